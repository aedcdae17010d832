"""The step path: one channel per actor (``workers/channel.py``), no Ray call per step.

Ray starts, places and watches the actors; each actor runs one long-running Ray call,
``serve()``, that answers the step messages arriving on its channel (the health
sentinel: it ends only when the actor stops or dies). A step is then one message to
each actor and one reply from each, tens of microseconds each on one node, where an
actor call costs milliseconds. Everything else (join, leave, plan changes, traces) stays
a Ray call: the actors are threaded (``max_concurrency=2``), and the coordinator issues
those calls only between steps, while every loop waits for its next message.

Failures read as they did with Ray calls (``cluster/recovery.py``): a closed channel or a
finished sentinel is a *dead* actor; an error reply is an *error* (the actor is alive,
e.g. its collective lost a peer); no reply in time is a *hung* actor. Once one actor
failed, the others get ``settle_s`` to answer; nothing at all for ``step_timeout_s``
makes every silent actor hung.
"""

from __future__ import annotations

import selectors
import time

import ray

from raymoe.cluster.recovery import StepFailure
from raymoe.workers.channel import Channel, ChannelClosed, connect


class StepChannels:
    """The coordinator's ends of the actors' channels, by actor index."""

    def __init__(self):
        self.channels: dict[int, Channel] = {}
        self.sentinels: dict[int, object] = {}  # actor index -> ObjectRef of its serve() call

    def open(self, index: int, actor, timeout_s: float = 60.0) -> None:
        """Start actor ``index``'s loop and connect to it (replacing an old channel)."""
        self.close(index)
        address = ray.get(actor.open_channel.remote(), timeout=timeout_s)
        self.sentinels[index] = actor.serve.remote()
        self.channels[index] = connect(address, timeout=timeout_s)

    def close(self, index: int) -> None:
        channel = self.channels.pop(index, None)
        if channel is not None:
            channel.close()
        self.sentinels.pop(index, None)

    def close_all(self) -> None:
        for index in list(self.channels):
            self.close(index)

    def call(self, messages: dict[int, tuple], settle_s: float, timeout_s: float) -> dict[int, object]:
        """Send ``(method, args)`` to each actor index, then gather every reply (see the
        module docstring for how failures read). All indices must have an open channel."""
        dead, errors = [], {}
        for index, message in messages.items():
            try:
                self.channels[index].send(message)
            except ChannelClosed as exc:
                dead.append(index)
                errors[index] = exc
        results = {}
        pending = {i for i in messages if i not in errors}
        deadline = time.monotonic() + (settle_s if errors else timeout_s)
        with selectors.DefaultSelector() as selector:
            for index in pending:
                selector.register(self.channels[index].sock, selectors.EVENT_READ, index)
            while pending:
                ready = [i for i in pending if self.channels[i].has_buffered()]
                if not ready:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    ready = [key.data for key, _ in selector.select(left)]
                for index in ready:
                    try:
                        status, value = self.channels[index].recv(timeout=max(deadline - time.monotonic(), 0.01))
                    except (ChannelClosed, TimeoutError) as exc:
                        dead.append(index)
                        errors[index] = self._why_dead(index, exc)
                    else:
                        if status == "ok":
                            results[index] = value
                        else:
                            errors[index] = value
                    pending.discard(index)
                    selector.unregister(self.channels[index].sock)
                    if errors:  # the others get settle_s to notice (their collectives fail or time out)
                        deadline = min(deadline, time.monotonic() + settle_s)
        if errors or pending:
            raise StepFailure(sorted(dead), sorted(pending), errors)
        return results

    def _why_dead(self, index: int, exc: BaseException) -> BaseException:
        """The sentinel's error when it has one (RayActorError: the process is gone)."""
        sentinel = self.sentinels.get(index)
        if sentinel is not None:
            ready, _ = ray.wait([sentinel], timeout=1.0)
            if ready:
                try:
                    ray.get(ready[0])
                except Exception as error:  # noqa: BLE001 - reported, not handled here
                    return error
        return exc
