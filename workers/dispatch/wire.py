"""The wire format of token rows: several 2-D tensors of any dtypes, row by row, as one
uint8 tensor, so one collective carries them all.

A dispatch row (``encode_rows``): ``[x (D values of the model dtype) | local slot ids
(A x int32, -1 = not on the receiving rank) | weights (A x float32)]``.
"""

from __future__ import annotations

import torch


def row_bytes(hidden: int, top_k: int, dtype: torch.dtype) -> int:
    return hidden * torch.finfo(dtype).bits // 8 + 8 * top_k


def pack_parts(*parts: torch.Tensor) -> torch.Tensor:
    """2-D tensors with N rows each (any dtypes) -> one uint8 ``[N, bytes]`` buffer, row by row."""
    n = parts[0].shape[0]
    widths = [p.shape[1] * p.element_size() for p in parts]
    if n == 0:  # an empty tensor may carry strides that refuse a byte view
        return torch.empty(0, sum(widths), dtype=torch.uint8, device=parts[0].device)
    return torch.cat([p.contiguous().view(torch.uint8).reshape(n, w) for p, w in zip(parts, widths)], 1)


def unpack_parts(buf: torch.Tensor, spec: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Inverse of ``pack_parts``: ``spec`` lists (dtype, columns) of each part, in order."""
    out, start = [], 0
    for dtype, columns in spec:
        width = columns * (torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits) // 8
        out.append(buf[:, start : start + width].contiguous().view(dtype))
        start += width
    return out


def encode_rows(x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``x [N, D]``, ``local_ids [N, A]`` int32, ``weights [N, A]`` float32 -> uint8 ``[N, row_bytes]``."""
    return pack_parts(x, local_ids.to(torch.int32), weights.to(torch.float32))


def decode_rows(buf: torch.Tensor, hidden: int, top_k: int, dtype: torch.dtype):
    """Inverse of ``encode_rows``: ``x [N, D]``, ``local_ids [N, A]`` int64, ``weights [N, A]``."""
    x, ids, weights = unpack_parts(buf, [(dtype, hidden), (torch.int32, top_k), (torch.float32, top_k)])
    return x, ids.long(), weights
