"""The ``raymoe`` command line.

Generated text goes to stdout; logs, tables and statistics go to stderr, so two runs
can be compared with ``diff``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from cluster.tables import format_expert_load
from workers.model.errors import RaymoeModelError
from workers.sampling import SamplingParams, SamplingParamsError
from workers.scheduler import RequestError

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-moe"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEMO_PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text (single-process reference engine)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="Hugging Face-format model directory")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable: one batch)")
    p.add_argument("--prompt-file", type=Path, help="one prompt per line")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="a prompt as comma-separated token ids (repeatable); prints token ids back")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--moge-groups", type=int, default=None, help="route with MoGE over this many expert groups")
    p.add_argument("--max-seqs", type=int, default=16, help="sequences decoded together")
    p.add_argument("--record-trace", type=Path, help="write the routing trace (.npz, see docs/formats.md)")
    p.add_argument("--expert-load", action="store_true", help="print the per-layer expert load to stderr")
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line.rstrip("\n").replace("\\n", "\n") for line in args.prompt_file.read_text().splitlines()
                    if line.strip()]
    if not prompts:
        raise RequestError("prompt", None, "at least one --prompt or a --prompt-file")
    return prompts


def _token_prompts(args: argparse.Namespace) -> list[list[int]]:
    try:
        return [[int(t) for t in p.split(",")] for p in args.prompt_ids]
    except ValueError:
        raise RequestError("prompt-ids", args.prompt_ids, "comma-separated integers, e.g. 1,2,3") from None


def run_reference(args: argparse.Namespace, prompts: list[str], show_load: bool) -> int:
    from workers.reference import ReferenceEngine

    started = time.perf_counter()
    engine = ReferenceEngine.from_pretrained(args.model, DTYPES[args.dtype], args.moge_groups, max_seqs=args.max_seqs)
    config = engine.model.config
    if args.record_trace or show_load:
        engine.runner.record_trace(True)
    _log(f"loaded {args.model} ({config.family}, {config.num_layers} layers, {config.num_experts} experts, "
         f"top-{config.top_k}) in {time.perf_counter() - started:.1f}s")
    started = time.perf_counter()
    token_prompts = _token_prompts(args) if getattr(args, "prompt_ids", None) else None
    if token_prompts:
        completions = engine.generate_ids(token_prompts, _sampling_params(args))
    else:
        completions = engine.generate(prompts, _sampling_params(args))
    elapsed = time.perf_counter() - started
    for prompt, completion in zip(prompts or token_prompts, completions):
        if token_prompts:
            print(",".join(map(str, completion.output_ids)))
        else:
            print(prompt + (completion.text or ""))
            print()
    generated = sum(len(c.output_ids) for c in completions)
    _log(f"{len(completions)} sequences, {generated} new tokens in {elapsed:.2f}s ({generated / elapsed:.1f} tok/s)")
    if args.record_trace:
        engine.recorder.save(args.record_trace)
        _log(f"routing trace: {args.record_trace} ({engine.recorder.topk_ids.shape[0]} tokens)")
    if show_load:
        _log(format_expert_load(engine.recorder.loads(), config.moe_layer_ids))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = [] if args.prompt_ids and not (args.prompt or args.prompt_file) else _prompts(args)
    return run_reference(args, prompts, args.expert_load)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="generate with the shipped tiny model and show its expert load")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    ns = argparse.Namespace(model=args.model, dtype="float32", moge_groups=None, max_seqs=16, record_trace=None,
                            max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                            stop=[], ignore_eos=False)
    _log("raymoe demo: reference engine, greedy decoding")
    return run_reference(ns, DEMO_PROMPTS, show_load=True)


def _add_plan(sub) -> None:
    try:
        from placement import cli as plan_cli
    except ImportError:  # TEMP until placement lands
        return

    p = sub.add_parser("plan", help="plan expert placement from a routing trace or loads")
    plan_cli.add_arguments(p)
    p.set_defaults(func=plan_cli.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymoe", description="Distributed expert-parallel MoE serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_plan(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RaymoeModelError, SamplingParamsError, RequestError) as exc:
        _log(f"raymoe: error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
