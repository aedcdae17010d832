"""Tables of ``raymoe.benchmarks.serving`` (HTTP vs direct), ``raymoe.benchmarks.overload`` (admission
under 4x load) and ``raymoe.benchmarks.recovery`` (faults)."""

from __future__ import annotations

import statistics

from raymoe.benchmarks.results_md.source import Result
from raymoe.benchmarks.results_md.tables import md_table

SERVING_RATIOS = ("requests_s", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def serving_table(results: list[Result]) -> str:
    """The setup line, both paths per stream count, and HTTP / direct."""
    result = results[0]
    meta, rows = result.meta, result.rows
    setup = (f"Model: {meta['model']} ({meta['layout']}, front-end + {meta['expert_ranks']} expert ranks, "
             f"max_seqs {meta['max_seqs']}), greedy, {meta['max_tokens']} new tokens per request (EOS ignored), "
             f"{meta.get('prompts', 8)} Python prompts in turn; closed loop, max({meta['min_requests']}, 2 x "
             f"streams) requests per row. Load average {meta['load_before']} before, {meta['load_after']} after.")
    out = [[r["streams"], r["path"], r["requests"], f"{r['requests_s']:.2f}", f"{r['output_tok_s']:.0f}",
            f"{r['ttft_p50_ms']:.1f}", f"{r['ttft_p99_ms']:.1f}", f"{r['itl_p50_ms']:.1f}", f"{r['itl_p99_ms']:.1f}"]
           for r in sorted(rows, key=lambda r: (r["streams"], r["path"]))]
    ratios = []
    for streams in sorted({r["streams"] for r in rows}):
        direct = next(r for r in rows if r["streams"] == streams and r["path"] == "direct")
        http = next(r for r in rows if r["streams"] == streams and r["path"] == "http")
        ratios.append([streams, *(f"{http[k] / direct[k]:.2f}x" for k in SERVING_RATIOS)])
    return "\n".join([
        setup, "",
        md_table(["streams", "path", "requests", "req/s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                  "ITL p99 ms"], out), "", "HTTP / direct:", "",
        md_table(["streams", "req/s", "output tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"], ratios)])


def overload_table(results: list[Result]) -> str:
    """The phases (capacity, unloaded, overload, recovery) and what they show."""
    result = results[0]
    meta = result.meta
    o, u, r = result["overload"], result["unloaded"], result["recovery"]
    a, idle = o["admitted"], result["idle_after"]
    capacity = result["capacity_requests_s"]
    rows = [
        [f"capacity ({meta['max_seqs']} closed-loop clients)", "-", "-", "-", "-", "-", f"{capacity:.2f} req/s sustained",
         ""],
        [f"unloaded ({meta['unloaded_fraction']:g}x capacity)", f"{result['unloaded_rate']:.2f}",
         f"{meta['unloaded_seconds']:g}", u["ok"], u["refused"], u["other"], f"{u['p50_s']:.2f}", f"{u['p99_s']:.2f}"],
        [f"overload ({meta['factor']:g}x capacity)", f"{result['overload_rate']:.2f}", f"{meta['seconds']:g}",
         o["ok_200"], o["refused_429"], o["other"], f"{a['p50_s']:.2f}", f"{a['p99_s']:.2f}"],
        ["recovery (unloaded rate)", f"{result['unloaded_rate']:.2f}", f"{meta['recovery_seconds']:g}", r["ok"],
         r["refused"], r["other"], f"{r['p50_s']:.2f}", f"{r['p99_s']:.2f}"],
    ]
    rss = "; ".join(f"{name} {v['start_mib']:.0f} -> max {v['max_mib']:.0f} MiB" for name, v in result["rss"].items())
    goodput = o["ok_200"] / meta["seconds"]
    return "\n".join([
        f"Model: {meta['model']} ({meta['layout']}, front-end + {meta['expert_ranks']} expert ranks, max_seqs "
        f"{meta['max_seqs']}, max_queue {meta['max_queue']}, max_wait_s {meta['max_wait_s']}), non-streaming "
        f"/v1/completions, greedy, {meta['max_tokens']} new tokens per request (EOS ignored); Poisson arrivals "
        f"over loopback from one asyncio client. Load average {meta['load_before']} before, {meta['load_after']} "
        "after.", "",
        md_table(["phase", "offered req/s", "seconds", "200", "429", "other", "latency p50 s", "latency p99 s"], rows),
        "",
        f"- Admitted latency under overload: p50 {o['admitted_p50_over_unloaded_p99']:.2f}x, p99 "
        f"**{o['admitted_p99_over_unloaded_p99']:.2f}x** the unloaded p99 (target: within 2x).",
        f"- Goodput under overload: {goodput:.2f} requests/s served, {100 * goodput / capacity:.0f}% of the "
        "sustainable rate.",
        f"- 429s carrying a Retry-After of whole seconds >= 1: {100 * o['retry_after_fraction']:.1f}% "
        f"(values {o['retry_after_s']['min']}-{o['retry_after_s']['max']} s); a 429 is answered in "
        f"{1e3 * o['refused_latency_p99_s']:.0f} ms (p99). Refusals by reason: queue_full "
        f"{idle['refused_queue_full']:.0f}, wait {idle['refused_wait']:.0f}.",
        f"- RSS during overload and recovery (start -> max, sampled every second, summed per actor class: "
        f"ExpertWorker is both expert ranks): {rss}.",
        (f"- Recovery: every request answered 200 within 2x the unloaded p99 from second {r['recovered_after_s']} "
         if r["recovered_after_s"] is not None else
         "- Recovery: no second of the recovery phase had every request answered 200 within 2x the unloaded p99 ")
        + f"after the load dropped (p99 {r['p99_s']:.2f} s, max {r['max_s']:.2f} s).",
        f"- Once idle: queue depth {idle['queue_depth']:.0f}, running sequences {idle['running_sequences']:.0f}, "
        f"open streams {idle['open_streams']:.0f}."])


FAULTS = {
    "none": "no fault (baseline)",
    "kill-expert-rank": "SIGKILL expert rank 1",
    "kill-replicated-rank": "SIGKILL expert rank 1, every expert on both ranks (standby on replicas)",
    "kill-front-end": "SIGKILL front-end",
    "hang-expert-rank": "SIGSTOP expert rank 1 (hang)",
    "plan-change": "live plan change linear -> round_robin",
}


def recovery_table(results: list[Result]) -> str:
    """Medians per fault: noticed, serving again, plan back, wall time, time lost."""
    out = []
    for scenario, s in results[0]["summary"].items():
        restored = [x for x in s["restored_s"] if x is not None]
        out.append([FAULTS.get(scenario, scenario), s["runs"], "yes" if s["all_equal_reference"] else "NO",
                    f"{s['detect_s']:.2f}", f"{s['recover_s']:.2f}",
                    f"{statistics.median(restored):.2f}" if restored else "-", f"{s['wall_s']:.2f}",
                    f"{s['lost_s']:+.2f}", str(s["replaced"])])
    return md_table(["fault", "runs", "every token == reference engine", "noticed (s)", "serving again (s)",
                     "full plan back (s)", "wall (s)", "lost (s)", "actors replaced"], out)
