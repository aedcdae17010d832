"""Decode step time of the distributed runtime against the single process it distributes.

    python -m raymoe.benchmarks.step_overhead            # writes benchmarks/results/step_overhead.json

For each model (the shipped tiny model; a random 16-expert x 1024-wide model) and batch
(1, 8, 32 sequences), in one run: the median decode ms per step of the reference engine
(one process), the runtime disaggregated with 1 and 2 expert ranks, and coherent with 2
ranks, each as a ratio to the reference (disaggregated with two micro-batches per decode
step never, always, and as the measured rule decides: ``batching.overlap`` off/on/auto);
transformers' decode on the large model; and the floor: the reference's own step (the
same model code, kernels and 1 torch thread; the runtime adds processes, pack/unpack and
collectives on top), plus what one all-to-all costs here on gloo and one dispatch +
combine on the same-node transport.

The machine is noisy (the same step varies by up to 2x over minutes), so all engines of a
model stay up together and decode the same requests in interleaved rounds: each round
times a few steps of every engine in turn, and the medians compare steps taken through
the same minutes.

Every row checks that it produced the reference's tokens. Runs on the embedded Ray.
"""

from __future__ import annotations

import argparse
import os
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
# (layout, ranks, batching.overlap): the disaggregated layout with two micro-batches per
# decode step always (on), never (off), and as its measured rule decides (auto).
ENGINES = tuple(("disaggregated", r, o) for r in (1, 2) for o in ("off", "on", "auto")) + (("coherent", 2, "off"),)


def interleaved(engines: dict[str, Engine], prompts: list[list[int]], warmup: int, rounds: int,
                per_round: int) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Every engine decodes the same requests; their steps run in rounds, ``per_round``
    steps of each engine in turn, so every engine is timed through the same minutes of a
    noisy machine. Returns the step seconds and the outputs of each engine."""
    total = 1 + warmup + rounds * per_round
    params = SamplingParams(max_new_tokens=total, ignore_eos=True)
    ids = {name: [e.add_request(p, params) for p in prompts] for name, e in engines.items()}
    done: dict[str, dict] = {name: {} for name in engines}
    seconds: dict[str, list[float]] = {name: [] for name in engines}

    def step(name: str, timed: bool) -> None:
        started = time.perf_counter()
        result = engines[name].step()
        if timed:
            seconds[name].append(time.perf_counter() - started)
        done[name].update({c.request_id: c.output_ids for c in result.finished})

    for name in engines:
        for _ in range(1 + warmup):  # prefill and warm-up
            step(name, False)
    for _ in range(rounds):
        for name in engines:
            for _ in range(per_round):
                step(name, True)
    for name, engine in engines.items():
        while engine.has_work():
            step(name, False)
    return seconds, {name: [done[name][i] for i in ids[name]] for name in engines}


def collectives_per_step(engine: Engine) -> float:
    """Collectives each rank issued per decode step (the stats count them at the call)."""
    stats = getattr(engine, "stats", None)
    steps = [s for s in stats.per_step if s.tokens == s.sequences] if stats else []  # decode steps
    if not steps or not steps[0].layers:
        return 0.0
    calls = sum(L.token_collectives + L.metadata_collectives for s in steps for L in s.layers) + \
        sum(s.coherence_collectives for s in steps)
    return calls / len(steps)


def two_batch_fraction(engine: Engine) -> float:
    """Of the decode steps of this batch, the fraction run as two micro-batches."""
    steps = [s for s in engine.stats.per_step if s.tokens == s.sequences]
    return sum(s.micro_batches == 2 for s in steps) / len(steps) if steps else 0.0


def transformers_decode(path: Path, prompts: list[list[int]], steps: int) -> tuple[float, list]:
    """transformers' median decode ms per step (one process, 1 thread) and its tokens."""
    from raymoe.benchmarks.baselines.hf_transformers import TransformersHost

    host = TransformersHost(str(path), threads=1)
    outputs, step_seconds, _ = host.generate(prompts, steps + 3)
    return statistics.median(step_seconds[3:]) * 1000, outputs


def bench_model(name: str, path: Path, batches: list[int], prompt_len: int, warmup: int, rounds: int,
                per_round: int, with_transformers: bool, progress: tqdm) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    torch.set_num_threads(1)  # the same per-process thread budget as each runtime actor
    engines: dict[str, Engine] = {"reference": ReferenceEngine.from_pretrained(path, max_seqs=max(batches))}
    try:
        for layout, ranks, overlap in ENGINES:
            config = parse_config({"model": str(path), "layout": layout, "expert_ranks": ranks,
                                   "batching": {"max_seqs": max(batches), "overlap": overlap},
                                   "resources": {"cpus_per_actor": 0.1, "threads_per_actor": 1}})
            engines[f"{layout} {ranks} {overlap}"] = Deployment(config)
        vocab = engines["reference"].model.config.vocab_size
        for batch in batches:
            prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
            for engine in engines.values():
                if hasattr(engine, "stats"):
                    engine.stats.per_step.clear()
            seconds, outputs = interleaved(engines, prompts, warmup, rounds, per_round)
            ref_ms = statistics.median(seconds["reference"]) * 1000
            rows.append({"model": name, "batch": batch, "engine": "reference", "ranks": 0, "decode_ms": ref_ms,
                         "ratio": 1.0, "same_tokens": True, "collectives_per_step": 0.0})
            if with_transformers:
                hf_ms, hf_out = transformers_decode(path, prompts, rounds * per_round)
                rows.append({"model": name, "batch": batch, "engine": "transformers", "ranks": 0,
                             "decode_ms": hf_ms, "ratio": hf_ms / ref_ms,
                             "same_tokens": [o[:len(hf_out[0])] for o in outputs["reference"]] == hf_out,
                             "collectives_per_step": 0.0})
            for layout, ranks, overlap in ENGINES:
                key = f"{layout} {ranks} {overlap}"
                ms = statistics.median(seconds[key]) * 1000
                row = {"model": name, "batch": batch, "engine": layout, "ranks": ranks, "decode_ms": ms,
                       "ratio": ms / ref_ms, "same_tokens": outputs[key] == outputs["reference"],
                       "collectives_per_step": collectives_per_step(engines[key]),
                       "backend": engines[key].backend}
                if layout == "disaggregated":
                    row["overlap"] = overlap
                    row["two_batch_steps"] = two_batch_fraction(engines[key])
                rows.append(row)
            progress.update()
    finally:
        for engine in engines.values():
            if hasattr(engine, "shutdown"):
                engine.shutdown()
    return rows


def local_transport_round_trip_us(world: int, nbytes: int = 4096, repeats: int = 300,
                                  shared_memory: bool = False) -> float:
    """Median microseconds of one dispatch + combine (rank 0 sends ``nbytes`` split over the
    others, they send it back) over the same-node transport: its sockets, or its
    shared-memory rings (``workers/dispatch/shm_mailbox.py``)."""
    import torch.multiprocessing as mp

    from raymoe.workers.process_group import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    name = f"probe-{free_port()}"
    procs = [ctx.Process(target=_round_trips, args=(r, world, name, nbytes, repeats, shared_memory, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return queue.get()


def _round_trips(rank: int, world: int, name: str, nbytes: int, repeats: int, shared_memory: bool, queue) -> None:
    from raymoe.workers.dispatch.local_transport import LocalTransport

    torch.set_num_threads(1)
    if shared_memory:  # the rings with spinning readers, as where the ranks have cores to spare
        os.environ["RAYMOE_SHARED_MEMORY"] = "1"
    t = LocalTransport.connect(name, rank, world, 30.0, shared_memory=shared_memory)
    per = nbytes // (world - 1)
    out_splits = [0] + [per] * (world - 1) if rank == 0 else [0] * world
    in_splits = [0] * world if rank == 0 else [per] + [0] * (world - 1)
    send, recv = torch.zeros(sum(out_splits), dtype=torch.uint8), torch.empty(sum(in_splits), dtype=torch.uint8)
    times = []
    for i in range(repeats + 20):
        started = time.perf_counter()
        t.all_to_all_single(recv, send, in_splits, out_splits)
        t.all_to_all_single(send, recv, out_splits, in_splits)
        if i >= 20:
            times.append(time.perf_counter() - started)
    if rank == 0:
        queue.put(statistics.median(times) * 1e6)
    t.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8, help="rounds of interleaved engines")
    parser.add_argument("--per-round", type=int, default=4, help="timed decode steps per engine and round")
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
        with tqdm(total=len(models) * len(batches), desc="step overhead", file=sys.stderr) as progress:
            for name, path, with_hf in models:
                rows += bench_model(name, path, batches, args.prompt_len, args.warmup, args.rounds, args.per_round,
                                    with_hf, progress)
    from raymoe.benchmarks.baselines.probe import all_to_all_latency

    for world, by_bytes in all_to_all_latency((2, 3), repeats=200).items():  # one gloo all_to_all_single
        floors[f"gloo_all_to_all_us_{world}_processes_4KiB"] = by_bytes[4096] * 1e6
    for world in (2, 3):  # dispatch + combine over the same-node transport's sockets
        floors[f"local_round_trip_us_{world}_processes_4KiB"] = local_transport_round_trip_us(world)
    # and over its shared-memory rings, which it uses where every rank has a core (2 ranks here)
    floors["shm_round_trip_us_2_processes_4KiB"] = local_transport_round_trip_us(2, shared_memory=True)
    ray.shutdown()
    data = {"rows": rows, "floors": floors}
    result_file.write(out, meta, data)
    from raymoe.benchmarks.results_md import render_result

    print(render_result("step_overhead", meta, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
