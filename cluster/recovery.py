"""Noticing that a step failed, and which actors are to blame.

A step is one message per actor over its channel (``cluster/step_channels.py``); other
operations are Ray calls. The actors then run collectives among themselves. When one
actor dies (its process killed) the others fail soon after: their collective loses a
peer, or times out (``collective_timeout_s``). When one hangs, the others fail at the
collective timeout and the hung one never answers. So the coordinator waits for the
replies of a step (or the results of Ray calls, ``wait_all``) as follows:

- all return: the step succeeded;
- one fails: the others get ``settle_s`` more to return. Each actor is then *dead* (its
  channel closed or its call raised ``RayActorError``: the process is gone), *hung* (no
  answer yet), or *alive* (it answered, with a result or an error such as a broken
  collective);
- nothing returns for ``step_timeout_s``: every actor still running is hung.

``StepFailure`` carries that verdict. ``RecoveryPolicy`` (the Ray executor's) then
replaces the dead and the hung and rebuilds the process groups; the engine replays the
step, every running sequence re-prefilling its committed tokens (``Replay``).

Fallback to replicas (disaggregated layout, gloo): when every expert of the failed
expert ranks has a replica on a live rank, a standby actor (started with the deployment,
holding no experts) takes each failed rank's place at once, the dispatch tables stop
using the failed ranks' slots (``workers/expert_map.py: without_ranks``), and serving
goes on while the replacements load their experts; between two steps, once they are
up, they take their ranks back and the full plan is restored.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError

from raymoe.workers.expert_map import without_ranks

log = logging.getLogger("raymoe")


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
    fallback: bool = False  # standbys served the failed ranks' places while their replacements loaded
    degraded_steps: int = 0  # steps served that way
    restored_seconds: float | None = None  # fallback: from noticing the failure to the full plan being back


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


class RecoveryPolicy:
    """Recovery of an ``ActorSet`` (``cluster/actors.py``), owned by the Ray executor: it
    replaces what failed, rebuilds the process groups and says what must be replayed.

    ``recoveries`` keeps one ``Recovery`` per recovery (``Deployment.recoveries``)."""

    def __init__(self, actors, config):
        self.actors, self.config = actors, config  # an ActorSet, a DeploymentConfig
        self.recoveries: list[Recovery] = []
        self._fallback_since = 0.0  # time.perf_counter() when the last fallback began
        self._pending: dict = {}  # actor index -> (replacement actor, its readiness ref), while serving degraded

    def take_pending(self) -> list:
        """The replacements still loading after a fallback (for shutdown); forgets them."""
        actors, self._pending = [replacement for replacement, _ in self._pending.values()], {}
        return actors

    def recover(self, failure: StepFailure, step_id: int, detect_seconds: float, running: int,
                replace_all: bool = False) -> Recovery:
        """Replace the dead and hung actors (a new actor reloads its weights from the
        checkpoint), have the survivors leave the broken group (one that cannot is
        replaced too), and rebuild the process groups with every actor. With a standby
        and replicas of the failed ranks' experts, the standby steps in at once and the
        replacement loads in the background (module docstring). ``running``: sequences
        that replay (their KV caches are to be forgotten by the caller)."""
        group, started = self.actors, time.perf_counter()
        log.warning("step %d failed (%s); recovering", step_id, failure)
        broken = set(range(len(group.actors))) if replace_all else set(failure.broken)
        broken |= self._abandon_fallback()
        survivors = [i for i in range(len(group.actors)) if i not in broken]
        left = settle([group.actors[i].leave.remote() for i in survivors], self.config.recovery.settle_s)
        broken |= {i for i, ok in zip(survivors, left) if not ok}
        left_at = time.perf_counter()
        degraded = self._fallback_maps(broken)
        for i in sorted(broken):
            ray.kill(group.actors[i], no_restart=True)
            if degraded is not None:  # the standby serves rank i - 1 (no experts) while its replacement loads
                self._fallback_since = started
                replacement = group.new_actor(i)
                self._pending[i] = (replacement, replacement.where.remote())
                group.replace(i, group.standby)
                group.standby = None
            else:
                group.replace(i, group.new_actor(i))
        group.join_all()
        if degraded is not None:
            group.wait([a.adopt_maps.remote(degraded, i - 1) for i, a in enumerate(group.actors)])
        log.info("recovery phases: survivors left the group in %.2f s; replacements up and group joined in %.2f s",
                 left_at - started, time.perf_counter() - left_at)
        record = Recovery(step_id, sorted(broken), failure.dead, failure.hung, detect_seconds,
                          time.perf_counter() - started, running, str(failure)[:300], fallback=degraded is not None)
        self.recoveries.append(record)
        log.warning("recovered from the failure of step %d in %.1f s (noticed after %.1f s): replaced actors %s%s; "
                    "%d sequences replay from their committed tokens", step_id, record.seconds, detect_seconds,
                    record.replaced, " (standby on replicas while the replacement loads)" if record.fallback else "",
                    record.replayed_seqs)
        return record

    def _fallback_maps(self, broken: set[int]):
        """Maps without the broken expert ranks, when a standby can take their place (one
        broken expert rank, disaggregated, gloo, every expert replicated elsewhere)."""
        c, group = self.config, self.actors
        if (not c.recovery.fallback_to_replicas or group.standby is None or c.layout != "disaggregated"
                or group.backend == "nccl" or len(broken) != 1 or 0 in broken):
            return None
        if not settle([group.standby.where.remote()], c.recovery.settle_s)[0]:  # the standby itself is gone
            group.standby = None
            return None
        return without_ranks(group.maps, {i - 1 for i in broken})

    def restore_if_ready(self, wait: bool = False) -> None:
        """Between steps: once the replacements have loaded, they take their ranks back
        from the standby and the full plan is restored (and a new standby started)."""
        if not self._pending:
            return
        group = self.actors
        refs = [ref for _, ref in self._pending.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)
        if len(ready) < len(refs):
            self.recoveries[-1] = dataclasses.replace(self.recoveries[-1],
                                                      degraded_steps=self.recoveries[-1].degraded_steps + 1)
            return
        try:
            ray.get(refs)  # a replacement that died while loading raises here
            settle([a.leave.remote() for a in group.actors], self.config.recovery.settle_s)
            for i, (replacement, _) in self._pending.items():
                ray.kill(group.actors[i], no_restart=True)  # the standby that served rank i - 1
                group.replace(i, replacement)
            self._pending = {}
            group.join_all()
            group.wait([a.adopt_maps.remote(group.maps, i - 1) for i, a in enumerate(group.actors)])
        except Exception as exc:  # a double fault: recover the plain way (every actor re-checked)
            raise StepFailure([], [], {-1: exc}) from exc
        rec = self.recoveries[-1]
        self.recoveries[-1] = dataclasses.replace(rec, restored_seconds=time.perf_counter() - self._fallback_since)
        group.standby = group.new_standby()
        log.warning("full plan restored: the replacement of actors %s is up after %d steps on replicas",
                    rec.replaced, rec.degraded_steps)

    def _abandon_fallback(self) -> set[int]:
        """A failure while serving on replicas: drop the pending replacements; the standbys
        in their places are replaced like any broken actor (returns their indices)."""
        for replacement, _ in self._pending.values():
            ray.kill(replacement, no_restart=True)
        broken, self._pending = set(self._pending), {}
        return broken
