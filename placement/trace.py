"""Routing traces and the statistics a planner needs from them.

Two inputs:

* ``RoutingTrace``: per-token routing, ``topk_ids: [tokens, layers, top_k]`` (raymoe's
  ``--record-trace`` ``.npz``, see docs/formats.md, or ExFlow's ``.npy`` ``[tokens,
  layers]`` of top-1 ids).
* ``RoutingStats``: aggregates, ``loads: [layers, experts]``, optionally
  ``transitions: [layers-1, experts, experts]`` and ``coactivation: [layers, experts,
  experts]`` (an ``.npy`` of loads, or an ``.npz`` with those names).

Definitions (pairs, so that top-k > 1 is counted the same way everywhere):

* ``loads[l, e]``: tokens whose top-k at layer l includes e.
* ``transitions[l, i, j]``: (token, i, j) triples with i in the token's top-k at layer
  l and j in its top-k at layer l+1 (``top_k**2`` pairs per token per boundary; for
  top-1, tokens that went from i to j).
* ``coactivation[l, i, j]``: tokens whose top-k at layer l includes both i and j
  (i != j); symmetric, zero diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placement.errors import TraceError


@dataclass(frozen=True, eq=False)
class RoutingStats:
    loads: np.ndarray                # float64 [layers, experts]
    transitions: np.ndarray | None   # float64 [layers-1, experts, experts]
    coactivation: np.ndarray | None  # float64 [layers, experts, experts], symmetric, zero diagonal
    top_k: int = 1
    num_tokens: int | None = None

    @property
    def num_layers(self) -> int:
        return self.loads.shape[0]

    @property
    def num_experts(self) -> int:
        return self.loads.shape[1]

    @classmethod
    def from_arrays(cls, loads, transitions=None, coactivation=None, top_k: int = 1,
                    num_tokens: int | None = None, source: str = "<arrays>") -> "RoutingStats":
        """Validate aggregate statistics (shapes, finite, non-negative) and wrap them."""
        loads = _as_counts(loads, "loads", source, ndim=2)
        num_layers, num_experts = loads.shape
        if transitions is not None:
            transitions = _as_counts(transitions, "transitions", source, ndim=3)
            want = (num_layers - 1, num_experts, num_experts)
            if transitions.shape != want:
                raise TraceError(source, "transitions.shape", transitions.shape, f"expected {want} for "
                                 f"loads of shape {loads.shape}", "pass [layers-1, experts, experts] counts")
        if coactivation is not None:
            coactivation = _as_counts(coactivation, "coactivation", source, ndim=3)
            if coactivation.shape != (num_layers, num_experts, num_experts):
                raise TraceError(source, "coactivation.shape", coactivation.shape,
                                 f"expected {(num_layers, num_experts, num_experts)}",
                                 "pass [layers, experts, experts] counts")
            asym = float(np.abs(coactivation - coactivation.transpose(0, 2, 1)).max(initial=0.0))
            if asym > 1e-9 * max(1.0, float(coactivation.max(initial=0.0))):
                raise TraceError(source, "coactivation", f"max |C - C^T| = {asym}", "not symmetric",
                                 "pass C + C.transpose(0, 2, 1) (counts of unordered pairs, both ways)")
            coactivation = coactivation.copy()
            coactivation[:, np.arange(num_experts), np.arange(num_experts)] = 0.0
        if top_k < 1:
            raise TraceError(source, "top_k", top_k, "must be >= 1", "pass the router's top-k")
        return cls(loads, transitions, coactivation, int(top_k), num_tokens)

    def null(self) -> "RoutingStats":
        """The load-only null model: same loads, transitions of independent layers.

        ``null.transitions[l] = outer(loads[l], loads[l+1]) / num_tokens``: what a trace
        with these loads and no inter-layer affinity would give. A planner's gain over
        this null is the gain due to affinity, not to load skew.
        """
        tokens = self.num_tokens or float(self.loads[0].sum()) / self.top_k
        trans = self.loads[:-1, :, None] * self.loads[1:, None, :] / max(tokens, 1.0)
        return RoutingStats(self.loads, trans, self.coactivation, self.top_k, self.num_tokens)


def _as_counts(array, name: str, source: str, ndim: int) -> np.ndarray:
    """Return ``array`` as float64 after checking rank, finiteness and sign."""
    try:
        out = np.asarray(array, dtype=np.float64)
    except ValueError as exc:  # ragged nested lists
        raise TraceError(source, name, "ragged", f"rows of different lengths ({exc})",
                         "pass a rectangular array") from None
    if out.ndim != ndim:
        raise TraceError(source, f"{name}.shape", out.shape, f"expected {ndim} dimensions",
                         "see placement/README.md for the expected shapes")
    if not np.isfinite(out).all():
        raise TraceError(source, name, "non-finite values", "NaN or inf in counts", "clean the data")
    if out.size and out.min() < 0:
        idx = np.unravel_index(int(np.argmin(out)), out.shape)
        raise TraceError(source, f"{name}{list(idx)}", float(out[idx]), "negative count",
                         "counts must be >= 0")
    return out


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    topk_ids: np.ndarray               # int64 [tokens, layers, top_k]
    num_experts: int
    topk_weights: np.ndarray | None = None  # float32 [tokens, layers, top_k]
    seq_ids: np.ndarray | None = None       # int64 [tokens]
    is_prompt: np.ndarray | None = None     # bool [tokens]

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[2]

    def take(self, index: np.ndarray) -> "RoutingTrace":
        """The sub-trace of tokens ``index`` (int [n] or bool [tokens])."""
        def pick(a):
            return None if a is None else a[index]
        return RoutingTrace(self.topk_ids[index], self.num_experts, pick(self.topk_weights),
                            pick(self.seq_ids), pick(self.is_prompt))

    def split(self, fit_fraction: float = 0.5) -> "TraceSplit":
        """Split into a fitting part and a held-back part.

        By request when ``seq_ids`` has at least two requests (the first
        ``fit_fraction`` of requests, in order of first appearance, are fitted), else by
        token order. Neither part is empty.
        """
        if not 0.0 < fit_fraction < 1.0 or self.num_tokens < 2:
            raise TraceError("trace", "fit_fraction", fit_fraction, f"cannot split {self.num_tokens} tokens",
                             "use 0 < fit_fraction < 1 on a trace of >= 2 tokens")
        if self.seq_ids is not None and len(np.unique(self.seq_ids)) >= 2:
            _, first = np.unique(self.seq_ids, return_index=True)
            order = self.seq_ids[np.sort(first)]
            cut = min(max(1, int(round(len(order) * fit_fraction))), len(order) - 1)
            fit = np.isin(self.seq_ids, order[:cut])
        else:
            cut = min(max(1, int(round(self.num_tokens * fit_fraction))), self.num_tokens - 1)
            fit = np.arange(self.num_tokens) < cut
        return TraceSplit(self.take(fit), self.take(~fit))

    def stats(self) -> RoutingStats:
        """Loads, transitions and co-activation counts of this trace (see module doc)."""
        ids, num_experts = self.topk_ids, self.num_experts
        num_layers, top_k = self.num_layers, self.top_k
        loads = np.stack([np.bincount(ids[:, l].ravel(), minlength=num_experts)
                          for l in range(num_layers)]).astype(np.float64)
        pairs = num_experts * num_experts
        trans = np.zeros((max(num_layers - 1, 0), num_experts, num_experts))
        for l in range(num_layers - 1):
            idx = ids[:, l, :, None] * num_experts + ids[:, l + 1, None, :]
            trans[l] = np.bincount(idx.ravel(), minlength=pairs).reshape(num_experts, num_experts)
        coact = None
        if top_k > 1:
            off = ~np.eye(top_k, dtype=bool)
            coact = np.zeros((num_layers, num_experts, num_experts))
            for l in range(num_layers):
                idx = (ids[:, l, :, None] * num_experts + ids[:, l, None, :])[:, off]
                coact[l] = np.bincount(idx.ravel(), minlength=pairs).reshape(num_experts, num_experts)
        return RoutingStats(loads, trans, coact, top_k, self.num_tokens)


@dataclass(frozen=True, eq=False)
class TraceSplit:
    fit: RoutingTrace
    held_out: RoutingTrace


def trace_from_array(topk_ids, num_experts: int | None = None, topk_weights=None, seq_ids=None,
                     is_prompt=None, source: str = "<array>") -> RoutingTrace:
    """Validate per-token routing and wrap it.

    topk_ids: int [tokens, layers, top_k] or [tokens, layers] (top-1, ExFlow). Raises
    TraceError for ragged input, ids out of [0, num_experts), repeated ids within one
    token's top-k, and arrays whose lengths disagree.
    """
    ids = _as_ids(topk_ids, source)
    if num_experts is None:
        num_experts = int(ids.max()) + 1 if ids.size else 0
    bad = np.argwhere((ids < 0) | (ids >= num_experts))
    if len(bad):
        t, l, k = (int(v) for v in bad[0])
        raise TraceError(source, f"topk_ids[{t}, {l}, {k}]", int(ids[t, l, k]),
                         f"expert id out of range [0, {num_experts}) ({len(bad)} such entries)",
                         "pass the model's num_experts, or fix the trace")
    if ids.shape[2] > 1:
        srt = np.sort(ids, axis=2)
        dup = np.argwhere((srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2))
        if len(dup):
            t, l = (int(v) for v in dup[0])
            raise TraceError(source, f"topk_ids[{t}, {l}]", ids[t, l].tolist(),
                             "an expert repeats within one token's top-k", "routers pick distinct experts")
    weights = _optional(topk_weights, ids.shape, np.float32, "topk_weights", source)
    seq = _optional(seq_ids, ids.shape[:1], np.int64, "seq_ids", source)
    prompt = _optional(is_prompt, ids.shape[:1], bool, "is_prompt", source)
    return RoutingTrace(ids, int(num_experts), weights, seq, prompt)


def _as_ids(topk_ids, source: str) -> np.ndarray:
    """int64 [tokens, layers, top_k] from a 2-D or 3-D integer array."""
    if isinstance(topk_ids, (list, tuple)):
        lengths = {len(row) if hasattr(row, "__len__") else -1 for row in topk_ids}
        if len(lengths) > 1:
            raise TraceError(source, "topk_ids row lengths", sorted(lengths), "ragged trace",
                             "every token must list the same number of layers (and top-k)")
    try:
        ids = np.asarray(topk_ids)
    except ValueError as exc:
        raise TraceError(source, "topk_ids", "ragged", str(exc), "pass a rectangular array") from None
    if ids.dtype == object:
        raise TraceError(source, "topk_ids.dtype", "object", "ragged trace (rows of different lengths)",
                         "pad or drop tokens so the array is [tokens, layers(, top_k)]")
    if ids.ndim == 2:
        ids = ids[:, :, None]
    if ids.ndim != 3 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise TraceError(source, "topk_ids.shape", ids.shape, "expected [tokens, layers, top_k] or "
                         "[tokens, layers], non-empty", "see docs/formats.md")
    if not np.issubdtype(ids.dtype, np.integer):
        if not (np.issubdtype(ids.dtype, np.floating) and np.all(ids == np.round(ids))):
            raise TraceError(source, "topk_ids.dtype", str(ids.dtype), "expert ids must be integers",
                             "save the ids as an integer array")
    return ids.astype(np.int64)


def _optional(array, shape: tuple, dtype, name: str, source: str) -> np.ndarray | None:
    if array is None:
        return None
    out = np.asarray(array).astype(dtype)
    if out.shape != tuple(shape):
        raise TraceError(source, f"{name}.shape", out.shape, f"expected {tuple(shape)} to match topk_ids",
                         "record every array for the same tokens")
    return out


def load_trace(path: str | Path, num_experts: int | None = None) -> RoutingTrace:
    """Read a routing trace: raymoe ``.npz`` (docs/formats.md) or ExFlow ``.npy``."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise TraceError(source, "path", source, "no such file", "pass an existing trace file")
    if path.suffix == ".npy":
        try:
            ids = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise TraceError(source, "array", "object/ragged", str(exc), "save a rectangular int array") from None
        return trace_from_array(ids, num_experts, source=source)
    with np.load(path, allow_pickle=False) as npz:
        if "topk_ids" not in npz.files:
            raise TraceError(source, "arrays", sorted(npz.files), "no 'topk_ids' array",
                             "record with --record-trace (docs/formats.md)")
        version = int(npz["version"]) if "version" in npz.files else 1
        if version != 1:
            raise TraceError(source, "version", version, "unsupported trace version", "use version 1")
        if num_experts is None and "num_experts" in npz.files:
            num_experts = int(npz["num_experts"])
        get = {name: npz[name] if name in npz.files else None
               for name in ("topk_weights", "seq_ids", "is_prompt")}
        return trace_from_array(npz["topk_ids"], num_experts, source=source, **get)


def load_stats(path: str | Path, top_k: int | None = None) -> RoutingStats:
    """Read aggregate statistics: ``.npy`` loads ``[layers, experts]``, or ``.npz`` with
    ``loads`` and optionally ``transitions``, ``coactivation``, ``top_k``, ``num_tokens``."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise TraceError(source, "path", source, "no such file", "pass an existing statistics file")
    if path.suffix == ".npy":
        loads = np.load(path, allow_pickle=False)
        return RoutingStats.from_arrays(loads, top_k=top_k or 1, source=source)
    with np.load(path, allow_pickle=False) as npz:
        if "loads" not in npz.files:
            raise TraceError(source, "arrays", sorted(npz.files), "no 'loads' array", "save loads=[layers, experts]")
        arrays = {name: npz[name] if name in npz.files else None for name in ("transitions", "coactivation")}
        k = top_k or (int(npz["top_k"]) if "top_k" in npz.files else 1)
        tokens = int(npz["num_tokens"]) if "num_tokens" in npz.files else None
        return RoutingStats.from_arrays(npz["loads"], top_k=k, num_tokens=tokens, source=source, **arrays)
