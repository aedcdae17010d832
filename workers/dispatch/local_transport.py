"""A same-node transport for the data plane: all-to-all among the ranks of one node over
Unix domain sockets, a full mesh made once per process group.

Why: on this project's CPU machines gloo's all-to-all costs about 0.2 ms between two
processes and 1 ms between three on two cores (benchmarks/RESULTS.md, "Step overhead"),
while one round trip over Unix sockets costs about 25 microseconds: a waiting rank
sleeps in ``recv`` and wakes when its bytes arrive, so three processes on two cores do
not fight for them. Across nodes the data plane stays on gloo (CPU) or NCCL (GPU); this
transport is used only for CPU tensors of ranks that share a node.

It has the semantics of ``torch.distributed.all_to_all_single`` with split sizes (and a
one-element all-gather), so ``Collectives`` counts it exactly as it counts gloo; and an
all-to-all whose receive sizes are not known in advance (``all_to_all_v``): each piece
travels behind an 8-byte row count on the same stream, so it costs one exchange where
torch.distributed needs a split-size all-to-all first.

Where every rank and the coordinator can have a core of their own (or
``RAYMOE_SHARED_MEMORY=1``), small pieces go through shared-memory rings instead (``shm_mailbox.py``: no system call while the receiver spins, about a quarter of
a socket round trip here); the sockets stay for large pieces and to tell a dead peer.

Sockets are abstract (Linux: no file), named after the group's rendezvous; a peer that
dies closes its sockets (``ConnectionError`` here), one that hangs makes ``recv`` time
out after ``timeout_s`` (``TimeoutError``), as gloo's collectives do. A rank whose
exchange fails closes all its sockets, so a peer waiting on it fails at once instead of
at its timeout: one failure breaks the whole mesh within milliseconds, and the
coordinator rebuilds it (``cluster/recovery.py``).

Shapes: W = ranks; a tensor's rows are its first dimension.
"""

from __future__ import annotations

import math
import selectors
import socket
import time

import torch

from raymoe.workers.dispatch import shm_mailbox
from raymoe.workers.dispatch.shm_mailbox import Mailboxes

SMALL = 64 << 10  # below this per peer, sends cannot block (the socket buffer holds them): no select loop


class LocalTransport:
    def __init__(self, rank: int, world: int, peers: dict[int, socket.socket], timeout_s: float,
                 boxes: Mailboxes | None = None):
        self.rank, self.world, self.peers, self.timeout_s = rank, world, peers, timeout_s
        self.boxes = boxes  # shared-memory rings for small pieces, or None: everything on the sockets

    @classmethod
    def connect(cls, name: str, rank: int, world: int, timeout_s: float,
                shared_memory: bool | None = None) -> "LocalTransport":
        """Build the mesh. All ranks must call this together with the same ``name`` and
        ``shared_memory`` (None: where ``shm_mailbox`` is usable and its readers may spin,
        ``shm_mailbox.default_spin_s``). The lower rank of each pair listens, the higher
        connects."""
        def address(low: int, high: int) -> str:
            return f"\0raymoe-{name}-{low}-{high}"

        listeners = {}
        for peer in range(rank + 1, world):
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(address(rank, peer))
            server.listen(1)
            listeners[peer] = server
        peers, deadline = {}, time.monotonic() + timeout_s
        for peer in range(rank):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            while True:
                try:
                    sock.connect(address(peer, rank))
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"rank {rank}: rank {peer} did not listen within {timeout_s} s") from None
                    time.sleep(0.002)
            sock.sendall(rank.to_bytes(4, "little"))
            peers[peer] = sock
        for peer, server in listeners.items():
            server.settimeout(max(deadline - time.monotonic(), 0.1))
            conn, _ = server.accept()
            server.close()
            hello = _recv_exact(conn, 4, time.monotonic() + timeout_s)
            assert int.from_bytes(hello, "little") == peer, "a stranger joined the mesh"
            peers[peer] = conn
        for sock in peers.values():
            sock.settimeout(timeout_s)
        if shared_memory is None:  # it pays only where the waiting ranks can spin (shm_mailbox.default_spin_s)
            shared_memory = shm_mailbox.usable() and shm_mailbox.default_spin_s(world) > 0
        boxes = Mailboxes.open(name, rank, world, peers) if shared_memory and world > 1 else None
        return cls(rank, world, peers, timeout_s, boxes)

    def close(self) -> None:
        for sock in self.peers.values():
            try:
                sock.close()
            except OSError:
                pass
        self.peers = {}
        if self.boxes is not None:
            self.boxes.close()
            self.boxes = None

    def all_to_all_single(self, recv: torch.Tensor, send: torch.Tensor, recv_splits: list[int],
                          send_splits: list[int]) -> None:
        """``torch.distributed.all_to_all_single`` with splits (rows), CPU tensors. All ranks
        must call this, in the same order, with matching splits."""
        row = math.prod(send.shape[1:]) * send.element_size()
        out = _bytes(send.contiguous())
        into = _bytes(recv)
        send_at = _offsets(send_splits, row)
        recv_at = _offsets(recv_splits, row)
        me = self.rank
        into[recv_at[me]:recv_at[me] + recv_splits[me] * row] = out[send_at[me]:send_at[me] + send_splits[me] * row]
        outgoing = {p: out[send_at[p]:send_at[p] + send_splits[p] * row] for p in self.peers if send_splits[p]}
        incoming = {p: into[recv_at[p]:recv_at[p] + recv_splits[p] * row] for p in self.peers if recv_splits[p]}
        if len(self.peers) != self.world - 1:
            raise ConnectionError("the local transport was broken by an earlier failure; rebuild the group")
        try:
            if self.boxes is not None:
                self._mail(outgoing, incoming)
                return
            self._exchange(outgoing, incoming)
        except (OSError, TimeoutError, ValueError):  # ValueError: a peer sent another size
            self.close()  # the peers waiting on this rank fail now, not at their timeout
            raise

    def all_to_all_v(self, send: torch.Tensor, send_splits: list[int]) -> tuple[torch.Tensor, list[int]]:
        """All-to-all with the receive sizes learnt in-band: each rank sends ``send_splits[r]``
        rows to rank r behind their count; returns the rows received (grouped by source)
        and how many from each. All ranks must call this, in the same order."""
        row = math.prod(send.shape[1:]) * send.element_size()
        out = _bytes(send.contiguous())
        send_at = _offsets(send_splits, row)
        me = self.rank
        if len(self.peers) != self.world - 1:
            raise ConnectionError("the local transport was broken by an earlier failure; rebuild the group")
        deadline = time.monotonic() + self.timeout_s
        try:
            pieces = {p: out[send_at[p]:send_at[p] + send_splits[p] * row] for p in self.peers}
            if self.boxes is not None and row:
                received = self._mail(pieces, None)
                counts = {p: len(v) // row for p, v in received.items()}
            elif all(len(v) <= SMALL for v in pieces.values()):
                for peer, data in pieces.items():
                    self.peers[peer].sendall(send_splits[peer].to_bytes(8, "little") + bytes(data))
                counts, received = {}, {}
                for peer in sorted(self.peers):
                    head = bytearray(8)
                    _recv_into(self.peers[peer], memoryview(head), deadline)
                    counts[peer] = int.from_bytes(head, "little")
                    received[peer] = bytearray(counts[peer] * row)
                    _recv_into(self.peers[peer], memoryview(received[peer]), deadline)
            else:  # large pieces: the counts first, then the interleaved exchange
                sizes = torch.tensor(send_splits, dtype=torch.int64)
                got = torch.empty(self.world, dtype=torch.int64)
                self.all_to_all_single(got, sizes, [1] * self.world, [1] * self.world)
                counts = {p: int(got[p]) for p in self.peers}
                received = {p: bytearray(counts[p] * row) for p in self.peers}
                self._exchange({p: v for p, v in pieces.items() if len(v)},
                               {p: memoryview(b) for p, b in received.items() if len(b)})
        except (OSError, TimeoutError, ValueError):  # ValueError: a peer sent another size
            self.close()
            raise
        recv_splits = [send_splits[me] if r == me else counts[r] for r in range(self.world)]
        recv = send.new_empty(sum(recv_splits), *send.shape[1:])
        into = _bytes(recv)
        at = 0
        for r in range(self.world):
            size = recv_splits[r] * row
            into[at:at + size] = out[send_at[me]:send_at[me] + size] if r == me else received[r]
            at += size
        return recv, recv_splits

    def all_gather_int(self, value: int) -> list[int]:
        """Every rank's ``value`` in rank order. All ranks must call this together."""
        send = torch.full((self.world,), value, dtype=torch.int64)
        recv = torch.empty(self.world, dtype=torch.int64)
        self.all_to_all_single(recv, send, [1] * self.world, [1] * self.world)
        return recv.tolist()

    def _mail(self, outgoing: dict[int, memoryview], incoming: dict[int, memoryview] | None) -> dict[int, memoryview]:
        """One exchange through the shared-memory rings: a record to every peer (empty
        where there is nothing to send), then one from every peer. Pieces too large for a
        ring announce their size there and travel on the sockets after. ``incoming``: where
        each peer's bytes go (sizes known), or None: returns new buffers (sizes learnt)."""
        deadline = time.monotonic() + self.timeout_s
        empty = memoryview(b"")
        by_socket_out = {}
        for peer in sorted(self.peers):
            data = outgoing.get(peer, empty)
            if not self.boxes.post(peer, data, self.peers[peer], deadline):
                by_socket_out[peer] = data
        received, by_socket_in = {}, {}
        for peer in sorted(self.peers):
            into = None if incoming is None else incoming.get(peer, empty)
            size, data = self.boxes.take(peer, self.peers[peer], deadline, into)
            if data is None:
                if into is not None and len(into) != size:
                    raise ValueError(f"rank {peer} sent {size} bytes where {len(into)} were expected")
                data = into if into is not None else memoryview(bytearray(size))
                by_socket_in[peer] = data
            received[peer] = data
        if by_socket_out or by_socket_in:
            self._exchange(by_socket_out, by_socket_in)
        return received

    def _exchange(self, outgoing: dict[int, memoryview], incoming: dict[int, memoryview]) -> None:
        deadline = time.monotonic() + self.timeout_s
        if all(len(v) <= SMALL for v in outgoing.values()):
            for peer, data in outgoing.items():
                self.peers[peer].sendall(data)
            for peer, view in incoming.items():
                _recv_into(self.peers[peer], view, deadline)
            return
        self._exchange_interleaved(outgoing, incoming, deadline)

    def _exchange_interleaved(self, outgoing, incoming, deadline) -> None:
        """Large pieces: send and receive at once (two ranks sending each other more than a
        socket buffer would otherwise both block in ``send``)."""
        sent = {p: 0 for p in outgoing}
        got = {p: 0 for p in incoming}
        with selectors.DefaultSelector() as selector:
            for peer, sock in self.peers.items():
                events = (selectors.EVENT_WRITE if peer in outgoing else 0) | \
                    (selectors.EVENT_READ if peer in incoming else 0)
                if events:
                    sock.setblocking(False)
                    selector.register(sock, events, peer)
            try:
                while any(sent[p] < len(outgoing[p]) for p in sent) or any(got[p] < len(incoming[p]) for p in got):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"local all-to-all: no progress within {self.timeout_s} s")
                    for key, mask in selector.select(left):
                        peer, sock = key.data, key.fileobj
                        if mask & selectors.EVENT_WRITE and sent.get(peer, 0) < len(outgoing.get(peer, b"")):
                            sent[peer] += sock.send(outgoing[peer][sent[peer]:])
                        if mask & selectors.EVENT_READ and got.get(peer, 0) < len(incoming.get(peer, b"")):
                            n = sock.recv_into(incoming[peer][got[peer]:])
                            if n == 0:
                                raise ConnectionError(f"rank {peer} closed its connection")
                            got[peer] += n
            finally:
                for key in list(selector.get_map().values()):
                    key.fileobj.setblocking(True)
                    key.fileobj.settimeout(self.timeout_s)


def _bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    if t.numel() == 0:
        return memoryview(bytearray(0))
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")


def _offsets(splits: list[int], row: int) -> list[int]:
    out, at = [], 0
    for n in splits:
        out.append(at)
        at += n * row
    return out


def _recv_into(sock: socket.socket, view: memoryview, deadline: float) -> None:
    got = 0
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except socket.timeout:
            raise TimeoutError("local all-to-all: a peer sent nothing before the timeout") from None
        if n == 0:
            raise ConnectionError("a peer closed its connection (its process ended)")
        got += n


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    buf = bytearray(size)
    _recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)
