"""Cost model of a decode step, per phase: counts (FLOPs, bytes, GEMMs, collectives) that a
routing trace and a placement plan imply, priced with an alpha-beta network model and a
roofline compute model.

    python -m raymoe.benchmarks.cost_model            # check against the CPU runs, then project to GPUs

1. Check (same model, same ranks, same routing as ``benchmarks/compare.py``'s measured CPU
   runs): the CPU's alpha, beta, GEMM rate, memory bandwidth and fixed overheads are fitted
   by non-negative least squares on relative error; predicted vs measured time per phase is
   reported in-sample and leave-one-batch-out (fitted without the batch it predicts).
2. PROJECTION (not a measurement): ``cost_model.yaml``'s GPU parameters, 8 to 64 GPUs on 1 to
   8 nodes, every layout (disaggregated, coherent, DeepSpeed-MoE EP) and placement policy.

Pricing. Shapes: B tokens per step, L MoE layers, E experts, A top-k, D hidden, I expert
width, P processes.

* compute stage: every process works in parallel; the stage lasts as long as the busiest one:
  ``gemms * gemm_launch + layers * layer_overhead + moe_ops * moe_overhead
  + roofline(FLOPs / rate, bytes / bandwidth)`` (roofline ``max`` on GPUs; ``sum`` for the CPU
  fit, which keeps the fit linear). A machine with fewer cores than processes (the CPU runs:
  2 cores, up to 5 processes) cannot beat the total work divided by its cores:
  ``max(busiest, sum / cores)``.
* collective: an all-to-all given as a bytes matrix ``[P, P]`` (sender, receiver). Per link
  class (inside a node, across nodes), with p the peers a process exchanges with in that class
  and n the busiest process's max(sent, received) bytes: ``p * alpha + beta * n`` (the
  alpha-beta model of a pairwise all-to-all). The classes run concurrently; the collective
  costs ``collective_launch`` plus the longer of the two.
* a step: the sum of its stages (raymoe runs its phases in order today: no overlap) plus
  "other": ``step_overhead + step_message * (messages the coordinator sends per step)``
  (one per actor over its channel; no Ray call on the step path).

What the runtime does, as priced: disaggregated, one dispatch and one combine all-to-all
per MoE layer with fixed capacity (every front-end sends every expert rank C = its token
count rows, padding included; no split-size exchange); coherent, a dispatch whose row
counts go in-band on the same-node transport (the CPU runs) or in a split-size exchange
first on NCCL (the GPU projection), plus a merge for top-k > 1. M front-ends (M:N) are
priced as the design describes them, but the runtime runs one front-end today: those
projection rows are marked not runnable.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from raymoe.benchmarks import result_file

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Path(__file__).with_name("cost_model.yaml")
RESULTS = ROOT / "benchmarks" / "results"
PHASES = ("attention", "dispatch", "experts", "combine", "coherence", "other")
PARAMS = ("collective_launch_s", "alpha_s", "beta_s_per_byte", "inv_flops", "inv_mem_bw", "gemm_launch_s",
          "layer_overhead_s", "moe_overhead_s", "step_overhead_s", "step_message_s")
WORK = 5  # compute work columns: FLOPs, bytes, GEMMs, layers, MoE ops (route/pack/unpack of one MoE layer)


# -- parameters ------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    alpha_s: float  # latency per peer message
    beta_s_per_byte: float  # seconds per byte on the busiest process's link

    def time(self, nbytes: float, peers: int = 1) -> float:
        """The alpha-beta model: ``peers * alpha + beta * nbytes``."""
        return peers * self.alpha_s + self.beta_s_per_byte * nbytes


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float  # achieved FLOP/s
    mem_bw: float  # achieved bytes/s
    gemm_launch_s: float
    layer_overhead_s: float
    step_overhead_s: float
    intra: Link
    inter: Link
    gpus_per_node: int = 1
    roofline: str = "max"
    collective_launch_s: float = 0.0
    step_message_s: float = 0.0
    moe_overhead_s: float = 0.0
    cores: int = 0  # processes share this many cores (0: one device per process, as GPUs)

    def compute_time(self, work: np.ndarray) -> np.ndarray:
        """``work [..., 5]`` = (FLOPs, bytes, GEMMs, layers, MoE ops) -> seconds ``[...]``."""
        f, b = work[..., 0] / self.flops, work[..., 1] / self.mem_bw
        body = np.maximum(f, b) if self.roofline == "max" else f + b
        return (work[..., 2] * self.gemm_launch_s + work[..., 3] * self.layer_overhead_s
                + work[..., 4] * self.moe_overhead_s + body)

    def stage_compute(self, work: np.ndarray) -> float:
        """Seconds of a parallel compute stage ``work [P, WORK]``."""
        t = self.compute_time(work)
        return float(max(t.max(initial=0.0), t.sum() / self.cores if self.cores else 0.0))

    @classmethod
    def from_theta(cls, theta: np.ndarray, name: str = "fitted CPU", cores: int = 0) -> "Hardware":
        """A single-link, sum-roofline machine from the fitted vector (order: ``PARAMS``)."""
        t = dict(zip(PARAMS, map(float, theta)))
        inv = lambda v: 1.0 / v if v > 0 else float("inf")  # noqa: E731 (a rate the fit found free)
        link = Link(t["alpha_s"], t["beta_s_per_byte"])
        return cls(name, inv(t["inv_flops"]), inv(t["inv_mem_bw"]), t["gemm_launch_s"], t["layer_overhead_s"],
                   t["step_overhead_s"], link, link, 1 << 20, "sum", t["collective_launch_s"], t["step_message_s"],
                   t["moe_overhead_s"], cores)

    def theta(self) -> np.ndarray:
        """The parameter vector (order: ``PARAMS``) of a single-link machine."""
        return np.array([self.collective_launch_s, self.intra.alpha_s, self.intra.beta_s_per_byte, 1 / self.flops,
                         1 / self.mem_bw, self.gemm_launch_s, self.layer_overhead_s, self.moe_overhead_s,
                         self.step_overhead_s, self.step_message_s])


def gpu_from_config(c: dict) -> Hardware:
    link = lambda d: Link(float(d["alpha_s"]), 1.0 / float(d["bandwidth"]))  # noqa: E731
    return Hardware(c["name"], float(c["peak_flops"]) * float(c["flops_efficiency"]),
                    float(c["mem_bw"]) * float(c["mem_efficiency"]), float(c["gemm_launch_s"]),
                    float(c["layer_overhead_s"]), float(c["step_overhead_s"]), link(c["intra"]), link(c["inter"]),
                    int(c["gpus_per_node"]), c.get("roofline", "max"), float(c["collective_launch_s"]),
                    float(c["step_message_s"]), float(c["moe_overhead_s"]))


def cpu_start(c: dict, cores: int) -> Hardware:
    link = Link(float(c["alpha_s"]), float(c["beta_s_per_byte"]))
    return Hardware("CPU (start)", float(c["flops"]), float(c["mem_bw"]), float(c["gemm_launch_s"]),
                    float(c["layer_overhead_s"]), float(c["step_overhead_s"]), link, link, 1 << 20, "sum",
                    float(c["collective_launch_s"]), float(c["step_message_s"]), float(c["moe_overhead_s"]), cores)


@dataclass(frozen=True)
class Shape:
    """A decoder whose layers are all MoE layers (Mixtral, Qwen3-MoE)."""

    hidden: int
    expert_width: int
    experts: int
    top_k: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int = 2
    context: int = 1024

    @property
    def kv_row_bytes(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    def attention(self, tokens: np.ndarray) -> np.ndarray:
        """One decoder layer's non-expert work (norms, q/k/v/o, attention over ``context``
        cached tokens, router) for ``tokens [P]`` tokens per process -> ``[P, 5]``."""
        tokens = np.asarray(tokens, dtype=float)
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        weights = self.hidden * (2 * q + 2 * kv + self.experts)
        busy = tokens > 0
        flops = tokens * (2 * weights + 4 * self.context * q)
        nbytes = busy * weights * self.dtype_bytes + tokens * self.context * 2 * kv * self.dtype_bytes
        return np.stack([flops, nbytes, np.zeros_like(tokens), busy.astype(float), np.zeros_like(tokens)], -1)

    def head(self, tokens: np.ndarray) -> np.ndarray:
        """Final norm, LM head and sampling for ``tokens [P]`` -> ``[P, 5]``."""
        tokens = np.asarray(tokens, dtype=float)
        busy = tokens > 0
        return np.stack([2.0 * self.hidden * self.vocab * tokens, busy * self.hidden * self.vocab * self.dtype_bytes,
                         np.zeros_like(tokens), busy.astype(float), np.zeros_like(tokens)], -1)

    def experts_work(self, rows: np.ndarray, owner: np.ndarray, processes: int) -> np.ndarray:
        """``rows [S]`` (token rows per expert slot), ``owner [S]`` (process of each slot) ->
        ``[P, 5]``: each active slot reads its weights once and runs one gated-MLP GEMM pair."""
        rows = np.asarray(rows, dtype=float)
        active = rows > 0
        per_slot = np.stack([6.0 * self.hidden * self.expert_width * rows,
                             active * 3.0 * self.hidden * self.expert_width * self.dtype_bytes
                             + rows * 2 * self.hidden * self.dtype_bytes, active.astype(float), np.zeros_like(rows),
                             np.zeros_like(rows)], -1)
        out = np.zeros((processes, WORK))
        np.add.at(out, owner, per_slot)
        return out


# -- what a step does ------------------------------------------------------------------
@dataclass(frozen=True)
class Compute:
    phase: str
    work: np.ndarray  # [P, WORK]: (FLOPs, bytes, GEMMs, layers, MoE ops) per process


@dataclass(frozen=True)
class StepMessages:
    """The coordinator's messages of one step (one per actor over its channel; 0 where ranks
    drive themselves)."""

    calls: int
    phase: str = "other"


@dataclass(frozen=True)
class Collective:
    phase: str
    matrix: np.ndarray  # [P, P] bytes from row process to column process (diagonal ignored)
    node: np.ndarray  # [P] node of each process

    def busiest(self) -> tuple[float, float, int, int]:
        """Inside nodes and across nodes: the busiest process's max(sent, received) bytes, and
        the most peers one process exchanges with (every other participant: a pairwise
        all-to-all sends to each, split sizes of zero included)."""
        m = self.matrix * (1 - np.eye(len(self.matrix)))
        same = self.node[:, None] == self.node[None, :]
        inside, across = m * same, m * ~same
        peak = lambda x: float(max(x.sum(0).max(initial=0), x.sum(1).max(initial=0)))  # noqa: E731
        return peak(inside), peak(across), int(same.sum(1).max()) - 1, int((~same).sum(1).max(initial=0))

    def total_bytes(self) -> float:
        return float((self.matrix * (1 - np.eye(len(self.matrix)))).sum())


def stage_time(stage, hw: Hardware) -> float:
    if isinstance(stage, Compute):
        return hw.stage_compute(stage.work)
    if isinstance(stage, StepMessages):
        return stage.calls * hw.step_message_s
    inside, across, inside_peers, across_peers = stage.busiest()
    return hw.collective_launch_s + max(hw.intra.time(inside, inside_peers),
                                        hw.inter.time(across, across_peers) if across_peers else 0.0)


def stage_features(stage, nominal: Hardware) -> np.ndarray:
    """Coefficients of ``PARAMS`` in the stage's time (one link class, sum roofline; the CPU
    runs are on one node): the busiest process, or the sum over processes / cores, whichever
    is larger at the nominal parameters."""
    f = np.zeros(len(PARAMS))
    if isinstance(stage, Compute):
        t = nominal.compute_time(stage.work)
        if nominal.cores and t.sum() / nominal.cores > t.max(initial=0.0):
            f[3:8] = stage.work.sum(0) / nominal.cores
        else:
            f[3:8] = stage.work[int(np.argmax(t))]
    elif isinstance(stage, StepMessages):
        f[9] = stage.calls
    else:
        inside, across, inside_peers, across_peers = stage.busiest()
        f[:3] = 1.0, inside_peers + across_peers, inside + across
    return f


def price(stages: list, hw: Hardware) -> dict[str, float]:
    """Seconds per phase of one step (``PHASES``; "other" = the step overhead)."""
    out = dict.fromkeys(PHASES, 0.0)
    for stage in stages:
        out[stage.phase] += stage_time(stage, hw)
    out["other"] += hw.step_overhead_s
    return out


def features(stages: list, nominal: Hardware) -> dict[str, np.ndarray]:
    out = {p: np.zeros(len(PARAMS)) for p in PHASES}
    for stage in stages:
        out[stage.phase] += stage_features(stage, nominal)
    out["other"][8] += 1.0
    return out


def bytes_moved(stages: list) -> float:
    return sum(s.total_bytes() for s in stages if isinstance(s, Collective))


# -- layouts: routing [B, L, A] + plan -> stages ---------------------------------------
def _place(plan, layer: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slot and rank of every pair ``ids [B, A]``, by the runtime's own replica rule
    (``LayerMap.slots``)."""
    import torch

    from raymoe.workers.expert_map import layer_maps

    lm = layer_maps(plan)[layer]
    slot = lm.slots(torch.as_tensor(ids, dtype=torch.long), torch.arange(ids.shape[0])).numpy()
    return slot, np.asarray(plan.slot2rank[layer])[slot]


def _pad(work: np.ndarray, before: int, after: int) -> np.ndarray:
    return np.concatenate([np.zeros((before, WORK)), work, np.zeros((after, WORK))])


def _moe_ops(who: np.ndarray) -> np.ndarray:
    """One MoE op (route/pack or unpack of a layer) on each process where ``who`` is true."""
    work = np.zeros((len(who), WORK))
    work[:, 4] = who
    return work


def disaggregated(shape: Shape, plan, routing: np.ndarray, frontends: int, node: np.ndarray) -> list:
    """M front-ends (processes 0..M-1, tokens split evenly) + R expert ranks. Per MoE layer:
    attention, the dispatch all-to-all (front-end m sends every expert rank C_m = its tokens
    rows, padding included), experts, the combine all-to-all (C_m rows back)."""
    tokens, layers, top_k = routing.shape
    m, r = frontends, plan.num_ranks
    p = m + r
    fe = np.arange(tokens) * m // tokens
    fe_tokens = np.bincount(fe, minlength=m)
    row, back = shape.hidden * shape.dtype_bytes + 8 * top_k, shape.hidden * shape.dtype_bytes
    owner = m + np.asarray(plan.slot2rank)  # [L, S] process of each slot
    stages = []
    for layer in range(layers):
        stages.append(Compute("attention", _pad(shape.attention(fe_tokens), 0, r)))
        slot, rank = _place(plan, layer, routing[:, layer])
        capacity = np.repeat(fe_tokens[:, None], r, axis=1).astype(float)  # [M, R]: C_m rows to every rank
        dispatch, combine = np.zeros((p, p)), np.zeros((p, p))
        dispatch[:m, m:], combine[m:, :m] = capacity * row, capacity.T * back
        frontend = np.arange(p) < m
        stages += [Compute("dispatch", _moe_ops(frontend)), Collective("dispatch", dispatch, node),
                   Compute("experts", shape.experts_work(np.bincount(slot.ravel(), minlength=owner.shape[1]),
                                                         owner[layer], p)),
                   Collective("combine", combine, node), Compute("combine", _moe_ops(frontend))]
    stages += [Compute("attention", _pad(shape.head(fe_tokens), 0, r)), StepMessages(p)]
    return stages


def deepspeed(shape: Shape, routing: np.ndarray, ranks: int, node: np.ndarray) -> list:
    """DeepSpeed-MoE EP: rank q decodes tokens ``q::R`` (data parallel), holds experts
    ``[q E/R, (q+1) E/R)``. Per layer: capacity all_reduce, an all-to-all of the capacity-
    padded ``[E, C, D]`` buffer, every local expert on R*C rows, the reverse all-to-all."""
    tokens, layers, _ = routing.shape
    share = np.arange(tokens) % ranks
    mine = np.bincount(share, minlength=ranks)
    local = shape.experts // ranks
    owner = np.arange(shape.experts) // local
    stages = []
    for layer in range(layers):
        stages.append(Compute("attention", shape.attention(mine)))
        counts = np.zeros((ranks, shape.experts))
        np.add.at(counts, (np.repeat(share, routing.shape[2]), routing[:, layer].ravel()), 1)
        capacity = counts.max()
        buffer = np.full((ranks, ranks), local * capacity * shape.hidden * shape.dtype_bytes)
        experts = shape.experts_work(np.full(shape.experts, ranks * capacity), owner, ranks)
        everyone = np.ones(ranks, dtype=bool)
        stages.append(Compute("dispatch", _moe_ops(everyone)))  # gate + capacity-padded encode
        if ranks > 1:
            stages += [Collective("dispatch", np.full((ranks, ranks), 8.0), node),
                       Collective("dispatch", buffer, node)]
        stages.append(Compute("experts", experts))
        if ranks > 1:
            stages.append(Collective("combine", buffer, node))
        stages.append(Compute("combine", _moe_ops(everyone)))  # decode + weighted sum
    stages.append(Compute("attention", shape.head(mine)))
    return stages


def coherent(shape: Shape, plan, routing: np.ndarray, node: np.ndarray, in_band_counts: bool = False) -> list:
    """ExFlow: every rank computes every token up to the first MoE layer; then a token
    moves to where its experts are (``workers/dispatch/coherent.py``: next home = most experts,
    then top-1's rank, then staying). KV rows after the first MoE layer are all-gathered
    once per decode step. ``in_band_counts``: the dispatch's row counts travel with the rows
    (the same-node transport) instead of in a split-size exchange (NCCL, gloo)."""
    tokens, layers, top_k = routing.shape
    r = plan.num_ranks
    owner = np.asarray(plan.slot2rank)
    row = shape.hidden * shape.dtype_bytes + 8 * top_k + 24
    partial = shape.hidden * shape.dtype_bytes + 8
    everyone = np.arange(tokens)
    home, computed_rows, stages = None, np.zeros(r), []
    for layer in range(layers):
        hosted = np.full(r, tokens) if home is None else np.bincount(home, minlength=r)
        if home is not None:
            computed_rows += hosted
        stages.append(Compute("attention", shape.attention(hosted)))
        slot, rank = _place(plan, layer, routing[:, layer])
        present = np.zeros((tokens, r), dtype=bool)
        present[everyone[:, None], rank] = True
        score = np.zeros((tokens, r))
        np.add.at(score, (np.repeat(everyone, top_k), rank.ravel()), 4)
        score[everyone, rank[:, 0]] += 2
        if home is not None:
            score[everyone, home] += 1
        new = score.argmax(1)
        stages.append(Compute("dispatch", _moe_ops(np.ones(r, dtype=bool))))  # route, choose homes, pack
        if home is not None:
            dispatch = np.zeros((r, r))
            away = present.copy()
            away[everyone, home] = False
            t, dest = np.nonzero(away)
            np.add.at(dispatch, (home[t], dest), row)
            if not in_band_counts:
                stages.append(Collective("dispatch", np.full((r, r), 8.0), node))
            stages.append(Collective("dispatch", dispatch + 8.0 * in_band_counts, node))
        stages.append(Compute("experts", shape.experts_work(np.bincount(slot.ravel(), minlength=owner.shape[1]),
                                                            owner[layer], r)))
        if top_k > 1:
            merge = np.zeros((r, r))
            away = present.copy()
            away[everyone, new] = False
            t, src = np.nonzero(away)
            np.add.at(merge, (src, new[t]), partial)
            stages += [Collective("combine", merge, node), Compute("combine", _moe_ops(np.ones(r, dtype=bool)))]
        home = new
    if layers > 1:
        gather = np.repeat(computed_rows[:, None] * (shape.kv_row_bytes + 12), r, axis=1)
        stages += [Collective("coherence", np.full((r, r), 8.0), node), Collective("coherence", gather, node)]
    stages += [Compute("attention", shape.head(np.bincount(home, minlength=r))), StepMessages(r)]
    return stages


# -- projection ------------------------------------------------------------------------
def projection_trace(cfg: dict, shape: Shape):
    """(fit statistics, decode-ordered held-out routing ``[T, L, A]``) for the projection."""
    from raymoe.placement.metrics import decode_order
    from raymoe.placement.synthetic import skewed_markov_trace

    loads = np.load(ROOT / cfg["loads"])
    trace = skewed_markov_trace(loads, int(cfg["trace_tokens"]), shape.top_k, float(cfg["affinity"]), seed=0,
                                num_seqs=256)
    split = trace.split(0.5)
    held = split.held_out
    return split.fit.stats(), held.topk_ids[decode_order(held)]


def projection_plan(policy: str, shape: Shape, ranks: int, nodes: int, stats, time_limit: float):
    """A plan of ``policy`` for ``ranks`` expert ranks on ``nodes`` nodes, and its label."""
    from raymoe.benchmarks.placement import redundant_for
    from raymoe.placement import LoadCapInfeasible, build_plan

    common = dict(num_layers=shape.layers, num_experts=shape.experts, num_ranks=ranks, num_nodes=nodes)
    if policy in ("linear", "round_robin"):
        return build_plan(policy, **common), policy
    redundant = redundant_for(shape.experts, ranks)
    if policy == "eplb":
        return build_plan("eplb", **common, loads=stats.loads, num_redundant=redundant), f"eplb +{redundant}r"
    for cap in (1.05, 1.2, None):
        try:
            plan = build_plan("affinity", **common, trace=stats, num_redundant=redundant, load_cap=cap,
                              time_limit=time_limit)
            return plan, f"affinity +{redundant}r" + (f" cap{cap}" if cap else "")
        except LoadCapInfeasible:
            continue
    raise AssertionError("unreachable: no cap always succeeds")


def blocks(count: int, nodes: int) -> np.ndarray:
    """Node of each of ``count`` processes spread in equal consecutive blocks."""
    return np.arange(count) * nodes // count


def project(config: dict, hw: Hardware, progress=None) -> list[dict]:
    """Decode tokens/s and time per phase for every GPU count, layout and policy."""
    cfg, shape = config["projection"], Shape(**config["model"])
    stats, routing = projection_trace(cfg, shape)
    out = []
    for gpus in cfg["gpus"]:
        nodes = max(1, gpus // hw.gpus_per_node)
        batch = int(cfg["batch_per_gpu"]) * gpus
        steps = [routing[(i * batch + np.arange(batch)) % len(routing)] for i in range(int(cfg["steps"]))]
        for layout in cfg["layouts"]:
            for policy in (["linear"] if layout == "deepspeed" else cfg["policies"]):
                splits = [0]  # front-end GPUs
                if layout == "disaggregated":  # M:N, the best of the configured front-end shares
                    splits = sorted({max(1, round(gpus * f)) for f in cfg["frontend_fractions"]})
                rows = [_project_one(shape, hw, stats, cfg, layout, policy, gpus, nodes, m, steps) for m in splits]
                out.append(max(rows, key=lambda r: r["decode_tok_s"]))
                if progress:
                    progress.update()
    return out


def _project_one(shape: Shape, hw: Hardware, stats, cfg: dict, layout: str, policy: str, gpus: int, nodes: int,
                 frontends: int, steps: list[np.ndarray]) -> dict:
    """One configuration: mean phases over the decode ``steps`` (each ``[B, L, A]``)."""
    ranks = gpus - frontends
    if layout == "deepspeed":
        label = "linear (DeepSpeed)"
        stage_sets = [deepspeed(shape, s, gpus, blocks(gpus, nodes)) for s in steps]
    else:
        plan, label = projection_plan(policy, shape, ranks, nodes, stats, float(cfg["affinity_time_limit_s"]))
        if layout == "coherent":
            stage_sets = [coherent(shape, plan, s, blocks(gpus, nodes)) for s in steps]
        else:
            node = np.concatenate([blocks(frontends, nodes), blocks(ranks, nodes)])
            stage_sets = [disaggregated(shape, plan, s, frontends, node) for s in steps]
    batch = steps[0].shape[0]
    phases = {p: float(np.mean([price(s, hw)[p] for s in stage_sets])) for p in PHASES}
    step_s = sum(phases.values())
    return {"gpus": gpus, "nodes": nodes, "layout": layout, "policy": label, "batch": batch, "frontends": frontends,
            "runnable": frontends <= 1,  # the runtime runs one front-end today (M:N is priced, not built)
            "expert_ranks": gpus if layout == "deepspeed" else ranks, "decode_tok_s": batch / step_s,
            "step_ms": 1e3 * step_s, "phase_ms": {p: 1e3 * v for p, v in phases.items()},
            "bytes_per_token": float(np.mean([bytes_moved(s) for s in stage_sets])) / batch}


# -- command line ----------------------------------------------------------------------
def load_config(path: Path) -> dict:
    config = yaml.safe_load(Path(path).read_text())
    for section in ("gpu", "model", "projection", "cpu_start"):
        if section not in config:
            raise ValueError(f"{path}: section '{section}' is missing (see benchmarks/cost_model.yaml)")
    return config


def check_table(result: dict) -> str:
    from raymoe.workers.tables import format_table

    rows = [[t["system"], t["batch"], t["phase"], f"{t['measured_ms']:.2f}", f"{t['predicted_ms']:.2f}",
             f"{100 * (t['predicted_ms'] - t['measured_ms']) / max(t['measured_ms'], 1e-9):+.0f}%",
             f"{t['held_out_ms']:.2f}",
             f"{100 * (t['held_out_ms'] - t['measured_ms']) / max(t['measured_ms'], 1e-9):+.0f}%"]
            for t in result["table"]]
    return format_table(["system", "batch", "phase", "measured ms/step", "fit ms", "fit err", "held-out ms",
                         "held-out err"], rows)


def main(argv: list[str] | None = None) -> int:
    from raymoe.benchmarks.cost_fit import build_stages, check, error_summary, measured_rows  # fitting imports this module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--measured", type=Path, default=RESULTS / "compare.json",
                        help="compare.json of benchmarks/compare.py (its *_routing.npz next to it)")
    parser.add_argument("--out", type=Path, help="JSON file (default: <--measured's name>_cost_model.json in "
                                                 "benchmarks/results, with a part per other non-default argument)")
    parser.add_argument("--plots", default=str(RESULTS), help="directory for the PNGs ('' for none)")
    parser.add_argument("--skip-projection", action="store_true")
    args = parser.parse_args(argv)
    out = args.out or result_file.default_path(f"{args.measured.stem}_cost_model", parser, args,
                                               ignore=("measured", "plots"))
    meta = result_file.run_meta("raymoe.benchmarks.cost_model", argv, args)
    from tqdm import tqdm

    config = load_config(args.config)
    result: dict = {"config": config}
    if args.measured.exists():
        compare = json.loads(args.measured.read_text())
        routing = dict(np.load(args.measured.with_name(args.measured.stem + "_routing.npz")))
        shape = Shape(**compare["meta"]["shape"])
        rows = measured_rows(compare, routing)
        nominal = cpu_start(config["cpu_start"], int(compare["meta"].get("cpu_cores", config["cpu_start"]["cores"])))
        for m in tqdm(rows, desc="cost model: CPU rows", file=sys.stderr):
            m.stages = build_stages(m, shape)
        checked = check(rows, nominal)
        checked["summary"] = {"fit": error_summary(checked["table"], "predicted_ms"),
                              "held_out": error_summary(checked["table"], "held_out_ms")}
        result["check"] = checked
        print(f"CHECK against {args.measured} ({compare['meta']['model']}; {compare['meta']['machine']})")
        print("fitted CPU parameters: " + ", ".join(f"{k} {v:.3g}" for k, v in checked["theta"].items()))
        print(check_table(checked))
        for name, s in checked["summary"].items():
            print(f"{name}: phases >= 10% of their step: median |error| {100 * s['phase_median']:.0f}%, max "
                  f"{100 * s['phase_max']:.0f}% ({s['phases_counted']} phases); whole step: median "
                  f"{100 * s['step_median']:.0f}%, max {100 * s['step_max']:.0f}%")
        for b in checked["bytes"]:
            print(f"bytes/token {b['system']} @ {b['batch']}: measured {b['measured']:.0f}, "
                  f"simulated {b['predicted']:.0f}")
    else:
        print(f"no measured runs at {args.measured}: run `python -m raymoe.benchmarks.compare` first; projection only")
    if not args.skip_projection:
        hw = gpu_from_config(config["gpu"])
        cfg = config["projection"]
        total = len(cfg["gpus"]) * sum(1 if l == "deepspeed" else len(cfg["policies"]) for l in cfg["layouts"])
        with tqdm(total=total, desc="cost model: projection", file=sys.stderr) as bar:
            result["projection"] = project(config, hw, bar)
    result_file.write(out, meta, result)
    if "projection" in result:
        from raymoe.benchmarks.results_md import render_result

        print(f"PROJECTION (cost model, not a measurement): {hw.name}; model {config['model']}")
        print(render_result("cost_model.projection", meta, result))
    if args.plots:
        from raymoe.benchmarks.plots import cost_model_plots

        for path in cost_model_plots(result, Path(args.plots)):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
