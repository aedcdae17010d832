"""The same-node transport against gloo, on its sockets alone and with its shared-memory
rings: the same all-to-alls (random splits, small and large pieces, 1-D and 2-D, empty)
give the same bytes and the same counted tallies; a dead peer fails the others at once; a
silent one times out; the rings keep order across wrap-around and leave nothing in
/dev/shm."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.forked import CONTEXT, start_processes

from raymoe.workers.process_group import free_port

WORLD = 3


def _cases(rank: int, seed: int):
    """The same sequence of (send tensor, send splits, recv splits) on every rank."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 40, (6, WORLD, WORLD), generator=g)  # [case, src, dst] rows
    sizes[3] *= 2000  # pieces of ~hundreds of KB: the interleaved path
    sizes[4] = 0  # nothing at all
    for case, width, dtype in zip(range(6), (7, 1, 0, 33, 5, 3), (torch.float32, torch.int64, torch.float32,
                                                                     torch.uint8, torch.float32, torch.bfloat16)):
        send_splits, recv_splits = sizes[case, rank].tolist(), sizes[case, :, rank].tolist()
        shape = (sum(send_splits),) + ((width,) if width else ())
        send = (torch.arange(int(torch.tensor(shape).prod())).reshape(shape) + 1000 * rank).to(dtype)
        yield send, send_splits, recv_splits


def _compare_worker(rank: int, port: int, shared_memory: bool, results) -> None:
    import torch.distributed as dist

    from raymoe.workers.dispatch.collectives import Collectives
    from raymoe.workers.process_group import join_groups, leave_groups

    from raymoe.workers.dispatch.local_transport import LocalTransport

    groups = join_groups("gloo", f"127.0.0.1:{port}", rank, WORLD, 30.0)
    transport = LocalTransport.connect(f"cmp-{port}", rank, WORLD, 30.0, shared_memory=shared_memory)
    assert (transport.boxes is not None) == shared_memory
    local, gloo = Collectives(groups.expert_parallel, transport), Collectives(groups.expert_parallel)
    same, cases = [], 0
    for _ in range(2):  # twice: the rings wrap around (each holds 256 KiB)
        for send, send_splits, recv_splits in _cases(rank, seed=3):
            a = local.all_to_all("dispatch", send, send_splits, recv_splits)
            b = gloo.all_to_all("dispatch", send, send_splits, recv_splits)
            (va, sa), (vb, sb) = local.all_to_all_v("merge", send, send_splits), gloo.all_to_all_v("merge", send,
                                                                                                   send_splits)
            same.append(bool(torch.equal(a, b)) and bool(torch.equal(va, vb)) and sa == sb == recv_splits)
            cases += 1
    counts = [local.exchange_counts("metadata", [rank * 10 + r for r in range(WORLD)], torch.device("cpu")),
              gloo.exchange_counts("metadata", [rank * 10 + r for r in range(WORLD)], torch.device("cpu"))]
    gathered = [local.gather_counts("kv_coherence", rank + 5, None), gloo.gather_counts("kv_coherence", rank + 5, None)]
    # the same bytes; gloo needs one split-size exchange per all_to_all_v, the local transport none
    calls_match = all(local.tally.calls[p] == gloo.tally.calls[p] - (cases if p == "metadata" else 0)
                      for p in local.tally.calls)
    results.put((rank, same, counts[0] == counts[1], gathered[0] == gathered[1] == [5, 6, 7],
                 local.tally.bytes == gloo.tally.bytes and calls_match))
    dist.barrier()
    transport.close()
    leave_groups(groups)


@pytest.mark.parametrize("shared_memory", [False, True], ids=["sockets", "shared-memory"])
def test_local_transport_equals_gloo(shared_memory):
    results = CONTEXT.Queue()
    start_processes(_compare_worker, (free_port("127.0.0.1"), shared_memory, results), WORLD)
    got = sorted(results.get(timeout=60) for _ in range(WORLD))
    assert got == [(r, [True] * 12, True, True, True) for r in range(WORLD)]
    assert not _leftover_segments()


def _failure_worker(rank: int, port: int, shared_memory: bool, results) -> None:
    from raymoe.workers.dispatch.local_transport import LocalTransport

    t = LocalTransport.connect(f"fail-{port}", rank, WORLD, 5.0, shared_memory=shared_memory)
    one = torch.ones(1, 4)
    t.all_to_all_single(torch.empty(WORLD, 4), one.repeat(WORLD, 1), [1] * WORLD, [1] * WORLD)  # all alive
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # dies before the second exchange
    started = time.monotonic()
    try:
        # rank 1 expects nothing from rank 2 here: it fails because rank 0 fails and closes its sockets
        recv_splits = [0, 1, 0] if rank == 0 else [1, 0, 0]
        send_splits = [0, 1, 1] if rank == 0 else [1, 0, 0]
        t.all_to_all_single(torch.empty(sum(recv_splits), 4), one.repeat(sum(send_splits), 1), recv_splits,
                            send_splits)
        t.all_to_all_single(torch.empty(WORLD, 4), one.repeat(WORLD, 1), [1] * WORLD, [1] * WORLD)
        outcome = "no error"
    except (ConnectionError, TimeoutError) as exc:
        outcome = type(exc).__name__
    results.put((rank, outcome, time.monotonic() - started < 2.0))


@pytest.mark.parametrize("shared_memory", [False, True], ids=["sockets", "shared-memory"])
def test_a_dead_peer_fails_every_rank_at_once(shared_memory):
    results = CONTEXT.Queue()
    procs = start_processes(_failure_worker, (free_port("127.0.0.1"), shared_memory, results), WORLD, join=False)
    got = sorted(results.get(timeout=60) for _ in range(WORLD - 1))
    for p in procs.processes:
        p.join(timeout=30)
    assert [g[0] for g in got] == [0, 1]
    assert all(outcome in ("ConnectionError", "BrokenPipeError", "ConnectionResetError") or "Connection" in outcome
               for _, outcome, _ in got), got
    assert all(fast for _, _, fast in got), got  # well before the 5 s timeout


def _silent_worker(rank: int, port: int, shared_memory: bool, results) -> None:
    from raymoe.workers.dispatch.local_transport import LocalTransport

    t = LocalTransport.connect(f"silent-{port}", rank, 2, 1.0, shared_memory=shared_memory)
    started = time.monotonic()
    if rank == 1:
        time.sleep(3)  # never takes part
        results.put((rank, "slept", True))
        return
    try:
        t.all_to_all_single(torch.empty(1, 2), torch.ones(1, 2), [0, 1], [0, 1])
        results.put((rank, "no error", False))
    except TimeoutError:
        results.put((rank, "TimeoutError", 0.9 < time.monotonic() - started < 2.5))


@pytest.mark.parametrize("shared_memory", [False, True], ids=["sockets", "shared-memory"])
def test_a_silent_peer_times_out(shared_memory):
    results = CONTEXT.Queue()
    start_processes(_silent_worker, (free_port("127.0.0.1"), shared_memory, results), 2)
    got = sorted(results.get(timeout=30) for _ in range(2))
    assert got == [(0, "TimeoutError", True), (1, "slept", True)]


def _leftover_segments() -> list[str]:
    return [p.name for p in Path("/dev/shm").glob("raymoe-*")]


@pytest.mark.parametrize("spin_s", [0.0, 2e-3], ids=["sleeping", "spinning"])
def test_rings_keep_order_across_wrap_around_and_size(spin_s):
    """Two ranks (threads) send each other 400 messages of random sizes through 1 KiB
    rings: every one arrives whole and in order, the ones over half a ring are announced
    for the socket, and the doorbell wakes a sleeping reader."""
    from raymoe.workers.dispatch.shm_mailbox import Mailboxes

    a, b = socket.socketpair()
    name, boxes, sizes = f"wrap-{os.getpid()}-{spin_s}", {}, [random.Random(7).randrange(0, 700) for _ in range(400)]

    def open_rank(rank, sock):
        boxes[rank] = Mailboxes.open(name, rank, 2, {1 - rank: sock}, capacity=1024, spin_s=spin_s)

    opener = threading.Thread(target=open_rank, args=(1, b))
    opener.start()
    open_rank(0, a)
    opener.join()
    deadline = time.monotonic() + 60
    got: list[tuple[int, bytes | None]] = []

    def reader():
        for _ in sizes:
            if len(got) % 50 == 0:
                time.sleep(0.003)  # let the writer fill the ring and wait for room
            size, data = boxes[1].take(0, b, deadline)
            got.append((size, None if data is None else bytes(data)))

    thread = threading.Thread(target=reader)
    thread.start()
    inline = []
    for i, n in enumerate(sizes):
        if i % 97 == 0:
            time.sleep(0.005)  # the reader sleeps on its doorbell
        inline.append(boxes[0].post(1, memoryview(bytes([i % 251]) * n), a, deadline))
    thread.join()
    assert inline == [n <= 512 for n in sizes]
    assert got == [(n, bytes([i % 251]) * n if n <= 512 else None) for i, n in enumerate(sizes)]
    assert not _leftover_segments()
    assert boxes[0].rung > 0  # the reader slept, and was woken
    for m in boxes.values():
        m.close()
    a.close()
    b.close()
