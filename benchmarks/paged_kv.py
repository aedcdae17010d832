"""The paged KV cache against the slot cache it replaced: throughput with many streams,
prefix caching, chunked prefill, memory per sequence.

    python -m raymoe.benchmarks.paged_kv      # writes benchmarks/results/paged_kv.json

The baseline is the engine itself as it was before the paged cache (commit
``--baseline``, unpacked with ``git archive`` into a temporary directory): 16 KV slots,
each as long as the longest sequence, no prefix caching, no chunked prefill. Every job
runs in its own process (``benchmarks/paged_kv_worker.py``) against one tree, with one
torch thread, the reference engine in-process (no HTTP), the shipped tiny model, greedy,
EOS ignored:

- throughput: ``C`` closed-loop clients (C = 16, 64, 256), 2C requests of a 32-token
  prompt and 32 new tokens each: output tokens/s, with KV bytes allocated and held per
  running sequence; the baseline at its default 16 slots and at C slots; the median of
  ``--rounds`` interleaved runs;
- decode: b = 1, 8, 32 sequences of 16 prompt tokens generating 128 each, together: ms
  per step (the median of ``--rounds``), paged against the slot engine with b slots;
- memory: 16 requests together, one with a 960-token prompt and 15 with 32 tokens
  (32 new tokens each): KV bytes allocated and held per running sequence;
- TTFT of requests sharing a 1,024-token prefix (16-token suffixes, one at a time, after a
  warm-up request): prefix caching on against off;
- inter-token latency p99 of 16 decoding streams while a 4,000-token prompt is prefilled,
  with chunked prefill at several step budgets against none, and against the streams'
  p99 before the prompt arrived.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from raymoe.benchmarks import result_file

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny-moe"
WORKER = Path(__file__).resolve().parent / "paged_kv_worker.py"


def unpack(commit: str, into: Path) -> Path:
    """The repository at ``commit``, as files (``git archive``)."""
    archive = into / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def run_job(tree: Path, job: dict) -> dict:
    out = subprocess.run([sys.executable, str(WORKER), "--tree", str(tree), "--model", str(TINY),
                          "--job", json.dumps(job)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"job {job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="ccb9b9c", help="the commit of the slot-cache engine")
    parser.add_argument("--clients", default="16,64,256")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per engine (the median is kept)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = args.out or result_file.default_path("paged_kv", parser, args)
    meta = result_file.run_meta("raymoe.benchmarks.paged_kv", argv, args)
    with tempfile.TemporaryDirectory() as tmp:
        old, new = unpack(args.baseline, Path(tmp)), ROOT
        rows = []
        for clients in [int(c) for c in args.clients.split(",")]:
            job = {"kind": "throughput", "clients": clients, "requests": 2 * clients, "prompt_len": 32, "max_new": 32,
                   "seed": 0, "max_seq_len": 1024}
            systems = [("slots (16)", old, 16)] + ([(f"slots ({clients})", old, clients)] if clients != 16 else [])
            systems.append(("paged", new, clients))
            runs = {name: [] for name, _, _ in systems}
            for _ in range(args.rounds):  # interleaved: a slow moment of the machine hits every engine alike
                for name, tree, max_seqs in systems:
                    runs[name].append(run_job(tree, {**job, "max_seqs": max_seqs}))
            for name, results in runs.items():
                best = sorted(results, key=lambda r: r["tokens_per_s"])[len(results) // 2]  # the median run
                rows.append({"clients": clients, "engine": name, "rounds": len(results), **best})
                print(rows[-1], flush=True)
        decode = []  # decode-bound: b sequences of 16 + 128 tokens, all at once; ms per step
        for b in (1, 8, 32):
            job = {"kind": "throughput", "clients": b, "requests": b, "prompt_len": 16, "max_new": 128, "seed": 4,
                   "max_seq_len": 1024, "max_seqs": b}
            runs = {"slots": [], "paged": []}
            for _ in range(args.rounds):
                for name, tree in (("slots", old), ("paged", new)):
                    runs[name].append(run_job(tree, job)["seconds"] / 128 * 1e3)
            decode.append({"batch": b, **{name: sorted(ms)[len(ms) // 2] for name, ms in runs.items()}})
            print(decode[-1], flush=True)
        mixed = {"kind": "throughput", "clients": 16, "requests": 16, "prompt_len": [960] + [32] * 15, "max_new": 32,
                 "seed": 3, "max_seq_len": 1024, "max_seqs": 16}
        memory = {"slots": run_job(old, mixed), "paged": run_job(new, mixed)}
        print(memory, flush=True)
        prefix = {"kind": "prefix_ttft", "prefix_len": 1024, "suffix_len": 16, "requests": 5, "seed": 1,
                  "max_seqs": 16, "max_seq_len": 2048}
        ttft = {"slots": run_job(old, prefix),
                "paged, no prefix caching": run_job(new, {**prefix, "engine": {"prefix_caching": False}}),
                "paged, prefix caching": run_job(new, prefix)}
        print(ttft, flush=True)
        itl_job = {"kind": "long_prompt_itl", "streams": 16, "long_len": 4000, "warm_steps": 30, "skip": 12,
                   "max_new": 260,
                   "seed": 2, "max_seqs": 32, "max_seq_len": 4096}
        itl = {"slots": run_job(old, itl_job)}
        for budget in (None, 2048, 512, 128, 64, 32):
            itl[f"paged, max_num_batched_tokens {budget}"] = run_job(
                new, {**itl_job, "engine": {"max_num_batched_tokens": budget}})
            print(itl, flush=True)
    data = {"throughput": rows, "decode_ms": decode, "memory": memory, "prefix_ttft": ttft, "long_prompt_itl": itl, "baseline": args.baseline}
    result_file.write(out, meta, data)
    from raymoe.benchmarks.results_md import render_result

    print(render_result("paged_kv", meta, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
