"""``raymoe plan``: build a placement plan from routing data, compare it, draw it.

    raymoe plan --trace trace.npz --ranks 8 [--nodes 2] --policy affinity --redundant 8 \\
                [--load-cap 1.05] [--holdout 0.5 | --eval-trace held.npz] --out plan.yaml
    raymoe plan --report plan.yaml --trace trace.npz --plot plan.png

Prints, for the new plan next to ``linear`` and ``round_robin`` on the same data:
cross-device and inter-node fraction, max/mean rank load (mean and worst layer, then
per layer), balancedness, slots per rank, solve time, and per-step imbalance of decode
batches when per-token routing is available. Standalone: ``python -m raymoe.placement.cli``.
"""

from __future__ import annotations

import argparse
import sys
import time

from raymoe.placement.errors import PlacementError
from raymoe.placement.metrics import score_plan
from raymoe.placement.build import build_plan
from raymoe.placement.plan import PlacementPlan
from raymoe.placement.report import ScoredPlan, format_layers, format_table, plot_plan
from raymoe.placement.trace import RoutingStats, RoutingTrace, load_stats, load_trace

POLICY_CHOICES = ("affinity", "eplb", "moge", "linear", "round_robin")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``raymoe plan``."""
    data = parser.add_argument_group("routing data (one of)")
    data.add_argument("--trace", help="routing trace: raymoe .npz (--record-trace) or ExFlow .npy [tokens, layers]")
    data.add_argument("--loads", help="aggregate statistics: .npy loads [layers, experts] or .npz with "
                                      "loads / transitions / coactivation")
    data.add_argument("--num-experts", type=int, help="experts per layer (default: from the trace)")
    parser.add_argument("--ranks", type=int, help="expert-parallel ranks (GPUs)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes; ranks are split evenly (default 1)")
    parser.add_argument("--policy", choices=POLICY_CHOICES, default="affinity")
    parser.add_argument("--redundant", type=int, default=0, help="redundant slots per layer (eplb, affinity)")
    parser.add_argument("--load-cap", type=float, help="max rank load / mean allowed in every layer")
    parser.add_argument("--solver", choices=("auto", "exact", "heuristic"), default="auto",
                        help="affinity solver (auto: exact MILP on small instances)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="solver time limit in seconds")
    parser.add_argument("--coactivation-weight", type=float, default=1.0,
                        help="weight of within-layer co-activation in the affinity objective (top-k > 1)")
    parser.add_argument("--num-groups", type=int, help="expert groups (moge; eplb hierarchical policy)")
    parser.add_argument("--refine", action="store_true", help="eplb: add load-lowering swaps after EPLB")
    parser.add_argument("--flat", action="store_true", help="affinity: one level even with several nodes")
    held = parser.add_argument_group("held-back scoring")
    held.add_argument("--holdout", type=float, help="fraction of the trace's requests held back for scoring")
    held.add_argument("--eval-trace", help="score the plan on this trace (held-back tokens)")
    parser.add_argument("--batch-sizes", default="16,64,256", help="decode batch sizes for per-step imbalance")
    parser.add_argument("--out", help="write the plan here (YAML)")
    parser.add_argument("--report", metavar="PLAN", help="describe an existing plan instead of building one")
    parser.add_argument("--plot", help="write a picture of the plan (PNG)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


class _Data:
    """Fit and evaluation data from the arguments."""

    def __init__(self, args: argparse.Namespace):
        self.fit_trace: RoutingTrace | None = None
        self.eval_trace: RoutingTrace | None = None
        if bool(args.trace) == bool(args.loads):
            raise PlacementError("pass exactly one of --trace FILE or --loads FILE")
        if args.trace:
            trace = load_trace(args.trace, args.num_experts)
            if args.holdout:
                split = trace.split(1.0 - args.holdout)
                trace, self.eval_trace = split.fit, split.held_out
            self.fit_trace = trace
            self.fit: RoutingStats = trace.stats()
            self.describe = (f"{args.trace}: {trace.num_layers} layers, {trace.num_experts} experts, "
                             f"top-{trace.top_k}, {trace.num_tokens} tokens fitted")
        else:
            self.fit = load_stats(args.loads)
            self.describe = f"{args.loads}: {self.fit.num_layers} layers, {self.fit.num_experts} experts (statistics)"
        if args.eval_trace:
            self.eval_trace = load_trace(args.eval_trace, self.fit.num_experts)
        self.eval: RoutingStats | None = None if self.eval_trace is None else self.eval_trace.stats()
        if self.eval_trace is not None:
            self.describe += f"; scored on {self.eval_trace.num_tokens} held-back tokens"


def _policy_options(args: argparse.Namespace) -> dict:
    if args.policy == "affinity":
        options = {"solver": args.solver, "time_limit": args.time_limit,
                   "coactivation_weight": args.coactivation_weight, "progress": not args.no_progress}
        return options | ({"hierarchical": False} if args.flat else {})
    if args.policy == "eplb":
        return {"num_groups": args.num_groups, "refine": args.refine}
    if args.policy == "moge":
        return {"num_groups": args.num_groups}
    return {}


def _baselines(num_ranks: int, num_nodes: int, stats: RoutingStats) -> list[tuple[str, PlacementPlan, float]]:
    out = []
    for name in ("linear", "round_robin"):
        start = time.perf_counter()
        plan = build_plan(name, num_layers=stats.num_layers, num_experts=stats.num_experts,
                          num_ranks=num_ranks, num_nodes=num_nodes, trace=stats)
        out.append((name, plan, time.perf_counter() - start))
    return out


def _print_tables(plans: list[tuple[str, PlacementPlan, float]], data: _Data, batch_sizes: tuple[int, ...]) -> None:
    sets = [("fitted data", data.fit, data.fit_trace)]
    if data.eval is not None:
        sets.append(("held-back data", data.eval, data.eval_trace))
    for title, stats, trace in sets:
        rows = [ScoredPlan(name, plan, score_plan(plan, stats, trace=trace, batch_sizes=batch_sizes if trace else ()),
                           elapsed) for name, plan, elapsed in plans]
        print(f"\n== scored on {title} ==")
        print(format_table(rows))
    print()
    print(format_layers(rows))


def _build(args: argparse.Namespace, data: _Data) -> int:
    if args.ranks is None:
        raise PlacementError("--ranks is required to build a plan")
    stats = data.fit
    start = time.perf_counter()
    plan = build_plan(args.policy, num_layers=stats.num_layers, num_experts=stats.num_experts,
                      num_ranks=args.ranks, num_nodes=args.nodes, trace=stats, num_redundant=args.redundant,
                      load_cap=args.load_cap, **_policy_options(args))
    elapsed = time.perf_counter() - start
    print(data.describe)
    if "solver_status" in plan.params:
        gap = plan.objectives.get("mip_gap")
        print(f"solver: {plan.params['solver']}, status {plan.params['solver_status']}"
              + ("" if gap is None else f", proven gap {100 * gap:.4f}% (score "
                 f"{plan.objectives['affinity_score']:.6g} <= bound {plan.objectives['affinity_score_bound']:.6g})"))
        if "solver_fallback" in plan.params:
            print(f"solver: {plan.params['solver_fallback']}")
    name = args.policy + (f"+{args.redundant}r" if args.redundant else "")
    plans = _baselines(args.ranks, args.nodes, stats) + [(name, plan, elapsed)]
    _print_tables(plans, data, _batch_sizes(args))
    if args.out:
        plan.save(args.out)
        print(f"\nplan written to {args.out}")
    if args.plot:
        plot_plan(plan, stats, args.plot, baseline=plans[0][1])
        print(f"picture written to {args.plot}")
    return 0


def _report(args: argparse.Namespace) -> int:
    plan = PlacementPlan.load(args.report)
    print(f"{args.report}: policy {plan.policy}, {plan.num_layers} layers, {plan.num_experts} experts, "
          f"{plan.num_ranks} ranks, {plan.num_nodes} node(s), {plan.num_slots} slots/layer")
    print(f"params: {plan.params}\nstored objectives: {plan.objectives}")
    if not (args.trace or args.loads):
        return 0
    data = _Data(args)
    if (data.fit.num_layers, data.fit.num_experts) != (plan.num_layers, plan.num_experts):
        raise PlacementError(f"the data has {data.fit.num_layers} layers x {data.fit.num_experts} experts, "
                             f"the plan {plan.num_layers} x {plan.num_experts}")
    print(data.describe)
    plans = _baselines(plan.num_ranks, plan.num_nodes, data.fit) + [(plan.policy, plan, 0.0)]
    _print_tables(plans, data, _batch_sizes(args))
    if args.plot:
        plot_plan(plan, data.eval or data.fit, args.plot, baseline=plans[0][1])
        print(f"picture written to {args.plot}")
    return 0


def _batch_sizes(args: argparse.Namespace) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in args.batch_sizes.split(",") if v.strip())
    except ValueError:
        raise PlacementError(f"--batch-sizes {args.batch_sizes!r}: expected integers like 16,64,256") from None
    return sizes


def run(args: argparse.Namespace) -> int:
    """Run ``raymoe plan``; returns the exit status (2 on bad input, with the reason on stderr)."""
    try:
        return _report(args) if args.report else _build(args, _Data(args))
    except PlacementError as exc:
        print(f"raymoe plan: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --out or --plot cannot be written (every input is read as a typed error)
        print(f"raymoe plan: error: cannot write {exc.filename}: {exc.strerror}. Fix: pass a writable path to "
              "--out / --plot", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raymoe plan", description="Plan expert placement from routing data.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
