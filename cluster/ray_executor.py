"""The Ray executor: runs each step on a deployment's actors, with no Ray call per step.

A step is one message to each actor over its channel (``cluster/step_channels.py``): the
front-end gets the step input, each expert rank the step number and token count; the
actors then run the step's collectives among themselves and answer. Per step, every
actor's counted collectives are merged into one ``StepStats``.

When a step fails (an actor died or hung), the recovery policy (``cluster/recovery.py``)
replaces what failed and rebuilds the process groups, and ``execute`` raises ``Replay``:
the engine then runs the step again from the sequences' committed tokens. After
``recovery.max_attempts`` recoveries of one step the failure is raised.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import ray
import torch

from raymoe.cluster.actors import ActorSet
from raymoe.cluster.config import DeploymentConfig, DeploymentConfigError
from raymoe.cluster.multinode import bundle_label_selectors, check_pinning
from raymoe.cluster.recovery import RecoveryPolicy, StepFailure
from raymoe.workers.engine import Replay
from raymoe.workers.expert_map import layer_maps
from raymoe.workers.overlap import OverlapRule
from raymoe.workers.stats import LayerTraffic, RuntimeStats, StepStats
from raymoe.workers.step import StepInput, StepOutput


class RayExecutor:
    """Front-end + expert ranks (or coherent ranks) on Ray, running steps."""

    def __init__(self, config: DeploymentConfig, plan, declared_dtype: str | None, cache_shapes: list):
        self.config, self.plan = config, plan
        self.maps = layer_maps(plan)
        self.stats = RuntimeStats()
        self.actors = ActorSet(config, plan, self.maps, declared_dtype, cache_shapes)
        self.recovery = RecoveryPolicy(self.actors, config)
        self._attempts: dict[int, int] = {}  # step id -> recoveries so far
        self.overlap = OverlapRule(config.batching.overlap)  # two micro-batches per decode step, or not

    def start(self) -> None:
        self.actors.start()

    # -- one step -------------------------------------------------------------------------
    def execute(self, step: StepInput) -> StepOutput:
        """Run ``step``; after a recovery raise ``Replay`` (module docstring)."""
        started = time.perf_counter()
        try:
            self.recovery.restore_if_ready()
            out = self._execute_once(step)
        except StepFailure as failure:
            attempts = self._attempts.get(step.step_id, 0)
            if attempts >= self.config.recovery.max_attempts:
                self._attempts.pop(step.step_id, None)
                raise
            self._attempts[step.step_id] = attempts + 1
            self.recovery.recover(failure, step.step_id, time.perf_counter() - started, len(step.seqs))
            raise Replay(step.step_id) from failure
        self._attempts.pop(step.step_id, None)
        self.stats.add(out.stats)
        return out

    def _execute_once(self, step: StepInput) -> StepOutput:
        if self.config.layout == "coherent":
            return self._execute_coherent(step)
        decode = step.decode and not step.prompt_scores  # (prompt logprobs run whole)
        split = self.overlap.split(len(step.seqs), decode)
        if len(split) == 2:
            step = dataclasses.replace(step, micro_batches=split)
            tokens = split  # decode: a token per sequence
        else:
            tokens = (sum(len(s.tokens) for s in step.seqs),)  # every dispatch's capacity
        started = time.perf_counter()
        messages = {0: ("step", (step,))}
        messages.update({i: ("step", (step.step_id, tokens)) for i in range(1, len(self.actors.actors))})
        replies = self.actors.step(messages)
        self.overlap.observe(split, decode, time.perf_counter() - started)
        out, worker_stats = replies[0], [replies[i] for i in sorted(replies) if i]
        out.stats.layers = [functools.reduce(LayerTraffic.add, per_rank)  # the front-end's first: its routing
                            for per_rank in zip(out.stats.layers, *(w.layers for w in worker_stats), strict=True)]
        expert_seconds = max((w.expert_seconds for w in worker_stats), default=0.0)
        out.stats.seconds["experts"] = expert_seconds
        out.stats.seconds["combine"] = max(0.0, out.stats.seconds["combine"] - expert_seconds)
        out.stats.messages = len(messages)
        return out

    def _execute_coherent(self, step: StepInput) -> StepOutput:
        messages = {i: ("step", (step,)) for i in range(len(self.actors.actors))}
        replies = self.actors.step(messages)
        outs = [replies[i] for i in sorted(replies)]
        tokens = {b: t for out in outs for b, t in out.tokens.items()}
        assert sorted(tokens) == list(range(len(step.seqs))), "every sequence is sampled on exactly one rank"
        layers = [functools.reduce(LayerTraffic.add, per_rank) for per_rank in zip(*(o.layers for o in outs))]
        stats = StepStats(sum(len(s.tokens) for s in step.seqs), len(step.seqs), layers, messages=len(messages),
                          coherence_bytes=sum(o.coherence_bytes for o in outs),
                          coherence_collectives=outs[0].coherence_collectives)
        for phase in ("attention", "dispatch", "coherence"):
            stats.seconds[phase] = max(o.seconds[phase] for o in outs)
        logits = None
        if step.return_logits:
            merged = {b: v for out in outs for b, v in out.logits.items()}
            logits = torch.stack([merged[b] for b in range(len(step.seqs))])
        scores = {b: s for out in outs for b, s in out.logprobs.items()}
        logprobs = [scores.get(b) for b in range(len(step.seqs))] if scores else None
        prompt = {}  # each rank scored the prompt rows it hosted at the last layer: put them in row order
        for out in outs:
            for b, rows in out.prompt_logprobs.items():
                prompt.setdefault(b, []).extend(rows)
        prompt = {b: [entry for _, entry in sorted(rows, key=lambda r: r[0])] for b, rows in prompt.items()}
        return StepOutput([tokens[b] for b in range(len(step.seqs))], stats, logits, logprobs, prompt or None)

    # -- plan changes, traces ----------------------------------------------------------------
    def set_plan(self, plan) -> tuple[dict, bool]:
        """Switch to ``plan`` between steps: expert weights move between the ranks over the
        process group (``workers/replan.py``). Returns what moved (``experts``, ``bytes``,
        ``collectives`` per actor, ``seconds``) and whether the running sequences' KV caches
        were lost (an actor failed meanwhile: every actor restarts with the new plan)."""
        c = self.config
        check_pinning(c, plan)
        if c.quantization.experts != "none":
            raise DeploymentConfigError("quantization.experts", c.quantization.experts,
                                        "a live plan change moves float expert weights; with quantized experts it "
                                        "is not built: redeploy with the new plan")
        if c.ray.node_label and bundle_label_selectors(plan, c.layout, c.ray.node_label) \
                != bundle_label_selectors(self.plan, c.layout, c.ray.node_label):
            raise DeploymentConfigError("placement.plan", "nodes", "a live plan change keeps every rank on its node; "
                                        "redeploy to move ranks between nodes")
        self.recovery.restore_if_ready(wait=True)  # a fallback in progress ends first
        started = time.perf_counter()
        maps = layer_maps(plan)
        self.plan, self.maps = plan, maps
        self.actors.plan, self.actors.maps = plan, maps
        lost = False
        try:
            moved = self.actors.wait([a.set_maps.remote(maps) for a in self.actors.actors])
        except StepFailure as failure:
            self.recovery.recover(failure, -1, time.perf_counter() - started, 0, replace_all=True)
            moved, lost = [], True
        if self.actors.standby is None:  # the new plan may replicate a whole rank's experts
            self.actors.standby = self.actors.new_standby()
        return ({"experts": sum(m.experts_sent for m in moved), "bytes": sum(m.bytes_sent for m in moved),
                 "collectives": moved[0].collectives if moved else 0, "seconds": time.perf_counter() - started},
                lost)

    def record_trace(self, enabled: bool) -> None:
        if self.config.layout == "coherent":
            raise DeploymentConfigError("layout", "coherent", "record routing traces with the disaggregated layout "
                                        "or the reference engine (the routing is the same)")
        ray.get(self.actors.frontend.record_trace.remote(enabled))
        self.overlap.paused = enabled  # a trace records whole steps

    def save_trace(self, path: str) -> int:
        return ray.get(self.actors.frontend.save_trace.remote(str(path)))

    def expert_loads(self):
        return ray.get(self.actors.frontend.expert_loads.remote())

    def shutdown(self) -> None:
        self.actors.shutdown(extra=self.recovery.take_pending())
