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
from raymoe.workers.dispatch.wire import decode_rows, encode_rows
from raymoe.workers.expert_map import LayerMap
from raymoe.workers.model.experts import ExpertStack


@dataclass(frozen=True)
class Packed:
    """The dispatch send buffer of one front-end, and what its combine needs."""

    rows: torch.Tensor  # uint8 [R * C, row_bytes]: rank r's rows at [r * C, (r + 1) * C)
    position: torch.Tensor  # int64 [R, T]: the row of token t in rank r's block, -1 if not sent there
    rows_per_rank: torch.Tensor  # int64 [R]: rows that are not padding
    pairs_per_rank: torch.Tensor  # int64 [R]: (token, expert) pairs each rank computes

    @property
    def capacity(self) -> int:
        return self.position.shape[1]


def pack(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer_map: LayerMap) -> Packed:
    """Dispatch preprocess (local): ``x [T, D]`` routed by ``topk_ids/topk_weights [T, A]``.

    Device ops only (no host sync): every index is computed, none read back."""
    tokens, top_k = topk_ids.shape
    ranks, device = layer_map.num_ranks, x.device
    token = torch.arange(tokens, device=device)
    slot = layer_map.slots(topk_ids, token)  # [T, A]; replicas chosen by the map's rule
    pair_rank, pair_local = layer_map.slot_rank[slot], layer_map.slot_local[slot]
    # Step 1: the (rank, token) rows that exist, each one's row in its rank's block.
    used = torch.zeros(ranks, tokens, dtype=torch.bool, device=device)
    used[pair_rank, token[:, None].expand(tokens, top_k)] = True
    position = torch.where(used, used.cumsum(1) - 1, -1)  # [R, T]
    # Step 2: which token fills each row (a padding row keeps token 0: its ids say "none").
    capacity = tokens
    flat = torch.where(used, torch.arange(ranks, device=device)[:, None] * capacity + position, ranks * capacity)
    token_at = torch.zeros(ranks * capacity + 1, dtype=torch.long, device=device)
    token_at.scatter_(0, flat.reshape(-1), token.repeat(ranks))  # the last entry collects the unused
    # Step 3: per row and top-k column, the local slot of a pair on that rank, and its weight.
    row = (pair_rank * capacity + position[pair_rank, token[:, None]]).reshape(-1)  # [T*A]
    column = torch.arange(top_k, device=device).repeat(tokens)
    ids = torch.full((ranks * capacity, top_k), -1, dtype=torch.int32, device=device)
    weights = torch.zeros(ranks * capacity, top_k, dtype=torch.float32, device=device)
    ids[row, column] = pair_local.reshape(-1).to(torch.int32)
    weights[row, column] = topk_weights.reshape(-1).float()
    rows = encode_rows(x[token_at[:-1]], ids, weights)
    pairs = torch.zeros(ranks, dtype=torch.long, device=device).index_add_(
        0, pair_rank.reshape(-1), torch.ones(tokens * top_k, dtype=torch.long, device=device))
    return Packed(rows, position, used.sum(1), pairs)


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
    """Combine postprocess (local): the ranks' partial sums ``[R * C, D]`` -> ``[T, D]``,
    added in rank order."""
    ranks, tokens = packed.position.shape
    back = back.view(ranks, packed.capacity, back.shape[1])
    out = back.new_zeros(tokens, back.shape[2])
    for r in range(ranks):
        mine = packed.position[r]
        out += torch.where((mine >= 0)[:, None], back[r, mine.clamp(min=0)], 0)
    return out
