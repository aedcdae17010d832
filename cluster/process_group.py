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


def pick_backend(requested: str = "auto") -> str:
    """NCCL when CUDA is available, gloo otherwise (or what the config asks for)."""
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def node_ip() -> str:
    """This node's address as Ray knows it (not 127.0.0.1 on a multi-node cluster)."""
    import ray

    return ray.util.get_node_ip_address()


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def init_group(backend: str, address: str, rank: int, world_size: int, timeout_s: float):
    """Join the deployment's process group; returns it. All ranks must call this."""
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
