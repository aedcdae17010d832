"""Decode step time of the distributed runtime against the single process it distributes.

    python -m raymoe.benchmarks.step_overhead            # writes benchmarks/results/step_overhead.json

For each model (the shipped tiny model; a random 16-expert x 1024-wide model) and batch
(1, 8, 32 sequences), in one run: the median decode ms per step of the reference engine
(one process), the runtime disaggregated with 1 and 2 expert ranks, and coherent with 2
ranks, each as a ratio to the reference measured in the same run; transformers' decode on
the large model; and the floor: the reference's own step (the same model code, kernels
and 1 torch thread; the runtime adds processes, pack/unpack and collectives on top), plus
what one gloo all-to-all costs here, times the collectives a step issues.

Every row checks that it produced the reference's tokens. Runs on the embedded Ray.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from raymoe.benchmarks import result_file
from raymoe.benchmarks.runtime import random_model
from raymoe.cluster.config import parse_config
from raymoe.cluster.coordinator import Deployment
from raymoe.workers.engine import Engine
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny-moe"
ENGINES = (("disaggregated", 1), ("disaggregated", 2), ("coherent", 2))


def decode_steps(engine: Engine, prompts: list[list[int]], warmup: int, steps: int) -> tuple[list[float], list]:
    """Seconds of each timed decode step (after the prefill and ``warmup`` steps) and the outputs."""
    params = SamplingParams(max_new_tokens=1 + warmup + steps, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    seconds, done, index = [], {}, 0
    while engine.has_work():
        started = time.perf_counter()
        result = engine.step()
        if index > warmup:
            seconds.append(time.perf_counter() - started)
        index += 1
        done.update({c.request_id: c.output_ids for c in result.finished})
    return seconds, [done[i] for i in ids]


def collectives_per_step(engine: Engine) -> float:
    """Collectives each rank issued per decode step (the stats count them at the call)."""
    stats = getattr(engine, "stats", None)
    steps = stats.per_step[1:] if stats and len(stats.per_step) > 1 else []
    if not steps or not steps[0].layers:
        return 0.0
    calls = sum(L.token_collectives + L.metadata_collectives for s in steps for L in s.layers) + \
        sum(s.coherence_collectives for s in steps)
    return calls / len(steps)


def transformers_decode(path: Path, prompts: list[list[int]], steps: int) -> tuple[float, list]:
    """transformers' median decode ms per step (one process, 1 thread) and its tokens."""
    from raymoe.benchmarks.baselines.hf_transformers import TransformersHost

    host = TransformersHost(str(path), threads=1)
    outputs, step_seconds, _ = host.generate(prompts, steps + 3)
    return statistics.median(step_seconds[3:]) * 1000, outputs


def bench_model(name: str, path: Path, batches: list[int], prompt_len: int, warmup: int, steps: int,
                with_transformers: bool, progress: tqdm) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    torch.set_num_threads(1)  # the same per-process thread budget as each runtime actor
    reference = ReferenceEngine.from_pretrained(path, max_seqs=max(batches))
    vocab = reference.model.config.vocab_size
    for batch in batches:
        prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
        seconds, ref_out = decode_steps(reference, prompts, warmup, steps)
        ref_ms = statistics.median(seconds) * 1000
        rows.append({"model": name, "batch": batch, "engine": "reference", "ranks": 0, "decode_ms": ref_ms,
                     "ratio": 1.0, "same_tokens": True, "collectives_per_step": 0.0})
        progress.update()
        if with_transformers:
            hf_ms, hf_out = transformers_decode(path, prompts, steps)
            rows.append({"model": name, "batch": batch, "engine": "transformers", "ranks": 0, "decode_ms": hf_ms,
                         "ratio": hf_ms / ref_ms, "same_tokens": [o[:len(hf_out[0])] for o in ref_out] == hf_out,
                         "collectives_per_step": 0.0})
        for layout, ranks in ENGINES:
            config = parse_config({"model": str(path), "layout": layout, "expert_ranks": ranks,
                                   "batching": {"max_seqs": max(batches)},
                                   "resources": {"cpus_per_actor": 0.1, "threads_per_actor": 1}})
            with Deployment(config) as dep:
                decode_steps(dep, prompts[:1], 0, 2)  # warm-up: actors, collectives
                dep.stats.per_step.clear()
                seconds, out = decode_steps(dep, prompts, warmup, steps)
                calls = collectives_per_step(dep)
            ms = statistics.median(seconds) * 1000
            rows.append({"model": name, "batch": batch, "engine": layout, "ranks": ranks, "decode_ms": ms,
                         "ratio": ms / ref_ms, "same_tokens": out == ref_out, "collectives_per_step": calls})
            progress.update()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per row")
    parser.add_argument("--large-experts", type=int, default=16)
    parser.add_argument("--large-hidden", type=int, default=1024)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/step_overhead.json, "
                                                 "with a part per non-default argument)")
    args = parser.parse_args(argv)
    out = args.out or result_file.default_path("step_overhead", parser, args)
    meta = result_file.run_meta("raymoe.benchmarks.step_overhead", argv, args)
    batches = [int(b) for b in args.batches.split(",")]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows, floors = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        models = [("tiny-moe", TINY, False)]
        if not args.skip_large:
            large = random_model(Path(tmp) / "large", args.large_hidden, args.large_experts, 4, args.large_hidden)
            models.append((f"random-{args.large_experts}x{args.large_hidden}", large, True))
        total = sum(len(batches) * (1 + len(ENGINES)) for _ in models)
        with tqdm(total=total, desc="step overhead", file=sys.stderr) as progress:
            for name, path, with_hf in models:
                rows += bench_model(name, path, batches, args.prompt_len, args.warmup, args.steps, with_hf, progress)
    from raymoe.benchmarks.baselines.probe import all_to_all_latency

    for world, by_bytes in all_to_all_latency((2, 3), repeats=200).items():  # one gloo all_to_all_single
        floors[f"gloo_all_to_all_us_{world}_processes_4KiB"] = by_bytes[4096] * 1e6
    ray.shutdown()
    data = {"rows": rows, "floors": floors}
    result_file.write(out, meta, data)
    from raymoe.benchmarks.results_md import render_result

    print(render_result("step_overhead", meta, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
