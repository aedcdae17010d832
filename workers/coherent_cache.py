"""A KV cache kept coherent across the ranks of the coherent layout.

Every rank holds the KV entries of every sequence. A rank computes the keys and values
of the tokens it hosts at a layer; the rows are then all-gathered so that any rank that
later hosts a token of that sequence finds them in its own cache.

The layers up to the first MoE layer are computed by every rank for every token (see
``workers/dispatch/coherent.py``), so their rows are written everywhere and not exchanged.

When the other rows are exchanged (T = tokens of the step, R = ranks, K = bytes of one
cached key + value row):

* a step where some sequence feeds several tokens (prefill): those tokens may sit on
  different ranks and attend to each other at the same layer, so rows are exchanged at
  every layer before attention: 2 collectives per layer (row counts, rows).
* a decode-only step (one new token per sequence): a token needs only earlier positions,
  already everywhere, and its own row, computed where it is; rows are buffered and
  exchanged once at the end of the step: 2 collectives per step.

Either way every row reaches the R - 1 other ranks: ``T * L' * (K + 12) * (R - 1)`` bytes
per step (L' = layers after the first MoE layer, 12 bytes of (layer, slot, position)),
plus 8 bytes of row count per rank and exchange.
"""

from __future__ import annotations

import torch

from raymoe.workers.dispatch.collectives import Collectives
from raymoe.workers.dispatch.wire import pack_parts, unpack_parts
from raymoe.workers.model.kv_cache import KVCache, KVLayout


class CoherentKVCache(KVCache):
    def __init__(self, shapes, num_slots: int, layout: KVLayout, dtype: torch.dtype, device,
                 collectives: Collectives):
        super().__init__(shapes, num_slots, layout, dtype, device)
        self.collectives = collectives  # purpose "kv_coherence": the row counts and the rows
        self.k_width = int(torch.tensor(shapes[0][0]).prod())
        self.v_width = int(torch.tensor(shapes[0][1]).prod())
        self.eager = True
        self.replicated = False  # every rank computes the same rows: nothing to exchange
        self._pending: list[torch.Tensor] = []

    def begin_step(self, eager: bool) -> None:
        """``eager``: exchange at every layer (the step has multi-token sequences)."""
        self.eager, self._pending = eager, []

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Store this rank's rows; with ``eager``, all ranks must call this for every layer
        (except while ``replicated``: every rank then writes the same rows). Every rank
        holds the same block tables (the step carries them), so a (slot, position) names
        the same pool row everywhere."""
        super().write(layer, slots, positions, k, v, rows)
        if self.replicated:
            return
        meta = torch.stack([torch.full_like(slots, layer), slots, positions], 1).to(torch.int32)
        rows = pack_parts(meta, k.reshape(len(k), self.k_width).to(self.dtype), v.reshape(len(v), self.v_width).to(self.dtype))
        if self.eager:
            self._exchange(rows)
        else:
            self._pending.append(rows)

    def flush(self) -> None:
        """End of a decode-only step: exchange the buffered rows. All ranks must call this."""
        if not self.eager:
            width = 12 + (self.k_width + self.v_width) * torch.finfo(self.dtype).bits // 8
            pending = self._pending or [torch.empty(0, width, dtype=torch.uint8, device=self.device)]
            self._exchange(torch.cat(pending))
        self._pending = []

    def _exchange(self, rows: torch.Tensor) -> None:
        """Send this rank's rows to every other rank and store theirs: one all-gather of
        row counts, then one ``all_to_all_single`` with exact splits (no padding)."""
        world, me = self.collectives.world, self.collectives.rank
        counts = self.collectives.gather_counts("kv_coherence", rows.shape[0], self.device)
        recv_splits = [0 if r == me else c for r, c in enumerate(counts)]
        send_splits = [0 if r == me else rows.shape[0] for r in range(world)]
        recv = self.collectives.all_to_all("kv_coherence", rows.repeat(world - 1, 1), send_splits, recv_splits)
        if len(recv):
            self._store(recv)

    def _store(self, rows: torch.Tensor) -> None:
        k_shape, v_shape = self.shapes[0]
        meta, k, v = unpack_parts(rows, [(torch.int32, 3), (self.dtype, self.k_width), (self.dtype, self.v_width)])
        meta = meta.long()
        for layer in torch.unique(meta[:, 0]).tolist():
            mine = meta[:, 0] == layer
            KVCache.write(self, layer, meta[mine, 1], meta[mine, 2],
                          k[mine].view(-1, *k_shape), v[mine].view(-1, *v_shape))
