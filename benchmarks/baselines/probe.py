"""How long one gloo ``all_to_all_single`` takes on this machine, by process count and
size: the per-collective latency every expert-parallel row of the comparison pays
(raymoe: 3 per MoE layer, DeepSpeed: 2 + an all_reduce). Rank 0 sends, the others receive,
as in a disaggregated dispatch.

    python -m raymoe.benchmarks.baselines.probe      # writes benchmarks/results/probe.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = (8, 4096, 65536, 262144, 1048576)


def _rank(rank: int, world: int, address: str, repeats: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{address}", rank=rank, world_size=world)
    out = {}
    for nbytes in SIZES:
        per = nbytes // (world - 1)
        send_splits = [0] + [per] * (world - 1) if rank == 0 else [0] * world
        recv_splits = [0] * world if rank == 0 else [per] + [0] * (world - 1)
        send = torch.zeros(sum(send_splits), dtype=torch.uint8)
        recv = torch.empty(sum(recv_splits), dtype=torch.uint8)
        for _ in range(5):
            dist.all_to_all_single(recv, send, recv_splits, send_splits)
        dist.barrier()
        started = time.perf_counter()
        for _ in range(repeats):
            dist.all_to_all_single(recv, send, recv_splits, send_splits)
        out[nbytes] = (time.perf_counter() - started) / repeats
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def all_to_all_latency(worlds: tuple[int, ...] = (2, 4, 5), repeats: int = 50) -> dict[int, dict[int, float]]:
    """``{processes: {bytes: seconds per all_to_all_single}}``, one thread per process."""
    from raymoe.workers.process_group import free_port

    ctx = mp.get_context("spawn")
    result = {}
    for world in worlds:
        queue = ctx.SimpleQueue()
        address = f"127.0.0.1:{free_port('127.0.0.1')}"
        procs = [ctx.Process(target=_rank, args=(r, world, address, repeats, queue)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        result[world] = queue.get()
    return result


def main(argv: list[str] | None = None) -> int:
    from raymoe.benchmarks import result_file
    from raymoe.benchmarks.results_md import render_result

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4,5", help="process counts")
    parser.add_argument("--repeats", type=int, default=50, help="timed collectives per size")
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/probe.json, with a part "
                                                 "per non-default argument)")
    args = parser.parse_args(argv)
    out = args.out or result_file.default_path("probe", parser, args)
    meta = result_file.run_meta("raymoe.benchmarks.baselines.probe", argv, args)
    worlds = tuple(int(w) for w in args.worlds.split(","))
    latency = all_to_all_latency(worlds, args.repeats)
    data = {"sizes": list(SIZES), "repeats": args.repeats,
            "seconds": [{"processes": world, "by_bytes": {str(n): t[n] for n in SIZES}} for world, t in latency.items()]}
    result_file.write(out, meta, data)
    print("gloo all_to_all_single, ms (rank 0 sends the bytes, split over the others)")
    print(render_result("probe", meta, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
