"""Tables of ``raymoe.benchmarks.runtime`` (reference engine vs runtime),
``raymoe.benchmarks.step_overhead`` (decode ms per step, as a ratio to the reference) and
``raymoe.benchmarks.layouts`` (disaggregated vs coherent, bytes per decoded token)."""

from __future__ import annotations

from raymoe.benchmarks.results_md.source import Result
from raymoe.benchmarks.results_md.tables import md_table, pct

RUNTIME_PHASES = ("attention", "dispatch", "experts", "combine")
LAYOUT_BYTES = ("dispatch_bytes", "combine_bytes", "merge_bytes", "metadata_bytes", "coherence_bytes")


def runtime_table(results: list[Result]) -> str:
    """One row per (model, engine, ranks): tokens/s, decode against the reference, phase split."""
    rows = results[0].rows
    out = []
    for row in rows:
        ref = next(r for r in rows if r["model"] == row["model"] and r["engine"] == "reference")
        phases = row["decode_phase_seconds"]
        total = sum(phases.values())
        out.append([row["model"], row["engine"], row["ranks"] or "-", f"{row['prefill_tok_s']:.0f}",
                    f"{row['decode_tok_s']:.1f}", f"{row['decode_tok_s'] / ref['decode_tok_s']:.2f}x",
                    *(pct(phases[p], total) for p in RUNTIME_PHASES), "yes" if row["same_tokens"] else "NO"])
    return md_table(["model", "engine", "ranks", "prefill tok/s", "decode tok/s", "decode vs ref", *RUNTIME_PHASES,
                     "same tokens"], out)


def layouts_table(results: list[Result]) -> str:
    """One row per (layout, plan): bytes per decoded token by purpose, collectives, tok/s."""
    result = results[0]
    rows = result.rows
    base = next(r for r in rows if r["layout"] == "disaggregated" and r["plan"] == "linear")["total_bytes_per_token"]
    out = []
    for r in rows:
        stayed = r["stayed_fraction_per_layer"]
        out.append([r["layout"], r["plan"], f"{r['total_bytes_per_token']:.0f}",
                    f"{r['total_bytes_per_token'] / base:.2f}",
                    *(f"{r['bytes_per_token'][k]:.0f}" for k in LAYOUT_BYTES),
                    f"{r['token_collectives_per_layer']:.2f}", f"{r['other_collectives_per_step']:.1f}",
                    f"{sum(stayed) / len(stayed):.0%}" if stayed else "-", f"{r['decode_tok_s']:.1f}",
                    "yes" if r["same_tokens"] else "NO"])
    ranks = rows[0]["ranks"]
    return f"{ranks} ranks:\n\n" + md_table(
        ["layout", "plan", "B/token", "x disagg+linear", "dispatch", "combine", "merge", "meta", "coherence",
         "a2a/layer", "other coll/step", "stayed", "decode tok/s", "same tokens"], out)


def step_overhead_table(results: list[Result]) -> str:
    """One row per (model, batch): each engine's decode ms per step and its ratio to the
    reference engine of the same run; then the transport floor."""
    data = results[0].data
    rows = data["rows"]
    def key(r: dict) -> tuple:
        return r["engine"], r["ranks"], r.get("overlap", "")

    engines = list(dict.fromkeys(key(r) for r in rows))

    def name(k: tuple) -> str:
        if k[0] in ("reference", "transformers"):
            return k[0]
        return f"{k[0]} {k[1]}r" + (f" overlap {k[2]}" if k[2] else "")

    def cell(r: dict) -> str:
        text = f"{r['decode_ms']:.1f}" + ("" if r["engine"] == "reference" else f" ({r['ratio']:.2f}x)")
        if r.get("overlap") == "auto":  # what share of the decode steps the rule split in two
            text += f" [{r['two_batch_steps']:.0%} split]"
        return text

    header = ["model", "batch"] + [name(k) for k in engines] + ["same tokens", "collectives/step"]
    out = []
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        mine = {key(r): r for r in rows if r["model"] == model and r["batch"] == batch}
        cells = [cell(mine[k]) if k in mine else "-" for k in engines]
        runtime = [mine[k] for k in engines if k in mine and k[0] not in ("reference", "transformers")]
        same = "yes" if all(r["same_tokens"] for r in runtime) else "NO"
        calls = "/".join(f"{r['collectives_per_step']:g}" for r in runtime)
        out.append([model, batch, *cells, same, calls])
    floors = data.get("floors", {})
    floor = "; ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in floors.items())
    return md_table(header, out) + (f"\n\nTransport floor here: {floor}." if floor else "")


def quantized_experts_table(results: list[Result]) -> str:
    """One row per (model, variant): held-out perplexity (and against float32; random
    models have none), routed-expert bytes (and against float32), decode ms per step per
    batch (and against float32 of the same model)."""
    data = results[0].data
    rows = data["rows"]
    batches = list(rows[0]["decode_ms"])
    out = []
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["variant"] == "float32")
        ms = [f"{r['decode_ms'][b]:.2f} ({r['decode_ms'][b] / base['decode_ms'][b]:.2f}x)" for b in batches]
        quality = [f"{r['perplexity']:.3f}", f"{r['perplexity_vs_float32']:+.2%}"] if r["perplexity"] else ["-", "-"]
        out.append([r["model"], r["variant"], *quality, f"{r['expert_bytes'] / 2**20:.2f}",
                    f"{r['bytes_vs_float32']:.3f}", *ms])
    table = md_table(["model", "variant", "perplexity", "vs float32", "expert MiB", "bytes vs float32",
                      *(f"decode ms b={b}" for b in batches)], out)
    return table + (f"\n\nPerplexity over {data['windows']} held-out windows of {data['seq_len']} tokens from "
                    f"{', '.join(data['held_out'])}.")


def paged_kv_table(results: list[Result]) -> str:
    """Three tables: closed-loop throughput per engine and client count (with the ratio to
    the 16-slot baseline and KV bytes), TTFT with a shared prefix, and the streams'
    inter-token latency while a long prompt is prefilled."""
    data = results[0].data
    rows = data["throughput"]
    out = []
    for r in rows:
        base = next(b for b in rows if b["clients"] == r["clients"] and b["engine"] == "slots (16)")
        out.append([r["clients"], r["engine"], f"{r['tokens_per_s']:.0f}",
                    f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
                    f"{r['kv_allocated_bytes'] / 2**20:.1f}", f"{r['kv_held_per_seq_bytes'] / 2**10:.0f}"])
    parts = [md_table(["clients", "engine", "output tok/s", "vs 16 slots", "KV MiB allocated",
                       "KV KiB held per running sequence"], out)]
    parts.append(md_table(["decode batch", "slots ms/step", "paged ms/step", "paged vs slots"],
                          [[r["batch"], f"{r['slots']:.2f}", f"{r['paged']:.2f}", f"{r['paged'] / r['slots']:.2f}x"]
                           for r in data["decode_ms"]]))
    parts.append(md_table(["16 sequences, one of 992 tokens, 15 of 64", "KV MiB allocated",
                           "KV KiB held per running sequence"],
                          [[name, f"{r['kv_allocated_bytes'] / 2**20:.1f}", f"{r['kv_held_per_seq_bytes'] / 2**10:.0f}"]
                           for name, r in data["memory"].items()]))
    ttft = data["prefix_ttft"]
    cold = ttft["paged, no prefix caching"]["ttft_s"]
    parts.append(md_table(["engine", "TTFT ms (median of 5)", "speed-up over paged without prefix caching"],
                          [[name, f"{r['ttft_s'] * 1e3:.1f}", f"{cold / r['ttft_s']:.2f}x"]
                           for name, r in ttft.items()]))
    itl = data["long_prompt_itl"]
    parts.append(md_table(["engine", "ITL p99 before (ms)", "ITL p99 while prefilled (ms)", "vs before", "max (ms)",
                           "steps until its first token"],
                          [[name, f"{r['itl_before_p99_s'] * 1e3:.1f}", f"{r['itl_during_p99_s'] * 1e3:.1f}",
                            f"{r['itl_during_p99_s'] / r['itl_before_p99_s']:.2f}x",
                            f"{r['itl_during_max_s'] * 1e3:.1f}",
                            r["steps_during"]] for name, r in itl.items()]))
    return "\n\n".join(parts) + f"\n\nBaseline: the slot-cache engine at commit {data['baseline']}."
