"""raymoe against what a user would run instead, side by side in one run: same checkpoint
(so the same expert weights), same prompts, same number of expert ranks.

    python -m raymoe.benchmarks.compare --ranks 4
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m raymoe.benchmarks.compare --ranks 4

Systems: raymoe's reference engine (1 process; its greedy tokens are the correctness
reference), transformers ``generate`` (1 process), raymoe disaggregated with 1 rank and with
R ranks, raymoe coherent with R ranks, DeepSpeed-MoE expert parallelism with R ranks, and
naive Ray dispatch with R expert actors. Each runs batches of 1, 8 and 32 prompts; the table
gives prefill and decode tokens/s, decode ratios against each baseline, the decode time split,
bytes across processes per decoded token, collectives per MoE layer, peak RSS per process and
whether the greedy tokens equal the reference's. Writes JSON and PNG plots.

Every process gets ``--threads`` torch threads (1 by default): on a small shared machine
the ratios then compare work, not who grabbed more cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from raymoe.benchmarks import result_file
from raymoe.benchmarks.baselines import deepspeed_ep
from raymoe.benchmarks.baselines.measure import RunResult, peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny-moe"
RESULTS = ROOT / "benchmarks" / "results"


def make_prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(count)]


def system_factories(model: str, ranks: int, max_seqs: int, threads: int, policies: list[str]) -> list[tuple]:
    """(kind, label, factory, largest batch only?) for every system, in run order."""
    from raymoe.benchmarks.baselines.hf_transformers import TransformersSystem
    from raymoe.benchmarks.baselines.naive_ray import NaiveRaySystem
    from raymoe.benchmarks.baselines.raymoe_deployment import DeploymentSystem
    from raymoe.benchmarks.baselines.reference import ReferenceSystem

    out = [
        ("reference", "raymoe reference", lambda: ReferenceSystem(model, max_seqs, threads), False),
        ("transformers", "transformers", lambda: TransformersSystem(model, threads), False),
        ("raymoe", "raymoe disaggregated 1r", lambda: DeploymentSystem(model, "disaggregated", 1, max_seqs,
                                                                       threads=threads), False),
        ("raymoe", f"raymoe disaggregated {ranks}r", lambda: DeploymentSystem(model, "disaggregated", ranks, max_seqs,
                                                                             threads=threads), False),
        ("raymoe", f"raymoe coherent {ranks}r", lambda: DeploymentSystem(model, "coherent", ranks, max_seqs,
                                                                        threads=threads), False),
        ("deepspeed", f"DeepSpeed-MoE EP {ranks}r", lambda: deepspeed_ep.DeepSpeedSystem(model, ranks, max_seqs,
                                                                                        threads=threads), False),
        ("naive", f"naive Ray {ranks}r", lambda: NaiveRaySystem(model, ranks, max_seqs, threads), False),
    ]
    for policy in policies:
        if policy != "linear":
            for layout in ("disaggregated", "coherent"):
                out.append(("raymoe", f"raymoe {layout} {ranks}r {policy}",
                            lambda layout=layout, policy=policy: DeploymentSystem(
                                model, layout, ranks, max_seqs, policy=policy, threads=threads), True))
    return out


def run_all(model: str, ranks: int, batches: list[int], prompt_len: int, new_tokens: int, threads: int,
            policies: list[str], budget_s: float, seed: int, only: set[str] | None,
            repeats: int = 1) -> tuple[list[RunResult], list[str]]:
    """Every system at every batch, ``repeats`` times (the row is the fastest repeat; every
    repeat must give the reference's tokens); returns the rows and notes on what was skipped."""
    from raymoe.workers.model.checkpoint import Checkpoint

    vocab = Checkpoint(model).config.vocab_size
    pool = make_prompts(vocab, max(batches), prompt_len, seed)
    systems = system_factories(model, ranks, max(batches), threads, policies)
    if only:
        systems = [s for s in systems if s[0] == "reference" or s[0] in only]
    skipped = deepspeed_ep.available()
    notes, rows, reference = [], [], {}
    started = time.perf_counter()
    total = sum(1 if last else len(batches) for *_, last in systems)
    with tqdm(total=total, desc="compare", file=sys.stderr) as progress:
        for kind, label, factory, largest_only in systems:
            todo = [max(batches)] if largest_only else batches
            if kind == "deepspeed" and skipped:
                notes.append(f"{label}: skipped, {skipped}")
                progress.update(len(todo))
                continue
            if kind != "reference" and time.perf_counter() - started > budget_s:
                notes.append(f"{label}: skipped, time budget of {budget_s:.0f} s spent")
                progress.update(len(todo))
                continue
            progress.set_postfix_str(label)
            try:
                rows += measure_system(factory, label, kind == "reference", pool, todo, new_tokens, repeats,
                                       reference, progress)
            except Exception as exc:  # a baseline that fails to start or run is reported, the others still run
                if kind == "reference":
                    raise
                notes.append(f"{label}: failed, {type(exc).__name__}: {exc}")
    return rows, notes


def measure_system(factory, label: str, is_reference: bool, pool: list[list[int]], batches: list[int],
                   new_tokens: int, repeats: int, reference: dict, progress) -> list[RunResult]:
    """Start one system, warm it up, run every batch ``repeats`` times, stop it."""
    system = factory()
    rows = []
    try:
        pids = system.pids()
        system.run(pool[:1], 2)  # warm-up: first calls, allocations, lazy imports
        for batch in batches:
            runs = [system.run(pool[:batch], new_tokens) for _ in range(repeats)]
            row = max(runs, key=lambda r: r.decode_tok_s)  # best of the repeats: the least disturbed
            row.extra["decode_tok_s_repeats"] = [round(r.decode_tok_s, 2) for r in runs]
            row.system = label
            row.peak_rss_mb = [peak_rss_mb(p) or 0.0 for p in pids]
            if is_reference:
                reference[batch] = row.outputs
            row.same_text = all(r.outputs == reference.get(batch) for r in runs)
            rows.append(row)
            progress.update()
    finally:
        system.close()
    return rows


def targets(rows: list[RunResult], ranks: int, batches: list[int]) -> list[str]:
    """The issue's targets, each with the measured number."""
    def find(prefix: str, batch: int) -> RunResult | None:
        return next((r for r in rows if r.system == prefix and r.batch == batch), None)

    lines, big = [], max(batches)
    disagg = find(f"raymoe disaggregated {ranks}r", big)
    for baseline, want in ((f"DeepSpeed-MoE EP {ranks}r", 1.5), (f"naive Ray {ranks}r", 5.0)):
        base = find(baseline, big)
        if disagg and base:
            ratio = disagg.decode_tok_s / base.decode_tok_s
            lines.append(f"raymoe disaggregated {ranks}r decode >= {want}x {baseline} at batch {big}: {ratio:.2f}x "
                         f"({'met' if ratio >= want else 'MISSED'})")
    for batch in batches:
        one, hf = find("raymoe disaggregated 1r", batch), find("transformers", batch)
        if one and hf:
            ratio = one.decode_tok_s / hf.decode_tok_s
            lines.append(f"raymoe 1 rank decode >= 0.8x transformers at batch {batch}: {ratio:.2f}x "
                         f"({'met' if ratio >= 0.8 else 'MISSED'})")
    wrong = [f"{r.system} @ {r.batch}" for r in rows if not r.same_text]
    lines.append("every row the reference's greedy tokens: " + ("met" if not wrong else "MISSED: " + ", ".join(wrong)))
    return lines


def model_shape(model: str, context: int) -> dict:
    """The dimensions the cost model needs (``benchmarks/cost_model.Shape`` fields)."""
    from raymoe.workers.model.checkpoint import Checkpoint

    c = Checkpoint(model).config
    return {"hidden": c.hidden_size, "expert_width": c.moe_intermediate_size, "experts": c.num_experts,
            "top_k": c.top_k, "layers": c.num_layers, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "vocab": c.vocab_size, "dtype_bytes": 4, "context": context}


def build_model(args, tmp: Path) -> tuple[str, str]:
    """The checkpoint directory and a description."""
    if args.model == "random":
        from raymoe.benchmarks.runtime import random_model

        path = random_model(tmp / "random", args.hidden, args.experts, args.layers, args.hidden)
        return str(path), (f"random Mixtral: hidden {args.hidden}, {args.experts} experts of width {args.hidden}, "
                           f"top-2, {args.layers} layers, vocab 4096 (raymoe.benchmarks.runtime.random_model, seed 0)")
    path = TINY if args.model == "tiny" else Path(args.model)
    return str(path), f"{path.name} ({path})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--model", default="random", help="'random' (built here), 'tiny' (models/tiny-moe) or a path")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process, every system")
    parser.add_argument("--policies", default="linear", help="placement policies of the raymoe rows, e.g. "
                        "linear,round_robin (policies after the first run at the largest batch only)")
    parser.add_argument("--systems", default="", help="subset: transformers,raymoe,deepspeed,naive (default all)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip systems not started by then")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (system, batch); the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded)")
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/compare.json, with a part "
                                                 "per non-default argument); its routing goes next to it")
    parser.add_argument("--plots", default=str(RESULTS), help="directory for compare_*.png ('' for none)")
    args = parser.parse_args(argv)
    out = args.out or result_file.default_path("compare", parser, args, ignore=("budget_s", "address", "plots"))
    from raymoe.cluster.bootstrap import connect
    from raymoe.cluster.config import RayConfig

    connect(RayConfig(address=args.address))
    batches = [int(b) for b in args.batches.split(",")]
    policies = args.policies.split(",")
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model, description = build_model(args, Path(tmp))
        shape = model_shape(model, args.prompt_len + args.new_tokens // 2)
        rows, notes = run_all(model, args.ranks, batches, args.prompt_len, args.new_tokens, args.threads, policies,
                              args.budget_s, args.seed, set(filter(None, args.systems.split(","))) or None,
                              args.repeats)
    wall = time.perf_counter() - started
    meta = result_file.run_meta(
        "raymoe.benchmarks.compare", argv, args, cpu_cores=_cpus(), model=description, shape=shape,
        load_average=[round(load_start, 1), round(os.getloadavg()[0], 1)], ranks=args.ranks, batches=batches,
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, threads_per_process=args.threads,
        repeats=args.repeats, wall_s=round(wall, 1), notes=notes)
    lines = targets(rows, args.ranks, batches)
    data = {"targets": lines, "rows": [r.to_json() for r in rows]}
    result_file.write(out, meta, data)
    from raymoe.benchmarks.results_md import render_result

    print(f"model: {description}; {args.ranks} ranks; prompts of {args.prompt_len} tokens, {args.new_tokens} new "
          f"tokens each; {args.threads} torch thread(s) per process; wall {wall:.0f} s")
    print(render_result("compare", meta, data))
    print("\n".join(["targets:"] + [f"  {t}" for t in lines] + [f"note: {n}" for n in notes]))
    routing = {f"b{r.batch}": r.routing for r in rows if r.routing is not None}
    if routing:  # the decode steps' expert ids, for benchmarks/cost_model.py
        np.savez_compressed(out.with_name(out.stem + "_routing.npz"), **routing)
    if args.plots:
        from raymoe.benchmarks.plots import draw_all

        for path in draw_all(rows, args.ranks, Path(args.plots)):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
