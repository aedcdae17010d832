"""Tables of ``raymoe.benchmarks.compare`` (raymoe against DeepSpeed-MoE, transformers, naive Ray),
``raymoe.benchmarks.baselines.probe`` (one gloo all-to-all) and ``raymoe.benchmarks.cost_model`` (fit to
the measured rows, projection to 8-64 GPUs)."""

from __future__ import annotations

from raymoe.benchmarks.results_md.source import Result
from raymoe.benchmarks.results_md.tables import md_table, pct, text_table

PHASES = ("attention", "dispatch", "experts", "combine", "coherence")
BASELINES = ("transformers", "DeepSpeed-MoE EP", "naive Ray")
PROJECTION_PHASES = (*PHASES, "other")


def _ratio(row: dict, rows: list[dict], baseline: str) -> str:
    base = next((r for r in rows if r["batch"] == row["batch"] and r["system"].startswith(baseline)), None)
    if base is None or base is row:
        return "-"
    return f"{row['decode_tok_s'] / base['decode_tok_s']:.2f}x"


def compare_table(results: list[Result]) -> str:
    """Every (system, batch): tokens/s, ratios to the baselines, phase split, bytes, memory."""
    rows = results[0].rows
    out = []
    for r in sorted(rows, key=lambda r: r["batch"]):
        phases = r["phase_seconds"]
        rss = r["peak_rss_mb"]
        out.append([r["batch"], r["system"], r["processes"], f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}",
                    *(_ratio(r, rows, b) for b in BASELINES),
                    *(pct(phases.get(p, 0.0), sum(phases.values())) for p in PHASES),
                    f"{r['bytes_per_token']:.0f}", f"{r['collectives_per_layer']:.2f}",
                    f"{max(rss, default=0):.0f}" + (f" x{len(rss)}" if len(rss) > 1 else ""),
                    "yes" if r["same_text"] else "NO"])
    return text_table(["batch", "system", "procs", "prefill tok/s", "decode tok/s", "vs transformers", "vs DeepSpeed",
                       "vs naive Ray", *PHASES, "B/token", "coll/layer", "peak RSS MB", "same text"], out)


def compare_phases_table(results: list[Result]) -> str:
    """Decode ms per step by phase at the smallest and largest batch, with every repeat's tok/s.
    ``other``: the step's time outside the phases the system reports (blank below 0.05 ms)."""
    rows = results[0].rows
    batches = sorted({r["batch"] for r in rows})
    out = []
    for r in rows:
        if r["batch"] not in (batches[0], batches[-1]):
            continue
        step_ms = 1e3 * r["batch"] / r["decode_tok_s"]
        phases = {p: 1e3 * s / r["decode_steps"] for p, s in r["phase_seconds"].items()}
        other = step_ms - sum(phases.values())
        cells = [f"{phases[p]:.1f}" if phases.get(p, 0.0) > 0 else "" for p in PHASES]
        repeats = r["extra"].get("decode_tok_s_repeats", [])
        out.append([r["batch"], r["system"], f"{step_ms:.1f}", *cells, f"{other:.1f}" if other >= 0.05 else "",
                    ", ".join(f"{x:.1f}" for x in repeats)])
    out.sort(key=lambda row: row[0])
    return md_table(["batch", "system", "ms/step", *PHASES, "other", "decode tok/s of the repeats"], out)


def compare_ratios_table(results: list[Result]) -> str:
    """Per file (a run): the decode ratios the targets are about, next to the load it ran under."""
    out, ranks = [], results[0].meta["ranks"]
    for result in results:
        rows, batches = result.rows, result.meta["batches"]

        def tok_s(system: str, batch: int, rows=rows) -> float:
            return next(r["decode_tok_s"] for r in rows if r["system"] == system and r["batch"] == batch)

        big, disagg = batches[-1], f"raymoe disaggregated {ranks}r"
        out.append([result.name, ", ".join(map(str, result.meta["load_average"])),
                    f"{tok_s(disagg, big) / tok_s(f'DeepSpeed-MoE EP {ranks}r', big):.2f}x",
                    f"{tok_s(disagg, big) / tok_s(f'naive Ray {ranks}r', big):.2f}x",
                    ", ".join(f"{tok_s('raymoe disaggregated 1r', b) / tok_s('transformers', b):.2f}x" for b in batches)])
    return md_table(["run", "load average start, end", f"disagg {ranks}r / DeepSpeed (batch {big})",
                     f"disagg {ranks}r / naive Ray (batch {big})",
                     f"disagg 1r / transformers (batch {', '.join(map(str, batches))})"], out)


def probe_table(results: list[Result]) -> str:
    """Milliseconds per ``all_to_all_single`` by process count and bytes sent by rank 0."""
    data = results[0].data
    sizes = data["sizes"]
    out = [[row["processes"], *(f"{1e3 * row['by_bytes'][str(n)]:.2f}" for n in sizes)] for row in data["seconds"]]
    return text_table(["processes", *(f"{n} B" for n in sizes)], out)


def cost_model_check_table(results: list[Result]) -> str:
    """Measured against the cost model per (system, batch), fitted on every row and on the
    other batches, and the worst phase of at least 10% of its step."""
    table = results[0]["check"]["table"]
    keys = list(dict.fromkeys((t["system"], t["batch"]) for t in table))
    out = []
    for system, batch in keys:
        phases = [t for t in table if (t["system"], t["batch"]) == (system, batch)]
        measured = sum(t["measured_ms"] for t in phases)
        fitted = sum(t["predicted_ms"] for t in phases)
        held = sum(t["held_out_ms"] for t in phases)
        big = [t for t in phases if t["measured_ms"] >= 0.1 * measured]
        worst = max(big, key=lambda t: abs(t["predicted_ms"] - t["measured_ms"]) / t["measured_ms"])
        out.append([system, batch, f"{measured:.1f}", f"{fitted:.1f} ({_err(fitted, measured)})",
                    f"{held:.1f} ({_err(held, measured)})",
                    f"{worst['phase']} {worst['measured_ms']:.1f} -> {worst['predicted_ms']:.1f} "
                    f"({_err(worst['predicted_ms'], worst['measured_ms'])})"])
    return md_table(["system", "batch", "measured ms/step", "cost model, fitted on all", "fitted without this batch",
                     "worst phase (>= 10% of the step), fitted"], out)


def _err(predicted: float, measured: float) -> str:
    return f"{100 * (predicted - measured) / measured:+.0f}%"


def cost_model_projection_table(results: list[Result]) -> str:
    """The projection to 8-64 GPUs (a projection of the cost model, not a measurement)."""
    out = []
    for r in results[0]["projection"]:
        layout = r["layout"] + (f" {r['frontends']}:{r['expert_ranks']}" if r["frontends"] else "")
        out.append([r["gpus"], r["nodes"], layout, r["policy"], r["batch"], f"{r['decode_tok_s']:.0f}",
                    f"{r['decode_tok_s'] / r['gpus']:.0f}", f"{r['step_ms']:.2f}",
                    *(pct(r["phase_ms"][p], r["step_ms"]) for p in PROJECTION_PHASES),
                    f"{r['bytes_per_token'] / 1024:.1f}"])
    return text_table(["GPUs", "nodes", "layout", "policy", "batch", "decode tok/s", "tok/s/GPU", "step ms",
                       *PROJECTION_PHASES, "KiB/token"], out)
