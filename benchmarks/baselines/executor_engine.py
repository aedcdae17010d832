"""raymoe's reference engine loop and model code with the routed experts run by a
baseline's ``ExpertExecutor`` (naive Ray calls, DeepSpeed's MoE layer). Attention, dense
layers, routers, sampling and scheduling are then the reference's own lines, so a
baseline differs from the reference only in how the experts are reached."""

from __future__ import annotations

from typing import Callable

from raymoe.workers.model.decoder import ExpertExecutor, MoEForCausalLM
from raymoe.workers.reference import ReferenceEngine


class ExecutorEngine(ReferenceEngine):
    """``new_executor()`` makes a fresh experts executor for every step; ``steps`` keeps, per
    step, (that executor, wall seconds of the forward pass + sampling, tokens computed)."""

    def __init__(self, model: MoEForCausalLM, new_executor: Callable[[], ExpertExecutor], max_seqs: int):
        super().__init__(model, None, max_seqs, experts=new_executor)
        self.new_executor = new_executor

    @property
    def steps(self) -> list[tuple[ExpertExecutor, float, int]]:
        return self.executor.steps
