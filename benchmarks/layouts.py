"""Disaggregated vs. coherent layout, each with a linear and an affinity plan: bytes
across ranks per decoded token (split by purpose), collectives per layer, decode tok/s.

    python -m raymoe.benchmarks.layouts --ranks 4      # writes benchmarks/results/layouts_r4.json

The affinity plan is fitted on a routing trace recorded by the reference engine on one
set of prompts (Python standard-library files) and every row is measured on another.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from raymoe.benchmarks import result_file
from raymoe.cluster.config import parse_config
from raymoe.cluster.coordinator import Deployment
from raymoe.placement import build_plan, load_trace
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny-moe"
FIT_FILES = ("json/decoder.py", "csv.py", "difflib.py", "pprint.py", "string.py", "calendar.py")
EVAL_FILES = ("textwrap.py", "shlex.py", "heapq.py", "fractions.py", "graphlib.py", "bisect.py")


def prompts_from(files: tuple[str, ...], tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens cut from standard-library sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids = [t for name in files for t in tokenizer.encode((stdlib / name).read_text())]
    step = max(len(ids) // count, length)
    return [ids[i * step: i * step + length] for i in range(count)]


def measure(model: Path, ranks: int, layout: str, plan, prompts, params, batch: int) -> dict:
    config = parse_config({"model": str(model), "layout": layout, "expert_ranks": ranks,
                           "batching": {"max_seqs": batch, "overlap": "off"},  # the layout's own traffic
                           "resources": {"cpus_per_actor": 0.1}})
    with Deployment(config, plan) as dep:
        for p in prompts:
            dep.add_request(p, params)
        outputs, decode_seconds = {}, 0.0
        while dep.has_work():
            started = time.perf_counter()
            result = dep.step()
            if dep.stats.steps > 1:
                decode_seconds += time.perf_counter() - started
            outputs.update({c.request_id: c.output_ids for c in result.finished})
        decode = dep.stats.per_step[1:]  # the first step prefills every prompt
    tokens = sum(s.tokens for s in decode)
    split = {key: sum(getattr(L, key) for s in decode for L in s.layers)
             for key in ("dispatch_bytes", "combine_bytes", "merge_bytes", "metadata_bytes")}
    split["coherence_bytes"] = sum(s.coherence_bytes for s in decode)
    layers = decode[0].layers
    stayed = [sum(s.layers[i].stayed_tokens for s in decode) / max(1, sum(s.layers[i].hosted_tokens for s in decode))
              for i in range(len(layers))] if layout == "coherent" else []
    return {
        "layout": layout, "plan": plan.policy, "ranks": ranks,
        "bytes_per_token": {k: v / tokens for k, v in split.items()},
        "total_bytes_per_token": sum(split.values()) / tokens,
        "token_collectives_per_layer": sum(L.token_collectives for s in decode for L in s.layers) / len(decode) / len(layers),
        "other_collectives_per_step": (sum(L.metadata_collectives for s in decode for L in s.layers)
                                       + sum(s.coherence_collectives for s in decode)) / len(decode),
        "stayed_fraction_per_layer": stayed,
        "decode_tok_s": tokens / decode_seconds,
        "outputs": [outputs[k] for k in sorted(outputs, key=int)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=TINY)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--load-cap", type=float, default=None, help="affinity plan's max/mean rank load")
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/layouts_r<ranks>.json, "
                                                 "with a part per other non-default argument)")
    args = parser.parse_args(argv)
    out = args.out or result_file.default_path("layouts", parser, args, always={"ranks": "r"})
    meta = result_file.run_meta("raymoe.benchmarks.layouts", argv, args, model=args.model.name)
    reference = ReferenceEngine.from_pretrained(args.model, max_seqs=args.batch)
    config = reference.model.config
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:  # record -> plan -> redeploy
        reference.record_trace()
        reference.generate_ids(prompts_from(FIT_FILES, reference.tokenizer, 32, args.prompt_len), params)
        reference.save_trace(Path(tmp) / "fit.npz")
        trace = load_trace(Path(tmp) / "fit.npz")
    layers, experts = len(config.moe_layer_ids), config.num_experts
    plans = {"linear": build_plan("linear", num_layers=layers, num_experts=experts, num_ranks=args.ranks),
             "affinity": build_plan("affinity", num_layers=layers, num_experts=experts, num_ranks=args.ranks,
                                    trace=trace, load_cap=args.load_cap)}
    prompts = prompts_from(EVAL_FILES, reference.tokenizer, args.batch, args.prompt_len)
    want = [c.output_ids for c in reference.generate_ids(prompts, params)]
    rows = []
    runs = [(layout, name) for layout in ("disaggregated", "coherent") for name in ("linear", "affinity")]
    for layout, name in tqdm(runs, desc="layouts benchmark", file=sys.stderr):
        row = measure(args.model, args.ranks, layout, plans[name], prompts, params, args.batch)
        row["same_tokens"] = row.pop("outputs") == want
        rows.append(row)
    print(f"model {args.model.name}, {args.ranks} ranks, {args.batch} sequences x {args.new_tokens} new tokens; "
          f"affinity plan fitted on {len(FIT_FILES)} other files ({plans['affinity'].objectives})")
    meta["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
    data = {"plans": {k: p.objectives for k, p in plans.items()}, "rows": rows}
    result_file.write(out, meta, data)
    from raymoe.benchmarks.results_md import render_result

    print(render_result("layouts", meta, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
