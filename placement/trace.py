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

import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raymoe.placement.errors import TraceError


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
        raw = np.asarray(array)
    except ValueError as exc:  # ragged nested lists
        raise TraceError(source, name, "ragged", f"rows of different lengths ({exc})",
                         "pass a rectangular array") from None
    if raw.dtype.kind not in "iuf":  # bool, complex, str, datetime, records: not counts
        raise TraceError(source, f"{name}.dtype", str(raw.dtype), "counts must be integers or floats",
                         "save the counts as an int or float array")
    out = raw.astype(np.float64)
    if out.ndim != ndim or 0 in out.shape:
        raise TraceError(source, f"{name}.shape", out.shape, f"expected {ndim} non-empty dimensions",
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
    out = np.asarray(array)
    if out.dtype.kind not in "biuf":
        raise TraceError(source, f"{name}.dtype", str(out.dtype), "expected numbers",
                         f"save {name} as numbers ({np.dtype(dtype).name}, docs/formats.md)")
    out = out.astype(dtype)
    if out.shape != tuple(shape):
        raise TraceError(source, f"{name}.shape", out.shape, f"expected {tuple(shape)} to match topk_ids",
                         "record every array for the same tokens")
    return out


TRACE_FORMS = "a raymoe .npz (generate --record-trace) or an ExFlow .npy of ids [tokens, layers]"
STATS_FORMS = "an .npy of loads [layers, experts] or an .npz with a 'loads' array"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first member, or an empty zip
# What np.load raises on a file it cannot read: truncated or corrupt zip or array data,
# a bad header, pickled objects, an encrypted or oddly compressed member, absurd shapes.
_UNREADABLE = (OSError, EOFError, ValueError, MemoryError, NotImplementedError, RuntimeError,
               zipfile.BadZipFile, zlib.error, pickle.UnpicklingError)


def read_arrays(path: str | Path, forms: str) -> np.ndarray | dict[str, np.ndarray]:
    """The array of an ``.npy`` file, or every array of an ``.npz`` archive by name (all
    read now, so a truncated member fails here, not halfway through planning).

    Decided by the file's signature, not its suffix. Raises TraceError naming the file for
    anything numpy cannot read: missing, empty, not NumPy data, truncated or corrupt,
    object arrays (never unpickled). ``forms`` says what the file should be, for the fix.
    """
    path = Path(path)
    source = str(path)
    fix = f"pass {forms} (docs/formats.md)"
    if not path.is_file():
        raise TraceError(source, "path", source, "not a file" if path.exists() else "no such file", fix)
    try:
        with path.open("rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise TraceError(source, "path", source, f"cannot be read ({exc.strerror})", fix) from None
    if not head:
        raise TraceError(source, "size", 0, "the file is empty", fix)
    kind = ".npy" if head == _NPY_MAGIC else ".npz" if head[:4] in _ZIP_MAGIC else None
    if kind is None:
        raise TraceError(source, "signature", head, "not an .npy or .npz file (neither NumPy's nor zip's "
                         "signature)", fix)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            arrays = {name: loaded[name] for name in loaded.files}
    except _UNREADABLE as exc:
        reason = " ".join(str(exc).split())[:200]
        if "allow_pickle" in reason:
            raise TraceError(source, "dtype", "object", f"the {kind} holds pickled Python objects, which raymoe "
                             "never loads", f"save numeric arrays; {fix}") from None
        raise TraceError(source, "contents", kind, f"truncated or corrupt ({type(exc).__name__}: {reason})",
                         f"write the file again; {fix}") from None
    odd = sorted(name for name, value in arrays.items() if not isinstance(value, np.ndarray))
    if odd:  # np.load hands back the raw bytes of a zip member that is not an .npy
        raise TraceError(source, "arrays", odd, "zip members that are not NumPy arrays", fix)
    return arrays


def _integer(arrays: dict[str, np.ndarray], name: str, source: str, default: int | None,
             minimum: int) -> int | None:
    """The scalar ``arrays[name]`` as an int >= ``minimum`` (``default`` when absent)."""
    if name not in arrays:
        return default
    value = np.asarray(arrays[name])
    number = value.reshape(-1)[0] if value.size == 1 else None
    integral = number is not None and (value.dtype.kind in "iu" or (value.dtype.kind == "f" and
                                                                     float(number).is_integer()))
    if not integral or int(number) < minimum:
        shown = value.tolist() if value.size <= 8 else f"array of shape {value.shape}"
        raise TraceError(source, name, shown, f"expected one integer >= {minimum}",
                         f"save {name} as a single integer (np.int64)")
    return int(number)


def load_trace(path: str | Path, num_experts: int | None = None) -> RoutingTrace:
    """Read a routing trace: raymoe ``.npz`` (docs/formats.md) or ExFlow ``.npy``."""
    source = str(path)
    data = read_arrays(path, TRACE_FORMS)
    if isinstance(data, np.ndarray):
        return trace_from_array(data, num_experts, source=source)
    if "topk_ids" not in data:
        raise TraceError(source, "arrays", sorted(data), "no 'topk_ids' array",
                         "record with --record-trace (docs/formats.md)")
    version = _integer(data, "version", source, 1, minimum=0)
    if version != 1:
        raise TraceError(source, "version", version, "unsupported trace version", "use version 1")
    if num_experts is None:
        num_experts = _integer(data, "num_experts", source, None, minimum=1)
    get = {name: data.get(name) for name in ("topk_weights", "seq_ids", "is_prompt")}
    return trace_from_array(data["topk_ids"], num_experts, source=source, **get)


def load_stats(path: str | Path, top_k: int | None = None) -> RoutingStats:
    """Read aggregate statistics: ``.npy`` loads ``[layers, experts]``, or ``.npz`` with
    ``loads`` and optionally ``transitions``, ``coactivation``, ``top_k``, ``num_tokens``."""
    source = str(path)
    data = read_arrays(path, STATS_FORMS)
    if isinstance(data, np.ndarray):
        return RoutingStats.from_arrays(data, top_k=top_k or 1, source=source)
    if "loads" not in data:
        raise TraceError(source, "arrays", sorted(data), "no 'loads' array", "save loads=[layers, experts]")
    arrays = {name: data.get(name) for name in ("transitions", "coactivation")}
    k = top_k or _integer(data, "top_k", source, 1, minimum=1)
    tokens = _integer(data, "num_tokens", source, None, minimum=0)
    return RoutingStats.from_arrays(data["loads"], top_k=k, num_tokens=tokens, source=source, **arrays)
