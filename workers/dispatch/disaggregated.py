"""The disaggregated layout's data plane: the front-end moves each MoE layer's tokens to the
expert ranks that hold their experts and brings the results back, one
``all_to_all_single`` per direction and nothing else.

Capacity, not metadata. A token goes to an expert rank at most once (its pairs on that
rank travel in one row), so a rank receives at most T rows from a front-end with T
tokens. The front-end therefore sends every expert rank exactly C = T rows, padding rows
carrying local ids -1 (no expert computes them), and every rank knows every split from
T alone, which the step's message gives each expert rank. There is no split-size
exchange and no host sync of counts (the design of DeepEP's low-latency mode); the
bytes counted include the padding.

Each direction is split in three, the Megatron-Core shape: a local preprocess, one
communication ("all ranks must call this"), a local postprocess:

    front-end                                  expert rank r
    pack (rows for every rank, padded)
    exchange_tokens  ------ dispatch ----->    exchange_tokens (C rows from the front-end)
                                               run_experts (its slots of each row)
    exchange_outputs <------ combine ------    exchange_outputs (C partial sums back)
    unpack (sum each token's partials)

Shapes: T = tokens at the front-end, A = activated experts per token, D = hidden,
R = expert ranks, C = capacity (= T), W = world size (front-end ranks first, then expert
ranks), F = front-end ranks (1 today; the splits are written for F).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.workers.dispatch.collectives import Collectives
from raymoe.workers.dispatch.compute import weighted_experts
from raymoe.workers.dispatch.wire import decode_rows, row_bytes
from raymoe.workers.expert_map import LayerMap
from raymoe.workers.model.experts import ExpertStack


@dataclass(frozen=True)
class Packed:
    """The dispatch send buffer of one front-end, and what its combine needs."""

    rows: torch.Tensor  # uint8 [R * C, row_bytes]: rank r's block at [r * C, (r + 1) * C); row t = token t
    on_rank: torch.Tensor  # bool [R, T, A]: pair (t, a) runs on rank r

    @property
    def capacity(self) -> int:
        return self.on_rank.shape[1]

    @property
    def rows_per_rank(self) -> torch.Tensor:
        """int64 [R]: rows that are not padding (tokens with an expert on the rank)."""
        return self.on_rank.any(2).sum(1)

    @property
    def pairs_per_rank(self) -> torch.Tensor:
        """int64 [R]: (token, expert) pairs each rank computes."""
        return self.on_rank.sum((1, 2))


def pack(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer_map: LayerMap) -> Packed:
    """Dispatch preprocess (local): ``x [T, D]`` routed by ``topk_ids/topk_weights [T, A]``.

    Rank r's block holds one row per token, in token order (C = T): token t's x, the
    local slots of its pairs on rank r (-1 for the pairs elsewhere; all -1 makes it a
    padding row, which no expert computes) and their weights. A handful of device ops and
    no host sync: nothing is compacted, so nothing needs counting first."""
    tokens, top_k = topk_ids.shape
    ranks = layer_map.num_ranks
    pair_rank, pair_local = layer_map.ranks_and_locals(topk_ids)  # [T, A] each
    on_rank = pair_rank[None] == torch.arange(ranks, device=x.device)[:, None, None]  # [R, T, A]
    ids = torch.where(on_rank, pair_local.to(torch.int32)[None], -1)
    weights = torch.where(on_rank, topk_weights.float()[None], 0.0)
    if tokens == 0:  # an empty tensor may carry strides that refuse a byte view
        return Packed(torch.empty(0, row_bytes(x.shape[1], top_k, x.dtype), dtype=torch.uint8, device=x.device),
                      on_rank)
    rows = torch.cat([x.contiguous().view(torch.uint8).expand(ranks, tokens, -1),
                      ids.view(torch.uint8), weights.view(torch.uint8)], 2)
    return Packed(rows.reshape(ranks * tokens, rows.shape[2]), on_rank)


def _splits(collectives: Collectives, frontends: int, capacity: int) -> tuple[list[int], list[int]]:
    """(front-end -> expert splits as the front-end sends them, as an expert rank receives them)."""
    world = collectives.world
    return [0] * frontends + [capacity] * (world - frontends), [capacity] * frontends + [0] * (world - frontends)


def exchange_tokens(rows: torch.Tensor, capacity: int, collectives: Collectives, frontends: int = 1) -> torch.Tensor:
    """Dispatch communicate. All ranks of the group must call this, in the same order.

    A front-end passes its ``Packed.rows`` and gets nothing back; an expert rank passes an
    empty ``[0, row_bytes]`` and gets ``[F * C, row_bytes]``: C rows from each front-end."""
    to_experts, from_frontends = _splits(collectives, frontends, capacity)
    nothing = [0] * collectives.world
    if collectives.rank < frontends:
        return collectives.all_to_all("dispatch", rows, to_experts, nothing)
    return collectives.all_to_all("dispatch", rows, nothing, from_frontends)


def run_experts(recv: torch.Tensor, stack: ExpertStack, hidden: int, top_k: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Expert-rank compute (local): received rows -> weighted sums of their experts ``[N, D]``
    (padding rows: zero), and the number of pairs computed."""
    x, ids, weights = decode_rows(recv, hidden, top_k, dtype)
    return weighted_experts(x, ids, weights, stack)


def exchange_outputs(out: torch.Tensor, capacity: int, collectives: Collectives, frontends: int = 1) -> torch.Tensor:
    """Combine communicate. All ranks of the group must call this, in the same order.

    An expert rank passes its ``[F * C, D]`` results and gets nothing back; a front-end
    passes an empty ``[0, D]`` and gets ``[R * C, D]``: rank r's rows at ``[r * C, (r+1) * C)``."""
    to_experts, from_frontends = _splits(collectives, frontends, capacity)
    nothing = [0] * collectives.world
    if collectives.rank < frontends:
        return collectives.all_to_all("combine", out, nothing, to_experts)
    return collectives.all_to_all("combine", out, from_frontends, nothing)


def unpack(back: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Combine postprocess (local): the ranks' partial sums ``[R * C, D]`` -> ``[T, D]``
    (a token's row on a rank that computed none of its pairs is zero), added in rank order."""
    ranks, tokens, _ = packed.on_rank.shape
    parts = back.view(ranks, tokens, back.shape[1])
    return parts[0] if ranks == 1 else parts.sum(0)
