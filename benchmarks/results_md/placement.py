"""Tables of ``raymoe.benchmarks.placement``: every policy on the Qwen3 loads, on per-token
traces (fitted on one half, scored on the other), hierarchical plans, MoGE, and the
issue's targets with the numbers behind them."""

from __future__ import annotations

from raymoe.benchmarks.results_md.source import Result
from raymoe.benchmarks.results_md.tables import md_table


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cut(cdf: float | None, base: float | None, sign: str = "") -> str:
    return "n/a" if cdf is None or not base else f"{100 * (1 - cdf / base):{sign}.1f}%"


def placement_tables(results: list[Result]) -> str:
    data = results[0].data
    parts = [_redundancy(data), _qwen(data["qwen"])]
    parts += [_trace(t, data["batches"]) for t in data["traces"]]
    parts += [_hierarchical(h) for h in data["hierarchical"]]
    parts += [_moge(data["moge"], data["batches"]), _targets(data), f"Total benchmark wall time: {data['wall_s']:.0f} s."]
    return "\n\n".join(parts)


def _redundancy(data: dict) -> str:
    """Which redundant slot count each (experts, ranks) got, and the affinity load cap."""
    groups = ["128 experts (Qwen3 loads and the synthetic traces): "
              + ", ".join(f"{r} ranks {red}" for r, red in _redundant_128(data).items())]
    groups += [f"{t['experts']} experts ({t['name']}): " + ", ".join(f"{r} ranks {red}" for r, red in t["redundant"].items())
               for t in data["traces"] if t["experts"] != 128]
    return ("Redundant slots (`redundant_for`: about one per 4 experts, at least one per rank, as EPLB deployments "
            f"use): {'; '.join(groups)}. Load cap of affinity: {data['load_cap']}.")


def _redundant_128(data: dict) -> dict[str, int]:
    """Redundant slots per rank count for 128 experts (the Qwen3 loads' and synthetic traces' size)."""
    return next(t["redundant"] for t in data["traces"] if t["experts"] == data["qwen"]["experts"])


def _qwen(qwen: dict) -> str:
    rows = []
    for r in qwen["rows"]:
        if "imbalance_mean" not in r:
            rows.append([r["ranks"], r["policy"], "", r["note"], "", "", f"{r['solve_s']:.2f}"])
            continue
        rows.append([r["ranks"], r["policy"], r["slots_per_rank"], f"{r['imbalance_mean']:.5f}",
                     f"{r['imbalance_max']:.5f}", f"{r['balancedness']:.5f}", f"{r['solve_s']:.2f}"])
    return "\n".join([
        f"### Qwen3-30B-A3B real loads ({qwen['layers']} x {qwen['experts']}, top-{qwen['top_k']}, "
        f"{qwen['decode_tokens']:,} decode tokens; loads only)", "",
        f"max/mean rank load per layer, mean and worst over the {qwen['layers']} layers (plans fitted and scored on "
        "the same loads: no per-token data exists for this model).", "",
        md_table(["ranks", "policy", "slots/rank", "imbalance mean", "imbalance max", "balancedness", "solve s"], rows)])


def _trace(trace: dict, batches: list[int]) -> str:
    rows, linear = [], {}
    for r in trace["rows"]:
        if "cross_dev" not in r:
            rows.append([r["ranks"], r["policy"], r["note"], *[""] * (5 + len(batches)), f"{r['solve_s']:.2f}"])
            continue
        if r["policy"] == "linear":
            linear[r["ranks"]] = r["cross_dev"]
        rows.append([r["ranks"], r["policy"], _fmt(r["cross_dev"]), _cut(r["cross_dev"], linear.get(r["ranks"]), "+"),
                     _fmt(r["null_cross_dev"]), _fmt(r["imbalance_mean"]), _fmt(r["imbalance_max"]),
                     *(_fmt(s, 3) for s in r["per_step_mean"]), f"{r['solve_s']:.2f}"])
    return "\n".join([
        f"### {trace['name']}", "",
        f"{trace['layers']} layers x {trace['experts']} experts, top-{trace['top_k']}; fitted on {trace['fit_tokens']} "
        f"tokens, scored on {trace['held_tokens']} held-back tokens. Per-step: mean over (decode batch, layer) of "
        "max/mean rank load.", "",
        md_table(["ranks", "policy", "cross-dev", "vs linear", "cross-dev (null)", "imb mean", "imb max",
                  *(f"step@{b}" for b in batches), "solve s"], rows)])


def _hierarchical(h: dict) -> str:
    rows = []
    for r in h["rows"]:
        if "cross_dev" not in r:
            rows.append([r["policy"], r["note"], "", "", f"{r['solve_s']:.2f}"])
            continue
        rows.append([r["policy"], _fmt(r["cross_dev"]), _fmt(r["inter_node"]), _fmt(r["imbalance_max"]),
                     f"{r['solve_s']:.2f}"])
    return "\n".join([
        f"### Hierarchical: {h['name']}, {h['nodes']} nodes x {h['ranks'] // h['nodes']} GPUs (held-back tokens)", "",
        md_table(["policy", "cross-dev", "inter-node", "imb max", "solve s"], rows)])


def _moge(moge: dict, batches: list[int]) -> str:
    return "\n".join([
        f"### MoGE ({moge['groups']} groups of {moge['experts'] // moge['groups']} experts, top-{moge['top_k']} = "
        f"{moge['top_k'] // moge['groups']} per group, Qwen3-like popularity)", "",
        f"moge plan: aggregate imbalance max {moge['imbalance_max']:.6f}; per-step imbalance max at batch "
        f"{', '.join(map(str, batches))}: {', '.join(f'{s:.6f}' for s in moge['per_step_max'])} (exactly 1 by "
        "construction). round_robin on the same trace, per-step mean: "
        f"{', '.join(f'{s:.3f}' for s in moge['round_robin_per_step_mean'])}."])


def _targets(data: dict) -> str:
    """One line per target of the issue, with the numbers behind it."""
    cap = data["load_cap"]
    out = ["### Targets", ""]
    qwen = {(r["ranks"], r["policy"]): r for r in data["qwen"]["rows"]}
    red128 = _redundant_128(data)
    for num_ranks, goal in ((8, 1.002), (16, 1.006)):
        red = red128.get(str(num_ranks))
        for label in (f"eplb +{red}r", f"eplb +{red}r refine"):
            row = qwen.get((num_ranks, label))
            if row is None or "imbalance_mean" not in row:
                continue
            mean, worst = row["imbalance_mean"], row["imbalance_max"]
            out.append(f"- Qwen3 loads, {num_ranks} ranks, {label}, max/mean <= {goal}: mean over layers {mean:.5f} "
                       f"({'met' if mean <= goal else 'MISSED'}), worst layer {worst:.5f} "
                       f"({'met' if worst <= goal else 'MISSED'}).")
    for trace in sorted(data["traces"], key=lambda t: ("tiny" not in t["name"], t["name"])):
        name = trace["name"]
        rows = {(r["ranks"], r["policy"]): r for r in trace["rows"]}
        for num_ranks in data["ranks"]:
            red = trace["redundant"][str(num_ranks)]
            linear, eplb, plain, capped, replicated = (
                rows.get((num_ranks, label), {}) for label in
                ("linear", f"eplb +{red}r", "affinity (no cap)", f"affinity cap{cap}", f"affinity +{red}r cap{cap}"))
            linear, eplb = linear.get("cross_dev"), eplb.get("cross_dev")
            capped_text = f"cut {_cut(capped['cross_dev'], linear)}" if "cross_dev" in capped else capped.get("note")
            repl_text = (f"cut {_cut(replicated['cross_dev'], linear)} vs linear, {_cut(replicated['cross_dev'], eplb)} "
                         f"vs eplb +{red}r (same replicas)" if "cross_dev" in replicated else replicated.get("note"))
            tag = "control (null): a cut here is not affinity" if "null" in name else (
                "target >= 25%" + ("" if "tiny" in name else ", synthetic, the target is for the tiny model"))
            out.append(f"- {name}, {num_ranks} ranks [{tag}]: affinity cap{cap}: {capped_text}; affinity +{red}r "
                       f"cap{cap}: {repl_text}; affinity without cap: cut {_cut(plain.get('cross_dev'), linear)}.")
    times = [(r["solve_s"], t["name"], r["policy"]) for t in data["traces"] if "synthetic" in t["name"]
             for r in t["rows"] if r["ranks"] == 16 and r["policy"].startswith("affinity") and "cross_dev" in r]
    if times:
        worst = max(times)
        out.append(f"- heuristic, 128 experts x 48 layers x 16 ranks, top-8: slowest solve {worst[0]:.1f} s "
                   f"({worst[2]}, {worst[1]}); target < 30 s {'met' if worst[0] < 30 else 'MISSED'}.")
    return "\n".join(out)
