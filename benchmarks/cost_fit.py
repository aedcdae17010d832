"""Fitting the cost model (``benchmarks/cost_model.py``) to measured CPU runs, and checking
it: non-negative least squares over the per-phase counts of ``benchmarks/compare.py``'s
rows gives the machine's alpha, beta and GEMM rate; ``check`` then compares predicted and
measured time per phase, also with each batch held out of the fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raymoe.benchmarks.cost_model import (PARAMS, PHASES, Hardware, Shape, bytes_moved, coherent, deepspeed,
                                   disaggregated, features)

def nnls(a: np.ndarray, b: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson-Hanson active set)."""
    n = a.shape[1]
    passive, x = np.zeros(n, dtype=bool), np.zeros(n)
    w = a.T @ (b - a @ x)
    for _ in range(3 * n + 10):
        if passive.all() or w[~passive].max(initial=-np.inf) <= tol:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > tol).all():
                break
            bad = passive & (z <= tol)
            step = np.min(x[bad] / np.maximum(x[bad] - z[bad], 1e-300))
            x = x + step * (z - x)
            passive &= x > tol
        x = z
        w = a.T @ (b - a @ x)
    return x


def fit(rows: np.ndarray, measured: np.ndarray, floor: np.ndarray | float = 1e-4) -> np.ndarray:
    """``rows [N, len(PARAMS)]`` features, ``measured [N]`` seconds -> parameters >= 0 that
    minimise the squared relative error (each equation divided by max(measured, floor); a
    per-equation floor keeps phases measured near zero from dominating)."""
    weight = 1.0 / np.maximum(measured, floor)
    a, b = rows * weight[:, None], measured * weight
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    return nnls(a / scale, b) / scale


@dataclass
class Measured:
    """One measured CPU row of compare.json, with the routing of its decode steps."""

    system: str
    layout: str  # disaggregated | coherent | deepspeed
    policy: str
    ranks: int
    batch: int
    phases: dict[str, float]  # seconds per decode step, in the model's phase names
    bytes_per_token: float
    routing: np.ndarray  # [steps, B, L, A]
    stages: list = field(default_factory=list)  # per decode step
    same_node_transport: bool = False  # the run's data plane was backend local (in-band row counts)


# measured phase <- model phases (each system measures its own split). raymoe disaggregated:
# the front-end waits for the experts inside the combine collective and the coordinator
# subtracts the slowest rank's expert time (clamped at 0), so experts + combine is what is
# measured reliably; coherent: the MoE layer (route, dispatch, experts, merge) is one phase.
MAPPING = {"disaggregated": {"attention": ("attention",), "dispatch": ("dispatch",),
                             "experts+combine": ("experts", "combine"), "other": ("other",)},
           "deepspeed": {"attention": ("attention",), "dispatch": ("dispatch",), "experts": ("experts",),
                         "combine": ("combine",), "other": ("other",)},
           "coherent": {"attention": ("attention",), "dispatch": ("dispatch", "experts", "combine"),
                        "coherence": ("coherence",), "other": ("other",)}}


def measured_rows(compare: dict, routing: dict) -> list[Measured]:
    """The distributed rows of a compare.json (raymoe layouts and DeepSpeed) that the model covers."""
    out = []
    for row in compare["rows"]:
        name, key = row["system"], f"b{row['batch']}"
        if key not in routing:
            continue
        parts = name.split()
        if name.startswith("raymoe disaggregated") or name.startswith("raymoe coherent"):
            layout, ranks = parts[1], int(parts[2].rstrip("r"))
            policy = parts[3] if len(parts) > 3 else "linear"
        elif name.startswith("DeepSpeed-MoE EP"):
            layout, ranks, policy = "deepspeed", int(parts[2].rstrip("r")), "linear"
        else:
            continue
        steps = row["decode_steps"]
        step_s = row["batch"] / row["decode_tok_s"]
        phases = {p: row["phase_seconds"].get(p, 0.0) / steps for p in PHASES if p != "other"}
        phases["other"] = max(step_s - sum(phases.values()), 0.0)
        want = MAPPING[layout]
        out.append(Measured(name, layout, policy, ranks, row["batch"],
                            {k: sum(phases.get(p, 0.0) for p in k.split("+")) for k in want},
                            row["bytes_per_token"], routing[key],
                            same_node_transport=row.get("extra", {}).get("backend") == "local"))
    return out


def build_stages(m: Measured, shape: Shape) -> list[list]:
    """The stages of each decode step of a measured row (one node: loopback)."""
    from raymoe.placement import build_plan

    if m.layout == "deepspeed":
        node = np.zeros(m.ranks, dtype=int)
        return [deepspeed(shape, step, m.ranks, node) for step in m.routing]
    plan = build_plan(m.policy, num_layers=shape.layers, num_experts=shape.experts, num_ranks=m.ranks)
    if m.layout == "coherent":
        return [coherent(shape, plan, step, np.zeros(m.ranks, dtype=int), in_band_counts=m.same_node_transport)
                for step in m.routing]
    return [disaggregated(shape, plan, step, 1, np.zeros(m.ranks + 1, dtype=int)) for step in m.routing]


def equations(rows: list[Measured], nominal: Hardware) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple]]:
    """One equation per (row, measured phase): mean features over the decode steps; and each
    equation's floor for the relative error (5% of its row's step time, at least 0.2 ms)."""
    a, b, floor, labels = [], [], [], []
    for m in rows:
        per_step = [features(s, nominal) for s in m.stages]
        step = sum(m.phases.values())
        for measured_phase, model_phases in MAPPING[m.layout].items():
            f = np.mean([sum(f[p] for p in model_phases) for f in per_step], axis=0)
            a.append(f)
            b.append(m.phases[measured_phase])
            floor.append(max(0.05 * step, 2e-4))
            labels.append((m.system, m.batch, measured_phase))
    return np.array(a), np.array(b), np.array(floor), labels


def check(rows: list[Measured], nominal: Hardware) -> dict:
    """Fit on all rows and on all-but-one batch; predicted vs measured per (row, phase)."""
    a, b, floor, labels = equations(rows, nominal)
    theta = fit(a, b, floor)
    batches = sorted({m.batch for m in rows})
    held = np.zeros_like(b)
    for batch in batches:
        out = np.array([lab[1] == batch for lab in labels])
        theta_b = fit(a[~out], b[~out], floor[~out]) if (~out).any() else theta
        held[out] = a[out] @ theta_b
    pred = a @ theta
    table = [{"system": s, "batch": bt, "phase": ph, "measured_ms": 1e3 * mv, "predicted_ms": 1e3 * pv,
              "held_out_ms": 1e3 * hv} for (s, bt, ph), mv, pv, hv in zip(labels, b, pred, held)]
    for m in rows:  # bytes are counts, not fitted: the simulator against the runtime's own counters
        tokens = sum(step.shape[0] for step in m.routing)
        m.predicted_bytes_per_token = sum(bytes_moved(s) for s in m.stages) / tokens
    return {"theta": dict(zip(PARAMS, theta.tolist())), "table": table,
            "bytes": [{"system": m.system, "batch": m.batch, "measured": m.bytes_per_token,
                       "predicted": m.predicted_bytes_per_token} for m in rows]}


def error_summary(table: list[dict], key: str, min_share: float = 0.1) -> dict:
    """Median and max relative error over (row, phase) pairs whose phase is >= ``min_share``
    of its row's measured step time (smaller phases are reported, not summarised)."""
    totals: dict[tuple, float] = {}
    for t in table:
        totals[(t["system"], t["batch"])] = totals.get((t["system"], t["batch"]), 0.0) + t["measured_ms"]
    errs = [abs(t[key] - t["measured_ms"]) / t["measured_ms"] for t in table
            if t["measured_ms"] >= min_share * totals[(t["system"], t["batch"])] and t["measured_ms"] > 0]
    step = {}
    for t in table:
        k = (t["system"], t["batch"])
        step.setdefault(k, [0.0, 0.0])
        step[k][0] += t["measured_ms"]
        step[k][1] += t[key]
    step_errs = [abs(p - m) / m for m, p in step.values() if m > 0]
    return {"phase_median": float(np.median(errs)) if errs else 0.0, "phase_max": float(max(errs, default=0.0)),
            "step_median": float(np.median(step_errs)) if step_errs else 0.0,
            "step_max": float(max(step_errs, default=0.0)), "phases_counted": len(errs)}
