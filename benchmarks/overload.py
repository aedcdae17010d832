"""Overload: the OpenAI HTTP endpoint offered 4x the load it sustains, then relieved.

    python -m raymoe.benchmarks.overload --seconds 60

One command, loopback only, bounded in time. It starts Ray Serve on the embedded Ray with
the shipped tiny model (``--config``, default deploy/configs/tiny.yaml; ``--max-wait-s``
and ``--max-queue`` override its admission limits) and runs four phases against
``POST /v1/completions`` (non-streaming, greedy, ``--max-tokens`` new tokens, end of
sequence ignored, so every request costs the same):

1. capacity: ``max_seqs`` closed-loop clients; the requests/s they get is the sustainable rate;
2. unloaded: open loop (Poisson arrivals) at ``--unloaded-fraction`` of that rate: the
   latency distribution of a moderately loaded server;
3. overload: open loop at ``--factor`` (4) times the sustainable rate for ``--seconds``;
   every request's status, Retry-After and latency are recorded, and the resident memory
   (RSS) of the Ray processes of this run (the Serve replica, proxy and controller, and the
   deployment's actors) is sampled every second;
4. recovery: straight back to the unloaded rate for ``--recovery-seconds``.

Reported (JSON to ``--out``, its RESULTS.md table to stdout, progress to stderr): counts of 200 / 429 / other, the
fraction of 429s carrying a valid Retry-After, admitted latency p50/p99 under overload
against the unloaded p99, RSS at the start and peak of the overload per process, the
recovery latencies, and the server's queue, running and stream gauges once it is idle.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from raymoe.benchmarks import result_file
from raymoe.benchmarks.serving import PROMPTS, percentile

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Outcome:
    """One request of an open-loop run: its phase, seconds since the phase started when it
    was sent, its HTTP status (0: the client failed: timeout, connection error), its
    Retry-After header (None: absent) and its latency in seconds."""

    phase: int
    sent: float
    status: int
    retry_after: str | None
    latency: float


def progress(message: str) -> None:
    print(f"[overload] {message}", file=sys.stderr, flush=True)


# -- load ------------------------------------------------------------------------------
async def _post(client, url: str, body: dict, phase: int = 0, started: float = 0.0) -> Outcome:
    sent = time.perf_counter()
    try:
        response = await client.post(url, json=body)
        status, retry_after = response.status_code, response.headers.get("retry-after")
    except Exception:  # timeout, connection reset: counted as "other"
        status, retry_after = 0, None
    return Outcome(phase, sent - started, status, retry_after, time.perf_counter() - sent)


def _body(model: str, max_tokens: int, i: int) -> dict:
    return {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}


async def closed_loop(base: str, model: str, clients: int, total: int, max_tokens: int) -> float:
    """Requests/s that ``clients`` back-to-back clients get over ``total`` requests."""
    import httpx2 as httpx

    counter = iter(range(total))
    url = f"{base}/v1/completions"

    async def client_loop(client) -> None:
        for i in counter:
            outcome = await _post(client, url, _body(model, max_tokens, i))
            if outcome.status != 200:
                raise RuntimeError(f"capacity run: HTTP {outcome.status}")

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return total / (time.perf_counter() - started)


async def open_loop(base: str, model: str, phases: list[tuple[float, float]], max_tokens: int,
                    seed: int) -> list[Outcome]:
    """Poisson arrivals, phase after phase: ``phases`` is [(requests/s, seconds)]. A phase
    starts when the previous one stops sending, not when its answers are in; returns once
    every request is answered."""
    import httpx2 as httpx

    rng = random.Random(seed)
    url = f"{base}/v1/completions"
    tasks = []
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for phase, (rate, seconds) in enumerate(phases):
            started, due = time.perf_counter(), 0.0
            while (due := due + rng.expovariate(rate)) < seconds:
                delay = started + due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = _body(model, max_tokens, len(tasks))
                tasks.append(asyncio.create_task(_post(client, url, body, phase, started)))
            await asyncio.sleep(max(0.0, started + seconds - time.perf_counter()))
        return list(await asyncio.gather(*tasks))


# -- memory ----------------------------------------------------------------------------
class RssSampler:
    """Every ``period_s``, the RSS (MiB) of the Ray processes this driver started, summed
    by actor class (the process title, e.g. ``ray::ServeReplica:overload:raymoe``)."""

    def __init__(self, period_s: float = 1.0):
        self.period_s, self.samples = period_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def snapshot() -> dict[str, float]:
        import psutil

        out: dict[str, float] = {}
        for proc in psutil.Process(os.getpid()).children(recursive=True):
            try:
                title = (proc.cmdline() or [""])[0]
                if title.startswith("ray::") and "IDLE" not in title:
                    name = title.split()[0].removeprefix("ray::").split(".")[0]  # the actor, not its method
                    out[name] = out.get(name, 0.0) + proc.memory_info().rss / 2**20
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - started, self.snapshot()))
            self._stop.wait(self.period_s)


def rss_report(samples: list[tuple[float, dict[str, float]]]) -> dict:
    """Per process: MiB at the first sample, the peak, the last; and the growth over the run."""
    names = sorted({n for _, snap in samples for n in snap})
    out = {}
    for name in names:
        series = [snap[name] for _, snap in samples if name in snap]
        out[name] = {"start_mib": series[0], "max_mib": max(series), "end_mib": series[-1],
                     "max_over_start": max(series) / series[0]}
    return out


# -- summaries -------------------------------------------------------------------------
def latency_summary(outcomes: list[Outcome]) -> dict:
    ok = [o.latency for o in outcomes if o.status == 200]
    refused = sum(o.status == 429 for o in outcomes)
    return {"requests": len(outcomes), "ok": len(ok), "refused": refused, "other": len(outcomes) - len(ok) - refused,
            "p50_s": percentile(ok, 50), "p99_s": percentile(ok, 99),
            "max_s": max(ok, default=float("nan"))}


def overload_summary(outcomes: list[Outcome], unloaded_p99: float) -> dict:
    statuses = [o.status for o in outcomes]
    refused = [o for o in outcomes if o.status == 429]
    valid = [o for o in refused if o.retry_after is not None and o.retry_after.isdigit() and int(o.retry_after) >= 1]
    admitted = latency_summary(outcomes)
    retry = [int(o.retry_after) for o in valid]
    return {"offered": len(outcomes), "ok_200": statuses.count(200), "refused_429": len(refused),
            "other": len(outcomes) - statuses.count(200) - len(refused),
            "other_statuses": sorted({s for s in statuses if s not in (200, 429)}),
            "retry_after_fraction": len(valid) / len(refused) if refused else float("nan"),
            "retry_after_s": {"min": min(retry, default=None), "max": max(retry, default=None)},
            "refused_latency_p99_s": percentile([o.latency for o in refused], 99),
            "admitted": admitted, "admitted_p99_over_unloaded_p99": admitted["p99_s"] / unloaded_p99,
            "admitted_p50_over_unloaded_p99": admitted["p50_s"] / unloaded_p99}


def recovery_summary(outcomes: list[Outcome], unloaded_p99: float) -> dict:
    """Latency per second after the load dropped; ``recovered_after_s``: the start of the
    first second from which every answer is a 200 within 2x the unloaded p99."""
    seconds = int(max((o.sent for o in outcomes), default=0)) + 1
    per_second = []
    for s in range(seconds):
        window = [o for o in outcomes if s <= o.sent < s + 1]
        ok = [o.latency for o in window if o.status == 200]
        per_second.append({"second": s, "sent": len(window), "ok": len(ok), "max_s": max(ok, default=None)})
    good = [r["sent"] == r["ok"] and (r["max_s"] is None or r["max_s"] <= 2 * unloaded_p99) for r in per_second]
    recovered = next((s for s in range(seconds) if all(good[s:])), None)
    return {**latency_summary(outcomes), "recovered_after_s": recovered, "per_second": per_second}


def scrape(base: str) -> dict:
    """The server's admission gauges and counters (``GET /metrics``)."""
    import httpx2 as httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=30).text):
        for sample in family.samples:
            values[sample.name + "".join(f":{v}" for v in sample.labels.values())] = sample.value
    return {"queue_depth": values.get("raymoe_queue_depth"),
            "running_sequences": values.get("raymoe_running_sequences"),
            "open_streams": values.get("raymoe_open_streams"),
            "refused_queue_full": values.get("raymoe_admission_refused_total:queue_full", 0.0),
            "refused_wait": values.get("raymoe_admission_refused_total:wait", 0.0)}


# -- the run ---------------------------------------------------------------------------
def run(settings, args) -> dict:
    from ray import serve

    from raymoe.deploy.server import app_for

    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(app_for(settings), name="overload", route_prefix="/")
    base, model = f"http://127.0.0.1:{args.port}", settings.model_name
    slots = settings.config.batching.max_seqs
    try:
        asyncio.run(closed_loop(base, model, 2, 4, args.max_tokens))  # warm-up
        capacity = asyncio.run(closed_loop(base, model, slots, 4 * slots, args.max_tokens))
        progress(f"capacity: {capacity:.2f} requests/s with {slots} closed-loop clients")
        unloaded_rate = args.unloaded_fraction * capacity
        unloaded = latency_summary(asyncio.run(
            open_loop(base, model, [(unloaded_rate, args.unloaded_seconds)], args.max_tokens, seed=1)))
        p99 = unloaded["p99_s"]
        progress(f"unloaded at {unloaded_rate:.2f} req/s: p50 {unloaded['p50_s']:.2f} s, p99 {p99:.2f} s")
        progress(f"overload at {args.factor * capacity:.2f} req/s for {args.seconds:g} s, then "
                 f"{unloaded_rate:.2f} req/s for {args.recovery_seconds:g} s")
        with RssSampler() as sampler:
            outcomes = asyncio.run(open_loop(base, model, [(args.factor * capacity, args.seconds),
                                                           (unloaded_rate, args.recovery_seconds)],
                                             args.max_tokens, seed=2))
        overload = overload_summary([o for o in outcomes if o.phase == 0], p99)
        recovery = recovery_summary([o for o in outcomes if o.phase == 1], p99)
        progress(f"overload: {overload['ok_200']} x 200, {overload['refused_429']} x 429, {overload['other']} "
                 f"other; admitted p99 {overload['admitted']['p99_s']:.2f} s "
                 f"({overload['admitted_p99_over_unloaded_p99']:.2f}x unloaded p99)")
        progress(f"recovery at {unloaded_rate:.2f} req/s: p99 {recovery['p99_s']:.2f} s, "
                 f"recovered after {recovery['recovered_after_s']} s")
        idle = scrape(base)
    finally:
        serve.shutdown()
    return {"capacity_requests_s": capacity, "unloaded_rate": unloaded_rate, "unloaded": unloaded,
            "overload_rate": args.factor * capacity, "overload": overload, "recovery": recovery,
            "rss": rss_report(sampler.samples), "idle_after": idle}


# -- report ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "deploy" / "configs" / "tiny.yaml")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the overload phase")
    parser.add_argument("--factor", type=float, default=4.0, help="overload: this many times the sustainable rate")
    parser.add_argument("--unloaded-fraction", type=float, default=0.5)
    parser.add_argument("--unloaded-seconds", type=float, default=20.0)
    parser.add_argument("--recovery-seconds", type=float, default=15.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-wait-s", default=None, help="override batching.max_wait_s ('none': no limit)")
    parser.add_argument("--max-queue", type=int, default=None, help="override batching.max_queue")
    parser.add_argument("--port", type=int, default=18331)
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/overload.json, with a "
                                                 "part per non-default argument)")
    args = parser.parse_args(argv)
    out = args.out or result_file.default_path("overload", parser, args, ignore=("port",))
    meta = result_file.run_meta("raymoe.benchmarks.overload", argv, args)

    import ray

    from raymoe.cluster.bootstrap import connect
    from raymoe.deploy.settings import settings_from_args

    settings = settings_from_args({"config": str(args.config)})
    batching = settings.config.batching
    if args.max_wait_s is not None:
        max_wait_s = None if args.max_wait_s == "none" else float(args.max_wait_s)
        batching = dataclasses.replace(batching, max_wait_s=max_wait_s)
    if args.max_queue is not None:
        batching = dataclasses.replace(batching, max_queue=args.max_queue)
    settings = dataclasses.replace(settings, config=settings.config.replace(batching=batching))
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    connect(settings.config.ray)
    try:
        result = run(settings, args)
    finally:
        ray.shutdown()
    c = settings.config
    meta.update(
        model=Path(c.model).name, layout=c.layout, expert_ranks=c.expert_ranks,
        max_seqs=c.batching.max_seqs, max_queue=c.batching.max_queue, max_wait_s=c.batching.max_wait_s,
        max_tokens=args.max_tokens, seconds=args.seconds, factor=args.factor,
        unloaded_fraction=args.unloaded_fraction, unloaded_seconds=args.unloaded_seconds,
        recovery_seconds=args.recovery_seconds, load_before=load_before,
        load_after=", ".join(f"{x:.1f}" for x in os.getloadavg()))
    result_file.write(out, meta, result)
    from raymoe.benchmarks.results_md import render_result

    print(render_result("overload", meta, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
