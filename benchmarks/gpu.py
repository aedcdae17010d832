"""The GPU path: the model core on CUDA against the CPU reference, the dispatch
collectives on NCCL, and deployments on NCCL.

    python -m raymoe.benchmarks.gpu core --out $OUT/core.json
    python -m raymoe.benchmarks.gpu nccl --out $OUT/nccl.json
    python -m raymoe.benchmarks.gpu deployment --out $OUT/deployment.json

The ``nccl`` part lives in ``benchmarks/gpu_nccl.py`` (spawned processes, no Ray), the
``deployment`` part in ``benchmarks/gpu_deployment.py``. Each part records what failed
(the error's text) instead of stopping, so one run on a lent GPU says everything it can. Models: ``models/tiny-moe`` and a random
Mixtral-family model (``benchmarks/runtime.py``'s ``random_model``: 16 experts, hidden
and expert width 1024, 4 layers, top-2). Decoding is greedy with ``ignore_eos``; a row's
tokens are compared with the CPU reference engine's in the same dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from raymoe.benchmarks import result_file
from raymoe.benchmarks.runtime import TINY, random_model
from raymoe.workers.model.checkpoint import load_model
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams
from raymoe.workers.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def engine_on(path: Path, dtype: torch.dtype, max_seqs: int, device: str, cuda_graphs: bool = False) -> ReferenceEngine:
    """The reference engine with its model and KV cache on ``device`` (decode steps from
    CUDA graphs with ``cuda_graphs``)."""
    model = load_model(path, dtype).to(device)
    return ReferenceEngine(model, load_tokenizer(path), max_seqs=max_seqs, cuda_graphs=cuda_graphs)


def prompts_for(vocab: int, batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def timed_generate(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy generation; the first step (every prompt admitted) is the prefill. Each
    step ends with the logits on the CPU, so wall time includes the device's work."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    outputs, seconds, first_logits = {}, [], None
    while engine.has_work():
        started = time.perf_counter()
        result = engine.step(return_logits=first_logits is None)
        seconds.append(time.perf_counter() - started)
        if first_logits is None:
            first_logits = torch.stack([result.logits[k] for k in sorted(result.logits, key=int)])
        outputs.update({c.request_id: c.output_ids for c in result.finished})
    decode = seconds[1:]
    return {"prefill_ms": 1e3 * seconds[0], "decode_step_ms_median": 1e3 * statistics.median(decode),
            "decode_step_ms_mean": 1e3 * statistics.mean(decode),
            "decode_tok_s": len(prompts) * len(decode) / sum(decode),
            "outputs": [outputs[k] for k in sorted(outputs, key=int)], "prefill_logits": first_logits}


def compare(got: dict, want: dict) -> dict:
    """Token agreement with the reference: sequences identical, and the first
    generated position where each sequence departs (None where none does)."""
    first_diff = []
    for a, b in zip(got["outputs"], want["outputs"]):
        first_diff.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None))
    return {"same_sequences": sum(d is None for d in first_diff), "sequences": len(first_diff),
            "first_divergence": [d for d in first_diff if d is not None],
            "prefill_logits_max_abs_diff": (got["prefill_logits"] - want["prefill_logits"]).abs().max().item()}


def bench_core(models: list[tuple[str, Path]], batches: list[int], dtypes: list[str], prompt_len: int,
               new_tokens: int, cuda_graphs: bool = False) -> list[dict]:
    """Decode-step latency of the single-process model on cuda:0 vs the CPU reference."""
    rows = []
    for name, path in models:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for batch in batches:
                row = {"model": name, "dtype": dtype_name, "batch": batch, "cuda_graphs": cuda_graphs}
                try:
                    cpu = engine_on(path, dtype, batch, "cpu")
                    prompts = prompts_for(cpu.model.config.vocab_size, batch, prompt_len)
                    want = timed_generate(cpu, prompts, new_tokens)
                    gpu = engine_on(path, dtype, batch, "cuda", cuda_graphs)
                    timed_generate(gpu, prompts[:1], 2)  # warm-up: CUDA context, kernels
                    got = timed_generate(gpu, prompts, new_tokens)
                    row.update({f"gpu_{k}": v for k, v in got.items() if k not in ("outputs", "prefill_logits")})
                    row.update({f"cpu_{k}": v for k, v in want.items() if k not in ("outputs", "prefill_logits")})
                    row.update(compare(got, want))
                    del gpu
                    torch.cuda.empty_cache()
                except Exception as exc:  # noqa: BLE001 -- recorded, the next row still runs
                    row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["core", "nccl", "deployment"])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--large-experts", type=int, default=16)
    parser.add_argument("--large-hidden", type=int, default=1024)
    parser.add_argument("--backend", default="nccl", help="nccl part: gloo runs it on the CPU (a smoke check)")
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="core part: keep scaled_dot_product_attention off its cuDNN backend")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="core part: decode steps replay CUDA graphs (workers/model/static_decode.py)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    batches = [int(b) for b in args.batches.split(",")]
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    with tempfile.TemporaryDirectory() as tmp:
        models = [("tiny-moe", TINY)]
        if args.part != "nccl":
            large = random_model(Path(tmp) / "large", args.large_hidden, args.large_experts, 4, args.large_hidden)
            models.append((f"random-{args.large_experts}x{args.large_hidden}", large))
        if args.part == "core":
            result = bench_core(models, batches, args.dtypes.split(","), args.prompt_len, args.new_tokens,
                                args.cuda_graphs)
        elif args.part == "nccl":
            from raymoe.benchmarks.gpu_nccl import bench_nccl

            result = bench_nccl(args.backend, args.large_hidden, batches)
        else:
            from raymoe.benchmarks.gpu_deployment import bench_deployments

            result = bench_deployments(models, batches, args.prompt_len, args.new_tokens)
    # attention on CUDA asks SDPA for flash / memory-efficient / math kernels, never cuDNN (workers/model/attention.py)
    meta = result_file.run_meta("raymoe.benchmarks.gpu", argv, args, bf16_attention="flash / efficient / math")
    result_file.write(args.out, meta, {"rows": result}, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
