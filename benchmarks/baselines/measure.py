"""What every system of the comparison reports, and the measuring helpers they share.

A run is one batch of B equal-length prompts, each generated greedily to ``new_tokens``
tokens (end-of-sequence ignored). Step 0 admits every prompt and is the prefill (it also
yields each sequence's first token); the other ``new_tokens - 1`` steps decode B tokens
each. Everything below counts decode steps only unless it says prefill.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

from raymoe.workers.sampling import SamplingParams

PHASES = ("attention", "dispatch", "experts", "combine", "coherence")


@dataclass
class RunResult:
    """One system at one batch size.

    ``phase_seconds``: decode time per phase (``PHASES``), as the system measures it.
    ``bytes_per_token``: bytes that cross processes per decoded token.
    ``collectives_per_layer``: collectives per MoE layer per decode step (naive Ray: remote calls).
    ``rank_pairs [L][R]``: (token, expert) pairs each expert rank computed over the decode steps.
    ``outputs``: generated token ids of each prompt, in prompt order.
    """

    system: str
    batch: int
    processes: int
    prefill_tok_s: float
    decode_tok_s: float
    decode_steps: int
    phase_seconds: dict[str, float]
    bytes_per_token: float = 0.0
    collectives_per_layer: float = 0.0
    rank_pairs: list[list[int]] | None = None
    outputs: list[list[int]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    peak_rss_mb: list[float] = field(default_factory=list)  # per process, peak over the whole run
    same_text: bool | None = None  # the reference's greedy tokens?
    routing: object = None  # reference only: int32 [decode steps, B, L, A] expert ids (the cost model's input)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("outputs", "routing")}


class System(Protocol):
    """A system under test: started once, then run at several batch sizes."""

    name: str
    processes: int

    def run(self, prompts: list[list[int]], new_tokens: int) -> RunResult: ...

    def pids(self) -> list[int]: ...

    def close(self) -> None: ...


@dataclass
class Generation:
    outputs: list[list[int]]  # per prompt, in prompt order
    step_seconds: list[float]  # wall time of each step; [0] is the prefill


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)


def drive(engine, prompts: list[list[int]], new_tokens: int) -> Generation:
    """Generate with a raymoe ``Engine`` (reference engine, deployment, or a baseline built
    on ``Engine``), timing every step."""
    ids = [engine.add_request(p, greedy(new_tokens)) for p in prompts]
    done: dict[str, list[int]] = {}
    seconds = []
    while engine.has_work():
        started = time.perf_counter()
        result = engine.step()
        seconds.append(time.perf_counter() - started)
        done.update({c.request_id: c.output_ids for c in result.finished})
    return Generation([done[i] for i in ids], seconds)


def throughput(prompts: list[list[int]], step_seconds: list[float]) -> tuple[float, float]:
    """Prefill tokens/s (prompt tokens / step 0) and decode tokens/s (B per later step)."""
    prefill = sum(len(p) for p in prompts) / max(step_seconds[0], 1e-9)
    decode_steps = len(step_seconds) - 1
    decode = len(prompts) * decode_steps / max(sum(step_seconds[1:]), 1e-9) if decode_steps else 0.0
    return prefill, decode


def peak_rss_mb(pid: int | None = None) -> float | None:
    """Peak resident set size (``VmHWM``) of a process on this node, in MiB; None if unreadable."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def set_threads(threads: int) -> None:
    """torch intra-op threads of this process (the same budget for every system)."""
    import torch

    torch.set_num_threads(threads)
