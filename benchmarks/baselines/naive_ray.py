"""Baseline: naive Ray dispatch, what a first attempt at expert parallelism on Ray looks
like. R expert actors hold the experts (expert e on actor ``e * R // E``, linear); a
front-end actor runs everything else (raymoe's own model code, so the math is the
reference's) and, at every MoE layer, makes ONE Ray remote call per expert that has
tokens, passing that expert's token rows as the call's argument (through Ray's object
store) and waiting for all results.

Shapes: T = tokens of the step, A = experts per token, D = hidden, N = an expert's rows.
"""

from __future__ import annotations

import os
import time

import ray
import torch

from raymoe.benchmarks.baselines.measure import PHASES, RunResult, drive, set_threads, throughput
from raymoe.workers.model.experts import ExpertStack, combine
from raymoe.workers.model.router import Routing


def expert_owner(expert: int, num_experts: int, ranks: int) -> int:
    """Linear placement: rank of logical expert ``expert``."""
    return expert * ranks // num_experts


class NaiveExpertActor:
    """Actor body: one rank's experts of every MoE layer."""

    def __init__(self, model_path: str, rank: int, ranks: int, threads: int):
        from raymoe.workers.model.checkpoint import Checkpoint

        set_threads(threads)
        ckpt = Checkpoint(model_path)
        config = ckpt.config
        mine = [e for e in range(config.num_experts) if expert_owner(e, config.num_experts, ranks) == rank]
        self.local = {e: i for i, e in enumerate(mine)}
        self.stacks = []
        for layer in config.moe_layer_ids:
            gate_up, down = ckpt.expert_weights(layer, mine)
            stack = ExpertStack(len(mine), config.hidden_size, config.moe_intermediate_size)
            stack.load_state_dict({"gate_up": gate_up, "down": down})
            self.stacks.append(stack.eval())

    def pid(self) -> int:
        return os.getpid()

    @torch.inference_mode()
    def run(self, moe_index: int, expert: int, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``x [N, D]`` through expert ``expert`` of MoE layer ``moe_index`` -> ``[N, D]``, seconds."""
        started = time.perf_counter()
        ids = torch.full((x.shape[0],), self.local[expert], dtype=torch.long)
        y = self.stacks[moe_index](x, ids)
        return y, time.perf_counter() - started


class NaiveRayExperts:
    """The front-end's ExpertExecutor: one remote call per expert with tokens."""

    def __init__(self, actors: list, num_experts: int):
        self.actors, self.num_experts = actors, num_experts
        self.seconds = dict.fromkeys(("dispatch", "experts", "combine"), 0.0)
        self.calls = self.bytes = 0
        self.pairs: list[list[int]] = []  # per MoE layer of the step: pairs per rank

    def __call__(self, moe_index: int, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        started = time.perf_counter()
        tokens, top_k = routing.topk_ids.shape
        expert = routing.topk_ids.reshape(-1)  # [T*A], pair p = (token p // A, its (p % A)-th expert)
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        rows = torch.arange(tokens).repeat_interleave(top_k)
        ranks = len(self.actors)
        calls, start, pairs = [], 0, [0] * ranks
        for e, count in enumerate(counts):
            if count:
                pair_ids = order[start:start + count]
                owner = expert_owner(e, self.num_experts, ranks)
                calls.append((pair_ids, self.actors[owner].run.remote(moe_index, e, x[rows[pair_ids]])))
                pairs[owner] += count
                start += count
        submitted = time.perf_counter()
        results = ray.get([ref for _, ref in calls])
        returned = time.perf_counter()
        out = x.new_empty(tokens * top_k, x.shape[1])
        for (pair_ids, _), (y, _) in zip(calls, results):
            out[pair_ids] = y
        combined = combine(out.view(tokens, top_k, x.shape[1]), routing.topk_weights)
        # Phases: the experts run in parallel, so the slowest call's compute is the experts'
        # time; the rest of the wait (serialisation, object store, scheduling) is dispatch.
        compute = max((s for _, s in results), default=0.0)
        self.seconds["experts"] += compute
        self.seconds["dispatch"] += submitted - started + max(0.0, returned - submitted - compute)
        self.seconds["combine"] += time.perf_counter() - returned
        self.calls += len(calls)
        self.bytes += 2 * tokens * top_k * x.shape[1] * x.element_size()  # each pair's row out and back
        self.pairs.append(pairs)
        return combined


class NaiveFrontEnd:
    """Actor body: the front-end process (attention, dense layers, routers, LM head)."""

    def __init__(self, model_path: str, actors: list, max_seqs: int, threads: int):
        from raymoe.benchmarks.baselines.executor_engine import ExecutorEngine
        from raymoe.workers.model.checkpoint import load_model

        set_threads(threads)
        model = load_model(model_path, with_experts=False)
        num_experts = model.config.num_experts
        self.engine = ExecutorEngine(model, lambda: NaiveRayExperts(actors, num_experts), max_seqs)
        self.num_layers = len(model.config.moe_layer_ids)

    def pid(self) -> int:
        return os.getpid()

    def run(self, prompts: list[list[int]], new_tokens: int) -> RunResult:
        self.engine.steps.clear()
        gen = drive(self.engine, prompts, new_tokens)
        prefill, decode = throughput(prompts, gen.step_seconds)
        steps = self.engine.steps[1:]
        tokens = sum(n for _, _, n in steps)
        phases = {p: sum(e.seconds.get(p, 0.0) for e, _, _ in steps) for p in PHASES}
        phases["attention"] = sum(seconds for _, seconds, _ in steps) - sum(phases.values())
        pairs = [[sum(v) for v in zip(*(e.pairs[i] for e, _, _ in steps))] for i in range(self.num_layers)]
        return RunResult("naive Ray", len(prompts), 0, prefill, decode, len(steps), phases,
                         bytes_per_token=sum(e.bytes for e, _, _ in steps) / max(tokens, 1),
                         collectives_per_layer=sum(e.calls for e, _, _ in steps) / max(len(steps) * self.num_layers, 1),
                         rank_pairs=pairs, outputs=gen.outputs)


class NaiveRaySystem:
    def __init__(self, model_path: str, ranks: int, max_seqs: int, threads: int = 1, num_cpus: float = 0.1):
        options = dict(num_cpus=num_cpus)
        self.workers = [ray.remote(NaiveExpertActor).options(**options).remote(str(model_path), r, ranks, threads)
                        for r in range(ranks)]
        self.frontend = ray.remote(NaiveFrontEnd).options(**options).remote(str(model_path), self.workers, max_seqs,
                                                                            threads)
        self.name = f"naive Ray {ranks}r"
        self.processes = ranks + 1

    def run(self, prompts: list[list[int]], new_tokens: int) -> RunResult:
        result = ray.get(self.frontend.run.remote(prompts, new_tokens))
        result.system, result.processes = self.name, self.processes
        return result

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in [self.frontend, *self.workers]])

    def close(self) -> None:
        for actor in [self.frontend, *self.workers]:
            ray.kill(actor)
