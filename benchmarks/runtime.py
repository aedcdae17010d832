"""Reference engine vs. the distributed runtime (1, 2, 4 expert ranks), side by side.

    python -m raymoe.benchmarks.runtime        # writes benchmarks/results/runtime.json

Same model, same prompts, same sampling (greedy) for every row; prefill and decode
tokens/s and the time split per phase (attention, dispatch, experts, combine). Every row
also says whether it produced the reference's tokens. Runs on the embedded Ray.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from raymoe.benchmarks import result_file
from raymoe.cluster.config import parse_config
from raymoe.cluster.coordinator import Deployment
from raymoe.workers.engine import Engine
from raymoe.workers.model.decoder import MoEForCausalLM
from raymoe.workers.model.export import save_checkpoint
from raymoe.workers.model.families import parse_config as parse_model_config
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny-moe"


def random_model(path: Path, hidden: int, experts: int, layers: int, width: int, seed: int = 0) -> Path:
    """A random-weight Mixtral-family checkpoint (the shapes of a mid-size MoE layer)."""
    config = parse_model_config({
        "model_type": "mixtral", "vocab_size": 4096, "hidden_size": hidden, "intermediate_size": width,
        "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 128,
        "num_local_experts": experts, "num_experts_per_tok": 2, "max_position_embeddings": 2048,
    })
    torch.manual_seed(seed)
    model = MoEForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    save_checkpoint(model, path)
    return path


def timed_run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Generate; the first step (all prompts admitted together) is the prefill."""
    for p in prompts:
        engine.add_request(p, params)
    outputs, step_seconds = {}, []
    while engine.has_work():
        started = time.perf_counter()
        finished = engine.step().finished
        step_seconds.append(time.perf_counter() - started)
        outputs.update({c.request_id: c.output_ids for c in finished})
    stats = engine.stats.per_step
    decode_tokens = sum(s.tokens for s in stats[1:])
    phases = {p: sum(s.seconds[p] for s in stats[1:]) for p in ("attention", "dispatch", "experts", "combine")}
    return {
        "prefill_tok_s": stats[0].tokens / step_seconds[0],
        "decode_tok_s": decode_tokens / max(sum(step_seconds[1:]), 1e-9),
        "decode_steps": len(stats) - 1,
        "decode_phase_seconds": phases,
        "outputs": [outputs[k] for k in sorted(outputs, key=int)],
    }


def bench_model(name: str, path: Path, ranks: list[int], batch: int, prompt_len: int, new_tokens: int,
                progress: tqdm) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ref_engine = ReferenceEngine.from_pretrained(path, max_seqs=batch)
    vocab = ref_engine.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    torch.set_num_threads(1)  # the same per-process thread budget as each runtime actor
    timed_run(ref_engine, prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    ref_engine.stats.per_step.clear()
    reference = timed_run(ref_engine, prompts, params)
    rows = [{"model": name, "engine": "reference", "ranks": 0, **reference, "same_tokens": True}]
    progress.update()
    for r in ranks:
        config = parse_config({"model": str(path), "expert_ranks": r, "batching": {"max_seqs": batch},
                               "resources": {"cpus_per_actor": 0.1, "threads_per_actor": 1}})
        with Deployment(config) as dep:
            timed_run(dep, prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))
            dep.stats.per_step.clear()
            result = timed_run(dep, prompts, params)
        rows.append({"model": name, "engine": "runtime", "ranks": r, **result,
                     "same_tokens": result["outputs"] == reference["outputs"]})
        progress.update()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--large-experts", type=int, default=32)
    parser.add_argument("--large-hidden", type=int, default=1024)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/runtime.json, with a "
                                                 "part per non-default argument)")
    args = parser.parse_args(argv)
    out = args.out or result_file.default_path("runtime", parser, args)
    meta = result_file.run_meta("raymoe.benchmarks.runtime", argv, args)
    ranks = [int(r) for r in args.ranks.split(",")]
    models = [("tiny-moe", TINY)]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_large:
            large = random_model(Path(tmp) / "large", args.large_hidden, args.large_experts, 4, args.large_hidden)
            models.append((f"random-{args.large_experts}x{args.large_hidden}", large))
        rows = []
        with tqdm(total=len(models) * (1 + len(ranks)), desc="runtime benchmark", file=sys.stderr) as progress:
            for name, path in models:
                rows += bench_model(name, path, ranks, args.batch, args.prompt_len, args.new_tokens, progress)
    data = {"rows": [{k: v for k, v in r.items() if k != "outputs"} for r in rows]}
    result_file.write(out, meta, data)
    from raymoe.benchmarks.results_md import render_result

    print(render_result("runtime", meta, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
