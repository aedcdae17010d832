"""Shared-memory mailboxes for the same-node transport: a ring buffer per ordered pair of
ranks, so a small piece of an all-to-all crosses processes as one copy into mapped memory
and one store, with no system call when the receiver is awake.

Why: on this project's 2-vCPU machine a Unix-socket dispatch + combine round trip costs
about 80-100 us, most of it the wake-up of a process sleeping in ``recv`` on the other
core; through shared memory, with the receiver spinning, it costs about 20 us of Python
(``python -m raymoe.benchmarks.step_overhead``, floors). A disaggregated decode step makes
two such exchanges per MoE layer. Without spinning the rings are slower than the sockets
(a doorbell costs the same wake-up, plus the lost-ring timeouts), so the transport uses
them only where its readers may spin.

Layout: each rank owns one segment (a file in /dev/shm, unlinked as soon as every peer has
mapped it) holding one inbound ring per source rank: a 128-byte header and ``capacity``
bytes of records. The writer owns the header's first cache line (``written``: bytes
written so far; ``bells``: doorbells rung), the reader its second (``read``: bytes read so
far; ``waiting``: the reader sleeps). A record is an int64 size and that many bytes,
padded to 8; a negative size ``-n`` says n bytes travel on the socket instead (pieces
larger than half the ring: a long prefill's).

Ordering: the writer copies the record, then stores ``written``; the reader loads
``written``, then the record, then stores ``read``; the writer loads ``read`` before it
overwrites. x86-64 keeps stores in order, loads in order, and loads before later stores
(TSO), and each access here is a separate C call the compiler cannot move, so a reader
that sees the new ``written`` sees its record. ``usable()`` says no elsewhere (other
architectures use the sockets alone).

Waiting: a reader spins for ``spin_s`` (only worth it when every rank of the group and
the coordinator can have a core of its own: ``default_spin_s``), then sets ``waiting`` and sleeps in ``select`` on the ring's
doorbell, an eventfd it made and passed to the writer over the socket; a writer that,
after storing ``written``, sees ``waiting`` rings it. x86 may let a load pass an earlier
store, so writer and reader can each miss the other's store and the ring be lost: the
sleep is therefore at most 1 ms, then the reader looks again. The reader sleeps on the
peer's socket too, which tells a dead peer (end of file) from a slow one, so a failed peer
is noticed within a millisecond, as with the sockets alone; a peer that hangs is a
``TimeoutError`` at the deadline. Rings are single-writer, single-reader: exchanges of one
group run one at a time, as collectives do.
"""

from __future__ import annotations

import mmap
import os
import platform
import select
import socket
import time

import numpy as np

HEADER = 128  # bytes per ring header: the writer's cache line, then the reader's
WRITTEN, READ, WAITING = 0, 8, 9  # int64 offsets in a header
DEFAULT_CAPACITY = 256 << 10  # record bytes per ring: a decode step's pieces fit, a long prefill's go by socket


ENV = "RAYMOE_SHARED_MEMORY"  # "1": rings with spinning readers whatever the cores; "0": sockets only


def usable() -> bool:
    """Shared-memory mailboxes need x86-64's memory order (see the module docstring) and
    /dev/shm, and are not switched off (``RAYMOE_SHARED_MEMORY=0``)."""
    if os.environ.get(ENV) == "0":
        return False
    return platform.machine() in ("x86_64", "AMD64") and os.path.isdir("/dev/shm")


def usable_cores() -> float:
    """The cores this process may run on: its affinity, capped by a cgroup v2 CPU quota (a
    container limited to 2 CPUs on a 16-core node sees 16 in its affinity)."""
    cores = float(len(os.sched_getaffinity(0)))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cores


def default_spin_s(world: int) -> float:
    """Spin while waiting only if every rank of the group, and the coordinator that drives
    its steps, can have a core to itself (or ``RAYMOE_SHARED_MEMORY=1`` says to): a
    spinning rank on a shared core takes it from the process it waits for. Measured on
    this project's 2-core machine: 2 spinning ranks made the e2e tests (Serve replicas,
    proxies and clients beside them) 19% slower than sockets (234 s against 197 s)."""
    if os.environ.get(ENV) == "1":
        return 2e-3
    return 2e-3 if usable_cores() >= world + 1 else 0.0


def _pad(n: int) -> int:
    return (n + 7) & ~7


class Mailboxes:
    """This rank's ends of the group's rings: the inbound rings of its own segment and its
    outbound ring in every peer's. Built by ``open`` (all ranks together, over the connected
    sockets of the mesh)."""

    def __init__(self, rank: int, inbound: np.ndarray, outbound: dict[int, np.ndarray], capacity: int,
                 spin_s: float, bells_in: dict[int, int], bells_out: dict[int, int]):
        """``inbound``: this rank's segment, uint8 ``[world * (HEADER + capacity)]`` (ring s
        holds what rank s sends here); ``outbound``: each peer's segment; ``bells_in`` /
        ``bells_out``: per peer, the eventfd this rank sleeps on / rings (owned here)."""
        if capacity % 8:
            raise ValueError(f"capacity must be a multiple of 8 bytes, not {capacity}")
        self.rank, self.capacity, self.spin_s = rank, capacity, spin_s
        stride = HEADER + capacity

        def ring(segment: np.ndarray, source: int) -> tuple[np.ndarray, np.ndarray]:
            at = source * stride
            return segment[at:at + HEADER].view(np.int64), segment[at + HEADER:at + stride]

        self._segments = (inbound, outbound)  # keeps the mappings alive
        self.inbound = {p: ring(inbound, p) for p in outbound}  # peer -> (header, records) of its ring here
        self.outbound = {p: ring(seg, rank) for p, seg in outbound.items()}  # peer -> my ring there
        self.written = dict.fromkeys(outbound, 0)  # bytes written to my ring at each peer
        self.read = dict.fromkeys(outbound, 0)  # bytes read from each peer's ring here
        self.bells_in, self.bells_out = bells_in, bells_out
        self.rung = 0  # doorbells this rank rang (a reader was asleep)

    @classmethod
    def open(cls, name: str, rank: int, world: int, peers: dict[int, socket.socket], capacity: int = DEFAULT_CAPACITY,
             spin_s: float | None = None) -> "Mailboxes":
        """Create this rank's segment, map every peer's, then unlink this rank's file once
        every peer has mapped it (nothing is left in /dev/shm, even if a process dies
        later). All ranks of the mesh must call this together."""
        size = world * (HEADER + capacity)
        own = f"/dev/shm/raymoe-{name}-{rank}"
        fd = os.open(own, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            try:
                os.ftruncate(fd, size)
                inbound = np.frombuffer(mmap.mmap(fd, size), dtype=np.uint8)
            finally:
                os.close(fd)
            _handshake(peers, b"C")  # every segment exists
            outbound = {p: _map(f"/dev/shm/raymoe-{name}-{p}", size) for p in peers}
            _handshake(peers, b"M")  # every peer has mapped every segment
        finally:
            os.unlink(own)
        bells_in = {p: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for p in peers}
        for p, sock in peers.items():  # each peer gets the doorbell of its ring here
            socket.send_fds(sock, [b"B"], [bells_in[p]])
        bells_out = {}
        for p, sock in peers.items():
            token, fds, _, _ = socket.recv_fds(sock, 1, 1)
            if token != b"B" or len(fds) != 1:
                raise ConnectionError(f"rank {p} sent no doorbell while opening the mailboxes")
            bells_out[p] = fds[0]
        spin_s = default_spin_s(world) if spin_s is None else spin_s
        return cls(rank, inbound, outbound, capacity, spin_s, bells_in, bells_out)

    def close(self) -> None:
        for fd in (*self.bells_in.values(), *self.bells_out.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self.bells_in, self.bells_out = {}, {}

    def post(self, peer: int, data: memoryview, sock: socket.socket, deadline: float) -> bool:
        """Append ``data`` to this rank's ring at ``peer`` and ring its doorbell if it sleeps.
        Returns False, having posted only the size, when ``data`` is larger than half the
        ring: the caller then sends it on the socket."""
        head, ring = self.outbound[peer]
        inline = len(data) <= self.capacity // 2
        need = 8 + (_pad(len(data)) if inline else 0)
        at = self.written[peer]
        if at + need - head[READ] > self.capacity:  # full: the reader is behind (rare)
            _poll(lambda: at + need - head[READ] <= self.capacity, sock, deadline)
        size = np.array([len(data) if inline else -len(data)], dtype=np.int64)
        self._put(ring, at, size.view(np.uint8))
        if inline and len(data):
            self._put(ring, at + 8, np.frombuffer(data, dtype=np.uint8))
        self.written[peer] = at + need
        head[WRITTEN] = at + need
        if head[WAITING]:  # loaded after the store of ``written`` (module docstring)
            os.eventfd_write(self.bells_out[peer], 1)
            self.rung += 1
        return inline

    def take(self, peer: int, sock: socket.socket, deadline: float,
             into: memoryview | None = None) -> tuple[int, object]:
        """Wait for ``peer``'s next record. Returns ``(size, data)``: the bytes (copied into
        ``into`` when given, else a new bytearray), or ``(size, None)`` when they travel on
        the socket (``size`` bytes, for the caller to read)."""
        head, ring = self.inbound[peer]
        at = self.read[peer]
        if head[WRITTEN] <= at:
            self._wait(head, at, sock, self.bells_in[peer], deadline)
        size = int(self._get(ring, at, 8).view(np.int64)[0])
        if size < 0:
            data, need = None, 8
        else:
            out = into if into is not None else memoryview(bytearray(size))
            if len(out) != size:
                raise ValueError(f"rank {peer} sent {size} bytes where {len(out)} were expected")
            if size:
                np.frombuffer(out, dtype=np.uint8)[:] = self._get(ring, at + 8, size)
            data, need = out, 8 + _pad(size)
        self.read[peer] = at + need
        head[READ] = at + need
        return abs(size), data

    def _put(self, ring: np.ndarray, at: int, data: np.ndarray) -> None:
        start = at % self.capacity
        first = min(len(data), self.capacity - start)
        ring[start:start + first] = data[:first]
        if first < len(data):
            ring[:len(data) - first] = data[first:]

    def _get(self, ring: np.ndarray, at: int, size: int) -> np.ndarray:
        start = at % self.capacity
        if start + size <= self.capacity:
            return ring[start:start + size]
        return np.concatenate([ring[start:], ring[:start + size - self.capacity]])

    def _wait(self, head: np.ndarray, at: int, sock: socket.socket, bell: int, deadline: float) -> None:
        """Until the ring holds bytes past ``at``: spin for ``spin_s``, then flag the ring
        and sleep on its doorbell until rung, or 1 ms (module docstring)."""
        if self.spin_s:
            until = time.perf_counter() + self.spin_s
            while time.perf_counter() < until:
                if head[WRITTEN] > at:
                    return
        _drain(bell)  # rings for records already read
        head[WAITING] = 1
        try:
            while head[WRITTEN] <= at:  # loaded after the store of ``waiting``
                if time.monotonic() > deadline:
                    raise TimeoutError("local all-to-all: a peer sent nothing before the timeout")
                readable, _, _ = select.select([bell, sock], [], [], 1e-3)
                if sock in readable and not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) \
                        and head[WRITTEN] <= at:  # a peer may post its last record and exit
                    raise ConnectionError("a peer closed its connection (its process ended)")
                if bell in readable:
                    _drain(bell)
        finally:
            head[WAITING] = 0


def _poll(ready, sock: socket.socket, deadline: float, pause: float = 20e-6, max_pause: float = 1e-3) -> None:
    """Until ``ready()``: sleep in ``select`` on the peer's socket, which wakes at a doorbell
    byte and tells a closed peer (end of file) from a slow one, with a pause that doubles up
    to ``max_pause``; ``TimeoutError`` past ``deadline``."""
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError("local all-to-all: a peer sent nothing before the timeout")
        readable, _, _ = select.select([sock], [], [], pause)
        if readable:
            if not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) and not ready():
                raise ConnectionError("a peer closed its connection (its process ended)")
            if not ready():  # bytes for later (a doorbell of the next message): do not spin on them
                time.sleep(pause)
        pause = min(pause * 2, max_pause)


def _drain(bell: int) -> None:
    try:
        os.eventfd_read(bell)
    except BlockingIOError:
        pass


def _map(path: str, size: int) -> np.ndarray:
    fd = os.open(path, os.O_RDWR)
    try:
        return np.frombuffer(mmap.mmap(fd, size), dtype=np.uint8)
    finally:
        os.close(fd)


def _handshake(peers: dict[int, socket.socket], token: bytes) -> None:
    for sock in peers.values():
        sock.sendall(token)
    for peer, sock in peers.items():
        got = sock.recv(1)
        if got != token:
            raise ConnectionError(f"rank {peer}: expected {token!r} while opening the mailboxes, got {got!r}")
