"""ExpertWorker: a Ray actor that hosts one expert rank's slots and computes them.

It loads only its own experts' weights, straight from the safetensors shards.
"""

from __future__ import annotations

import time

import torch

from raymoe.workers.dispatch.collectives import Tally
from raymoe.workers.dispatch.disaggregated import exchange_outputs, exchange_tokens, run_experts
from raymoe.workers.dispatch.wire import row_bytes
from raymoe.workers.expert_map import LayerMap
from raymoe.workers.model.checkpoint import Checkpoint
from raymoe.workers.model.experts import ExpertStack
from raymoe.workers.model.quantized_experts import quantize_stack
from raymoe.workers.rank import RankActor
from raymoe.workers.replan import MoveStats, move_experts
from raymoe.workers.stats import LayerTraffic
from raymoe.workers.step import WorkerStepStats


def load_expert_stacks(ckpt: Checkpoint, maps: list[LayerMap], expert_rank: int, dtype: torch.dtype,
                       device: torch.device, quantization: tuple[str, int] = ("none", 32)) -> list:
    """One ``ExpertStack`` per MoE layer with this rank's slots, in slot order, read
    straight from the checkpoint's shards (no other expert is loaded); with
    ``quantization`` ``(mode, group_size)`` other than none, a ``QuantizedExpertStack``
    (``workers/model/quantized_experts.py``)."""
    config = ckpt.config
    stacks = []
    for layer, layer_map in zip(config.moe_layer_ids, maps):
        experts = list(layer_map.rank_experts[expert_rank])
        gate_up, down = ckpt.expert_weights(layer, experts, dtype)
        stack = ExpertStack(len(experts), config.hidden_size, config.moe_intermediate_size)
        stack.load_state_dict({"gate_up": gate_up, "down": down})
        stacks.append(quantize_stack(stack.to(device).eval(), *quantization))
    return stacks


def refuse_quantized_move(quantization: tuple[str, int]) -> None:
    """A live plan change moves expert weights as float tensors: not built for quantized ones."""
    if quantization[0] != "none":
        raise ValueError(f"a live plan change moves float expert weights; with quantization.experts "
                         f"{quantization[0]} it is not built: redeploy with the new plan instead")


class ExpertWorker(RankActor):
    """``expert_rank=None``: a standby, holding no expert until ``adopt_maps`` gives it the
    rank of a dead one whose experts all have replicas elsewhere (``cluster/coordinator.py``)."""

    def __init__(self, model_path: str, dtype: torch.dtype, expert_rank: int | None, maps: list[LayerMap],
                 moge_groups: int | None = None, threads: int = 1, quantization: tuple[str, int] = ("none", 32)):
        super().__init__(threads)
        self.quantization = quantization
        self.ckpt = Checkpoint(model_path, moge_groups)
        config = self.ckpt.config
        self.expert_rank, self.dtype, self.maps = expert_rank, dtype, maps
        self.hidden, self.top_k, self.inter = config.hidden_size, config.top_k, config.moe_intermediate_size
        self.row_bytes = row_bytes(config.hidden_size, config.top_k, dtype)
        self.stacks = load_expert_stacks(self.ckpt, maps, expert_rank, dtype, self.device, quantization) \
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
            self.stacks = load_expert_stacks(self.ckpt, maps, expert_rank, self.dtype, self.device,
                                             self.quantization)  # empty
        elif [m.rank_experts[self.expert_rank] for m in maps] != [m.rank_experts[self.expert_rank] for m in self.maps]:
            raise ValueError(f"expert rank {self.expert_rank}: these maps change its slots; use set_maps")
        self.maps = maps

    @torch.inference_mode()
    def set_maps(self, maps: list[LayerMap]) -> MoveStats:
        """Take up a new plan: expert weights move over the process group (``workers/replan.py``)."""
        refuse_quantized_move(self.quantization)
        self.stacks, stats = move_experts(self.stacks, self.maps, maps, self.expert_rank, self.rank - self.expert_rank,
                                          self.collectives, (self.hidden, self.inter), self.dtype, self.device)
        self.maps = maps
        return stats

    @torch.inference_mode()
    def step(self, step_id: int, tokens: tuple[int, ...]) -> WorkerStepStats:
        """Serve every MoE layer of one step: ``tokens`` = the front-end tokens of each
        micro-batch (the capacity of its dispatches). All ranks must call their step
        together: per layer, dispatch then combine, in layer order; with two micro-batches,
        in the interleaved order of ``workers/overlap.py``."""
        stats = WorkerStepStats()
        moved = [Tally.zero() for _ in self.stacks]  # per MoE layer: what this rank's collectives sent
        if len(tokens) == 2:
            self._step_two(tokens, stats, moved)
        else:
            for index, stack in enumerate(self.stacks):
                recv = self._counted(moved, index, exchange_tokens, self._nothing(), tokens[0], self.collectives)
                out = self._compute(recv, stack, stats, add=False)
                self._counted(moved, index, exchange_outputs, out, tokens[0], self.collectives)
        ranks = self.maps[0].num_ranks
        # bytes only: the front-end's part of the layer has the routing counts
        stats.layers = [LayerTraffic.of([0] * ranks, [0] * ranks, m) for m in moved]
        return stats

    def _step_two(self, tokens: tuple[int, int], stats: WorkerStepStats, moved: list[Tally]) -> None:
        """d0(0) d1(0) c0(0) d0(1) c1(0) d1(1) ...: compute one micro-batch while the
        front-end runs the other's attention."""
        layers, nothing, group = len(self.stacks), self._nothing(), self.collectives
        if not layers:
            return
        recv0 = self._counted(moved, 0, exchange_tokens, nothing, tokens[0], group)
        for index, stack in enumerate(self.stacks):
            out0 = self._compute(recv0, stack, stats, add=False)
            recv1 = self._counted(moved, index, exchange_tokens, nothing, tokens[1], group)
            self._counted(moved, index, exchange_outputs, out0, tokens[0], group)
            out1 = self._compute(recv1, stack, stats, add=True)
            if index + 1 < layers:
                recv0 = self._counted(moved, index + 1, exchange_tokens, nothing, tokens[0], group)
            self._counted(moved, index, exchange_outputs, out1, tokens[1], group)

    def _counted(self, moved: list[Tally], layer: int, collective, *args):
        before = self.collectives.snapshot()
        result = collective(*args)
        moved[layer] += self.collectives.snapshot() - before
        return result

    def _nothing(self) -> torch.Tensor:
        return torch.empty(0, self.row_bytes, dtype=torch.uint8, device=self.device)  # expert ranks send no tokens

    def _compute(self, recv: torch.Tensor, stack: ExpertStack, stats: WorkerStepStats, add: bool) -> torch.Tensor:
        started = time.perf_counter()
        out, pairs = run_experts(recv, stack, self.hidden, self.top_k, self.dtype)
        stats.expert_seconds += time.perf_counter() - started
        if add:
            stats.pairs[-1] += pairs
        else:
            stats.pairs.append(pairs)
        return out
