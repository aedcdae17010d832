"""Serving overhead: the OpenAI HTTP endpoint (Ray Serve) against the runtime driven
directly from Python, at 1, 8 and 32 concurrent streams.

    python -m raymoe.benchmarks.serving --config deploy/configs/tiny.yaml    # writes benchmarks/results/serving.json

Both paths run the same deployment config, prompts and sampling (greedy, ``--max-tokens``
new tokens, end-of-sequence ignored so every request has the same length) as a closed
loop: each of C streams sends its next request when the previous one finished, until
``max(--min-requests, 2 C)`` requests are done. Direct: one Python loop adds requests to
a ``Deployment`` and steps it, timing each token when its step returns. HTTP: an asyncio
load generator streams ``/v1/completions`` (Server-Sent Events) over loopback and times
each chunk as it arrives. Reported: requests/s, output tokens/s, time to first token and
inter-token latency (HTTP: between chunks, as vLLM's serving benchmark measures it),
p50/p99, and the HTTP/direct ratios. Loopback only, bounded in requests and time.
``batching.max_wait_s`` is turned off (a closed loop waits by design).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from raymoe.benchmarks import result_file

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):",
           "def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\"\n", "for i in range(len(s)):",
           "try:\n    import json\nexcept ImportError:\n", "    def __repr__(self):\n        return",
           "with open(path) as f:\n    for line in f:"]
LEVELS = (1, 8, 32)


@dataclass
class Timing:
    """One request: when it was sent and when each piece of output arrived (perf_counter)."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def summarize(timings: list[Timing], wall_s: float) -> dict:
    ttft = [t.arrivals[0] - t.sent for t in timings if t.arrivals]
    itl = [b - a for t in timings for a, b in zip(t.arrivals, t.arrivals[1:])]
    return {"requests": len(timings), "wall_s": wall_s, "requests_s": len(timings) / wall_s,
            "output_tok_s": sum(t.tokens for t in timings) / wall_s,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99)}


# -- the runtime, called directly ---------------------------------------------------------
def run_direct(engine, prompts: list[list[int]], streams: int, total: int, params) -> dict:
    """Closed loop over a ``Deployment``: up to ``streams`` requests in flight."""
    in_flight: dict[str, Timing] = {}
    done: list[Timing] = []
    sent = 0
    started = time.perf_counter()
    while len(done) < total:
        while len(in_flight) < streams and sent < total:
            rid = engine.add_request(prompts[sent % len(prompts)], params)
            in_flight[rid] = Timing(time.perf_counter())
            sent += 1
        result = engine.step()
        now = time.perf_counter()
        for rid in result.tokens:
            in_flight[rid].arrivals.append(now)
        for completion in result.finished:
            timing = in_flight.pop(completion.request_id)
            timing.tokens = len(completion.output_ids)
            done.append(timing)
    return summarize(done, time.perf_counter() - started)


# -- the HTTP endpoint ------------------------------------------------------------------
async def _stream_one(client, url: str, body: dict) -> Timing:
    timing = Timing(time.perf_counter())
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                timing.tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"]:
                timing.arrivals.append(time.perf_counter())
    return timing


async def run_http(base_url: str, model: str, prompts: list[str], streams: int, total: int, max_tokens: int) -> dict:
    import httpx2 as httpx

    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    counter = iter(range(total))
    done: list[Timing] = []

    async def stream(client) -> None:
        for i in counter:
            done.append(await _stream_one(client, f"{base_url}/v1/completions",
                                          {**body, "prompt": prompts[i % len(prompts)]}))

    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(stream(client) for _ in range(streams)))
        return summarize(done, time.perf_counter() - started)


# -- the two sides ----------------------------------------------------------------------
def bench_direct(config, prompt_texts: list[str], levels, min_requests: int, max_tokens: int) -> list[dict]:
    from raymoe.cluster.coordinator import Deployment
    from raymoe.workers.sampling import SamplingParams

    rows = []
    with Deployment(config) as engine:
        prompts = [engine.tokenizer.encode(p) for p in prompt_texts]
        params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
        run_direct(engine, prompts, 2, 2, params)  # warm-up
        for streams in levels:
            total = max(min_requests, 2 * streams)
            rows.append({"path": "direct", "streams": streams, **run_direct(engine, prompts, streams, total, params)})
            _progress(rows[-1])
    return rows


def bench_http(settings, prompt_texts: list[str], levels, min_requests: int, max_tokens: int, port: int) -> list[dict]:
    from ray import serve

    from raymoe.deploy.server import app_for

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_for(settings), name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        asyncio.run(run_http(base, settings.model_name, prompt_texts, 2, 2, max_tokens))  # warm-up
        for streams in levels:
            total = max(min_requests, 2 * streams)
            result = asyncio.run(run_http(base, settings.model_name, prompt_texts, streams, total, max_tokens))
            rows.append({"path": "http", "streams": streams, **result})
            _progress(rows[-1])
    finally:
        serve.shutdown()
    return rows


def _progress(row: dict) -> None:
    print(f"  {row['path']:6} {row['streams']:3} streams: {row['requests_s']:.2f} req/s, "
          f"{row['output_tok_s']:.0f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "deploy" / "configs" / "tiny.yaml")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent streams, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--port", type=int, default=18321)
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/serving.json, with a "
                                                 "part per non-default argument)")
    parser.add_argument("--results", type=Path, help="then re-render the tables of this RESULTS.md from "
                                                     "benchmarks/results (python -m raymoe.benchmarks.results_md)")
    args = parser.parse_args(argv)
    out = args.out or result_file.default_path("serving", parser, args, ignore=("port", "results"))
    meta = result_file.run_meta("raymoe.benchmarks.serving", argv, args)
    levels = [int(x) for x in args.levels.split(",")]

    import ray

    from raymoe.cluster.bootstrap import connect
    from raymoe.deploy.settings import settings_from_args

    settings = settings_from_args({"config": str(args.config)})
    # Admission by expected wait is off: this closed loop keeps 32 streams on 16 slots waiting
    # by design (benchmarks.overload measures admission).
    c = settings.config
    settings = dataclasses.replace(settings, config=dataclasses.replace(
        c, batching=dataclasses.replace(c.batching, max_wait_s=None)))
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    connect(settings.config.ray)
    try:
        rows = bench_direct(settings.config, PROMPTS, levels, args.min_requests, args.max_tokens)
        rows += bench_http(settings, PROMPTS, levels, args.min_requests, args.max_tokens, args.port)
    finally:
        ray.shutdown()
    c = settings.config
    meta.update(
        model=Path(c.model).name, layout=c.layout, expert_ranks=c.expert_ranks,
        max_seqs=c.batching.max_seqs, max_tokens=args.max_tokens, min_requests=args.min_requests,
        prompts=len(PROMPTS), load_before=load_before, load_after=", ".join(f"{x:.1f}" for x in os.getloadavg()))
    result_file.write(out, meta, {"rows": rows})
    from raymoe.benchmarks.results_md import render_result
    from raymoe.benchmarks.results_md.__main__ import main as render_results_md

    print(render_result("serving", meta, {"rows": rows}))
    if args.results:
        render_results_md(["--results", str(args.results)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
