"""ExpertWorker: a Ray actor that hosts one expert rank's slots and computes them.

It loads only its own experts' weights, straight from the safetensors shards.
"""

from __future__ import annotations

import time

import torch

from raymoe.workers.dispatch.disaggregated import exchange_outputs, exchange_tokens, run_experts
from raymoe.workers.dispatch.wire import row_bytes
from raymoe.workers.expert_map import LayerMap
from raymoe.workers.model.checkpoint import Checkpoint
from raymoe.workers.model.experts import ExpertStack
from raymoe.workers.rank import RankActor
from raymoe.workers.replan import MoveStats, move_experts
from raymoe.workers.stats import LayerTraffic
from raymoe.workers.step import WorkerStepStats


def load_expert_stacks(ckpt: Checkpoint, maps: list[LayerMap], expert_rank: int, dtype: torch.dtype,
                       device: torch.device) -> list[ExpertStack]:
    """One ``ExpertStack`` per MoE layer with this rank's slots, in slot order, read
    straight from the checkpoint's shards (no other expert is loaded)."""
    config = ckpt.config
    stacks = []
    for layer, layer_map in zip(config.moe_layer_ids, maps):
        experts = list(layer_map.rank_experts[expert_rank])
        gate_up, down = ckpt.expert_weights(layer, experts, dtype)
        stack = ExpertStack(len(experts), config.hidden_size, config.moe_intermediate_size)
        stack.load_state_dict({"gate_up": gate_up, "down": down})
        stacks.append(stack.to(device).eval())
    return stacks


class ExpertWorker(RankActor):
    """``expert_rank=None``: a standby, holding no expert until ``adopt_maps`` gives it the
    rank of a dead one whose experts all have replicas elsewhere (``cluster/coordinator.py``)."""

    def __init__(self, model_path: str, dtype: torch.dtype, expert_rank: int | None, maps: list[LayerMap],
                 moge_groups: int | None = None, threads: int = 1):
        super().__init__(threads)
        self.ckpt = Checkpoint(model_path, moge_groups)
        config = self.ckpt.config
        self.expert_rank, self.dtype, self.maps = expert_rank, dtype, maps
        self.hidden, self.top_k, self.inter = config.hidden_size, config.top_k, config.moe_intermediate_size
        self.row_bytes = row_bytes(config.hidden_size, config.top_k, dtype)
        self.stacks = load_expert_stacks(self.ckpt, maps, expert_rank, dtype, self.device) \
            if expert_rank is not None else []

    def hosted(self) -> list[int]:
        """Number of expert slots per MoE layer held here."""
        return [s.num_experts for s in self.stacks]

    def adopt_maps(self, maps: list[LayerMap], expert_rank: int | None = None) -> None:
        """Dispatch tables that keep this rank's slots as they are (a failed peer's slots
        taken out of use, or back): no weight moves. A standby takes ``expert_rank``, which
        must hold no slot under ``maps``."""
        if self.expert_rank is None:
            if any(m.rank_experts[expert_rank] for m in maps):
                raise ValueError(f"a standby cannot take expert rank {expert_rank}: it holds slots under these maps")
            self.expert_rank = expert_rank
            self.stacks = load_expert_stacks(self.ckpt, maps, expert_rank, self.dtype, self.device)  # empty
        elif [m.rank_experts[self.expert_rank] for m in maps] != [m.rank_experts[self.expert_rank] for m in self.maps]:
            raise ValueError(f"expert rank {self.expert_rank}: these maps change its slots; use set_maps")
        self.maps = maps

    @torch.inference_mode()
    def set_maps(self, maps: list[LayerMap]) -> MoveStats:
        """Take up a new plan: expert weights move over the process group (``workers/replan.py``)."""
        self.stacks, stats = move_experts(self.stacks, self.maps, maps, self.expert_rank, self.rank - self.expert_rank,
                                          self.collectives, (self.hidden, self.inter), self.dtype, self.device)
        self.maps = maps
        return stats

    @torch.inference_mode()
    def step(self, step_id: int, tokens: int) -> WorkerStepStats:
        """Serve every MoE layer of one step of ``tokens`` front-end tokens (the capacity of
        every dispatch). All ranks must call their step together: per layer, dispatch then
        combine, in layer order."""
        stats = WorkerStepStats()
        ranks = self.maps[0].num_ranks
        nothing = torch.empty(0, self.row_bytes, dtype=torch.uint8, device=self.device)  # expert ranks send no tokens
        for stack in self.stacks:
            before = self.collectives.snapshot()
            recv = exchange_tokens(nothing, tokens, self.collectives)
            started = time.perf_counter()
            out, pairs = run_experts(recv, stack, self.hidden, self.top_k, self.dtype)
            stats.expert_seconds += time.perf_counter() - started
            stats.pairs.append(pairs)
            exchange_outputs(out, tokens, self.collectives)
            # bytes only: the front-end's part of the layer has the routing counts
            stats.layers.append(LayerTraffic.of([0] * ranks, [0] * ranks, self.collectives.snapshot() - before))
        return stats

