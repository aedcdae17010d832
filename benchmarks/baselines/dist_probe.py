"""Count the collectives a process issues by wrapping torch.distributed's own functions.

For code whose collectives we do not route ourselves (DeepSpeed's MoE layer), and for the
tests, which check raymoe's counted collectives (``workers/dispatch/collectives.py``) against what
torch.distributed itself was asked to do. While installed, every call of the functions in
``WRAPPED`` is counted in this process: calls by function name, and the bytes this rank
sent to other ranks (its own split excluded).

    probe = DistProbe.install()
    ...                      # run steps
    probe.calls, probe.bytes_sent
    probe.uninstall()

In a Ray actor: ``actor.__ray_call__.remote(lambda self: DistProbe.install() and None)``
(``installed()`` finds it again for reading).
"""

from __future__ import annotations

import math
from collections import Counter

import torch.distributed as dist

WRAPPED = ("all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor", "all_reduce", "broadcast",
           "reduce_scatter_tensor", "send", "recv", "barrier")

_INSTALLED: list["DistProbe"] = []  # at most one; lets a later call in the same process read it


def _sent_to_others(name: str, args, kwargs) -> int:
    """Bytes this rank sends to other ranks in one call of ``dist.<name>`` (the group, as
    raymoe and DeepSpeed pass it, is a keyword; None is the default group)."""
    group = kwargs.get("group")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if name == "all_to_all_single":
        send = args[1] if len(args) > 1 else kwargs["input"]
        splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
        row = math.prod(send.shape[1:]) * send.element_size()
        if not splits:
            return send.numel() * send.element_size() * (world - 1) // world
        return (sum(splits) - splits[rank]) * row
    if name == "all_to_all":
        inputs = args[1] if len(args) > 1 else kwargs["input_tensor_list"]
        return sum(t.numel() * t.element_size() for r, t in enumerate(inputs) if r != rank)
    if name in ("all_gather", "all_gather_into_tensor"):
        tensor = args[1] if len(args) > 1 else kwargs.get("tensor", kwargs.get("input_tensor"))
        return tensor.numel() * tensor.element_size() * (world - 1)
    if name == "all_reduce":  # as a ring: each rank sends 2 (W - 1) / W of the tensor
        tensor = args[0] if args else kwargs["tensor"]
        return 2 * (world - 1) * tensor.numel() * tensor.element_size() // world
    if name == "send":
        tensor = args[0] if args else kwargs["tensor"]
        return tensor.numel() * tensor.element_size()
    return 0


class DistProbe:
    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self._originals: dict[str, object] = {}

    @classmethod
    def install(cls) -> "DistProbe":
        """Wrap torch.distributed's collectives in this process (one probe at a time)."""
        if _INSTALLED:
            raise RuntimeError("a DistProbe is already installed in this process")
        probe = cls()
        for name in WRAPPED:
            original = getattr(dist, name)
            probe._originals[name] = original
            setattr(dist, name, probe._wrap(name, original))
        _INSTALLED.append(probe)
        return probe

    @staticmethod
    def installed() -> "DistProbe":
        return _INSTALLED[0]

    def _wrap(self, name: str, original):
        def counted(*args, **kwargs):
            if name != "barrier":
                self.bytes_sent[name] += _sent_to_others(name, args, kwargs)
            self.calls[name] += 1
            return original(*args, **kwargs)

        counted.__wrapped__ = original
        return counted

    def reset(self) -> None:
        self.calls.clear()
        self.bytes_sent.clear()

    def snapshot(self) -> dict:
        return {"calls": dict(self.calls), "bytes_sent": dict(self.bytes_sent)}

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        _INSTALLED.remove(self)

