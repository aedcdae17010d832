"""Real processes for the multi-process unit tests (gloo and the same-node transport between
ranks): forked from one forkserver that has imported torch and the test modules once,
instead of spawned (a spawned child imports torch and its test module again, ~2.5 s of CPU
each on the 2-core machine). The forkserver is a fresh interpreter, so nothing the test
session started (Ray's threads, OpenMP pools) is forked."""

from __future__ import annotations

import torch.multiprocessing as mp

PRELOAD = ["torch", "tests.unit.test_dispatch", "tests.unit.test_local_transport"]
CONTEXT = mp.get_context("forkserver")
CONTEXT.set_forkserver_preload(PRELOAD)


def start_processes(fn, args: tuple, nprocs: int, join: bool = True):
    """``torch.multiprocessing.start_processes`` from the forkserver: ``fn(rank, *args)``
    in ``nprocs`` processes; with ``join``, waits and raises a child's exception."""
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=join, start_method="forkserver")
