"""The dispatch collectives on NCCL without Ray: spawned processes, one per rank, all
on cuda:0 (the lent machine has one GPU).

Every rank is a front-end and an expert rank (``expert_base`` 0, the coherent shape):
it routes its own tokens over all ranks' experts, then dispatch -> experts -> combine
(``workers/dispatch/disaggregated.py``). The result is checked against the same experts applied in
one process, then the round trip is timed per decode batch size.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time

import torch

from raymoe.workers.process_group import free_port, join_groups, leave_groups
from raymoe.placement.build import build_plan
from raymoe.workers.dispatch.collectives import Collectives
from raymoe.workers.dispatch.compute import weighted_experts
from raymoe.workers.dispatch.disaggregated import pack, run_experts, unpack
from raymoe.workers.expert_map import layer_maps
from raymoe.workers.model.experts import ExpertStack

EXPERTS, TOP_K = 16, 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def full_stack(hidden: int, width: int, dtype: torch.dtype, device: torch.device) -> ExpertStack:
    """Every expert of the layer, the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(0)
    stack = ExpertStack(EXPERTS, hidden, width)
    with torch.no_grad():
        stack.gate_up.copy_(torch.randn(stack.gate_up.shape, generator=g) * 0.02)
        stack.down.copy_(torch.randn(stack.down.shape, generator=g) * 0.02)
    return stack.to(device, dtype)


def local_stack(full: ExpertStack, experts: tuple[int, ...]) -> ExpertStack:
    stack = ExpertStack(len(experts), full.gate_up.shape[2], full.down.shape[2])
    stack = stack.to(full.gate_up.device, full.gate_up.dtype)
    with torch.no_grad():
        stack.gate_up.copy_(full.gate_up[list(experts)])
        stack.down.copy_(full.down[list(experts)])
    return stack


def routed_batch(tokens: int, hidden: int, rank: int, dtype: torch.dtype, device: torch.device):
    """``x [T, D]``, ``topk_ids [T, A]`` (distinct experts), ``topk_weights [T, A]``."""
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.rand(tokens, EXPERTS, generator=g).argsort(1)[:, :TOP_K]
    weights = torch.rand(tokens, TOP_K, generator=g).softmax(1)
    return x.to(device, dtype), ids.to(device), weights.to(device)


def round_trip(x, ids, weights, layer_map, stack, group: Collectives, world: int) -> torch.Tensor:
    """Dispatch -> local experts -> combine for this rank's tokens, every rank both a sender
    and an expert rank (C = T rows to and from every rank: every rank has T tokens). All
    ranks must call this."""
    packed = pack(x, ids, weights, layer_map)
    splits = [packed.capacity] * world
    recv = group.all_to_all("dispatch", packed.rows, splits, splits)
    out, _ = run_experts(recv, stack, x.shape[1], TOP_K, x.dtype)
    back = group.all_to_all("combine", out, splits, splits)
    return unpack(back, packed)


PHASES = ("pack", "dispatch", "experts", "combine", "unpack")


def phase_times(x, ids, weights, layer_map, stack, group, world: int, iters: int) -> dict[str, float]:
    """Mean microseconds of each phase of ``round_trip`` (``dispatch`` = the token
    all-to-all; no metadata), the device synchronised after each phase. All ranks must call this."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    totals = dict.fromkeys(PHASES, 0.0)
    for _ in range(iters):
        marks = [time.perf_counter()]
        packed = pack(x, ids, weights, layer_map)
        splits = [packed.capacity] * world
        sync(), marks.append(time.perf_counter())
        recv = group.all_to_all("dispatch", packed.rows, splits, splits)
        sync(), marks.append(time.perf_counter())
        out, _ = run_experts(recv, stack, x.shape[1], TOP_K, x.dtype)
        sync(), marks.append(time.perf_counter())
        back = group.all_to_all("combine", out, splits, splits)
        sync(), marks.append(time.perf_counter())
        unpack(back, packed)
        sync(), marks.append(time.perf_counter())
        for name, start, end in zip(PHASES, marks, marks[1:]):
            totals[name] += end - start
    return {name: round(1e6 * t / iters, 1) for name, t in totals.items()}


def rank_main(rank: int, world: int, address: str, backend: str, hidden: int, batches: list[int], results) -> None:
    """One spawned rank: join, check, time. Puts ``(rank, dict)`` on ``results``."""
    out: dict = {"rank": rank}
    groups = None
    try:
        device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        groups = join_groups(backend, address, rank, world, 60.0)
        group = Collectives(groups.expert_parallel)
        layer_map = layer_maps(build_plan("linear", num_layers=1, num_experts=EXPERTS, num_ranks=world))[0].to(device)
        for dtype_name, dtype in DTYPES.items():
            full = full_stack(hidden, hidden, dtype, device)
            mine = local_stack(full, layer_map.rank_experts[rank])
            x, ids, weights = routed_batch(64, hidden, rank, dtype, device)
            got = round_trip(x, ids, weights, layer_map, mine, group, world)
            want, _ = weighted_experts(x, ids, weights, full)
            out[f"{dtype_name}_max_abs_diff"] = (got.float() - want.float()).abs().max().item()
            out[f"{dtype_name}_max_abs_ref"] = want.float().abs().max().item()
            for tokens in batches:
                x, ids, weights = routed_batch(tokens, hidden, rank, dtype, device)
                for _ in range(3 if device.type == "cpu" else 10):
                    round_trip(x, ids, weights, layer_map, mine, group, world)
                torch.cuda.synchronize() if device.type == "cuda" else None
                started, iters = time.perf_counter(), 0
                while iters < 100 and (iters < 3 or time.perf_counter() - started < 0.5):
                    round_trip(x, ids, weights, layer_map, mine, group, world)
                    iters += 1
                torch.cuda.synchronize() if device.type == "cuda" else None
                out[f"{dtype_name}_T{tokens}_round_trip_us"] = 1e6 * (time.perf_counter() - started) / iters
                out[f"{dtype_name}_T{tokens}_phases_us"] = phase_times(x, ids, weights, layer_map, mine, group,
                                                                       world, iters)
        out["ok"] = True
    except Exception as exc:  # noqa: BLE001 -- the error is the result
        out["error"] = f"{type(exc).__name__}: {exc}"[:3000]
    finally:
        leave_groups(groups)
    results.put((rank, out))


def run_world(world: int, backend: str, hidden: int, batches: list[int], timeout_s: float = 180.0) -> dict:
    """Spawn ``world`` ranks on this machine; their results, or who hung."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    procs = [ctx.Process(target=rank_main, args=(r, world, address, backend, hidden, batches, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got, deadline = {}, time.time() + timeout_s
    while len(got) < world and time.time() < deadline:
        try:
            rank, out = results.get(timeout=max(0.1, deadline - time.time()))
            got[rank] = out
        except queue.Empty:
            break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    return {"world": world, "backend": backend, "ranks": [got.get(r, {"rank": r, "error": "no result (hung)"})
                                                          for r in range(world)]}


def bench_nccl(backend: str, hidden: int, batches: list[int]) -> list[dict]:
    """World 1 (the only NCCL group one GPU surely allows), then 2 ranks sharing cuda:0."""
    rows = []
    for world in (1, 2):
        row = run_world(world, backend, hidden, batches + [256])
        print(row, flush=True)
        rows.append(row)
    return rows
