"""Placement benchmark: every policy side by side on real loads and per-token traces.

    .venv/bin/python -m raymoe.benchmarks.placement [--trace tiny_trace.npz] [--ranks 4,8,16]

* Qwen3-30B-A3B real loads (48 layers x 128 experts, top-8; aggregate counts only):
  aggregate imbalance of every policy at 4, 8 and 16 ranks.
* Per-token traces: the tiny model's trace (``--trace``, default
  models/tiny-moe/trace_val.npz when it exists) and synthetic traces with Qwen3's
  per-layer skew (``raymoe.placement.synthetic.skewed_markov_trace``, affinity 0.3 and the
  load-only null 0.0; 128 experts x 48 layers, the size of the < 30 s target). Plans
  are fitted on the first half of the requests and scored on the other half:
  cross-device fraction, imbalance, per-step imbalance of decode batches of 16, 64 and
  256 tokens, solve time.
* MoGE: a MoGE-routed trace on the ``moge`` plan (imbalance must be exactly 1.0).

Writes benchmarks/results/placement.json (``--out``); ``python -m raymoe.benchmarks.results_md``
renders its tables into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raymoe.benchmarks import result_file
from raymoe.placement.errors import LoadCapInfeasible
from raymoe.placement.metrics import imbalance_of, per_step_imbalance, rank_loads, score_plan
from raymoe.placement.moge import moge_route
from raymoe.placement.build import build_plan
from raymoe.placement.plan import PlacementPlan
from raymoe.placement.synthetic import skewed_markov_trace
from raymoe.placement.trace import RoutingTrace, load_trace, trace_from_array

QWEN_LOADS = Path(__file__).resolve().parents[1] / "tests" / "data" / "qwen3-30b-a3b-loads" / "expert_loads.npy"
TINY_TRACE = Path(__file__).resolve().parents[1] / "models" / "tiny-moe" / "trace_val.npz"
BATCHES = (16, 64, 256)
LOAD_CAP = 1.05


@dataclass(frozen=True)
class Policy:
    label: str
    name: str
    redundant: bool = False
    options: tuple = ()


def policies(redundant: int) -> list[Policy]:
    return [
        Policy("linear", "linear"),
        Policy("round_robin", "round_robin"),
        Policy("moge", "moge"),
        Policy(f"eplb +{redundant}r", "eplb", True),
        Policy(f"eplb +{redundant}r refine", "eplb", True, (("refine", True),)),
        Policy("affinity (no cap)", "affinity"),
        Policy(f"affinity cap{LOAD_CAP}", "affinity", False, (("load_cap", LOAD_CAP),)),
        Policy(f"affinity +{redundant}r cap{LOAD_CAP}", "affinity", True, (("load_cap", LOAD_CAP),)),
    ]


def redundant_for(num_experts: int, num_ranks: int) -> int:
    """What EPLB users pick: about one redundant slot per 4 experts (32 for 128), rounded
    up so that every rank gets the same number of slots."""
    red = max(num_ranks, num_experts // 4)
    return red + (-(num_experts + red) % num_ranks)


@dataclass
class Built:
    plan: PlacementPlan | None
    seconds: float
    note: str = ""


def build(policy: Policy, num_ranks: int, stats, redundant: int, num_nodes: int = 1) -> Built:
    options = dict(policy.options)
    load_cap = options.pop("load_cap", None)
    start = time.perf_counter()
    try:
        plan = build_plan(policy.name, num_layers=stats.num_layers, num_experts=stats.num_experts,
                          num_ranks=num_ranks, num_nodes=num_nodes, trace=stats, load_cap=load_cap,
                          num_redundant=redundant if policy.redundant else 0, **options)
    except LoadCapInfeasible as exc:
        bound = "n/a" if exc.lower_bound is None else f"{exc.lower_bound:.3f}"
        if exc.proven:
            note = f"cap infeasible (proven bound {bound})"
        else:
            best = "n/a" if exc.best_found is None else f"{exc.best_found:.3f}"
            note = f"cap not met by the heuristic (best {best}, proven bound {bound})"
        return Built(None, time.perf_counter() - start, note)
    return Built(plan, time.perf_counter() - start)


def qwen_section(ranks: list[int], log) -> dict:
    """Aggregate imbalance of every policy on the real Qwen3 loads (fitted and scored on them)."""
    from raymoe.placement.trace import RoutingStats

    loads = np.load(QWEN_LOADS)
    stats = RoutingStats.from_arrays(loads, top_k=8)
    rows = []
    for num_ranks in ranks:
        red = redundant_for(128, num_ranks)
        for policy in policies(red):
            built = build(policy, num_ranks, stats, red)
            log(f"qwen3 R={num_ranks} {policy.label}: {built.seconds:.2f}s {built.note}")
            row = {"ranks": num_ranks, "policy": policy.label, "solve_s": built.seconds, "note": built.note}
            if built.plan is not None:
                imb = imbalance_of(rank_loads(built.plan.presence, stats.loads))
                row.update(slots_per_rank=int(built.plan.slots_per_rank[0].max()), imbalance_mean=float(imb.mean()),
                           imbalance_max=float(imb.max()), balancedness=float((1 / imb).mean()))
            rows.append(row)
    return {"layers": stats.num_layers, "experts": stats.num_experts, "top_k": 8,
            "decode_tokens": int(loads[0].sum()) // 8, "rows": rows}


def trace_section(name: str, trace: RoutingTrace, ranks: list[int], log) -> dict:
    """Fit on the first half of the requests, score on the other half (and on its load-only null)."""
    split = trace.split(0.5)
    fit, held = split.fit.stats(), split.held_out.stats()
    null = held.null()
    rows = []
    for num_ranks in ranks:
        red = redundant_for(trace.num_experts, num_ranks)
        for policy in policies(red):
            built = build(policy, num_ranks, fit, red)
            log(f"{name} R={num_ranks} {policy.label}: {built.seconds:.2f}s {built.note}")
            row = {"ranks": num_ranks, "policy": policy.label, "solve_s": built.seconds, "note": built.note}
            if built.plan is not None:
                score = score_plan(built.plan, held, trace=split.held_out, batch_sizes=BATCHES)
                row.update(cross_dev=score.cross_device_fraction,
                           null_cross_dev=score_plan(built.plan, null).cross_device_fraction,
                           imbalance_mean=score.imbalance_mean, imbalance_max=score.imbalance_max,
                           per_step_mean=[s.mean for s in score.per_step])
            rows.append(row)
    return {"name": name, "layers": trace.num_layers, "experts": trace.num_experts, "top_k": trace.top_k,
            "fit_tokens": split.fit.num_tokens, "held_tokens": split.held_out.num_tokens,
            "redundant": {str(r): redundant_for(trace.num_experts, r) for r in ranks}, "rows": rows}


def hierarchical_section(name: str, trace: RoutingTrace, num_ranks: int, log) -> dict:
    """affinity +replicas on 2 nodes (hierarchical) next to linear: inter-node fraction."""
    split = trace.split(0.5)
    fit, held = split.fit.stats(), split.held_out.stats()
    red = redundant_for(trace.num_experts, num_ranks)
    candidates = [Policy("linear", "linear")] + [
        Policy(f"affinity +{red}r cap{cap} hierarchical", "affinity", True, (("load_cap", cap),))
        for cap in (LOAD_CAP, 1.2)]
    rows = []
    for policy in candidates:
        built = build(policy, num_ranks, fit, red, num_nodes=2)
        log(f"hierarchical R={num_ranks} {policy.label}: {built.seconds:.2f}s {built.note}")
        row = {"policy": policy.label, "solve_s": built.seconds, "note": built.note}
        if built.plan is not None:
            score = score_plan(built.plan, held)
            row.update(cross_dev=score.cross_device_fraction, inter_node=score.inter_node_fraction,
                       imbalance_max=score.imbalance_max)
        rows.append(row)
    return {"name": name, "ranks": num_ranks, "nodes": 2, "rows": rows}


def moge_section(num_ranks: int = 8) -> dict:
    """A MoGE-routed trace with Qwen3-like expert popularity on the moge plan."""
    rng = np.random.default_rng(0)
    loads = np.load(QWEN_LOADS).astype(np.float64)
    scores = np.log(np.maximum(loads, 1.0) / loads.sum(1, keepdims=True))[None] + rng.gumbel(size=(2048, 48, 128))
    trace = trace_from_array(moge_route(scores, 8, num_ranks), 128)
    plan = build_plan("moge", num_layers=48, num_experts=128, num_ranks=num_ranks, trace=trace.stats())
    other = build_plan("round_robin", num_layers=48, num_experts=128, num_ranks=num_ranks, trace=trace.stats())
    return {"groups": num_ranks, "experts": 128, "top_k": 8,
            "imbalance_max": float(plan.objectives["imbalance_max"]),
            "per_step_max": [float(per_step_imbalance(plan.presence, trace, b).max) for b in BATCHES],
            "round_robin_per_step_mean": [float(per_step_imbalance(other.presence, trace, b).mean) for b in BATCHES]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", help=f"per-token routing trace of the tiny model (default {TINY_TRACE.name} "
                                        "of models/tiny-moe when it exists)")
    parser.add_argument("--ranks", default="4,8,16")
    parser.add_argument("--tokens", type=int, default=16000, help="tokens per synthetic trace")
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/placement.json, with a "
                                                 "part per non-default argument)")
    args = parser.parse_args(argv)
    out = args.out or result_file.default_path("placement", parser, args)
    meta = result_file.run_meta("raymoe.benchmarks.placement", argv, args)
    ranks = [int(r) for r in args.ranks.split(",")]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    data = []
    tiny = Path(args.trace) if args.trace else TINY_TRACE
    if tiny.exists():
        data.append((f"tiny model trace ({tiny.name})", load_trace(tiny)))
    loads = np.load(QWEN_LOADS).astype(np.float64)
    data += [("synthetic, Qwen3 skew, affinity 0.3", skewed_markov_trace(loads, args.tokens, 8, 0.3, seed=1)),
             ("synthetic, Qwen3 skew, affinity 0.0 (load-only null)",
              skewed_markov_trace(loads, args.tokens, 8, 0.0, seed=1))]
    result = {"ranks": ranks, "batches": list(BATCHES), "load_cap": LOAD_CAP,
              "qwen": qwen_section(ranks, log),
              "traces": [trace_section(name, trace, ranks, log) for name, trace in data],
              # the tiny model (if any) and the synthetic trace with affinity
              "hierarchical": [hierarchical_section(name, trace, 8 if "tiny" in name else max(ranks), log)
                               for name, trace in data[:-1]],
              "moge": moge_section()}
    result["wall_s"] = time.perf_counter() - started
    result_file.write(out, meta, result)
    from raymoe.benchmarks.results_md import render_result

    print(render_result("placement", meta, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
