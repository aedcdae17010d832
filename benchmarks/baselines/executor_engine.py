"""raymoe's reference engine loop and model code with the routed experts run by a
baseline's ``ExpertExecutor`` (naive Ray calls, DeepSpeed's MoE layer). Attention, dense
layers, routers, sampling and scheduling are then the reference's own lines, so a
baseline differs from the reference only in how the experts are reached."""

from __future__ import annotations

import time
from typing import Callable

from raymoe.workers.model.decoder import ExpertExecutor, MoEForCausalLM
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.stats import StepStats
from raymoe.workers.step import StepInput, StepOutput


class ExecutorEngine(ReferenceEngine):
    """``new_executor()`` makes a fresh executor for every step; ``steps`` keeps, per step,
    (executor, wall seconds of the forward pass + sampling, tokens computed)."""

    def __init__(self, model: MoEForCausalLM, new_executor: Callable[[], ExpertExecutor], max_seqs: int):
        super().__init__(model, None, max_seqs)
        self.new_executor = new_executor
        self.steps: list[tuple[ExpertExecutor, float, int]] = []

    def _execute(self, step: StepInput) -> StepOutput:
        executor = self.new_executor()
        started = time.perf_counter()
        tokens, logits, num_tokens = self.runner.run(step, executor)
        self.steps.append((executor, time.perf_counter() - started, num_tokens))
        stats = StepStats(num_tokens, len(step.seqs), [])
        self.stats.add(stats)
        return StepOutput(tokens, stats, logits)
