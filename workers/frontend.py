"""FrontEnd: a Ray actor that runs everything but the routed experts.

Embeddings, attention with the KV cache, dense layers, routers, shared experts, final
norm, LM head and sampling. Per MoE layer it packs the routed tokens by expert rank and
moves them with one all-to-all each way (``workers/dispatch/disaggregated.py``).
"""

from __future__ import annotations

import time

import torch

from raymoe.workers.dispatch.collectives import Collectives
from raymoe.workers.dispatch.disaggregated import Packed, exchange_outputs, exchange_tokens, pack, unpack
from raymoe.workers.expert_map import LayerMap
from raymoe.workers.guided import model_guides
from raymoe.workers.model.checkpoint import load_model
from raymoe.workers.model.kv_cache import KVLayout
from raymoe.workers.model.router import Routing
from raymoe.workers.rank import RankActor
from raymoe.workers.reference import checkpoint_eos_ids
from raymoe.workers.replan import MoveStats, move_experts
from raymoe.workers.runner import ModelRunner
from raymoe.workers.stats import LayerTraffic
from raymoe.workers.step import StepInput, StepOutput


class DispatchingExperts:
    """The front-end's ExpertExecutor: routed experts run on the expert ranks.

    Per MoE layer and micro-batch: 1 dispatch all-to-all + 1 combine all-to-all (fixed
    capacity C = T rows per expert rank, ``workers/dispatch/disaggregated.py``), in the
    order every expert rank runs in ``ExpertWorker.step``. Called whole (``__call__``) or
    cut at its collectives (``send`` / ``receive``, for two micro-batches).
    """

    def __init__(self, maps: list[LayerMap], collectives: Collectives, expert_base: int, dtype: torch.dtype):
        self.maps, self.collectives, self.expert_base, self.dtype = maps, collectives, expert_base, dtype
        self.layers: dict[int, LayerTraffic] = {}  # per MoE layer, the front-end's part; the ranks report theirs
        self._counts: dict[int, list[torch.Tensor]] = {}  # per MoE layer: [pairs, rows] per rank, on device
        self.seconds = {"dispatch": 0.0, "combine_wait": 0.0}

    def __call__(self, moe_index: int, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return self.receive(self.send(moe_index, layer, x, routing))

    def send(self, moe_index: int, layer: int, x: torch.Tensor, routing: Routing) -> tuple[int, Packed, torch.Tensor]:
        """Pack and dispatch one micro-batch's tokens of MoE layer ``moe_index``."""
        started = time.perf_counter()
        before = self.collectives.snapshot()
        packed = pack(x, routing.topk_ids, routing.topk_weights, self.maps[moe_index])
        exchange_tokens(packed.rows, packed.capacity, self.collectives, self.expert_base)
        self._add(moe_index, packed, self.collectives.snapshot() - before)
        self.seconds["dispatch"] += time.perf_counter() - started
        return moe_index, packed, x.new_empty(0, x.shape[1])

    def receive(self, sent: tuple[int, Packed, torch.Tensor]) -> torch.Tensor:
        """Wait for the combine of what ``send`` dispatched: ``[T, D]``."""
        started = time.perf_counter()
        moe_index, packed, nothing = sent
        before = self.collectives.snapshot()
        back = exchange_outputs(nothing, packed.capacity, self.collectives, self.expert_base)
        self._add(moe_index, None, self.collectives.snapshot() - before)
        out = unpack(back, packed)
        self.seconds["combine_wait"] += time.perf_counter() - started
        return out

    def _add(self, moe_index: int, packed: Packed | None, moved) -> None:
        traffic = LayerTraffic.of([], [], moved)
        earlier = self.layers.get(moe_index)
        self.layers[moe_index] = traffic if earlier is None else earlier.followed_by(traffic)
        if packed is not None:
            counts = [packed.pairs_per_rank, packed.rows_per_rank]
            if moe_index in self._counts:
                counts = [a + b for a, b in zip(self._counts[moe_index], counts)]
            self._counts[moe_index] = counts

    def traffic(self) -> list[LayerTraffic]:
        """Every layer's traffic, the routing counts read back once for the whole step."""
        layers = [self.layers[i] for i in sorted(self.layers)]
        if self._counts:
            counts = torch.stack([torch.stack(self._counts[i]) for i in sorted(self._counts)]).tolist()  # [L, 2, R]
            for layer, (pairs, rows) in zip(layers, counts):
                layer.pairs_per_rank, layer.rows_per_rank = pairs, rows
        return layers


class FrontEnd(RankActor):
    def __init__(self, model_path: str, dtype: torch.dtype, maps: list[LayerMap], max_seqs: int, kv: KVLayout,
                 moge_groups: int | None = None, threads: int = 1, expert_base: int = 1):
        super().__init__(threads)
        model = load_model(model_path, dtype, moge_groups, with_experts=False).to(self.device)
        guides = model_guides(model_path, model.config.vocab_size, checkpoint_eos_ids(model_path, model.config))
        self.runner = ModelRunner(model, max_seqs, kv, self.device, guides=guides)
        self.dtype, self.expert_base = dtype, expert_base
        self.maps = [m.to(self.device) for m in maps]
        self.expert_shape = (model.config.hidden_size, model.config.moe_intermediate_size)

    def record_trace(self, enabled: bool) -> None:
        self.runner.record_trace(enabled)

    def save_trace(self, path: str) -> int:
        self.runner.recorder.save(path)
        return int(self.runner.recorder.topk_ids.shape[0])

    def expert_loads(self):
        """Tokens per expert per MoE layer seen since ``record_trace(True)``, or None."""
        return self.runner.recorder.loads() if self.runner.recorder else None

    def adopt_maps(self, maps: list[LayerMap], expert_rank: int | None = None) -> None:
        """Dispatch by ``maps`` from the next step on (no weights move: a failed rank's
        slots taken out of use, or back)."""
        self.maps = [m.to(self.device) for m in maps]

    def set_maps(self, maps: list[LayerMap]) -> MoveStats:
        """Take part in a plan change (the front-end holds no experts: it sends and
        receives nothing) and dispatch by the new plan from the next step on."""
        _, stats = move_experts(None, self.maps, maps, None, self.expert_base, self.collectives,
                                self.expert_shape, self.dtype, self.device)
        self.maps = [m.to(self.device) for m in maps]
        return stats

    def step(self, step: StepInput) -> StepOutput:
        """One forward pass + sampling. The expert ranks must run ``step`` at the same time."""
        started = time.perf_counter()
        experts = DispatchingExperts(self.maps, self.collectives, self.expert_base, self.dtype)
        out = self.runner.run(step, experts)
        waited = experts.seconds["dispatch"] + experts.seconds["combine_wait"]
        out.stats.layers, out.stats.micro_batches = experts.traffic(), max(1, len(step.micro_batches))
        out.stats.seconds.update(attention=time.perf_counter() - started - waited,
                                 dispatch=experts.seconds["dispatch"], combine=experts.seconds["combine_wait"])
        if not step.return_logits:
            out.logits = None  # not shipped back to the coordinator unless asked for
        return out
