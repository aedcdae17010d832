"""Weight-only int8 / int4 routed experts against float32 and bfloat16: quality, memory, speed.

    python -m raymoe.benchmarks.quantized_experts      # writes benchmarks/results/quantized_experts.json

On the shipped tiny model (``models/tiny-moe``, trained on the CPython standard library),
for each variant (float32; bfloat16 weights and activations; int8 experts; int4 experts
with groups of 32 and 64 columns (the model's expert width is 64), activations in float32):

- perplexity on the held-out standard-library modules the model never saw in training
  (``benchmarks/train_tiny_moe.VAL_FILES``, this interpreter's copies), windows of 256
  tokens; the goal is int8 within 1% of float32;
- bytes of the routed experts' weights (what an expert rank holds; with R ranks, 1/R each);
- decode ms per step of the reference engine (the same expert code as an expert rank,
  1 torch thread) at b = 1, 8, 32, the variants taking turns in interleaved rounds as in
  ``benchmarks/step_overhead.py``, each as a ratio to float32 in the same run.

Then bytes and decode speed (no perplexity: its weights are random) on a random
16-expert x 1024-wide model, where each decode step reads 16 MiB of one layer's active
experts in float32 and the kernels' memory savings can show.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from raymoe.benchmarks import result_file
from raymoe.benchmarks.runtime import random_model
from raymoe.benchmarks.step_overhead import interleaved
from raymoe.benchmarks.train_tiny_moe import encode_documents, evaluate, stdlib_corpus, val_chunks
from raymoe.workers.model.quantized_experts import stack_nbytes
from raymoe.workers.reference import ReferenceEngine

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny-moe"
# name -> (dtype, experts mode, int4 group size)
VARIANTS = {"float32": ("float32", "none", 32), "bfloat16": ("bfloat16", "none", 32), "int8": ("float32", "int8", 32),
            "int4 g32": ("float32", "int4", 32), "int4 g64": ("float32", "int4", 64)}


def expert_bytes(engine: ReferenceEngine) -> int:
    return sum(stack_nbytes(layer.mlp.experts) for layer in engine.model.model.layers if layer.is_moe)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--seq-len", type=int, default=256, help="perplexity window (tokens)")
    parser.add_argument("--max-windows", type=int, default=64, help="held-out windows scored (0: all)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = args.out or result_file.default_path("quantized_experts", parser, args)
    meta = result_file.run_meta("raymoe.benchmarks.quantized_experts", argv, args)
    torch.set_num_threads(1)
    corpus = stdlib_corpus()
    chunks = val_chunks(encode_documents(Tokenizer.from_file(str(TINY / "tokenizer.json")), corpus.val_texts),
                        args.seq_len)
    if args.max_windows:
        chunks = chunks[: args.max_windows]
    batches = [int(b) for b in args.batches.split(",")]

    def load(path: Path) -> dict[str, ReferenceEngine]:
        return {name: ReferenceEngine.from_pretrained(path, dtype, expert_quantization=(mode, group),
                                                      max_seqs=max(batches))
                for name, (dtype, mode, group) in VARIANTS.items()}

    def timed(model: str, engines: dict[str, ReferenceEngine], rows: list[dict]) -> None:
        base = rows[0]
        for row in rows:
            row["bytes_vs_float32"] = row["expert_bytes"] / base["expert_bytes"]
        vocab = engines["float32"].model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        for batch in tqdm(batches, desc=f"decode {model}", file=sys.stderr):
            prompts = [torch.randint(3, vocab, (16,), generator=g).tolist() for _ in range(batch)]
            seconds, _ = interleaved(engines, prompts, 3, args.rounds, args.per_round)
            for row in rows:
                row["decode_ms"][str(batch)] = statistics.median(seconds[row["variant"]]) * 1000

    def row(model: str, name: str, engine: ReferenceEngine, perplexity: float | None) -> dict:
        dtype, mode, group = VARIANTS[name]
        return {"model": model, "variant": name, "dtype": dtype, "experts": mode,
                "group_size": group if mode == "int4" else None, "perplexity": perplexity,
                "expert_bytes": expert_bytes(engine), "decode_ms": {}}

    engines = load(TINY)
    rows = []
    for name, engine in tqdm(engines.items(), desc="perplexity", file=sys.stderr):
        rows.append(row("tiny-moe", name, engine, math.exp(evaluate(engine.model, chunks, batch_size=8))))
    for r in rows:
        r["perplexity_vs_float32"] = r["perplexity"] / rows[0]["perplexity"] - 1
    timed("tiny-moe", engines, rows)
    del engines
    with tempfile.TemporaryDirectory() as tmp:
        large = load(random_model(Path(tmp) / "large", 1024, 16, 4, 1024))
        large_rows = [row("random-16x1024", name, engine, None) for name, engine in large.items()]
        timed("random-16x1024", large, large_rows)
        rows += large_rows
        del large
    data = {"rows": rows, "windows": len(chunks), "seq_len": args.seq_len,
            "held_out": [p.name for p in corpus.val_files]}
    result_file.write(out, meta, data)
    from raymoe.benchmarks.results_md import render_result

    print(render_result("quantized_experts", meta, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
