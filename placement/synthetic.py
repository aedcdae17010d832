"""Synthetic routing traces with known structure, for tests and benchmarks.

* ``planted_affinity_trace``: expert i at layer l is always followed by pi_l(i) at
  l+1 (a random permutation per layer boundary); a perfect placement exists with
  cross-device fraction 0.
* ``skewed_markov_trace``: per-layer marginals taken from real loads (e.g. Qwen3's),
  and a tunable share ``affinity`` of tokens whose next experts follow a planted
  permutation of the current ones; ``affinity = 0`` is the load-only null (layers
  independent given the loads).
"""

from __future__ import annotations

import numpy as np

from raymoe.placement.trace import RoutingTrace


def _gumbel_topk(log_p: np.ndarray, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """log_p: [experts] -> [tokens?]: sample top_k distinct experts without replacement
    (Gumbel top-k). log_p: [n, experts] -> int64 [n, top_k]."""
    keys = log_p + rng.gumbel(size=log_p.shape)
    top = np.argpartition(-keys, top_k - 1, axis=1)[:, :top_k]
    order = np.argsort(-np.take_along_axis(keys, top, 1), axis=1)
    return np.take_along_axis(top, order, 1).astype(np.int64)


def planted_affinity_trace(num_tokens: int, num_layers: int, num_experts: int, top_k: int = 1,
                           seed: int = 0) -> tuple[RoutingTrace, np.ndarray]:
    """Trace where layer l+1's experts are ``perms[l]`` of layer l's.

    Returns the trace (topk_ids [tokens, layers, top_k]) and perms [layers-1, experts].
    Layer 0 draws from a skewed (Zipf-like) distribution.
    """
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(num_experts) for _ in range(num_layers - 1)]) if num_layers > 1 \
        else np.zeros((0, num_experts), dtype=np.int64)
    weights = 1.0 / np.arange(1, num_experts + 1)
    log_p = np.log(rng.permutation(weights / weights.sum()))
    ids = np.empty((num_tokens, num_layers, top_k), dtype=np.int64)
    ids[:, 0] = _gumbel_topk(np.broadcast_to(log_p, (num_tokens, num_experts)), top_k, rng)
    for layer in range(num_layers - 1):
        ids[:, layer + 1] = perms[layer][ids[:, layer]]
    return RoutingTrace(ids, num_experts), perms


def skewed_markov_trace(loads: np.ndarray, num_tokens: int, top_k: int, affinity: float,
                        seed: int = 0, num_seqs: int = 64) -> RoutingTrace:
    """Trace with per-layer expert popularity proportional to ``loads: [layers, experts]``.

    A token keeps its "affinity path" with probability ``affinity`` at each boundary:
    its top-k at l+1 is ``perm_l`` of its top-k at l; otherwise it draws a fresh top-k
    from layer l+1's marginal. perm_l maps the r-th most loaded expert of l to the r-th
    most loaded of l+1 (up to a local shuffle), so followers keep the skew realistic.
    Tokens are interleaved over ``num_seqs`` requests (``seq_ids = token % num_seqs``),
    as in decode steps that advance every request by one token.
    """
    rng = np.random.default_rng(seed)
    num_layers, num_experts = loads.shape
    log_p = np.log(np.maximum(loads, 1e-9) / loads.sum(axis=1, keepdims=True))
    ids = np.empty((num_tokens, num_layers, top_k), dtype=np.int64)
    ids[:, 0] = _gumbel_topk(np.broadcast_to(log_p[0], (num_tokens, num_experts)), top_k, rng)
    for layer in range(num_layers - 1):
        perm = _rank_matching_perm(loads[layer], loads[layer + 1], rng)
        fresh = _gumbel_topk(np.broadcast_to(log_p[layer + 1], (num_tokens, num_experts)), top_k, rng)
        follow = rng.random(num_tokens) < affinity
        ids[:, layer + 1] = np.where(follow[:, None], perm[ids[:, layer]], fresh)
    return RoutingTrace(ids, num_experts, seq_ids=np.arange(num_tokens) % num_seqs)


def _rank_matching_perm(src: np.ndarray, dst: np.ndarray, rng: np.random.Generator,
                        window: int = 8) -> np.ndarray:
    """[experts] permutation sending src's k-th hottest expert near dst's k-th hottest
    (shuffled within blocks of ``window`` ranks)."""
    src_order = np.argsort(-src, kind="stable")
    dst_order = np.argsort(-dst, kind="stable")
    for start in range(0, len(dst_order), window):
        rng.shuffle(dst_order[start:start + window])
    perm = np.empty(len(src), dtype=np.int64)
    perm[src_order] = dst_order
    return perm
