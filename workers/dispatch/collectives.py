"""The data plane's one door to torch.distributed: every collective a rank issues goes
through a ``Collectives`` object, which makes the call and counts it, by purpose.

What is counted, per purpose (``PURPOSES``), on each rank: the calls, and the bytes this
rank sent to other ranks (its own split is not a transfer). Summing the ranks' tallies
gives what crossed between processes; every rank of a group issues the same calls, so
the call count is the same on every rank. The statistics (``workers/stats.py``) are fed
from these tallies, never from formulas; tests check the tallies against what an
instrumented torch.distributed saw.

Shapes: W = group size; rows = a 2-D tensor's first dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

# metadata: split sizes / row counts; dispatch: tokens to experts; combine: expert outputs back;
# merge: coherent top-k partials to the token's next home; kv_coherence: new KV rows to the
# other replicas; replan: expert weights of a live plan change.
PURPOSES = ("metadata", "dispatch", "combine", "merge", "kv_coherence", "replan")


@dataclass
class Tally:
    """Calls and bytes sent to other ranks, per purpose."""

    calls: dict[str, int]
    bytes: dict[str, int]

    @classmethod
    def zero(cls) -> "Tally":
        return cls(dict.fromkeys(PURPOSES, 0), dict.fromkeys(PURPOSES, 0))

    def __sub__(self, earlier: "Tally") -> "Tally":
        return Tally({p: self.calls[p] - earlier.calls[p] for p in PURPOSES},
                     {p: self.bytes[p] - earlier.bytes[p] for p in PURPOSES})

    def __add__(self, other: "Tally") -> "Tally":
        return Tally({p: self.calls[p] + other.calls[p] for p in PURPOSES},
                     {p: self.bytes[p] + other.bytes[p] for p in PURPOSES})

    def copy(self) -> "Tally":
        return Tally(dict(self.calls), dict(self.bytes))


def _row_bytes(t: torch.Tensor) -> int:
    """Bytes of one row (one element of a 1-D tensor)."""
    return math.prod(t.shape[1:]) * t.element_size()


class Collectives:
    """Counted collectives over one process group (passed in, never a global).

    Every method enters a collective: all ranks of ``group`` must call it, in the same
    order, with the same ``purpose``.
    """

    def __init__(self, group, transport=None):
        """``transport``: a same-node ``LocalTransport`` that carries the data instead of
        ``group``'s backend (counted the same way), or None."""
        self.group, self.transport = group, transport
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.tally = Tally.zero()

    def _count(self, purpose: str, sent_bytes: int) -> None:
        self.tally.calls[purpose] += 1
        self.tally.bytes[purpose] += sent_bytes

    def all_to_all(self, purpose: str, send: torch.Tensor, send_splits: list[int],
                   recv_splits: list[int]) -> torch.Tensor:
        """``send [sum(send_splits), ...]`` (rows grouped by destination rank) -> the rows
        received, ``[sum(recv_splits), ...]`` grouped by source rank. One ``all_to_all_single``."""
        recv = send.new_empty(sum(recv_splits), *send.shape[1:])
        if self.transport is not None and send.device.type == "cpu":
            self.transport.all_to_all_single(recv, send, recv_splits, send_splits)
        else:
            dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=self.group)
        self._count(purpose, (sum(send_splits) - send_splits[self.rank]) * _row_bytes(send))
        return recv

    def all_to_all_v(self, purpose: str, send: torch.Tensor, send_splits: list[int]) -> tuple[torch.Tensor, list[int]]:
        """All-to-all whose receive sizes only the senders know: returns the rows received
        (grouped by source) and how many from each. The same-node transport carries the
        counts in-band: one call, whose 8 bytes of count per peer are counted as ``metadata``
        bytes (no metadata call); torch.distributed needs a split-size exchange first (a
        ``metadata`` call)."""
        if self.transport is not None and send.device.type == "cpu":
            recv, recv_splits = self.transport.all_to_all_v(send, send_splits)
            self._count(purpose, (sum(send_splits) - send_splits[self.rank]) * _row_bytes(send))
            self.tally.bytes["metadata"] += (self.world - 1) * 8
            return recv, recv_splits
        recv_splits = self.exchange_counts("metadata", send_splits, send.device)
        return self.all_to_all(purpose, send, send_splits, recv_splits), recv_splits

    def exchange_counts(self, purpose: str, counts: list[int], device: torch.device) -> list[int]:
        """Send ``counts[r]`` to rank r, get every rank's count for this one: one
        ``all_to_all_single`` of W int64."""
        send = torch.tensor(counts, dtype=torch.int64, device=device)
        recv = torch.empty_like(send)
        if self.transport is not None:
            self.transport.all_to_all_single(recv, send, [1] * self.world, [1] * self.world)
        else:
            dist.all_to_all_single(recv, send, group=self.group)
        self._count(purpose, (self.world - 1) * 8)
        return recv.tolist()

    def gather_counts(self, purpose: str, count: int, device: torch.device) -> list[int]:
        """Every rank's ``count``, in rank order: one ``all_gather`` of one int64."""
        self._count(purpose, (self.world - 1) * 8)
        if self.transport is not None:
            return self.transport.all_gather_int(count)
        mine = torch.tensor([count], dtype=torch.int64, device=device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.group)
        return [int(c) for c in out]

    def snapshot(self) -> Tally:
        """The tallies so far (a copy); ``later - earlier`` is what happened in between."""
        return self.tally.copy()
