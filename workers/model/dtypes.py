"""Serving dtypes by name, and ``auto``: what a deployment or engine computes in.

``auto`` (the default) picks, as vLLM's ``--dtype auto`` does, from the checkpoint's
``config.json`` (``dtype``, or the older ``torch_dtype``) and from where the weights run:

- on GPUs: the checkpoint's dtype when it is bfloat16 or float16; bfloat16 when it is
  float32 or says nothing (half the memory; fp32 GEMMs leave tensor cores idle);
- on CPUs: float32 whatever the checkpoint says (bfloat16 and float16 matmuls are several
  times slower than float32 on CPUs without AMX, and this project's machines have none).

Every choice comes with the reason, which the engines log.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = ("auto", *DTYPES)
HALF = ("bfloat16", "float16")


def checkpoint_dtype(raw_config: dict) -> str | None:
    """The dtype a ``config.json`` declares (``dtype``, else ``torch_dtype``), as written, or None."""
    for field in ("dtype", "torch_dtype"):
        value = raw_config.get(field)
        if isinstance(value, str) and value:
            return value.removeprefix("torch.")
    return None


def resolve(requested: str, declared: str | None, on_gpu: bool) -> tuple[str, str]:
    """``(dtype name, why)`` for a request (``auto`` or a name in ``DTYPES``), the
    checkpoint's declared dtype (``checkpoint_dtype``) and where the weights run.

    Raises ValueError for a name that is neither."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype {requested!r} is not one of {list(CHOICES)}")
        return requested, "asked for"
    said = f"the checkpoint says {declared}" if declared else "the checkpoint declares no dtype"
    if not on_gpu:
        return "float32", f"auto on CPU ({said}; half-precision matmuls are slow on CPUs)"
    if declared in HALF:
        return declared, f"auto on GPU ({said})"
    return "bfloat16", f"auto on GPU ({said})"
