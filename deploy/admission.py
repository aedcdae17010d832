"""Admission under overload: refuse a request (HTTP 429) rather than let the wait for a
KV-cache slot grow without bound, and tell the client when to come back (Retry-After).

Two limits, checked by the engine loop before a request joins the engine's queue:

- ``max_queue`` (count): more than this many requests waiting for a slot;
- ``max_wait_s`` (time, optional): the request's expected wait for a slot is longer than
  this. The admitted requests' latency is then at most about ``max_wait_s`` plus their own
  generation time, however much load is offered.

The expected wait is computed from what the engine already holds: a sequence frees its
block-table row and its KV-cache blocks when it has generated its last token, so each
running sequence frees them after its remaining token budget (``max_new_tokens`` minus
what it generated) in steps, holding by then the blocks of its whole length; each
waiting request, in order, starts once a row and the blocks of its own whole length are
free, and holds them for its budget. The new request needs a row and one block. Steps are
turned into seconds with the measured step time. Sequences that stop early
(end-of-sequence, stop strings) free theirs sooner, and shared prefix blocks free less
than counted, so the estimate errs toward refusing.

Pure functions (no engine, no clock): ``raymoe.deploy.engine_loop`` calls them on its thread.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from raymoe.workers.engine import QueueFullError
from raymoe.workers.scheduler import Scheduler

STEP_EWMA = 0.1  # weight of the newest step in the moving average of the step time


class WaitTooLongError(QueueFullError):
    """The expected wait for a KV slot is over the admission budget (``max_wait_s``)."""

    def __init__(self, waiting: int, expected_wait_s: float, max_wait_s: float):
        super().__init__(waiting, 0, retry_after_s(expected_wait_s))
        self.expected_wait_s, self.max_wait_s = expected_wait_s, max_wait_s
        self.args = (f"{waiting} requests are waiting; the expected wait for a slot, {expected_wait_s:.2f} s, is "
                     f"over the limit of {max_wait_s:g} s (batching.max_wait_s); retry later",)


def retry_after_s(expected_wait_s: float | None) -> int:
    """Whole seconds (>= 1) until a slot is expected to be free: the Retry-After header."""
    return max(1, math.ceil(expected_wait_s or 0.0))


@dataclass(frozen=True)
class AdmissionPolicy:
    """``max_queue``: refuse beyond this many waiting requests (None: no limit).
    ``max_wait_s``: refuse when the expected wait for a slot is longer (None: no limit)."""

    max_queue: int | None = None
    max_wait_s: float | None = None


def wait_steps(scheduler: Scheduler) -> int:
    """Engine steps until one more request would get a block-table row and a KV block
    (0: both are free for it now)."""
    limit, size = scheduler.max_seq_len, scheduler.kv.block_size

    def steps_left(seq) -> int:
        return max(1, min(seq.request.params.max_new_tokens - len(seq.output_ids), limit - seq.num_tokens))

    def blocks_at_end(seq) -> int:
        return math.ceil(min(seq.num_tokens + seq.request.params.max_new_tokens - len(seq.output_ids), limit) / size)

    rows = scheduler.max_seqs - len(scheduler.running)
    blocks = scheduler.pool.num_free - sum(max(0, blocks_at_end(s) - len(s.blocks)) for s in scheduler.running)
    frees = [(steps_left(s), max(blocks_at_end(s), len(s.blocks))) for s in scheduler.running]  # (step, blocks)
    heapq.heapify(frees)
    now = 0

    def start(need: int) -> None:
        """Advance ``now`` until a row and ``need`` blocks are free."""
        nonlocal now, rows, blocks
        while (rows < 1 or blocks < need) and frees:
            now, freed = max(now, frees[0][0]), heapq.heappop(frees)[1]
            rows, blocks = rows + 1, blocks + freed

    for seq in scheduler.waiting:  # in order, each takes the first row and blocks to free
        need = blocks_at_end(seq)
        start(need)
        rows, blocks = rows - 1, blocks - need
        heapq.heappush(frees, (now + steps_left(seq), need))
    start(1)
    return now


def refusal(policy: AdmissionPolicy, scheduler: Scheduler, step_s: float | None) -> QueueFullError | None:
    """Why one more request must be refused now, or None to admit it. ``step_s``: the
    measured step time (seconds; None before any step was timed, when only the count
    limit applies and Retry-After is 1)."""
    waiting = len(scheduler.waiting)
    wait_s = None if step_s is None else wait_steps(scheduler) * step_s
    if policy.max_queue is not None and waiting >= policy.max_queue:
        return QueueFullError(waiting, policy.max_queue, retry_after_s(wait_s))
    if policy.max_wait_s is not None and wait_s is not None and wait_s > policy.max_wait_s:
        return WaitTooLongError(waiting, wait_s, policy.max_wait_s)
    return None
