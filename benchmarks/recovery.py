"""Time to recover from real faults while 16 requests decode on the shipped tiny model.

    python -m raymoe.benchmarks.recovery --repeats 3      # writes benchmarks/results/recovery.json

Scenarios, each on a fresh deployment (front-end + 2 expert ranks, gloo): no fault (the
baseline), SIGKILL of an expert rank, SIGKILL of the front-end (its KV caches are lost:
every request re-prefills its committed tokens), SIGSTOP of an expert rank (a hang,
found by the collective timeout), and a live plan change (linear -> round_robin: expert
weights move over the process group; its "recovered" time is the move), and SIGKILL of an
expert rank when every expert is on both ranks (a standby serves on the replicas at once
while the replacement loads; "full plan back" is when the replacement took over). The
fault lands after the 4th step. Per run:
whether every request's greedy tokens equal the reference engine's, how long the
failure took to notice and to recover from, and the wall time lost against the baseline.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from raymoe.benchmarks import result_file
from raymoe.cluster.config import parse_config
from raymoe.cluster.coordinator import Deployment
from raymoe.placement import build_plan
from raymoe.placement.plan import PlacementPlan
from raymoe.workers.model.checkpoint import Checkpoint
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny-moe"
SCENARIOS = ("none", "kill-expert-rank", "kill-replicated-rank", "kill-front-end", "hang-expert-rank", "plan-change")


def prompts_for(tokenizer, count: int) -> list[list[int]]:
    text = (ROOT / "README.md").read_text()
    ids = tokenizer.encode(text)
    return [ids[i * 40: i * 40 + 12 + i % 7] for i in range(count)]


def replicated_plan(num_layers: int, num_experts: int) -> PlacementPlan:
    """Every expert on both of 2 ranks."""
    phy2log = np.tile(np.concatenate([np.arange(num_experts)] * 2), (num_layers, 1))
    slot2rank = np.tile(np.repeat([0, 1], num_experts), (num_layers, 1))
    return PlacementPlan(num_ranks=2, num_nodes=1, num_experts=num_experts, phy2log=phy2log, slot2rank=slot2rank,
                         policy="replicated", params={}, objectives={})


def run(model: Path, scenario: str, prompts, params, collective_timeout_s: float) -> dict:
    config = parse_config({"model": str(model), "expert_ranks": 2, "batching": {"max_seqs": len(prompts)},
                           "resources": {"cpus_per_actor": 0.1}, "collective_timeout_s": collective_timeout_s,
                           "recovery": {"settle_s": 5}})
    checkpoint = Checkpoint(model).config
    plan = replicated_plan(len(checkpoint.moe_layer_ids), checkpoint.num_experts) \
        if scenario == "kill-replicated-rank" else None
    with Deployment(config, plan) as dep:
        pids = [w["pid"] for w in ray.get([a.where.remote() for a in dep.actors])]
        moved: dict = {}
        faults = {
            "kill-expert-rank": lambda: os.kill(pids[2], signal.SIGKILL),
            "kill-replicated-rank": lambda: os.kill(pids[2], signal.SIGKILL),
            "kill-front-end": lambda: os.kill(pids[0], signal.SIGKILL),
            "hang-expert-rank": lambda: os.kill(pids[2], signal.SIGSTOP),
            "plan-change": lambda: moved.update(dep.set_plan(build_plan(
                "round_robin", num_layers=dep.plan.num_layers, num_experts=dep.plan.num_experts, num_ranks=2))),
        }
        ids = [dep.add_request(p, params) for p in prompts]
        done, steps, started = {}, 0, time.perf_counter()
        try:
            while dep.has_work():
                if steps == 4 and scenario in faults:
                    faults[scenario]()
                done.update({c.request_id: c.output_ids for c in dep.step().finished})
                steps += 1
        finally:
            if scenario == "hang-expert-rank":
                try:
                    os.kill(pids[2], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        wall = time.perf_counter() - started
        if dep.recoveries and dep.recoveries[0].fallback and dep.recoveries[0].restored_seconds is None:
            dep.restore()  # decoding ended first: wait for the replacement, for the record
        rec = dep.recoveries[0] if dep.recoveries else None
    return {"scenario": scenario, "outputs": [done[i] for i in ids], "wall_s": wall, "recoveries": len(dep.recoveries),
            "detect_s": rec.detect_seconds if rec else 0.0,
            "recover_s": rec.seconds if rec else moved.get("seconds", 0.0),
            "replaced": rec.replaced if rec else [], "moved_bytes": moved.get("bytes", 0),
            "degraded_steps": rec.degraded_steps if rec else 0,
            "restored_s": rec.restored_seconds if rec and rec.restored_seconds is not None else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=TINY)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--collective-timeout-s", type=float, default=5.0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/recovery.json, with a "
                                                 "part per non-default argument)")
    args = parser.parse_args(argv)
    out = args.out or result_file.default_path("recovery", parser, args)
    meta = result_file.run_meta("raymoe.benchmarks.recovery", argv, args)
    ref = ReferenceEngine.from_pretrained(args.model, max_seqs=args.requests)
    prompts = prompts_for(ref.tokenizer, args.requests)
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    expected = [c.output_ids for c in ref.generate_ids(prompts, params)]
    ray.init(include_dashboard=False, log_to_driver=False)
    scenarios = args.scenarios.split(",")
    runs = []
    for scenario in tqdm([s for s in scenarios for _ in range(args.repeats)], desc="runs", file=sys.stderr):
        result = run(args.model, scenario, prompts, params, args.collective_timeout_s)
        result["equal_reference"] = result.pop("outputs") == expected
        runs.append(result)
    baseline = statistics.median(r["wall_s"] for r in runs if r["scenario"] == "none") if "none" in scenarios else 0.0
    summary = {}
    for scenario in scenarios:
        mine = [r for r in runs if r["scenario"] == scenario]
        median = {k: statistics.median(r[k] for r in mine) for k in ("wall_s", "detect_s", "recover_s")}
        summary[scenario] = {**median, "lost_s": median["wall_s"] - baseline, "runs": len(mine),
                             "all_equal_reference": all(r["equal_reference"] for r in mine),
                             "recoveries": [r["recoveries"] for r in mine], "replaced": mine[0]["replaced"],
                             "moved_bytes": mine[0]["moved_bytes"],
                             "degraded_steps": [r["degraded_steps"] for r in mine],
                             "restored_s": [r["restored_s"] for r in mine]}
    data = {"summary": summary, "runs": runs}
    result_file.write(out, meta, data)
    from raymoe.benchmarks.results_md import render_result

    print(render_result("recovery", meta, data))


if __name__ == "__main__":
    main()
