"""Deployments on one GPU: every actor on cuda:0, collectives on NCCL (or gloo on CUDA
tensors where NCCL refuses two ranks on one device). Tokens are checked against the
reference engine on the CPU and on the GPU, both float32.
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from raymoe.benchmarks.gpu import compare, engine_on, prompts_for, timed_generate
from raymoe.cluster.config import parse_config
from raymoe.cluster.coordinator import Deployment

# (name, layout, expert ranks, GPU share per actor, backend)
CASES = [
    ("coherent 1 rank, nccl", "coherent", 1, 1.0, "nccl"),
    ("disaggregated 1+1 on one GPU, nccl", "disaggregated", 1, 0.5, "nccl"),
    ("coherent 2 ranks on one GPU, nccl", "coherent", 2, 0.5, "nccl"),
    ("disaggregated 1+1 on one GPU, gloo", "disaggregated", 1, 0.5, "gloo"),
    ("coherent 2 ranks on one GPU, gloo", "coherent", 2, 0.5, "gloo"),
]


def bench_case(path: Path, case: tuple, batches: list[int], prompt_len: int, new_tokens: int,
               references: dict) -> list[dict]:
    name, layout, ranks, gpus, backend = case
    config = parse_config({"model": str(path), "layout": layout, "expert_ranks": ranks, "backend": backend,
                           "collective_timeout_s": 60, "recovery": {"max_attempts": 0, "step_timeout_s": 120},
                           "batching": {"max_seqs": max(batches)},
                           "resources": {"cpus_per_actor": 1, "gpus_per_actor": gpus, "threads_per_actor": 1}})
    rows = []
    with Deployment(config) as dep:
        where = ray.get([a.where.remote() for a in dep.actors])
        timed_generate(dep, [[5, 6, 7]], 2)  # warm-up
        for batch in batches:
            prompts = prompts_for(dep.model_config.vocab_size, batch, prompt_len)
            got = timed_generate(dep, prompts, new_tokens)
            row = {"case": name, "batch": batch, "devices": [w["device"] for w in where],
                   **{k: v for k, v in got.items() if k not in ("outputs", "prefill_logits")}}
            for ref_name, ref in references[batch].items():
                row[f"vs_{ref_name}"] = compare(got, ref)
            rows.append(row)
    return rows


def bench_deployments(models: list[tuple[str, Path]], batches: list[int], prompt_len: int,
                      new_tokens: int) -> list[dict]:
    batches = [b for b in batches if b > 1] or batches
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=True, namespace="raymoe-gpu")
    rows, failed = [], set()
    for model_name, path in models:
        references = {}
        for batch in batches:
            references[batch] = {}
            for device in ("cpu", "cuda"):
                engine = engine_on(path, torch.float32, batch, device)
                prompts = prompts_for(engine.model.config.vocab_size, batch, prompt_len)
                if device == "cuda":
                    timed_generate(engine, prompts[:1], 2)
                references[batch][f"{device}_reference"] = ref = timed_generate(engine, prompts, new_tokens)
                rows.append({"case": f"{device} reference engine", "model": model_name, "batch": batch,
                             **{k: v for k, v in ref.items() if k not in ("outputs", "prefill_logits")}})
                print(rows[-1], flush=True)
        for case in CASES:
            if case[0] in failed:  # a case that cannot start on this machine fails the same way again
                rows.append({"case": case[0], "model": model_name, "error": "skipped: failed on an earlier model"})
                continue
            try:
                for row in bench_case(path, case, batches, prompt_len, new_tokens, references):
                    rows.append({"model": model_name, **row})
                    print(rows[-1], flush=True)
            except Exception as exc:  # noqa: BLE001 -- recorded; the next case still runs
                failed.add(case[0])
                rows.append({"case": case[0], "model": model_name, "error": f"{type(exc).__name__}: {exc}"[:3000]})
                print(rows[-1], flush=True)
    ray.shutdown()
    return rows
