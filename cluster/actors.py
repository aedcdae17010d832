"""The actors of one deployment on Ray: their placement group, their processes and process
groups, the standby, and the step channels to them.

Actor ``index`` is its process-group rank: disaggregated, 0 is the front-end and index i
is expert rank i - 1; coherent, index i is rank i. Every actor is threaded
(``max_concurrency=2``): one thread runs its step loop (``serve``), the other takes Ray
calls (``join``, ``leave``, plan changes, ``where``), which the coordinator sends only
between steps.
"""

from __future__ import annotations

import logging

import ray
import torch
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raymoe.cluster.bootstrap import cluster_gpus, create_placement_group
from raymoe.cluster.config import DeploymentConfig, DeploymentConfigError, memory_bytes
from raymoe.cluster.multinode import bundle_label_selectors, check_pinning
from raymoe.cluster.recovery import wait_all
from raymoe.cluster.step_channels import StepChannels
from raymoe.workers.coherent import CoherentRank
from raymoe.workers.expert_map import LayerMap, without_ranks
from raymoe.workers.experts import ExpertWorker
from raymoe.workers.frontend import FrontEnd
from raymoe.workers.model.dtypes import DTYPES
from raymoe.workers.model.dtypes import resolve as resolve_dtype
from raymoe.workers.model.kv_cache import KVCacheBudgetError, KVLayout, kv_layout
from raymoe.workers.model.quantized_experts import ExpertQuantizationError, check_device
from raymoe.workers.process_group import data_plane, pick_backend

log = logging.getLogger("raymoe")

CONCURRENCY = 2  # the step loop + one Ray call at a time


class ActorSet:
    def __init__(self, config: DeploymentConfig, plan, maps: list[LayerMap], declared_dtype: str | None,
                 cache_shapes: list):
        """``declared_dtype``: the checkpoint's (``workers/model/dtypes.checkpoint_dtype``), for
        ``dtype: auto``, resolved at ``start`` once the actors' GPUs are known; the KV pool
        (``kv``) is sized from ``batching`` and ``cache_shapes`` in that dtype."""
        self.config, self.plan, self.maps, self.declared_dtype = config, plan, maps, declared_dtype
        self.cache_shapes = cache_shapes
        self.dtype_name, self.dtype_reason = resolve_dtype(config.dtype, declared_dtype, on_gpu=False)
        self.kv = self._kv_layout()  # refuses a budget too small for one sequence before anything starts
        self.world = config.expert_ranks + (config.layout == "disaggregated")
        self.quantization = (config.quantization.experts, config.quantization.group_size)
        self.actors: list = []
        self.standby = None  # an ExpertWorker holding no experts, or None
        self.placement_group = None
        self.channels = StepChannels()
        self._channel_of: dict[int, object] = {}  # actor index -> the actor handle its channel belongs to
        self.rendezvous = ""

    # -- start ----------------------------------------------------------------------------
    def start(self) -> None:
        c, res = self.config, self.config.resources
        self.gpus = self._gpus_per_actor(res.gpus_per_actor)
        self.dtype_name, self.dtype_reason = resolve_dtype(c.dtype, self.declared_dtype, on_gpu=self.gpus > 0)
        self.kv = self._kv_layout()
        try:
            check_device(c.quantization.experts, "cuda" if self.gpus else "cpu")
        except ExpertQuantizationError as exc:
            raise DeploymentConfigError(exc.field, exc.value, exc.fix) from None
        if c.backend == "nccl" and self.gpus < 1:
            raise DeploymentConfigError("backend", "nccl", f"NCCL needs a whole GPU per actor and this deployment "
                                        f"gives each {self.gpus:g} (resources.gpus_per_actor, GPUs in the cluster); "
                                        "use auto or gloo")
        # gloo or nccl until the actors' nodes are known; join_all may pick the same-node transport
        self.backend = pick_backend(c.backend, self.gpus) if self.gpus else "gloo"
        bundle = {"CPU": res.cpus_per_actor, **({"GPU": self.gpus} if self.gpus else {})}
        check_pinning(c, self.plan)
        plural = "s" if c.expert_ranks > 1 else ""
        described = f"{c.expert_ranks} rank{plural}" if c.layout == "coherent" else \
            f"front-end + {c.expert_ranks} expert rank{plural}"
        self.placement_group = create_placement_group([dict(bundle) for _ in range(self.world)], c.ray.strategy,
                                                      label_selectors=bundle_label_selectors(
                                                          self.plan, c.layout, c.ray.node_label), actors=described)
        self.actors = [self.new_actor(index) for index in range(self.world)]
        self.standby = self.new_standby()  # starts alongside the actors
        self.join_all()
        if self.standby is not None:
            ray.get(self.standby.where.remote())  # up before the first step, ready to step in
        log.info("%s deployment up: %d expert ranks, dtype %s (%s), backend %s, rendezvous %s",
                 c.layout, c.expert_ranks, self.dtype_name, self.dtype_reason, self.backend, self.rendezvous)

    def _kv_layout(self) -> KVLayout:
        b = self.config.batching
        try:
            return kv_layout(self.cache_shapes, DTYPES[self.dtype_name], memory_bytes(b.kv_cache_memory),
                             b.max_seq_len, b.block_size)
        except KVCacheBudgetError as exc:
            raise DeploymentConfigError("batching.kv_cache_memory", b.kv_cache_memory, exc.fix) from None

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

    def new_actor(self, index: int):
        """A fresh actor for position ``index`` of the placement group (it loads its weights)."""
        c, res = self.config, self.config.resources
        options = dict(num_cpus=res.cpus_per_actor, num_gpus=self.gpus, max_restarts=0, max_concurrency=CONCURRENCY,
                       scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, index))
        if c.layout == "coherent":  # every rank is a front-end and an expert rank
            return ray.remote(CoherentRank).options(**options).remote(
                c.model, self.dtype, index, self.maps, c.batching.max_seqs, self.kv, c.moge_groups,
                res.threads_per_actor, self.quantization)
        if index == 0:
            return ray.remote(FrontEnd).options(**options).remote(
                c.model, self.dtype, self.maps, c.batching.max_seqs, self.kv, c.moge_groups, res.threads_per_actor, 1)
        return ray.remote(ExpertWorker).options(**options).remote(
            c.model, self.dtype, index - 1, self.maps, c.moge_groups, res.threads_per_actor, self.quantization)

    def new_standby(self):
        """A spare ExpertWorker holding no experts, outside the placement group (it needs
        no resources until it serves), when a failed expert rank could fall back to
        replicas: disaggregated, gloo, and some rank's experts all replicated elsewhere."""
        c = self.config
        if not c.recovery.fallback_to_replicas or c.layout != "disaggregated" or self.backend == "nccl" or \
                all(without_ranks(self.maps, {r}) is None for r in range(c.expert_ranks)):
            return None
        return ray.remote(ExpertWorker).options(num_cpus=0, max_restarts=0, max_concurrency=CONCURRENCY).remote(
            c.model, self.dtype, None, None, c.moge_groups, c.resources.threads_per_actor, self.quantization)

    def join_all(self) -> None:
        """Every actor joins new process groups, meeting at a fresh address on rank 0's node,
        and every actor without a step loop gets one. Waits for every actor to be up first
        (the join must not time out on a slow start)."""
        where = ray.get([a.where.remote() for a in self.actors])
        if self.backend != "nccl":
            try:
                self.backend = data_plane("gloo", self.config.backend, [w["node_ip"] for w in where], self.gpus)
            except ValueError as exc:
                raise DeploymentConfigError("backend", self.config.backend, str(exc)) from None
        self.rendezvous = ray.get(self.actors[0].rendezvous.remote())
        ray.get([a.join.remote(self.backend, self.rendezvous, rank, self.world, self.config.collective_timeout_s)
                 for rank, a in enumerate(self.actors)])
        for index, actor in enumerate(self.actors):
            if self._channel_of.get(index) is not actor:
                self.channels.open(index, actor)
                self._channel_of[index] = actor

    @property
    def dtype(self) -> torch.dtype:
        """What the actors compute in (``dtype_name``; ``auto`` resolved by ``start``)."""
        return DTYPES[self.dtype_name]

    # -- calls -----------------------------------------------------------------------------
    @property
    def frontend(self):
        return self.actors[0]

    @property
    def workers(self) -> list:
        return self.actors[1:]

    def wait(self, refs: list) -> list:
        """Ray calls' results, or StepFailure (``cluster/recovery.py``)."""
        r = self.config.recovery
        return wait_all(refs, r.settle_s, r.step_timeout_s)

    def step(self, messages: dict[int, tuple]) -> dict[int, object]:
        """One step over the channels: ``(method, args)`` per actor index; their replies."""
        r = self.config.recovery
        return self.channels.call(messages, r.settle_s, r.step_timeout_s)

    def replace(self, index: int, actor) -> None:
        """Put ``actor`` at ``index`` (its step loop starts at the next ``join_all``)."""
        self.channels.close(index)
        self._channel_of.pop(index, None)
        self.actors[index] = actor

    # -- stop ------------------------------------------------------------------------------
    def shutdown(self, extra: list = ()) -> None:
        """Kill the actors (ending their process-group membership) and free the placement group."""
        self.channels.close_all()
        self._channel_of = {}
        spares = [self.standby] if self.standby is not None else []
        for actor in [*self.actors, *spares, *extra]:
            ray.kill(actor, no_restart=True)
        self.actors, self.standby = [], None
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
