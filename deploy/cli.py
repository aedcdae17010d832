"""The ``raymoe`` command line.

Generated text goes to stdout; logs, tables and statistics go to stderr, so two runs
can be compared with ``diff``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from raymoe.cluster.config import DeploymentConfigError
from raymoe.workers.tables import format_expert_load
from raymoe.placement.errors import PlanError
from raymoe.workers.model.dtypes import CHOICES as DTYPE_CHOICES
from raymoe.workers.model.errors import RaymoeModelError
from raymoe.workers.sampling import SamplingParams, SamplingParamsError
from raymoe.workers.scheduler import RequestError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "tiny-moe"
DEMO_CONFIG = ROOT / "deploy" / "configs" / "tiny.yaml"
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
    p = sub.add_parser("generate", help="generate text: reference engine, or the distributed runtime with --config")
    p.add_argument("--config", type=Path, help="deployment YAML: run on the distributed runtime (Ray)")
    p.add_argument("--model", type=Path, help=f"model directory (default: the config's, else {DEFAULT_MODEL.name})")
    p.add_argument("--ranks", type=int, help="override the config's expert_ranks")
    p.add_argument("--layout", choices=["disaggregated", "coherent"], help="override the config's layout")
    p.add_argument("--address", help="join this Ray cluster ('auto' or host:port) instead of the config's "
                                     "ray.address / RAY_ADDRESS / embedded Ray")
    p.add_argument("--plan", type=Path, help="placement plan file from `raymoe plan` (overrides the config)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable: one batch)")
    p.add_argument("--prompt-file", type=Path, help="one prompt per line")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="a prompt as comma-separated token ids (repeatable); prints token ids back")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="default: the config's, else auto (the checkpoint's on GPUs, float32 on CPUs)")
    p.add_argument("--moge-groups", type=int, default=None, help="route with MoGE over this many expert groups")
    p.add_argument("--max-seqs", type=int, default=16, help="sequences decoded together (reference engine)")
    p.add_argument("--record-trace", type=Path, help="write the routing trace (.npz, see docs/formats.md)")
    p.add_argument("--expert-load", action="store_true", help="print the per-layer expert load to stderr")
    p.add_argument("--stats", action="store_true", help="print the runtime statistics table to stderr")
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line.rstrip("\n").replace("\\n", "\n") for line in args.prompt_file.read_text().splitlines()
                    if line.strip()]
    if not prompts and not args.prompt_ids:
        raise RequestError("prompt", None, "at least one --prompt, --prompt-ids or a --prompt-file")
    return prompts


def _token_prompts(args: argparse.Namespace) -> list[list[int]]:
    try:
        return [[int(t) for t in p.split(",")] for p in args.prompt_ids]
    except ValueError:
        raise RequestError("prompt-ids", args.prompt_ids, "comma-separated integers, e.g. 1,2,3") from None


def deployment_config(args: argparse.Namespace):
    """The config file with the command line's overrides applied."""
    from raymoe.cluster.config import load_config

    config = load_config(args.config)
    changes = {"model": str(args.model)} if args.model else {}
    if args.ranks is not None:
        changes["expert_ranks"] = args.ranks
    if args.layout:
        changes["layout"] = args.layout
    if args.address:
        changes["ray"] = dataclasses.replace(config.ray, address=args.address)
    if args.dtype:
        changes["dtype"] = args.dtype
    if args.moge_groups is not None:
        changes["moge_groups"] = args.moge_groups
    if args.plan:
        changes["placement"] = dataclasses.replace(config.placement, plan=str(args.plan))
    return config.replace(**changes)


def open_engine(args: argparse.Namespace):
    """The distributed runtime when --config is given, else the reference engine."""
    if args.config:
        from raymoe.cluster.coordinator import Deployment

        config = deployment_config(args)
        ranks = f"{config.expert_ranks} ranks" if config.layout == "coherent" else \
            f"front-end + {config.expert_ranks} expert ranks"
        _log(f"starting {config.layout} deployment: {ranks} ({config.ray.address or 'embedded Ray'})")
        return Deployment(config)
    from raymoe.workers.reference import ReferenceEngine

    return ReferenceEngine.from_pretrained(args.model or DEFAULT_MODEL, args.dtype or "auto",
                                           args.moge_groups, max_seqs=args.max_seqs)


def run_generation(args: argparse.Namespace, prompts: list[str]) -> int:
    started = time.perf_counter()
    engine = open_engine(args)
    try:
        config = engine.model_config if args.config else engine.model.config
        if args.record_trace or args.expert_load:
            engine.record_trace(True)
        _log(f"ready in {time.perf_counter() - started:.1f}s: {config.family}, {config.num_layers} layers, "
             f"{config.num_experts} experts, top-{config.top_k}")
        started = time.perf_counter()
        params = _sampling_params(args)
        token_prompts = _token_prompts(args)
        completions = engine.generate_ids(token_prompts, params) if token_prompts else engine.generate(prompts, params)
        elapsed = time.perf_counter() - started
        for prompt, completion in zip(prompts or token_prompts, completions):
            if token_prompts:
                print(",".join(map(str, completion.output_ids)))
            else:
                print(prompt + (completion.text or ""))
                print()
        generated = sum(len(c.output_ids) for c in completions)
        _log(f"{len(completions)} sequences, {generated} new tokens in {elapsed:.2f}s "
             f"({generated / elapsed:.1f} tok/s)")
        if args.record_trace:
            _log(f"routing trace: {args.record_trace} ({engine.save_trace(args.record_trace)} tokens)")
        if args.expert_load:
            _log(format_expert_load(engine.expert_loads(), config.moe_layer_ids))
        if args.stats:
            _log(engine.stats.table(config.moe_layer_ids))
    finally:
        if args.config:
            engine.shutdown()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    return run_generation(args, _prompts(args))


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the shipped tiny model on the distributed runtime (embedded Ray)")
    p.add_argument("--config", type=Path, default=DEMO_CONFIG)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    parser = build_parser()
    argv = ["generate", "--config", str(args.config), "--max-new-tokens", str(args.max_new_tokens),
            "--expert-load", "--stats"] + [a for p in DEMO_PROMPTS for a in ("--prompt", p)]
    _log("raymoe demo: the tiny MoE trained on Python's standard library, greedy decoding, "
         "front-end + expert ranks on the embedded Ray")
    return run_generation(parser.parse_args(argv), DEMO_PROMPTS)


def _add_plan(sub) -> None:
    from raymoe.placement import cli as plan_cli

    p = sub.add_parser("plan", help="plan expert placement from a routing trace or loads")
    plan_cli.add_arguments(p)
    p.set_defaults(func=plan_cli.run)


def _add_serve(sub) -> None:
    from raymoe.deploy import serve_cli

    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API and gRPC through Ray Serve")
    serve_cli.add_arguments(p)
    p.set_defaults(func=serve_cli.run)


def _add_k8s(sub) -> None:
    from raymoe.deploy.k8s import render as k8s

    p = sub.add_parser("k8s", help="render and check KubeRay manifests (RayService, RayJob) for a deployment")
    k8s.add_arguments(p)
    p.set_defaults(func=k8s.run)


def version() -> str:
    """``raymoe X.Y.Z`` as installed (the package metadata, no torch or Ray import)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return f"raymoe {installed('raymoe')}"
    except PackageNotFoundError:
        return "raymoe (not installed: running from a source tree)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymoe", description="Distributed expert-parallel MoE serving on Ray")
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_plan(sub)
    _add_serve(sub)
    _add_k8s(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RaymoeModelError, SamplingParamsError, RequestError, DeploymentConfigError, PlanError) as exc:
        _log(f"raymoe: error: {exc}")
        return 2
    except RuntimeError as exc:
        bootstrap = sys.modules.get("raymoe.cluster.bootstrap")  # not imported yet (no Ray): not a ClusterError
        if bootstrap is None or not isinstance(exc, bootstrap.ClusterError):
            raise
        _log(f"raymoe: error: {exc}")  # the cluster has the resources, but they were not free in time
        return 1


if __name__ == "__main__":
    sys.exit(main())
