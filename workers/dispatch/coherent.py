"""One MoE layer of the coherent layout (ExFlow): a token moves only to where its
experts are, and continues its next layer there.

Every rank holds the dense weights, so a token's residual stream ``h`` can live on any
rank. Per MoE layer, for the tokens a rank hosts:

1. route them; each (token, expert) pair runs on the rank of the expert's slot (a
   replicated expert: replica ``token % logcnt``);
2. pick the token's next home: the rank that holds most of its experts, ties to the
   rank of its top-1 expert, then to where it is now. A token whose experts all sit
   on its rank moves nothing;
3. ONE dispatch all-to-all: ``h`` goes once to every other rank holding one of its
   experts, with a bitmask of the ranks whose partials its home must wait for, so the
   merge needs no metadata of its own. The row counts travel in-band with the rows on the
   same-node transport (exact bytes, so affinity-aware plans save them); on
   torch.distributed a split-size exchange goes first (``Collectives.all_to_all_v``);
4. every rank computes its pairs; with top-1 the token is now home (no combine). With
   top-k > 1 the partial outputs not computed at the token's home travel there in ONE
   merge ``all_to_all_single``;
5. the home adds the partials (top-k order) and the shared expert(s) to ``h``.

Collectives per MoE layer: top-1: 1 (dispatch); top-k > 1: 2 (dispatch, merge); on
torch.distributed one split-size exchange more. Bytes counted: the rows plus 8 bytes of
row count per peer.

The first MoE layer of a step is special: every rank computed the layers before it,
and its attention, for every token (all ranks hold the context and the dense
weights), so every rank routes every token the same way and already holds every ``h``.
Each token simply starts at its home: no dispatch and no metadata; with top-k > 1 the
partials computed away from a token's home still travel there (1 merge all-to-all).

Shapes: n = tokens hosted here, A = top-k, D = hidden, R = ranks, N = rows computed here
(hosted + arrived).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raymoe.workers.dispatch.collectives import Collectives
from raymoe.workers.dispatch.compute import weighted_experts
from raymoe.workers.dispatch.wire import pack_parts, unpack_parts
from raymoe.workers.expert_map import LayerMap
from raymoe.workers.model.experts import ExpertStack
from raymoe.workers.model.router import Routing
from raymoe.workers.stats import LayerTraffic


@dataclass
class Hosted:
    """The tokens a rank hosts: global token indices ``[n]`` (ascending) and ``h [n, D]``."""

    tokens: torch.Tensor
    h: torch.Tensor


@dataclass(frozen=True)
class Routed:
    """Where the pairs of the hosted tokens run and where each token goes next."""

    routing: Routing  # topk_ids / topk_weights [n, A]
    pair_rank: torch.Tensor  # int64 [n, A]
    pair_local: torch.Tensor  # int64 [n, A]: the slot's row in that rank's stack
    home: torch.Tensor  # int64 [n]: the token's next home
    present: torch.Tensor  # bool [n, R]: the token has an expert on rank r
    mask: torch.Tensor  # int64 [n]: bitmask of the ranks whose partial must go home


@dataclass
class Rows:
    """The rows a rank computes: its hosted tokens, then the arrived ones ([N, ...] each)."""

    h: torch.Tensor  # the residual stream
    token: torch.Tensor
    home: torch.Tensor
    mask: torch.Tensor
    ids: torch.Tensor  # local slot ids [N, A], -1 = not here
    weights: torch.Tensor  # [N, A]


def choose_homes(pair_rank: torch.Tensor, current: int, num_ranks: int) -> torch.Tensor:
    """``pair_rank [n, A]`` (rank of each pair, top-1 first) -> next home ``[n]``."""
    counts = F.one_hot(pair_rank, num_ranks).sum(1)  # [n, R]
    top1 = F.one_hot(pair_rank[:, 0], num_ranks)
    here = torch.zeros_like(counts)
    here[:, current] = 1
    return (counts * 4 + top1 * 2 + here).argmax(1)  # counts dominate, then top-1, then staying


def route(routing: Routing, tokens: torch.Tensor, lm: LayerMap, current: int) -> Routed:
    """Steps 1-2 (local): every pair's rank and slot, each token's next home and the ranks
    whose partials must meet there. ``current``: this rank, or -1 when every rank hosts
    every token (the step's first MoE layer)."""
    ranks = lm.num_ranks
    slot = lm.slots(routing.topk_ids, tokens)
    pair_rank, pair_local = lm.slot_rank[slot], lm.slot_local[slot]  # [n, A]
    home = choose_homes(pair_rank, current, ranks)
    present = F.one_hot(pair_rank, ranks).sum(1) > 0  # [n, R]
    partial_from = present.clone()
    partial_from[torch.arange(len(home), device=home.device), home] = False
    mask = (partial_from.long() << torch.arange(ranks, device=home.device)).sum(1)
    return Routed(routing, pair_rank, pair_local, home, present, mask)


def pack_dispatch(hosted: Hosted, routed: Routed, me: int) -> tuple[torch.Tensor, list[int]]:
    """Dispatch preprocess (local): for every other rank, the hosted tokens with an expert
    there, in rank order -> uint8 ``[rows, bytes]`` and the rows per destination. A row:
    ``[h | local ids on the destination (-1 elsewhere) | weights | token, home, mask]``."""
    remote = routed.present.clone()
    remote[:, me] = False
    dest, row = torch.nonzero(remote.T, as_tuple=True)  # grouped by destination
    send = pack_parts(hosted.h[row],
                      torch.where(routed.pair_rank[row] == dest[:, None], routed.pair_local[row], -1).to(torch.int32),
                      routed.routing.topk_weights[row].float(),
                      torch.stack([hosted.tokens[row], routed.home[row], routed.mask[row]], 1))
    return send, torch.bincount(dest, minlength=routed.present.shape[1]).tolist()


def exchange_dispatch(send: torch.Tensor, send_splits: list[int], collectives: Collectives) -> torch.Tensor:
    """Dispatch communicate. All ranks must call this, in the same order. The receive sizes
    travel with the rows (``Collectives.all_to_all_v``): one exchange on the same-node
    transport, a split-size exchange first on torch.distributed."""
    recv, _ = collectives.all_to_all_v("dispatch", send, send_splits)
    return recv


def rows_here(hosted: Hosted, routed: Routed, arrived: torch.Tensor | None, me: int, top_k: int) -> Rows:
    """Dispatch postprocess (local): hosted tokens, then the arrived rows (``arrived`` None:
    nothing was dispatched)."""
    local_ids = torch.where(routed.pair_rank == me, routed.pair_local, -1)
    if arrived is None:
        return Rows(hosted.h, hosted.tokens, routed.home, routed.mask, local_ids, routed.routing.topk_weights.float())
    h_in, ids_in, w_in, meta_in = unpack_parts(arrived, [(hosted.h.dtype, hosted.h.shape[1]), (torch.int32, top_k),
                                                         (torch.float32, top_k), (torch.int64, 3)])
    return Rows(torch.cat([hosted.h, h_in]), torch.cat([hosted.tokens, meta_in[:, 0]]),
                torch.cat([routed.home, meta_in[:, 1]]), torch.cat([routed.mask, meta_in[:, 2]]),
                torch.cat([local_ids, ids_in.long()]), torch.cat([routed.routing.topk_weights.float(), w_in]))


def merge_partials(rows: Rows, partial: torch.Tensor, me: int, ranks: int,
                   collectives: Collectives) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 5, communicate (top-k > 1). All ranks must call this, in the same order: each
    partial computed away from its token's home goes there; split sizes come from the
    bitmasks the rows carry, so no metadata. Returns the partials that arrived ``[m, D]``
    and their tokens ``[m]``."""
    keep = rows.home == me
    away = ~keep & (rows.ids >= 0).any(1)
    order = torch.argsort(rows.home[away], stable=True)
    out = pack_parts(partial[away][order], rows.token[away][order, None])
    send_splits = torch.bincount(rows.home[away], minlength=ranks).tolist()
    bits = (rows.mask[keep, None] >> torch.arange(ranks, device=partial.device)) & 1  # who sends partials here
    back = collectives.all_to_all("merge", out, send_splits, bits.sum(0).tolist())
    merged, merged_token = unpack_parts(back, [(partial.dtype, partial.shape[1]), (torch.int64, 1)])
    return merged, merged_token.reshape(-1)


class CoherentMoE:
    """The MoE layers of one rank; ``__call__`` runs one layer. All ranks must call it for
    every MoE layer, in order."""

    def __init__(self, maps: list[LayerMap], stacks: list[ExpertStack], collectives: Collectives, rank: int,
                 top_k: int):
        self.maps, self.stacks, self.collectives, self.rank, self.top_k = maps, stacks, collectives, rank, top_k

    def __call__(self, moe_index: int, layer, hosted: Hosted, replicated: bool = False) -> tuple[Hosted, LayerTraffic]:
        """One MoE layer (a ``DecoderLayer``: its ``mlp_input``, ``route`` and ``moe_output``)
        of the hosted tokens (``hosted.h``: their residual stream); ``replicated``: every
        rank hosts every token (the step's first MoE layer: nothing to dispatch)."""
        lm, me = self.maps[moe_index], self.rank
        before = self.collectives.snapshot()
        routed = route(layer.route(layer.mlp_input(hosted.h)), hosted.tokens, lm, -1 if replicated else me)
        arrived = None  # replicated: every rank already holds every token
        if not replicated:
            arrived = exchange_dispatch(*pack_dispatch(hosted, routed, me), self.collectives)
        rows = rows_here(hosted, routed, arrived, me, self.top_k)
        partial, pairs = weighted_experts(layer.mlp_input(rows.h), rows.ids, rows.weights, self.stacks[moe_index])
        merged, merged_token = partial[:0], rows.token[:0]
        if self.top_k > 1:
            merged, merged_token = merge_partials(rows, partial, me, lm.num_ranks, self.collectives)
        new = self._assemble(rows, partial, merged, merged_token, layer)
        arrived_rows = len(rows.token) - len(hosted.tokens)
        stats = LayerTraffic.of([pairs if r == me else 0 for r in range(lm.num_ranks)],
                                [arrived_rows if r == me else 0 for r in range(lm.num_ranks)],
                                self.collectives.snapshot() - before,
                                hosted_tokens=int((routed.home == me).sum()) if replicated else len(routed.home),
                                stayed_tokens=int((routed.home == me).sum()))
        return new, stats

    def _assemble(self, rows: Rows, partial: torch.Tensor, merged: torch.Tensor, merged_token: torch.Tensor,
                  layer) -> Hosted:
        """Step 6 (local): the tokens hosted from now on: residual + experts + shared experts."""
        keep = rows.home == self.rank
        tokens, order = torch.sort(rows.token[keep])
        residual, y = rows.h[keep][order], partial[keep][order]
        y.index_add_(0, torch.searchsorted(tokens, merged_token), merged)
        return Hosted(tokens, layer.moe_output(residual, layer.mlp_input(residual), y))
