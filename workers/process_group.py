"""torch.distributed process groups for a deployment: backend choice, rendezvous, init.

The coordinator asks rank 0 for a rendezvous address on its own node (its IP, a free
port), then every actor joins with ``init_group``. Groups are returned, never stored
in module globals.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist


class BackendUnavailable(RuntimeError):
    """A rank cannot use the backend it was asked to join with."""

    def __init__(self, backend: str, rank: int, reason: str):
        super().__init__(f"backend {backend} on rank {rank}: {reason}")
        self.backend, self.rank = backend, rank


def pick_backend(requested: str = "auto", gpus_per_actor: float | None = None) -> str:
    """What the config asks for; for ``auto``, NCCL when every rank owns a whole GPU,
    else gloo.

    NCCL refuses two ranks of one communicator on one GPU ("Duplicate GPU detected", at
    the join), so actors that share a GPU (``gpus_per_actor < 1``) get gloo, which moves
    CUDA tensors too (through host memory). ``gpus_per_actor=None``: decide by whether
    this process sees CUDA (right only where the caller runs where the ranks do).
    """
    if requested != "auto":
        return requested
    if gpus_per_actor is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if gpus_per_actor >= 1 else "gloo"


def node_ip() -> str:
    """This node's address as Ray knows it (not 127.0.0.1 on a multi-node cluster)."""
    import ray

    return ray.util.get_node_ip_address()


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def init_group(backend: str, address: str, rank: int, world_size: int, timeout_s: float):
    """Join the deployment's process group; returns it. All ranks must call this.

    With NCCL the communicator is bound to this process's current CUDA device (the one
    Ray assigned: ``CUDA_VISIBLE_DEVICES`` makes it device 0) and created here, not at
    the first collective, so an NCCL error (two ranks on one GPU, say) fails the join
    instead of the first step.
    """
    device = None
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise BackendUnavailable(backend, rank, "no CUDA device is visible; give each actor a GPU "
                                     "(resources.gpus_per_actor) or use backend gloo")
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), device_id=device)
    if device is not None:
        dist.barrier(device_ids=[device.index])  # every rank's communicator is up before the first step
    return dist.group.WORLD


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
