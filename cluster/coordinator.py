"""The coordinator: owns a deployment's actors, its request queue and its step loop.

Each step it makes exactly one Ray call per actor (the front-end's carries the batch,
an expert rank's only the step number); the actors then run the same sequence of
collectives among themselves. Requests join between steps and leave when they finish
(continuous batching, ``workers/scheduler.py``).
"""

from __future__ import annotations

import functools
import logging

import ray
import torch
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.bootstrap import cluster_gpus, connect, create_placement_group
from cluster.config import DeploymentConfig, DeploymentConfigError
from cluster.multinode import bundle_label_selectors, check_pinning
from cluster.process_group import pick_backend
from workers.coherent import CoherentRank
from workers.experts import ExpertWorker
from workers.expert_map import layer_maps
from workers.frontend import FrontEnd
from workers.engine import Engine
from workers.model.checkpoint import Checkpoint
from workers.reference import eos_ids
from workers.scheduler import Scheduler
from workers.stats import LayerTraffic, RuntimeStats, StepStats
from workers.step import StepInput, StepOutput
from workers.tokenizer import load_tokenizer

log = logging.getLogger("raymoe")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_plan(config: DeploymentConfig, num_moe_layers: int, num_experts: int):
    """The placement plan the config asks for, checked against the model."""
    from placement.plan import PlacementPlan, build_plan

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
            raise DeploymentConfigError(f"placement.plan ({name})", have,
                                        f"the deployment needs {want}; rebuild the plan with `raymoe plan`")


class Deployment(Engine):
    """Front-end + expert ranks on Ray, serving one model. Use as a context manager or
    call ``shutdown()``; a second deployment can follow in the same process."""

    def __init__(self, config: DeploymentConfig, plan=None):
        self.config = config
        self.dtype = DTYPES[config.dtype]
        # Everything that can be wrong with the checkpoint is reported here, before any actor starts.
        ckpt = Checkpoint(config.model, config.moge_groups)
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
        gpus = (1.0 if cluster_gpus() > 0 else 0.0) if res.gpus_per_actor == "auto" else float(res.gpus_per_actor)
        world = c.expert_ranks + (c.layout == "disaggregated")
        bundle = {"CPU": res.cpus_per_actor, **({"GPU": gpus} if gpus else {})}
        check_pinning(c, self.plan)
        self.placement_group = create_placement_group([dict(bundle) for _ in range(world)], c.ray.strategy,
                                                      label_selectors=bundle_label_selectors(
                                                          self.plan, c.layout, c.ray.node_label))

        def options(index: int) -> dict:
            return dict(num_cpus=res.cpus_per_actor, num_gpus=gpus, max_restarts=0,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, index))

        maps = layer_maps(self.plan)
        if c.layout == "coherent":  # every rank is a front-end and an expert rank
            self.actors = [ray.remote(CoherentRank).options(**options(r)).remote(
                c.model, self.dtype, r, maps, c.batching.max_seqs, c.moge_groups, res.threads_per_actor)
                for r in range(c.expert_ranks)]
        else:
            self.frontend = ray.remote(FrontEnd).options(**options(0)).remote(
                c.model, self.dtype, maps, c.batching.max_seqs, c.moge_groups, res.threads_per_actor, 1)
            self.workers = [
                ray.remote(ExpertWorker).options(**options(1 + r)).remote(
                    c.model, self.dtype, r, maps, c.moge_groups, res.threads_per_actor)
                for r in range(c.expert_ranks)
            ]
            self.actors = [self.frontend, *self.workers]
        address = ray.get(self.actors[0].rendezvous.remote())
        backend = pick_backend(c.backend) if gpus else "gloo"
        ray.get([a.join.remote(backend, address, rank, world, c.collective_timeout_s)
                 for rank, a in enumerate(self.actors)])
        self.rendezvous = address
        log.info("%s deployment up: %d expert ranks, backend %s, rendezvous %s",
                 c.layout, c.expert_ranks, backend, address)

    def shutdown(self) -> None:
        """Kill the actors (ending their process-group membership) and free the placement group."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- one step ------------------------------------------------------------------
    def _execute(self, step: StepInput) -> StepOutput:
        """Exactly one Ray call per actor; the actors then run the step's collectives."""
        if self.config.layout == "coherent":
            return self._execute_coherent(step)
        refs = [self.frontend.step.remote(step)] + [w.step.remote(step.step_id) for w in self.workers]
        out, *worker_stats = ray.get(refs)
        expert_seconds = max((w.expert_seconds for w in worker_stats), default=0.0)
        out.stats.seconds["experts"] = expert_seconds
        out.stats.seconds["combine"] = max(0.0, out.stats.seconds["combine"] - expert_seconds)
        out.stats.ray_calls = len(refs)
        self.stats.add(out.stats)
        return out

    def _execute_coherent(self, step: StepInput) -> StepOutput:
        outs = ray.get([rank.step.remote(step) for rank in self.actors])
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
