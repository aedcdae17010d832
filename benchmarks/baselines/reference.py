"""raymoe's single-process reference engine, in its own process (a Ray actor, so its
memory is measured alone). Its greedy tokens are what every other row must reproduce."""

from __future__ import annotations

import os

import ray

from raymoe.benchmarks.baselines.measure import RunResult, drive, set_threads, throughput


class ReferenceHost:
    """Actor body: a ``ReferenceEngine`` on the checkpoint, with every expert in-process."""

    def __init__(self, model_path: str, max_seqs: int, threads: int):
        from raymoe.workers.reference import ReferenceEngine

        set_threads(threads)
        self.engine = ReferenceEngine.from_pretrained(model_path, max_seqs=max_seqs)

    def pid(self) -> int:
        return os.getpid()

    def run(self, prompts: list[list[int]], new_tokens: int) -> RunResult:
        """Generate; also returns the routing of the decode steps (recording costs a copy of
        the expert ids per layer, the same for every run)."""
        self.engine.stats.per_step.clear()
        self.engine.record_trace(True)
        gen = drive(self.engine, prompts, new_tokens)
        prefill, decode = throughput(prompts, gen.step_seconds)
        ids = self.engine.recorder.topk_ids  # [prompt tokens + decode tokens, L, A], step by step
        self.engine.record_trace(False)
        steps = len(gen.step_seconds) - 1
        routing = ids[sum(map(len, prompts)):].reshape(steps, len(prompts), *ids.shape[1:])
        return RunResult("reference", len(prompts), 1, prefill, decode, steps,
                         {"attention": sum(gen.step_seconds[1:])}, outputs=gen.outputs, routing=routing)


class ReferenceSystem:
    name = "raymoe reference"
    processes = 1

    def __init__(self, model_path: str, max_seqs: int, threads: int = 1, num_cpus: float = 0.1):
        self.actor = ray.remote(ReferenceHost).options(num_cpus=num_cpus).remote(model_path, max_seqs, threads)

    def run(self, prompts: list[list[int]], new_tokens: int) -> RunResult:
        result = ray.get(self.actor.run.remote(prompts, new_tokens))
        result.system = self.name
        return result

    def pids(self) -> list[int]:
        return [ray.get(self.actor.pid.remote())]

    def close(self) -> None:
        ray.kill(self.actor)
