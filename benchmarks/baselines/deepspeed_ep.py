"""Baseline: DeepSpeed-MoE expert parallelism, ``deepspeed.moe.layer.MoE`` with
``ep_size`` = R, one process per rank over torch.distributed gloo.

This is DeepSpeed-MoE's inference layout: the non-expert part is data parallel (every rank
holds attention, dense layers and LM head, and decodes its own share of the sequences);
the experts are split over the R ranks (expert e on rank ``e // (E / R)``). Per MoE layer
every rank runs DeepSpeed's gate on its tokens, packs them into a capacity-padded
``[E, C, D]`` buffer, and the layer does two ``all_to_all_single`` (dispatch, combine);
every rank computes C rows for each of its experts from each rank (padding included).

Settings, chosen so that DeepSpeed computes what the reference computes:

* ``drop_tokens=False``: capacity C = the step's largest per-expert count, agreed by an
  ``all_reduce(MAX)`` over the EP group (a third collective per layer). With dropping
  (capacity_factor c: C = ceil(c * k * T / E)) tokens over capacity lose an expert and the
  text differs from the reference's; DeepSpeed's own docs equate ``drop_tokens=False``
  with infinite capacity.
* the gate is DeepSpeed's ``TopKGate`` with ``wg`` = the checkpoint's router weight:
  fp32 logits, softmax over all experts, top-k, then the k weights renormalised to sum to
  one (k >= 2; k = 1 keeps the softmax probability). That is Mixtral's and Qwen3-MoE's
  routing (``norm_topk_prob``); other routers are refused (``UnsupportedRouterError``).
  ``use_rts=False`` and ``top2_2nd_expert_sampling=False`` (both random, training-time
  choices) and ``min_capacity=0``. Each step checks that DeepSpeed's per-expert counts
  equal those of raymoe's router on the same input (``routing_mismatches`` in the result).
* attention, dense layers, router inputs, sampling and scheduling are raymoe's reference
  code (``ExecutorEngine``), so only the MoE layer is DeepSpeed's.

A rank without sequences (batch < R) still joins every MoE layer's collectives with zero
tokens, as a data-parallel DeepSpeed rank must.

Shapes: T = a rank's tokens, E = experts, R = ranks, C = capacity, D = hidden, I = expert width.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import time

import ray
import torch
import torch.nn.functional as F
from torch import nn

from raymoe.benchmarks.baselines.dist_probe import DistProbe
from raymoe.benchmarks.baselines.measure import PHASES, RunResult, drive, set_threads
from raymoe.workers.model.router import Routing


class UnsupportedRouterError(ValueError):
    """DeepSpeed's TopKGate cannot reproduce this model's routing."""

    def __init__(self, field_name: str, value: object, fix: str):
        self.field, self.value = field_name, value
        super().__init__(f"router field '{field_name}' = {value!r}: {fix}")


def check_router(cfg) -> None:
    """Refuse routers whose semantics DeepSpeed's TopKGate does not have (``RouterConfig``)."""
    checks = [("scoring", cfg.scoring, cfg.scoring == "softmax"),
              ("n_group", cfg.n_group, cfg.n_group == 1),
              ("correction_bias", cfg.correction_bias, not cfg.correction_bias),
              ("moge_groups", cfg.moge_groups, not cfg.moge_groups),
              ("routed_scaling_factor", cfg.routed_scaling_factor, cfg.routed_scaling_factor == 1.0),
              ("norm_topk_prob", cfg.norm_topk_prob, cfg.norm_topk_prob == (cfg.top_k > 1))]
    for name, value, ok in checks:
        if not ok:
            raise UnsupportedRouterError(name, value, "DeepSpeed's TopKGate is softmax top-k, renormalised for k >= 2 "
                                         "(Mixtral, Qwen3-MoE); benchmark this model without the DeepSpeed baseline")


def available() -> str | None:
    """None when DeepSpeed is installed, else why not (checked without importing it: the
    import is slow and only the rank processes need it)."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (`make setup` installs it from requirements.lock)"
    return None


def init_deepspeed_comm() -> None:
    """Start ``deepspeed.comm`` on the torch.distributed group this process has joined.

    On a CPU accelerator DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce
    kernel (C++, needs a compiler, minutes on a busy machine). It serves only
    tensor-parallel ``inference_all_reduce``; the MoE layer never calls it, so it is skipped.
    """
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False, verbose=False)


class DeepSpeedExpert(nn.Module):
    """One expert in the form DeepSpeed's ``Experts`` container copies: ``[..., D] -> [..., D]``,
    the same math and weight layout as raymoe's ``ExpertStack`` (gate rows, then up rows)."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class _MoETimer:
    """Forward hooks on one DeepSpeed MoE layer: when it starts, when its experts start and
    end, when it ends, and the capacity its gate chose."""

    def __init__(self, moe):
        self.marks: dict[str, float] = {}
        self.capacity = 0
        moe.register_forward_pre_hook(lambda m, a: self._mark("start"))
        moe.register_forward_hook(lambda m, a, o: self._mark("end"))
        experts = moe.deepspeed_moe.experts
        experts.register_forward_pre_hook(lambda m, a: self._mark("experts_start"))
        experts.register_forward_hook(lambda m, a, o: self._mark("experts_end"))
        moe.deepspeed_moe.gate.register_forward_hook(self._gate)

    def _mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def _gate(self, module, args, output) -> None:
        self.capacity = int(output[1])  # sparse routes: (l_aux, capacity, num_experts, ...)


def build_moe_layers(ckpt, model, rank: int, ranks: int) -> list:
    """One DeepSpeed MoE layer per MoE layer of the checkpoint, with this rank's experts and
    the router's weight as the gate's. All ranks must call this together (it creates the
    expert-parallel process group)."""
    from deepspeed.moe.layer import MoE

    config = ckpt.config
    experts, hidden, width = config.num_experts, config.hidden_size, config.moe_intermediate_size
    local = experts // ranks
    layers = []
    for layer in config.moe_layer_ids:
        with torch.device("meta"):  # no random init of weights that are overwritten below
            moe = MoE(hidden, DeepSpeedExpert(hidden, width), num_experts=experts, ep_size=ranks, k=config.top_k,
                      capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False,
                      use_rts=False, top2_2nd_expert_sampling=False)
        moe = moe.to_empty(device="cpu")
        moe.set_deepspeed_parallelism()
        gate_up, down = ckpt.expert_weights(layer, list(range(rank * local, (rank + 1) * local)))
        with torch.no_grad():
            moe.deepspeed_moe.gate.wg.weight.copy_(model.model.layers[layer].mlp.gate.weight)
            for j, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
                expert.gate_up.weight.copy_(gate_up[j])
                expert.down.weight.copy_(down[j])
        layers.append(moe.eval())
    return layers


class DeepSpeedExperts:
    """ExpertExecutor of one step: MoE layer i is DeepSpeed's layer i (its own gate; raymoe's
    routing of the same input is only compared with it)."""

    def __init__(self, layers: list, timers: list[_MoETimer], num_experts: int, probe: DistProbe):
        self.layers, self.timers, self.num_experts, self.probe = layers, timers, num_experts, probe
        self.seconds = dict.fromkeys(("dispatch", "experts", "combine"), 0.0)
        self.capacity: list[int] = []  # per MoE layer
        self.counts: list[list[int]] = []  # per MoE layer: this rank's (token, expert) pairs per expert
        self.collectives: list[int] = []  # per MoE layer: torch.distributed calls DeepSpeed made (probe)
        self.sent_bytes: list[int] = []  # per MoE layer: bytes this rank sent to other ranks (probe)
        self.mismatches = 0

    def __call__(self, moe_index: int, layer: int, x: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        calls, sent = sum(self.probe.calls.values()), sum(self.probe.bytes_sent.values())
        out, _, counts = self.layers[moe_index](x)
        self.collectives.append(sum(self.probe.calls.values()) - calls)
        self.sent_bytes.append(sum(self.probe.bytes_sent.values()) - sent)
        m = self.timers[moe_index].marks
        self.seconds["dispatch"] += m["experts_start"] - m["start"]
        self.seconds["experts"] += m["experts_end"] - m["experts_start"]
        self.seconds["combine"] += m["end"] - m["experts_end"]
        self.capacity.append(self.timers[moe_index].capacity)
        self.counts.append(counts.tolist())
        if routing is not None:
            ours = torch.bincount(routing.topk_ids.reshape(-1), minlength=self.num_experts)
            self.mismatches += int(not torch.equal(ours, counts.to(ours.dtype)))
        return out


class DeepSpeedRank:
    """Actor body: one rank (one process) of the DeepSpeed expert-parallel group."""

    def __init__(self, model_path: str, rank: int, ranks: int, max_seqs: int, threads: int):
        from raymoe.workers.model.checkpoint import Checkpoint, load_model

        set_threads(threads)
        self.ckpt = Checkpoint(model_path)
        config = self.ckpt.config
        check_router(config.router)
        if config.num_experts % ranks:
            raise ValueError(f"DeepSpeed-MoE needs experts ({config.num_experts}) divisible by ranks ({ranks})")
        self.model = load_model(model_path, with_experts=False, checkpoint=self.ckpt)
        self.rank, self.ranks, self.max_seqs = rank, ranks, max_seqs

    def pid(self) -> int:
        return os.getpid()

    def rendezvous(self) -> str:
        from raymoe.workers.process_group import free_port, node_ip

        ip = node_ip()
        return f"{ip}:{free_port(ip)}"

    def join(self, address: str, timeout_s: float) -> int:
        """Join the gloo group, start deepspeed.comm, build the MoE layers. All ranks together."""
        from raymoe.benchmarks.baselines.executor_engine import ExecutorEngine
        from raymoe.workers.process_group import join_groups

        join_groups("gloo", address, self.rank, self.ranks, timeout_s)  # DeepSpeed uses the default group
        init_deepspeed_comm()
        self.layers = build_moe_layers(self.ckpt, self.model, self.rank, self.ranks)
        timers = [_MoETimer(moe) for moe in self.layers]
        experts = self.ckpt.config.num_experts
        probe = DistProbe.install()  # DeepSpeed's collectives, counted where torch.distributed is called
        self.engine = ExecutorEngine(self.model, lambda: DeepSpeedExperts(self.layers, timers, experts, probe),
                                     self.max_seqs)
        return self.rank

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        """Generate this rank's share; every rank runs ``new_tokens`` steps. All ranks together."""
        import torch.distributed as dist

        dist.barrier()  # start the clocks together
        self.engine.steps.clear()
        if prompts:
            outputs, step_seconds = drive(self.engine, prompts, new_tokens).outputs, None
        else:
            outputs, step_seconds = [], self._idle(new_tokens)
        steps = self.engine.steps
        if step_seconds is None:
            step_seconds = [seconds for _, seconds, _ in steps]
        decode = steps[1:]
        return {
            "outputs": outputs,
            "step_seconds": step_seconds,
            "phases": {p: sum(e.seconds.get(p, 0.0) for e, _, _ in decode) for p in PHASES},
            "capacity": [e.capacity for e, _, _ in decode],  # [steps][L]
            "counts": [e.counts for e, _, _ in decode],  # [steps][L][E]
            "collectives": [e.collectives for e, _, _ in decode],  # [steps][L]
            "sent_bytes": [e.sent_bytes for e, _, _ in decode],  # [steps][L]
            "mismatches": sum(e.mismatches for e, _, _ in steps),
        }

    def _idle(self, new_tokens: int) -> list[float]:
        """A rank without sequences: join every MoE layer of every step with zero tokens."""
        hidden = self.ckpt.config.hidden_size
        nothing = torch.empty(0, hidden)
        seconds = []
        for _ in range(new_tokens):
            started = time.perf_counter()
            executor = self.engine.new_executor()
            for i in range(len(self.layers)):
                executor(i, -1, nothing, None)
            seconds.append(time.perf_counter() - started)
            self.engine.steps.append((executor, seconds[-1], 0))
        return seconds


def merge_ranks(name: str, prompts: list[list[int]], per_rank: list[dict], num_experts: int) -> RunResult:
    """The ranks' reports of one run -> one ``RunResult``. Rank r decoded prompts ``r::R``.

    A step lasts as long as its slowest rank (the collectives couple them). The time split
    is rank 0's: it holds the most sequences (``ceil(B / R)``), so it is the critical path
    (a rank with fewer sequences spends the difference waiting inside the collectives).
    Collectives and bytes are what torch.distributed was asked to do (``DistProbe``): calls
    per MoE layer (the same on every rank) and bytes every rank sent to the others.
    """
    ranks = len(per_rank)
    outputs = [per_rank[i % ranks]["outputs"][i // ranks] for i in range(len(prompts))]
    steps = [max(r["step_seconds"][s] for r in per_rank) for s in range(len(per_rank[0]["step_seconds"]))]
    decode_steps = len(steps) - 1
    first = per_rank[0]
    phases = dict(first["phases"], attention=sum(first["step_seconds"][1:]) - sum(first["phases"].values()))
    capacity = per_rank[0]["capacity"]  # [steps][L], the same on every rank (all_reduce MAX)
    num_layers = len(capacity[0]) if capacity else 0
    moved = sum(b for r in per_rank for step in r["sent_bytes"] for b in step)
    calls = [c for step in first["collectives"] for c in step]
    local = num_experts // ranks
    pairs = [[sum(r["counts"][s][layer][e] for r in per_rank for s in range(decode_steps)
                  for e in range(q * local, (q + 1) * local)) for q in range(ranks)] for layer in range(num_layers)]
    rows_computed = sum(ranks * num_experts * c for step in capacity for c in step)
    decode_tokens = len(prompts) * decode_steps
    prefill = sum(len(p) for p in prompts) / max(steps[0], 1e-9)
    return RunResult(name, len(prompts), ranks, prefill, decode_tokens / max(sum(steps[1:]), 1e-9), decode_steps,
                     phases, bytes_per_token=moved / max(decode_tokens, 1),
                     collectives_per_layer=sum(calls) / max(len(calls), 1), rank_pairs=pairs, outputs=outputs,
                     extra={"expert_rows_computed": rows_computed, "expert_pairs": sum(map(sum, pairs)),
                            "mean_capacity": rows_computed / max(ranks * num_experts * decode_steps * num_layers, 1),
                            "routing_mismatches": sum(r["mismatches"] for r in per_rank)})


class DeepSpeedSystem:
    """R ``DeepSpeedRank`` actors; a batch's prompts are dealt round-robin over the ranks."""

    def __init__(self, model_path: str, ranks: int, max_seqs: int, threads: int = 1, num_cpus: float = 0.1,
                 timeout_s: float = 300.0):
        per_rank = -(-max_seqs // ranks)
        self.actors = [ray.remote(DeepSpeedRank).options(num_cpus=num_cpus).remote(
            str(model_path), r, ranks, per_rank, threads) for r in range(ranks)]
        address = ray.get(self.actors[0].rendezvous.remote())
        ray.get([a.join.remote(address, timeout_s) for a in self.actors])
        from raymoe.workers.model.checkpoint import Checkpoint

        config = Checkpoint(model_path).config
        self.ranks, self.num_experts = ranks, config.num_experts
        self.name = f"DeepSpeed-MoE EP {ranks}r"
        self.processes = ranks

    def run(self, prompts: list[list[int]], new_tokens: int) -> RunResult:
        shares = [prompts[r::self.ranks] for r in range(self.ranks)]
        per_rank = ray.get([a.run.remote(share, new_tokens) for a, share in zip(self.actors, shares)])
        return merge_ranks(self.name, prompts, per_rank, self.num_experts)

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
