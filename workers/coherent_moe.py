"""One MoE layer of the coherent layout (ExFlow): a token moves only to where its
experts are, and continues its next layer there.

Every rank holds the dense weights, so a token's residual stream ``h`` can live on any
rank. Per MoE layer, for the tokens a rank hosts:

1. route them; each (token, expert) pair runs on the rank of the expert's slot (a
   replicated expert: replica ``token % logcnt``);
2. pick the token's next home: the rank that holds most of its experts, ties to the
   rank of its top-1 expert, then to where it is now. A token whose experts all sit
   on its rank moves nothing;
3. one metadata all-to-all (R split sizes per rank) then ONE dispatch
   ``all_to_all_single``: ``h`` goes once to every other rank holding one of its experts,
   with a bitmask of the ranks whose partials its home must wait for, so the merge
   needs no metadata of its own;
4. every rank computes its pairs; with top-1 the token is now home (no combine). With
   top-k > 1 the partial outputs not computed at the token's home travel there in ONE
   merge ``all_to_all_single``;
5. the home adds the partials (top-k order) and the shared expert(s) to ``h``.

Collectives per MoE layer: top-1: 1 token-carrying + 1 metadata; top-k > 1: 2 + 1.

The first MoE layer of a step is special: every rank computed the layers before it,
and its attention, for every token (all ranks hold the context and the dense
weights), so every rank routes every token the same way and already holds every ``h``.
Each token simply starts at its home: no dispatch and no metadata; with top-k > 1 the
partials computed away from a token's home still travel there (1 merge all-to-all).

Shapes: n = tokens hosted here, A = top-k, D = hidden, R = ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raymoe.workers.collectives import Collectives
from raymoe.workers.dispatch import pack_parts, unpack_parts, weighted_experts
from raymoe.workers.expert_map import LayerMap
from raymoe.workers.model.experts import ExpertStack
from raymoe.workers.stats import LayerTraffic


@dataclass
class Hosted:
    """The tokens a rank hosts: global token indices ``[n]`` (ascending) and ``h [n, D]``."""

    tokens: torch.Tensor
    h: torch.Tensor


def choose_homes(pair_rank: torch.Tensor, current: int, num_ranks: int) -> torch.Tensor:
    """``pair_rank [n, A]`` (rank of each pair, top-1 first) -> next home ``[n]``."""
    counts = F.one_hot(pair_rank, num_ranks).sum(1)  # [n, R]
    top1 = F.one_hot(pair_rank[:, 0], num_ranks)
    here = torch.zeros_like(counts)
    here[:, current] = 1
    return (counts * 4 + top1 * 2 + here).argmax(1)  # counts dominate, then top-1, then staying


class CoherentMoE:
    """The MoE layers of one rank; ``__call__`` runs one layer. All ranks must call it for
    every MoE layer, in order."""

    def __init__(self, maps: list[LayerMap], stacks: list[ExpertStack], collectives: Collectives, rank: int,
                 top_k: int):
        self.maps, self.stacks, self.collectives, self.rank, self.top_k = maps, stacks, collectives, rank, top_k

    def __call__(self, moe_index: int, layer, hosted: Hosted, replicated: bool = False) -> tuple[Hosted, LayerTraffic]:
        """One MoE layer; ``replicated``: every rank hosts every token (the step's first MoE layer)."""
        lm, block, norm = self.maps[moe_index], layer.mlp, layer.post_attention_layernorm
        ranks, me, h = lm.num_ranks, self.rank, hosted.h
        before = self.collectives.snapshot()
        # Step 1-2: where every pair runs, and each token's next home.
        routing = block.route(norm(h))
        slot = lm.log2phy[routing.topk_ids, hosted.tokens[:, None] % lm.logcnt[routing.topk_ids]]
        pair_rank, pair_local = lm.slot_rank[slot], lm.slot_local[slot]  # [n, A]
        home = choose_homes(pair_rank, -1 if replicated else me, ranks)
        present = F.one_hot(pair_rank, ranks).sum(1) > 0  # [n, R]: token has an expert there
        partial_from = present.clone()
        partial_from[torch.arange(len(home)), home] = False  # ranks whose partial must go home
        mask = (partial_from.long() << torch.arange(ranks, device=h.device)).sum(1)  # as a bitmask
        # Step 3: dispatch rows (token, destination) for every other rank holding its experts.
        remote = present.clone()
        remote[:, me] = False
        if replicated:  # every rank already holds every token: nothing to dispatch
            remote[:] = False
        dest, token_row = torch.nonzero(remote.T, as_tuple=True)  # grouped by destination
        send = pack_parts(h[token_row], torch.where(pair_rank[token_row] == dest[:, None], pair_local[token_row], -1)
                          .to(torch.int32), routing.topk_weights[token_row].float(),
                          torch.stack([hosted.tokens[token_row], home[token_row], mask[token_row]], 1))
        if replicated:
            recv = send
        else:
            send_splits = torch.bincount(dest, minlength=ranks).tolist()
            recv_splits = self.collectives.exchange_counts("metadata", send_splits, h.device)
            recv = self.collectives.all_to_all("dispatch", send, send_splits, recv_splits)
        h_in, ids_in, w_in, meta_in = unpack_parts(recv, [(h.dtype, h.shape[1]), (torch.int32, self.top_k),
                                                          (torch.float32, self.top_k), (torch.int64, 3)])
        # Step 4: every pair on this rank, for hosted and arrived tokens alike.
        rows_h = torch.cat([h, h_in])
        rows_token = torch.cat([hosted.tokens, meta_in[:, 0]])
        rows_home = torch.cat([home, meta_in[:, 1]])
        rows_mask = torch.cat([mask, meta_in[:, 2]])
        local_ids = torch.where(pair_rank == me, pair_local, -1)
        partial, pairs = weighted_experts(norm(rows_h), torch.cat([local_ids, ids_in.long()]),
                                          torch.cat([routing.topk_weights.float(), w_in]), self.stacks[moe_index])
        # Step 5: partials computed away from their token's home go there (top-k > 1).
        keep = rows_home == me
        merged_token, merged = rows_token[:0], partial[:0]
        if self.top_k > 1:
            away = ~keep & (torch.cat([local_ids, ids_in.long()]) >= 0).any(1)
            order = torch.argsort(rows_home[away], stable=True)
            out = pack_parts(partial[away][order], rows_token[away][order, None])
            send_splits = torch.bincount(rows_home[away], minlength=ranks).tolist()
            bits = (rows_mask[keep, None] >> torch.arange(ranks, device=h.device)) & 1  # who sends partials here
            back = self.collectives.all_to_all("merge", out, send_splits, bits.sum(0).tolist())
            merged, merged_token = unpack_parts(back, [(h.dtype, h.shape[1]), (torch.int64, 1)])
        # Step 6: the tokens hosted from now on, with residual + experts + shared experts.
        tokens, order = torch.sort(rows_token[keep])
        residual, y = rows_h[keep][order], partial[keep][order]
        y.index_add_(0, torch.searchsorted(tokens, merged_token.reshape(-1)), merged)
        shared = block.shared(norm(residual))
        new = Hosted(tokens, residual + (y if shared is None else y + shared))
        stats = LayerTraffic.of([pairs if r == me else 0 for r in range(ranks)],
                                [len(recv) if r == me else 0 for r in range(ranks)],
                                self.collectives.snapshot() - before,
                                hosted_tokens=int((home == me).sum()) if replicated else len(home),
                                stayed_tokens=int((home == me).sum()))
        return new, stats
