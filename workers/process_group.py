"""torch.distributed process groups for a deployment: backend choice, rendezvous, init.

The coordinator asks rank 0 for a rendezvous address on its own node (its IP, a free
port), then every actor joins with ``join_groups``. Groups are returned in a
``ProcessGroups``, never stored in module globals.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class BackendUnavailable(RuntimeError):
    """A rank cannot use the backend it was asked to join with."""

    def __init__(self, backend: str, rank: int, reason: str):
        super().__init__(f"backend {backend} on rank {rank}: {reason}")
        self.backend, self.rank = backend, rank


def data_plane(backend: str, requested: str, node_ips: list[str], gpus_per_actor: float) -> str:
    """``local`` where gloo would carry CPU tensors between ranks that share one node
    (``requested`` auto, no GPUs, one node IP): the same-node transport is ~40x faster
    than gloo there (``workers/dispatch/local_transport.py``). Otherwise ``backend``.

    Raises ValueError for ``requested`` local when the ranks are on several nodes or have GPUs."""
    one_node = len(set(node_ips)) == 1
    if requested == "local":
        if not one_node or gpus_per_actor:
            raise ValueError(f"backend local needs every rank on one node and no GPUs (nodes {sorted(set(node_ips))},"
                             f" {gpus_per_actor:g} GPUs per actor); use auto or gloo")
        return "local"
    if requested == "auto" and backend == "gloo" and one_node and not gpus_per_actor:
        return "local"
    return backend


def pick_backend(requested: str = "auto", gpus_per_actor: float | None = None) -> str:
    """What the config asks for; for ``auto``, NCCL when every rank owns a whole GPU,
    else gloo.

    NCCL refuses two ranks of one communicator on one GPU ("Duplicate GPU detected", at
    the join), so actors that share a GPU (``gpus_per_actor < 1``) get gloo, which moves
    CUDA tensors too (through host memory). ``gpus_per_actor=None``: decide by whether
    this process sees CUDA (right only where the caller runs where the ranks do).
    """
    if requested == "local":
        return "gloo"  # the groups; data_plane() decides once the actors' nodes are known
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


@dataclass(frozen=True)
class ProcessGroups:
    """The torch.distributed groups one actor belongs to, by name. Passed to what
    communicates (``workers/dispatch/collectives.py``), never kept in a module global.

    expert_parallel: every actor of the deployment, front-end ranks first, then expert
    ranks (the data plane's group). More named groups (front-end groups for M front-ends,
    DESIGN.md) are added here as fields.
    """

    backend: str  # gloo, nccl, or local (gloo groups; the data over a same-node LocalTransport)
    rank: int  # this actor's rank in the deployment
    size: int
    expert_parallel: object  # torch.distributed ProcessGroup
    created: tuple = ()  # the groups join_groups made for this actor, destroyed by leave_groups
    owns_default: bool = False  # join_groups initialised torch.distributed's default group
    transport: object = None  # backend local: the LocalTransport of the expert-parallel ranks


def join_groups(backend: str, address: str, rank: int, world_size: int, timeout_s: float) -> ProcessGroups:
    """Join the deployment's process groups; all ranks must call this together.

    torch.distributed needs a default group to make others: it is initialised here (TCP
    rendezvous at ``address``) unless this process already has one; the named groups are
    then created over it. With NCCL the communicators are bound to this process's current
    CUDA device (the one Ray assigned: ``CUDA_VISIBLE_DEVICES`` makes it device 0) and
    created here, not at the first collective, so an NCCL error (two ranks on one GPU,
    say) fails the join instead of the first step.
    """
    device = None
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise BackendUnavailable(backend, rank, "no CUDA device is visible; give each actor a GPU "
                                     "(resources.gpus_per_actor) or use backend gloo")
        device = torch.device("cuda", torch.cuda.current_device())
    torch_backend = "gloo" if backend == "local" else backend
    owns_default = not dist.is_initialized()
    if owns_default:
        dist.init_process_group(torch_backend, init_method=f"tcp://{address}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), device_id=device)
    expert_parallel = dist.new_group(list(range(world_size)), timeout=timedelta(seconds=timeout_s),
                                     backend=torch_backend)
    if device is not None:
        dist.barrier(group=expert_parallel, device_ids=[device.index])  # communicators up before the first step
    transport = None
    if backend == "local":
        from raymoe.workers.dispatch.local_transport import LocalTransport

        transport = LocalTransport.connect(address.replace(":", "-"), rank, world_size, timeout_s)
    return ProcessGroups(backend, rank, world_size, expert_parallel, (expert_parallel,), owns_default, transport)


def leave_groups(groups: ProcessGroups | None) -> None:
    """Destroy what ``join_groups`` created for this actor, newest first (and the default
    group only if it made it)."""
    if groups is None:
        return
    if groups.transport is not None:
        groups.transport.close()
    if not dist.is_initialized():
        return
    for group in reversed(groups.created):
        dist.destroy_process_group(group)
    if groups.owns_default:
        dist.destroy_process_group()
