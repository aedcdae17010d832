"""One job of ``benchmarks/paged_kv.py``, run in its own process against the raymoe of a
given source tree (``--tree``: this checkout, or an older commit unpacked with ``git
archive``), so the paged engine and the slot engine before it are timed by the same
code. Run by path, not imported: ``raymoe`` must be found in ``--tree`` before anything
imports it.

    python benchmarks/paged_kv_worker.py --tree DIR --job '{"kind": "throughput", ...}'

Prints one JSON object. Only APIs both engines have are used (``ReferenceEngine(model,
max_seqs=..., max_seq_len=...)``, ``add_request``, ``step``); the paged engine's own
options come in ``job["engine"]``.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import math
import random
import statistics
import sys
import time
import tomllib
from pathlib import Path


class TreeFinder(importlib.abc.MetaPathFinder):
    """Imports ``raymoe`` and its top-level packages from ``root``, by the package
    directories its pyproject.toml declares (the subpackages follow their parents)."""

    def __init__(self, root: Path):
        setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
        self.dirs = {name: root / folder for name, folder in setuptools["package-dir"].items()}

    def find_spec(self, fullname, path, target=None):
        folder = self.dirs.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _engine(model_dir: Path, job: dict):
    import torch

    from raymoe.workers.model.checkpoint import load_model
    from raymoe.workers.reference import ReferenceEngine

    torch.set_num_threads(1)
    return ReferenceEngine(load_model(model_dir), max_seqs=job["max_seqs"], max_seq_len=job["max_seq_len"],
                           **job.get("engine", {}))


def _params(max_new: int):
    from raymoe.workers.sampling import SamplingParams

    return SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)


def _kv_bytes(engine) -> tuple[int, int]:
    """(bytes the KV cache has allocated, bytes the running sequences hold)."""
    cache = engine.runner.cache
    allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    if hasattr(engine.scheduler, "pool"):  # paged: the blocks the sequences hold
        per_block = allocated // ((cache.layout.num_blocks + 1) * cache.block_size) * cache.block_size
        return allocated, engine.scheduler.pool.num_used * per_block
    per_slot = allocated // cache.num_slots  # slots: every running sequence holds a whole slot
    return allocated, len(engine.scheduler.running) * per_slot


def throughput(engine, job: dict) -> dict:
    """``clients`` closed-loop clients, each sending its next request as soon as the last
    one finishes, ``requests`` requests in all (prompts of ``prompt_len`` tokens, or of
    each length of that list in turn): output tokens per second, and the KV bytes
    allocated (at most) and held per running sequence (on average over the steps)."""
    rng = random.Random(job["seed"])
    lengths = job["prompt_len"] if isinstance(job["prompt_len"], list) else [job["prompt_len"]]
    prompts = [[rng.randrange(2, 4096) for _ in range(lengths[i % len(lengths)])] for i in range(job["requests"])]
    params = _params(job["max_new"])
    sent = 0
    for _ in range(min(job["clients"], len(prompts))):
        engine.add_request(prompts[sent], params)
        sent += 1
    started, steps, peak, held_per_seq = time.perf_counter(), 0, 0, []
    while engine.has_work():
        result = engine.step()
        steps += 1
        allocated, held = _kv_bytes(engine)
        peak = max(peak, allocated)
        if engine.scheduler.running:
            held_per_seq.append(held / len(engine.scheduler.running))
        for _ in result.finished:
            if sent < len(prompts):
                engine.add_request(prompts[sent], params)
                sent += 1
    seconds = time.perf_counter() - started
    return {"tokens_per_s": len(prompts) * job["max_new"] / seconds, "seconds": seconds, "steps": steps,
            "kv_allocated_bytes": peak, "kv_held_per_seq_bytes": statistics.mean(held_per_seq)}


def prefix_ttft(engine, job: dict) -> dict:
    """Time to first token of requests that share a ``prefix_len``-token prefix and differ
    in a ``suffix_len``-token suffix, one at a time, after one warm-up request."""
    rng = random.Random(job["seed"])
    prefix = [rng.randrange(2, 4096) for _ in range(job["prefix_len"])]
    params = _params(1)
    times = []
    for i in range(job["requests"] + 1):
        prompt = prefix + [rng.randrange(2, 4096) for _ in range(job["suffix_len"])]
        started = time.perf_counter()
        rid = engine.add_request(prompt, params)
        while rid not in engine.step().tokens:
            pass
        if i:  # the first one fills the cache (when there is one)
            times.append(time.perf_counter() - started)
        while engine.has_work():
            engine.step()
    return {"ttft_s": statistics.median(times), "ttft_all_s": times}


def long_prompt_itl(engine, job: dict) -> dict:
    """``streams`` sequences decode; after ``warm_steps`` steps a ``long_len``-token prompt
    arrives. Inter-token latency of the streams (the step intervals in which they get a
    token) before it arrived (after the first ``skip``) and while it is prefilled, until
    its first token."""
    rng = random.Random(job["seed"])
    params = _params(job["max_new"])
    ids = {engine.add_request([rng.randrange(2, 4096) for _ in range(16)], params) for _ in range(job["streams"])}
    long_id, before, during = None, [], []
    last = time.perf_counter()
    for step in range(job["max_new"] - 1):
        if step == job["warm_steps"]:
            long_id = engine.add_request([rng.randrange(2, 4096) for _ in range(job["long_len"])], _params(1))
        result = engine.step()
        now = time.perf_counter()
        if ids & set(result.tokens):
            (before if long_id is None else during).append(now - last)
            last = now
        if long_id is not None and long_id in result.tokens:
            break
    before = before[job["skip"]:]  # the streams' own prefill (chunked too, under small budgets)
    return {"itl_before_p99_s": _p99(before), "itl_during_p99_s": _p99(during), "itl_during_max_s": max(during),
            "itl_before_median_s": statistics.median(before), "steps_during": len(during)}


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--job", required=True)
    args = parser.parse_args()
    sys.meta_path.insert(0, TreeFinder(args.tree.resolve()))
    job = json.loads(args.job)
    engine = _engine(args.model, job)
    print(json.dumps({"throughput": throughput, "prefix_ttft": prefix_ttft,
                      "long_prompt_itl": long_prompt_itl}[job["kind"]](engine, job)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
