"""The coordinator: a deployment is the engine loop (``workers/engine.py``: request queue,
continuous batching, commits) over a ``RayExecutor`` (``cluster/ray_executor.py``: the
actors, the step channels, recovery). Each step is one message per actor, no Ray call;
the actors then run the same sequence of collectives among themselves.
"""

from __future__ import annotations

import logging


from raymoe.cluster.bootstrap import connect
from raymoe.cluster.config import DeploymentConfig, DeploymentConfigError
from raymoe.cluster.ray_executor import RayExecutor
from raymoe.cluster.recovery import Recovery
from raymoe.workers.engine import Engine
from raymoe.workers.generation_config import load_generation_config
from raymoe.workers.model.attention import cache_shapes
from raymoe.workers.model.checkpoint import Checkpoint
from raymoe.workers.model.dtypes import checkpoint_dtype
from raymoe.workers.model.quantized_experts import ExpertQuantizationError, check_quantizable
from raymoe.workers.reference import eos_ids
from raymoe.workers.scheduler import Scheduler
from raymoe.workers.stats import RuntimeStats
from raymoe.workers.tokenizer import load_tokenizer

log = logging.getLogger("raymoe")


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
            raise DeploymentConfigError(f"placement.plan ({name})", have,
                                        f"the deployment needs {want}; rebuild the plan with `raymoe plan`")


class Deployment(Engine):
    """Front-end + expert ranks on Ray, serving one model: the engine loop over a
    ``RayExecutor``. Use as a context manager or call ``shutdown()``; a second deployment
    can follow in the same process."""

    def __init__(self, config: DeploymentConfig, plan=None):
        self.config = config
        # Everything that can be wrong with the checkpoint is reported here, before any actor starts.
        ckpt = Checkpoint(config.model, config.moge_groups)
        ckpt.check_shapes()  # from the shard headers: a wrong shape would otherwise fail inside the actors
        if config.check_finite:
            ckpt.check_finite()
        self.model_config = model = ckpt.config
        q = config.quantization
        try:  # the dimensions the int4 kernel takes (where the actors run is checked when they start)
            check_quantizable(q.experts, q.group_size, model.hidden_size, model.moe_intermediate_size, "cpu")
        except ExpertQuantizationError as exc:
            raise DeploymentConfigError(exc.field, exc.value, exc.fix) from None
        if plan is None:
            plan = resolve_plan(config, len(model.moe_layer_ids), model.num_experts)
        else:
            check_plan(plan, config.expert_ranks, len(model.moe_layer_ids), model.num_experts)
        tokenizer = load_tokenizer(config.model)
        self.generation = load_generation_config(config.model)
        b = config.batching
        eos = eos_ids(model.eos_token_ids, tokenizer, model.vocab_size, self.generation.eos_token_ids)
        self.executor = RayExecutor(config, plan, checkpoint_dtype(ckpt.raw_config), cache_shapes(model))
        connect(config.ray)
        try:
            self.executor.start()
        except BaseException:
            self.shutdown()
            raise
        # the KV pool is sized once the actors' dtype is known (on GPUs `dtype: auto` may halve a token's bytes)
        scheduler = Scheduler(b.max_seqs, b.max_seq_len, eos, tokenizer, model.vocab_size, self.executor.actors.kv,
                              b.max_num_batched_tokens, b.prefix_caching)
        super().__init__(self.executor, scheduler, tokenizer, b.max_queue)

    # -- what the executor holds ---------------------------------------------------------
    @property
    def plan(self):
        return self.executor.plan

    @property
    def maps(self):
        return self.executor.maps

    @property
    def stats(self) -> RuntimeStats:
        return self.executor.stats

    @property
    def recoveries(self) -> list[Recovery]:
        return self.executor.recovery.recoveries

    @property
    def actors(self) -> list:
        return self.executor.actors.actors

    @property
    def frontend(self):
        return self.executor.actors.frontend

    @property
    def workers(self) -> list:
        return self.executor.actors.workers

    @property
    def standby(self):
        return self.executor.actors.standby

    @property
    def backend(self) -> str:
        return self.executor.actors.backend

    @property
    def dtype(self) -> str:
        """What the actors compute in: the config's ``dtype``, ``auto`` resolved (``workers/model/dtypes.py``)."""
        return self.executor.actors.dtype_name

    @property
    def rendezvous(self) -> str:
        return self.executor.actors.rendezvous

    # -- operations -------------------------------------------------------------------------
    def set_plan(self, plan) -> dict:
        """Switch to a new placement plan between steps: expert weights move between the
        ranks over the process group (``workers/replan.py``), and the next step dispatches
        by the new plan. Running requests carry on (their KV caches stay). Returns what
        moved: ``{"experts": copies sent, "bytes": bytes sent, "collectives": per actor,
        "seconds": s}``. If an actor fails meanwhile, every actor is restarted with the
        new plan and the running requests replay."""
        check_plan(plan, self.config.expert_ranks, len(self.model_config.moe_layer_ids), self.model_config.num_experts)
        moved, lost = self.executor.set_plan(plan)
        if lost:
            self.scheduler.forget_kv()
        return moved

    def restore(self) -> None:
        """Wait for replacements still loading after a fallback and restore the full plan
        (``set_plan`` does this first; also useful before measuring)."""
        self.executor.recovery.restore_if_ready(wait=True)

    def record_trace(self, enabled: bool = True) -> None:
        self.executor.record_trace(enabled)

    def save_trace(self, path: str) -> int:
        """Write the routing trace (docs/formats.md); returns the number of tokens in it."""
        return self.executor.save_trace(path)

    def expert_loads(self):
        """Tokens per expert per MoE layer ``[L, E]`` since ``record_trace()``."""
        return self.executor.expert_loads()

    def shutdown(self) -> None:
        """Kill the actors (ending their process-group membership) and free the placement group."""
        self.executor.shutdown()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
