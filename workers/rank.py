"""What every actor of a deployment does besides its own work: join and leave the
process group, report where it runs."""

from __future__ import annotations

import os

import torch

from raymoe.workers.process_group import destroy_group, free_port, init_group, node_ip
from raymoe.workers.collectives import Collectives


class RankActor:
    """Base of FrontEnd and ExpertWorker (plain classes; ``ray.remote`` wraps them)."""

    def __init__(self, threads: int):
        self.group = None
        self.collectives: Collectives | None = None  # the counted collectives over ``group``
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
        """Join the process group. All actors of the deployment must call this together."""
        self.group = init_group(backend, address, rank, world_size, timeout_s)
        self.collectives = Collectives(self.group)
        self.rank = rank
        return rank

    def leave(self) -> None:
        destroy_group()
        self.group = self.collectives = None
