"""Noticing that a step failed, and which actors are to blame.

A step is one Ray call per actor; the actors then run collectives among themselves. When
one actor dies (its process killed) the calls of the others fail soon after: their
collective loses a peer, or times out (``collective_timeout_s``). When one hangs, the
others fail at the collective timeout and the hung one never returns. So the
coordinator waits for the calls of a step as follows:

- all return: the step succeeded;
- one fails: the others get ``settle_s`` more to return. Each actor is then *dead* (its
  call raised ``RayActorError``: the process is gone), *hung* (its call has not
  returned), or *alive* (it returned, with a result or an error such as a broken
  collective);
- nothing returns for ``step_timeout_s``: every actor still running is hung.

``StepFailure`` carries that verdict; ``Deployment`` replaces the dead and the hung,
rebuilds the process group and replays the step (``cluster/coordinator.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError


class StepFailure(RuntimeError):
    """A step's calls did not all succeed. Indices are positions in the actor list."""

    def __init__(self, dead: list[int], hung: list[int], errors: dict[int, BaseException]):
        self.dead, self.hung, self.errors = dead, hung, errors
        first = next(iter(errors.values()), None)
        super().__init__(f"step failed: dead actors {dead}, hung actors {hung}, errors from actors "
                         f"{sorted(errors)}" + (f"; first error: {first!r}"[:600] if first else ""))

    @property
    def broken(self) -> list[int]:
        """Actors to replace: those whose process died or that stopped answering."""
        return sorted(set(self.dead) | set(self.hung))


@dataclass(frozen=True)
class Recovery:
    """One recovery, as reported by ``Deployment.recoveries``."""

    step_id: int
    replaced: list[int]  # actor indices restarted (dead, hung, or unable to leave the group)
    dead: list[int]
    hung: list[int]
    detect_seconds: float  # from the failed step's start to its failure being known
    seconds: float  # from then to the process group being whole again (replacements loaded)
    replayed_seqs: int  # sequences re-prefilled from their committed tokens
    reason: str = field(default="", compare=False)


def wait_all(refs: list, settle_s: float, step_timeout_s: float) -> list:
    """Every call's result in order, or ``StepFailure`` (see the module docstring)."""
    index = {ref: i for i, ref in enumerate(refs)}
    results: dict[int, object] = {}
    errors: dict[int, BaseException] = {}
    dead: list[int] = []
    pending = list(refs)
    deadline = time.monotonic() + step_timeout_s
    while pending:
        now = time.monotonic()
        if now >= deadline:
            break
        ready, pending = ray.wait(pending, num_returns=1, timeout=deadline - now)
        for ref in ready:
            i = index[ref]
            try:
                results[i] = ray.get(ref)
            except RayActorError as exc:  # the process is gone (killed, crashed, OOM)
                dead.append(i)
                errors[i] = exc
            except Exception as exc:  # raised inside the actor: e.g. a collective lost its peer
                errors[i] = exc
            if errors:  # the rest get settle_s to notice (their collectives fail or time out)
                deadline = min(deadline, time.monotonic() + settle_s)
    if errors or pending:
        raise StepFailure(sorted(dead), sorted(index[ref] for ref in pending), errors)
    return [results[i] for i in range(len(refs))]


def settle(refs: list, timeout_s: float) -> list[bool]:
    """Wait up to ``timeout_s`` for calls; per call, whether it returned without error."""
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    ok = []
    for ref in refs:
        if ref not in done:
            ok.append(False)
            continue
        try:
            ray.get(ref)
            ok.append(True)
        except Exception:
            ok.append(False)
    return ok
