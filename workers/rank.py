"""What every actor of a deployment does besides its own work: join and leave the
process groups, report where it runs, and answer step messages on its channel.

The step loop (``serve``) is the actor's one long-running Ray call (its health sentinel,
as in vLLM's RayExecutorV2): it accepts the coordinator's connection
(``workers/channel.py``) and answers each message ``(method, args)`` with
``("ok", result)`` or ``("error", exception)``, until ``("stop", ())`` or the channel
closes. The actors are threaded (two Ray calls at a time), so ``where``, ``join``,
``leave`` and plan changes still arrive as Ray calls while the loop waits; the
coordinator sends those only between steps.
"""

from __future__ import annotations

import os

import torch

from raymoe.workers.channel import ChannelClosed, Listener
from raymoe.workers.dispatch.collectives import Collectives
from raymoe.workers.process_group import ProcessGroups, free_port, join_groups, leave_groups, node_ip

STEP_METHODS = ("step",)  # what the loop answers; everything else is a Ray call


class RankActor:
    """Base of FrontEnd, ExpertWorker and CoherentRank (plain classes; ``ray.remote`` wraps them)."""

    def __init__(self, threads: int):
        self.groups: ProcessGroups | None = None
        self.collectives: Collectives | None = None  # the counted collectives over the expert-parallel group
        self._listener: Listener | None = None
        self.threads = threads
        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def where(self) -> dict:
        return {"pid": os.getpid(), "node_ip": node_ip(), "device": str(self.device)}

    def rendezvous(self) -> str:
        """A host:port on this actor's node for the group to meet at (called on rank 0)."""
        ip = node_ip()
        return f"{ip}:{free_port(ip)}"

    def join(self, backend: str, address: str, rank: int, world_size: int, timeout_s: float) -> int:
        """Join the process groups. All actors of the deployment must call this together."""
        self.groups = join_groups(backend, address, rank, world_size, timeout_s)
        self.collectives = Collectives(self.groups.expert_parallel, self.groups.transport)
        self.rank = rank
        return rank

    def leave(self) -> None:
        leave_groups(self.groups)
        self.groups = self.collectives = None

    # -- the step loop ------------------------------------------------------------------
    def open_channel(self) -> str:
        """Listen for the coordinator on this node; returns ``host:port`` (then ``serve``)."""
        self._listener = Listener(node_ip())
        return self._listener.address

    def serve(self, accept_timeout_s: float = 120.0) -> str:
        """Answer step messages until told to stop or the coordinator goes away."""
        if not torch.cuda.is_available():
            torch.set_num_threads(self.threads)  # OpenMP's thread count is per thread: set it in this one too
        channel = self._listener.accept(accept_timeout_s)
        self._listener = None
        try:
            while True:
                try:
                    method, args = channel.recv()
                except ChannelClosed:
                    return "closed"
                if method == "stop":
                    channel.send(("ok", None))
                    return "stopped"
                if method not in STEP_METHODS:
                    channel.send(("error", ValueError(f"{method!r} is not a step method ({STEP_METHODS})")))
                    continue
                try:
                    reply = ("ok", getattr(self, method)(*args))
                except Exception as exc:  # noqa: BLE001 - a broken collective, a bad step: the coordinator decides
                    reply = ("error", _picklable(exc))
                channel.send(reply)
        finally:
            channel.close()


def _picklable(exc: Exception) -> Exception:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")
