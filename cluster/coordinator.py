"""The coordinator: owns a deployment's actors, its request queue and its step loop.

Each step it makes exactly one Ray call per actor (the front-end's carries the batch,
an expert rank's only the step number); the actors then run the same sequence of
collectives among themselves. Requests join between steps and leave when they finish
(continuous batching, ``workers/scheduler.py``).
"""

from __future__ import annotations

import functools
import logging
import time

import ray
import torch
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raymoe.cluster.bootstrap import cluster_gpus, connect, create_placement_group
from raymoe.cluster.config import DeploymentConfig, DeploymentConfigError
from raymoe.cluster.multinode import bundle_label_selectors, check_pinning
from raymoe.workers.process_group import pick_backend
from raymoe.cluster.recovery import Recovering, Recovery, StepFailure, wait_all
from raymoe.workers.coherent import CoherentRank
from raymoe.workers.engine import Engine
from raymoe.workers.expert_map import layer_maps, without_ranks
from raymoe.workers.experts import ExpertWorker
from raymoe.workers.frontend import FrontEnd
from raymoe.workers.model.checkpoint import Checkpoint
from raymoe.workers.reference import eos_ids
from raymoe.workers.scheduler import Scheduler
from raymoe.workers.stats import LayerTraffic, RuntimeStats, StepStats
from raymoe.workers.step import StepInput, StepOutput
from raymoe.workers.tokenizer import load_tokenizer

log = logging.getLogger("raymoe")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_plan(config: DeploymentConfig, num_moe_layers: int, num_experts: int):
    """The placement plan the config asks for, checked against the model."""
    from raymoe.placement.build import build_plan
    from raymoe.placement.plan import PlacementPlan

    if config.placement.plan:
        plan = PlacementPlan.load(config.placement.plan)
    else:
        plan = build_plan(config.placement.policy, num_layers=num_moe_layers, num_experts=num_experts,
                          num_ranks=config.expert_ranks)
    check_plan(plan, config.expert_ranks, num_moe_layers, num_experts)
    return plan


def check_plan(plan, expert_ranks: int, num_moe_layers: int, num_experts: int) -> None:
    for name, have, want in (("num_ranks", plan.num_ranks, expert_ranks), ("num_layers", plan.num_layers, num_moe_layers),
                             ("num_experts", plan.num_experts, num_experts)):
        if have != want:
            raise DeploymentConfigError(f"raymoe.placement.plan ({name})", have,
                                        f"the deployment needs {want}; rebuild the plan with `raymoe plan`")


class Deployment(Recovering, Engine):
    """Front-end + expert ranks on Ray, serving one model. Use as a context manager or
    call ``shutdown()``; a second deployment can follow in the same process."""

    def __init__(self, config: DeploymentConfig, plan=None):
        self.config = config
        self.dtype = DTYPES[config.dtype]
        # Everything that can be wrong with the checkpoint is reported here, before any actor starts.
        ckpt = Checkpoint(config.model, config.moge_groups)
        ckpt.check_shapes()  # from the shard headers: a wrong shape would otherwise fail inside the actors
        if config.check_finite:
            ckpt.check_finite()
        self.model_config = model = ckpt.config
        if plan is None:
            plan = resolve_plan(config, len(model.moe_layer_ids), model.num_experts)
        else:
            check_plan(plan, config.expert_ranks, len(model.moe_layer_ids), model.num_experts)
        self.plan = plan
        tokenizer = load_tokenizer(config.model)
        b = config.batching
        scheduler = Scheduler(b.max_seqs, b.max_seq_len, eos_ids(model.eos_token_ids, tokenizer, model.vocab_size),
                              tokenizer.decode if tokenizer else None, model.vocab_size)
        super().__init__(scheduler, tokenizer, b.max_queue)
        self.stats = RuntimeStats()
        self.recoveries: list[Recovery] = []
        self._pending: dict = {}
        self.actors: list = []
        self.placement_group = None
        connect(config.ray)
        try:
            self._start_actors()
        except BaseException:
            self.shutdown()
            raise

    # -- start and stop --------------------------------------------------------------
    def _start_actors(self) -> None:
        c, res = self.config, self.config.resources
        self.world = c.expert_ranks + (c.layout == "disaggregated")
        self.gpus = self._gpus_per_actor(res.gpus_per_actor)
        if c.backend == "nccl" and self.gpus < 1:
            raise DeploymentConfigError("backend", "nccl", f"NCCL needs a whole GPU per actor and this deployment "
                                        f"gives each {self.gpus:g} (resources.gpus_per_actor, GPUs in the cluster); "
                                        "use auto or gloo")
        self.backend = pick_backend(c.backend, self.gpus) if self.gpus else "gloo"
        bundle = {"CPU": res.cpus_per_actor, **({"GPU": self.gpus} if self.gpus else {})}
        check_pinning(c, self.plan)
        plural = "s" if c.expert_ranks > 1 else ""
        actors = f"{c.expert_ranks} rank{plural}" if c.layout == "coherent" else \
            f"front-end + {c.expert_ranks} expert rank{plural}"
        self.placement_group = create_placement_group([dict(bundle) for _ in range(self.world)], c.ray.strategy,
                                                      label_selectors=bundle_label_selectors(
                                                          self.plan, c.layout, c.ray.node_label), actors=actors)
        self.maps = layer_maps(self.plan)
        self.actors = [self._new_actor(index) for index in range(self.world)]
        self.standby = self._new_standby()  # starts alongside the actors
        self._join_all()
        if self.standby is not None:
            ray.get(self.standby.where.remote())  # up before the first step, ready to step in
        log.info("%s deployment up: %d expert ranks, backend %s, rendezvous %s",
                 c.layout, c.expert_ranks, self.backend, self.rendezvous)

    def _gpus_per_actor(self, requested) -> float:
        """``auto``: a whole GPU per actor when the cluster has enough, else an equal share
        of them (the actors then talk over gloo: NCCL refuses two ranks on one GPU)."""
        if requested != "auto":
            return float(requested)
        available = cluster_gpus()
        if available >= self.world or available == 0:
            return 1.0 if available else 0.0
        log.warning("%d actors and %g GPUs: each actor gets %.3g of a GPU and the ranks use gloo", self.world,
                    available, available / self.world)
        return available / self.world

    def _new_actor(self, index: int):
        """The actor at position ``index`` (= its process-group rank) of the placement group:
        coherent: rank ``index``; disaggregated: 0 the front-end, then expert rank ``index - 1``."""
        c, res = self.config, self.config.resources
        options = dict(num_cpus=res.cpus_per_actor, num_gpus=self.gpus, max_restarts=0,
                       scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, index))
        if c.layout == "coherent":  # every rank is a front-end and an expert rank
            return ray.remote(CoherentRank).options(**options).remote(
                c.model, self.dtype, index, self.maps, c.batching.max_seqs, c.moge_groups, res.threads_per_actor)
        if index == 0:
            return ray.remote(FrontEnd).options(**options).remote(
                c.model, self.dtype, self.maps, c.batching.max_seqs, c.moge_groups, res.threads_per_actor, 1)
        return ray.remote(ExpertWorker).options(**options).remote(
            c.model, self.dtype, index - 1, self.maps, c.moge_groups, res.threads_per_actor)

    def _new_standby(self):
        """A spare ExpertWorker holding no experts, outside the placement group (it needs
        no resources until it serves), when a failed expert rank could fall back to
        replicas: disaggregated, gloo, and some rank's experts all replicated elsewhere."""
        c = self.config
        if not c.recovery.fallback_to_replicas or c.layout != "disaggregated" or self.backend != "gloo" or \
                all(without_ranks(self.maps, {r}) is None for r in range(c.expert_ranks)):
            return None
        return ray.remote(ExpertWorker).options(num_cpus=0, max_restarts=0).remote(
            c.model, self.dtype, None, None, c.moge_groups, c.resources.threads_per_actor)

    def _join_all(self) -> None:
        """Every actor joins a new process group, meeting at a fresh address on rank 0's node.
        Waits for every actor to be up first (the join must not time out on a slow start)."""
        ray.get([a.where.remote() for a in self.actors])
        self.rendezvous = ray.get(self.actors[0].rendezvous.remote())
        ray.get([a.join.remote(self.backend, self.rendezvous, rank, self.world, self.config.collective_timeout_s)
                 for rank, a in enumerate(self.actors)])

    @property
    def frontend(self):
        return self.actors[0]

    @property
    def workers(self) -> list:
        return self.actors[1:]

    def shutdown(self) -> None:
        """Kill the actors (ending their process-group membership) and free the placement group."""
        spares = [self.standby] if self.standby is not None else []
        for actor in [*self.actors, *spares, *(replacement for replacement, _ in self._pending.values())]:
            ray.kill(actor, no_restart=True)
        self.actors, self.standby, self._pending = [], None, {}
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- one step ------------------------------------------------------------------
    def _execute(self, step: StepInput) -> StepOutput:
        """Run a step; when an actor dies or hangs, recover and replay it (``_recover``)."""
        r = self.config.recovery
        for attempt in range(r.max_attempts + 1):
            started = time.perf_counter()
            try:
                self._restore_if_ready()
                return self._execute_once(step)
            except StepFailure as failure:
                if attempt == r.max_attempts:
                    raise
                self._recover(failure, step.step_id, time.perf_counter() - started)
                step = self._replay(step)
        raise AssertionError("unreachable")

    def _execute_once(self, step: StepInput) -> StepOutput:
        """Exactly one Ray call per actor; the actors then run the step's collectives."""
        if self.config.layout == "coherent":
            return self._execute_coherent(step)
        refs = [self.frontend.step.remote(step)] + [w.step.remote(step.step_id) for w in self.workers]
        out, *worker_stats = self._wait(refs)
        out.stats.layers = [functools.reduce(LayerTraffic.add, per_rank)  # the front-end's first: its routing
                            for per_rank in zip(out.stats.layers, *(w.layers for w in worker_stats), strict=True)]
        expert_seconds = max((w.expert_seconds for w in worker_stats), default=0.0)
        out.stats.seconds["experts"] = expert_seconds
        out.stats.seconds["combine"] = max(0.0, out.stats.seconds["combine"] - expert_seconds)
        out.stats.ray_calls = len(refs)
        self.stats.add(out.stats)
        return out

    def _wait(self, refs: list) -> list:
        r = self.config.recovery
        return wait_all(refs, r.settle_s, r.step_timeout_s)

    # -- plan changes ----------------------------------------------------------------
    def set_plan(self, plan) -> dict:
        """Switch to a new placement plan between steps: expert weights move between the
        ranks over the process group (``workers/replan.py``), and the next step dispatches
        by the new plan. Running requests carry on (their KV caches stay). Returns what
        moved: ``{"experts": copies sent, "bytes": bytes sent, "collectives": per actor,
        "seconds": s}``. If an actor fails meanwhile, every actor is restarted with the
        new plan and the running requests replay."""
        check_plan(plan, self.config.expert_ranks, len(self.model_config.moe_layer_ids), self.model_config.num_experts)
        check_pinning(self.config, plan)
        if self.config.ray.node_label and bundle_label_selectors(plan, self.config.layout, self.config.ray.node_label) \
                != bundle_label_selectors(self.plan, self.config.layout, self.config.ray.node_label):
            raise DeploymentConfigError("raymoe.placement.plan", "nodes", "a live plan change keeps every rank on its node; "
                                        "redeploy to move ranks between nodes")
        self.restore()  # a fallback in progress ends first: every rank holds its own experts again
        started = time.perf_counter()
        maps = layer_maps(plan)
        self.plan, self.maps = plan, maps
        try:
            moved = self._wait([a.set_maps.remote(maps) for a in self.actors])
        except StepFailure as failure:
            self._recover(failure, -1, time.perf_counter() - started, replace_all=True)
            for seq in self.scheduler.running:
                seq.cached = 0
            moved = []
        if self.standby is None:  # the new plan may replicate a whole rank's experts
            self.standby = self._new_standby()
        return {"experts": sum(m.experts_sent for m in moved), "bytes": sum(m.bytes_sent for m in moved),
                "collectives": moved[0].collectives if moved else 0, "seconds": time.perf_counter() - started}

    def _execute_coherent(self, step: StepInput) -> StepOutput:
        outs = self._wait([rank.step.remote(step) for rank in self.actors])
        tokens = {b: t for out in outs for b, t in out.tokens.items()}
        assert sorted(tokens) == list(range(len(step.seqs))), "every sequence is sampled on exactly one rank"
        layers = [functools.reduce(LayerTraffic.add, per_rank) for per_rank in zip(*(o.layers for o in outs))]
        stats = StepStats(sum(len(s.tokens) for s in step.seqs), len(step.seqs), layers,
                          ray_calls=len(outs), coherence_bytes=sum(o.coherence_bytes for o in outs),
                          coherence_collectives=outs[0].coherence_collectives)
        for phase in ("attention", "dispatch", "coherence"):
            stats.seconds[phase] = max(o.seconds[phase] for o in outs)
        self.stats.add(stats)
        logits = None
        if step.return_logits:
            merged = {b: v for out in outs for b, v in out.logits.items()}
            logits = torch.stack([merged[b] for b in range(len(step.seqs))])
        return StepOutput([tokens[b] for b in range(len(step.seqs))], stats, logits)

    # -- traces ----------------------------------------------------------------------
    def record_trace(self, enabled: bool = True) -> None:
        if self.config.layout == "coherent":
            raise DeploymentConfigError("layout", "coherent", "record routing traces with the disaggregated layout "
                                        "or the reference engine (the routing is the same)")
        ray.get(self.frontend.record_trace.remote(enabled))

    def save_trace(self, path: str) -> int:
        """Write the routing trace (docs/formats.md); returns the number of tokens in it."""
        return ray.get(self.frontend.save_trace.remote(str(path)))

    def expert_loads(self):
        """Tokens per expert per MoE layer ``[L, E]`` since ``record_trace()``."""
        return ray.get(self.frontend.expert_loads.remote())
