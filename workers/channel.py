"""A message channel between the coordinator and one actor: pickled objects, length-prefixed,
over one TCP connection (loopback on one node, the node IP across nodes).

This is the step path that replaces a Ray call per actor per step (the pattern of vLLM's
RayExecutorV2: Ray starts, places and watches the actors; step inputs travel over a
socket; tensors over torch.distributed). A message costs a pickle and one ``sendall``
(tens of microseconds on one node), where a Ray actor call costs milliseconds.

The actor listens (``Listener``, a port on its own node), the coordinator connects
(``connect``); the two sides then exchange ``Channel.send`` / ``Channel.recv`` in turn.
A closed connection reads as ``ChannelClosed``; a ``recv`` past its deadline raises
``TimeoutError``.
"""

from __future__ import annotations

import pickle
import socket
import struct

_HEADER = struct.Struct("!Q")  # payload length, bytes


class ChannelClosed(ConnectionError):
    """The other side closed the connection (its process ended, or it closed the channel)."""


class Channel:
    def __init__(self, sock: socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small messages go out at once
        self.sock = sock
        self._buffer = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: object) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.sock.sendall(_HEADER.pack(len(payload)) + payload)
        except OSError as exc:
            raise ChannelClosed(f"send failed: {exc}") from exc

    def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            try:
                chunk = self.sock.recv(max(size - len(self._buffer), 1 << 16))
            except OSError as exc:
                if isinstance(exc, (socket.timeout, TimeoutError)):
                    raise TimeoutError("no message before the deadline") from None
                raise ChannelClosed(f"receive failed: {exc}") from exc
            if not chunk:
                raise ChannelClosed("the other side closed the channel")
            self._buffer += chunk

    def recv(self, timeout: float | None = None) -> object:
        """The next message; ``timeout`` seconds at most (None: wait forever). A message is
        never lost to a timeout: bytes already read stay buffered for the next call."""
        self.sock.settimeout(timeout)
        self._fill(_HEADER.size)
        (size,) = _HEADER.unpack_from(self._buffer)
        self._fill(_HEADER.size + size)
        payload = bytes(self._buffer[_HEADER.size:_HEADER.size + size])
        del self._buffer[:_HEADER.size + size]
        return pickle.loads(payload)

    def has_buffered(self) -> bool:
        """Bytes of a next message are already read (``select`` would not see them)."""
        return bool(self._buffer)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Listener:
    """The actor's end: a listening socket on ``host``; ``accept`` the coordinator once."""

    def __init__(self, host: str):
        self.sock = socket.create_server((host, 0))
        self.address = f"{host}:{self.sock.getsockname()[1]}"

    def accept(self, timeout: float | None = None) -> Channel:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(None)
        self.sock.close()  # one coordinator per actor
        return Channel(conn)


def connect(address: str, timeout: float = 30.0) -> Channel:
    """The coordinator's end: connect to an actor's ``Listener.address`` (``host:port``)."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.settimeout(None)
    return Channel(sock)
