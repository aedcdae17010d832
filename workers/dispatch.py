"""The data plane: move tokens to the ranks that hold their experts and bring the
results back, one ``all_to_all_single`` per direction.

Dispatch and combine are each split into a local preprocess, one communication, and a
local postprocess (the Megatron-Core shape); only the ``exchange_*`` functions talk.

Shapes: T = tokens at the front-end, A = activated experts per token, D = hidden,
N = rows sent (one per distinct (token, expert rank) pair: a token whose two experts
share a rank is sent once), W = world size (front-end ranks first, then expert ranks).

Row wire format (uint8, so one tensor carries any dtype): ``[x (D values of the model
dtype) | local slot ids (A x int32, -1 = not on this rank) | weights (A x float32)]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.workers.collectives import Collectives
from raymoe.workers.expert_map import LayerMap
from raymoe.workers.model.experts import ExpertStack


@dataclass(frozen=True)
class Packed:
    """The dispatch send buffer of one front-end rank."""

    rows: torch.Tensor  # uint8 [N, row_bytes], grouped by destination rank
    splits: list[int]  # [W] rows for each process rank
    row_token: torch.Tensor  # int64 [N] token of each row
    pairs_per_rank: list[int]  # (token, expert) pairs for each expert rank


def row_bytes(hidden: int, top_k: int, dtype: torch.dtype) -> int:
    return hidden * torch.finfo(dtype).bits // 8 + 8 * top_k


def pack_parts(*parts: torch.Tensor) -> torch.Tensor:
    """2-D tensors with N rows each (any dtypes) -> one uint8 ``[N, bytes]`` buffer, row by row."""
    n = parts[0].shape[0]
    widths = [p.shape[1] * p.element_size() for p in parts]
    if n == 0:  # an empty tensor may carry strides that refuse a byte view
        return torch.empty(0, sum(widths), dtype=torch.uint8, device=parts[0].device)
    return torch.cat([p.contiguous().view(torch.uint8).reshape(n, w) for p, w in zip(parts, widths)], 1)


def unpack_parts(buf: torch.Tensor, spec: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Inverse of ``pack_parts``: ``spec`` lists (dtype, columns) of each part, in order."""
    out, start = [], 0
    for dtype, columns in spec:
        width = columns * (torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits) // 8
        out.append(buf[:, start : start + width].contiguous().view(dtype))
        start += width
    return out


def encode_rows(x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``x [N, D]``, ``local_ids [N, A]`` int32, ``weights [N, A]`` float32 -> uint8 ``[N, row_bytes]``."""
    return pack_parts(x, local_ids.to(torch.int32), weights.to(torch.float32))


def decode_rows(buf: torch.Tensor, hidden: int, top_k: int, dtype: torch.dtype):
    """Inverse of ``encode_rows``: ``x [N, D]``, ``local_ids [N, A]`` int64, ``weights [N, A]``."""
    x, ids, weights = unpack_parts(buf, [(dtype, hidden), (torch.int32, top_k), (torch.float32, top_k)])
    return x, ids.long(), weights


def pack(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer_map: LayerMap,
         world_size: int, expert_base: int) -> Packed:
    """Dispatch preprocess (local): ``x [T, D]`` routed by ``topk_ids/topk_weights [T, A]``.

    A token of a replicated expert goes to replica ``token % logcnt[e]``, which spreads
    the expert's tokens evenly over its copies. Expert rank r is process rank
    ``expert_base + r``.
    """
    tokens, top_k = topk_ids.shape
    ranks, device = layer_map.num_ranks, x.device
    pair_token = torch.arange(tokens, device=device)[:, None].expand(tokens, top_k).reshape(-1)  # [T*A]
    expert = topk_ids.reshape(-1)
    slot = layer_map.log2phy[expert, pair_token % layer_map.logcnt[expert]]
    pair_rank, pair_local = layer_map.slot_rank[slot], layer_map.slot_local[slot]
    # Step 1: one row per distinct (rank, token), sorted by rank, then token: the set
    # entries of a dense [R*T] mask, read in order (no sort; on a GPU each host sync
    # costs more than these kernels, so pack syncs twice: here and for the counts).
    pair_key = pair_rank * tokens + pair_token
    used = torch.zeros(ranks * tokens, dtype=torch.bool, device=device)
    used[pair_key] = True
    keys = used.nonzero().squeeze(1)  # [N]
    pair_row = (used.cumsum(0) - 1)[pair_key]  # [T*A] row of each pair
    row_rank, row_token = keys // tokens, keys % tokens
    # Step 2: each row carries the local slot and weight of its pairs, in top-k order.
    local_ids = torch.full((len(keys), top_k), -1, dtype=torch.int32, device=device)
    weights = torch.zeros(len(keys), top_k, dtype=torch.float32, device=device)
    column = torch.arange(top_k, device=device).repeat(tokens)
    local_ids[pair_row, column] = pair_local.to(torch.int32)
    weights[pair_row, column] = topk_weights.reshape(-1).float()
    # Step 3: rows and pairs per expert rank, read back in one transfer.
    counts = torch.zeros(2, ranks, dtype=torch.int64, device=device)
    counts[0].index_add_(0, row_rank, torch.ones_like(row_rank))
    counts[1].index_add_(0, pair_rank, torch.ones_like(pair_rank))
    rows_per_rank, pairs_per_rank = counts.tolist()
    splits = [0] * expert_base + rows_per_rank + [0] * (world_size - expert_base - ranks)
    return Packed(encode_rows(x[row_token], local_ids, weights), splits, row_token, pairs_per_rank)


def exchange_dispatch(send: torch.Tensor, send_splits: list[int],
                      collectives: Collectives) -> tuple[torch.Tensor, list[int]]:
    """Dispatch communicate. All ranks of the group must call this, in the same order.

    One metadata ``all_to_all_single`` (W int64 split sizes) then one token-carrying
    ``all_to_all_single`` with variable splits. Returns the received rows and, per
    source rank, how many.
    """
    recv_splits = collectives.exchange_counts("metadata", send_splits, send.device)
    return collectives.all_to_all("dispatch", send, send_splits, recv_splits), recv_splits


def exchange_combine(results: torch.Tensor, recv_splits: list[int], send_splits: list[int],
                     collectives: Collectives) -> torch.Tensor:
    """Combine communicate. All ranks of the group must call this, in the same order.

    Every rank returns its results to the ranks the rows came from (split sizes are
    the dispatch's, reversed, so no metadata is needed): one ``all_to_all_single``.
    """
    return collectives.all_to_all("combine", results, recv_splits, send_splits)


def weighted_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, stack: ExpertStack) -> tuple[torch.Tensor, int]:
    """``x [N, D]`` through the local experts ``ids [N, A]`` (-1 = elsewhere), weighted by
    ``weights [N, A]`` and summed per row -> ``[N, D]``; and the number of pairs computed.

    Each row's partials are added in top-k order, as the single-process ``combine`` does.
    """
    row, column = torch.nonzero(ids >= 0, as_tuple=True)  # pairs, row-major = top-k order
    out = torch.zeros_like(x)
    if len(row):
        y = stack(x[row], ids[row, column]) * weights[row, column, None].to(x.dtype)
        out.index_add_(0, row, y)
    return out, len(row)


def run_experts(recv: torch.Tensor, stack: ExpertStack, hidden: int, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Expert-rank compute (local): received rows -> weighted sums of their experts ``[N, D]``."""
    x, ids, weights = decode_rows(recv, hidden, top_k, dtype)
    return weighted_experts(x, ids, weights, stack)


def unpack_combine(back: torch.Tensor, row_token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Combine postprocess (local): per-row partial sums ``[N, D]`` -> ``[T, D]``."""
    out = back.new_zeros(num_tokens, back.shape[1])
    return out.index_add_(0, row_token, back)
