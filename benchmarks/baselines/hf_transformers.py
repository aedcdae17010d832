"""Baseline: the model's own ``transformers`` implementation in one process, ``generate``
with its KV cache, greedy, on the same checkpoint directory raymoe loads.

Timing comes from a logits processor that stamps the clock each time ``generate`` has a
new token's logits: the first stamp closes the prefill, each later one a decode step.
The time split uses forward hooks on every MoE block (router + experts = "experts"; the
rest of the step = "attention"). transformers' defaults are kept (sdpa attention, its
default experts implementation), as a user would run it.
"""

from __future__ import annotations

import os
import time

import ray
import torch

from raymoe.benchmarks.baselines.measure import RunResult, set_threads


class _Stamps:
    """A ``LogitsProcessor``: records the time each step's logits are ready, and the time
    spent in MoE blocks by then."""

    def __init__(self, moe_timer: "_BlockTimer"):
        self.moe_timer = moe_timer
        self.times: list[float] = []
        self.moe_seconds: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        self.moe_seconds.append(self.moe_timer.seconds)
        return scores


class _BlockTimer:
    """Forward pre/post hooks that add up the time spent inside some modules."""

    def __init__(self, modules):
        self.seconds, self._start = 0.0, 0.0
        for m in modules:
            m.register_forward_pre_hook(self._enter)
            m.register_forward_hook(self._leave)

    def _enter(self, module, args):
        self._start = time.perf_counter()

    def _leave(self, module, args, output):
        self.seconds += time.perf_counter() - self._start


class TransformersHost:
    """Actor body: ``AutoModelForCausalLM`` on the checkpoint directory."""

    def __init__(self, model_path: str, threads: int):
        from transformers import AutoModelForCausalLM

        set_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        blocks = [layer.mlp for layer in self.model.model.layers if hasattr(layer.mlp, "experts")]
        self.moe_timer = _BlockTimer(blocks)
        self.experts_implementation = getattr(self.model.config, "_experts_implementation", None)

    def pid(self) -> int:
        return os.getpid()

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[float], float]:
        """Greedy ``generate``; returns (new token ids per prompt, step seconds, MoE-block seconds
        during the decode steps). Prompts must have equal lengths (no padding)."""
        from transformers import GenerationConfig, LogitsProcessorList

        if len({len(p) for p in prompts}) != 1:
            raise ValueError("the transformers baseline batches equal-length prompts only (no padding)")
        input_ids = torch.tensor(prompts, dtype=torch.long)
        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                                  use_cache=True)
        stamps = _Stamps(self.moe_timer)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                                      logits_processor=LogitsProcessorList([stamps]))
        times = [started] + stamps.times
        steps = [b - a for a, b in zip(times, times[1:])]
        return out[:, input_ids.shape[1]:].tolist(), steps, stamps.moe_seconds[-1] - stamps.moe_seconds[0]


class TransformersSystem:
    name = "transformers"
    processes = 1

    def __init__(self, model_path: str, threads: int = 1, num_cpus: float = 0.1):
        self.actor = ray.remote(TransformersHost).options(num_cpus=num_cpus).remote(str(model_path), threads)

    def run(self, prompts: list[list[int]], new_tokens: int) -> RunResult:
        from raymoe.benchmarks.baselines.measure import throughput

        outputs, steps, moe_seconds = ray.get(self.actor.generate.remote(prompts, new_tokens))
        prefill, decode = throughput(prompts, steps)
        decode_seconds = sum(steps[1:])
        return RunResult(self.name, len(prompts), 1, prefill, decode, len(steps) - 1,
                         {"attention": decode_seconds - moe_seconds, "experts": moe_seconds}, outputs=outputs)

    def pids(self) -> list[int]:
        return [ray.get(self.actor.pid.remote())]

    def close(self) -> None:
        ray.kill(self.actor)
