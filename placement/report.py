"""Pictures and text tables of a plan (``raymoe plan --report ... --plot``).

``plot_plan`` draws three panels:

1. rank load / mean rank load, heatmap layers x ranks (1.0 = perfectly balanced);
2. the affinity the plan keeps: share of the transition mass leaving rank r at layer l
   that stays on r at layer l+1, heatmap layers x ranks;
3. per layer: cross-device fraction of the plan next to ``linear`` (and the load-only
   null, when transitions exist), and max/mean rank load.

``format_table`` renders rows of ``placement.metrics.PlanScore`` for the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raymoe.placement.metrics import PlanScore, imbalance_of, rank_loads, replica_share
from raymoe.placement.plan import PlacementPlan
from raymoe.placement.trace import RoutingStats


@dataclass(frozen=True, eq=False)
class ScoredPlan:
    name: str
    plan: PlacementPlan
    score: PlanScore
    solve_time_s: float


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _slots(plan: PlacementPlan) -> str:
    spr = plan.slots_per_rank[0]
    return str(int(spr[0])) if spr.min() == spr.max() else f"{int(spr.min())}-{int(spr.max())}"


def format_table(rows: list[ScoredPlan]) -> str:
    """One line per plan: cross-device, inter-node, imbalance (mean/max over layers),
    balancedness, slots per rank, solve time; then per-step imbalance when scored."""
    head = (f"{'policy':<14}{'slots/rank':>11}{'cross-dev':>11}{'inter-node':>11}{'imb mean':>10}"
            f"{'imb max':>10}{'balanced':>10}{'solve s':>9}")
    lines = [head, "-" * len(head)]
    for row in rows:
        s = row.score
        lines.append(f"{row.name:<14}{_slots(row.plan):>11}{_fmt(s.cross_device_fraction):>11}"
                     f"{_fmt(s.inter_node_fraction):>11}{_fmt(s.imbalance_mean):>10}{_fmt(s.imbalance_max):>10}"
                     f"{_fmt(s.balancedness_mean):>10}{row.solve_time_s:>9.2f}")
    steps = [(row.name, step) for row in rows for step in row.score.per_step if step.num_batches]
    if steps:
        lines += ["", "per-step imbalance (decode batches): mean / p99 / max over (batch, layer)"]
        lines += [f"  {name:<14} batch {st.batch_size:>4} ({st.num_batches:>4} batches): "
                  f"{st.mean:.4f} / {st.p99:.4f} / {st.max:.4f}" for name, st in steps]
    return "\n".join(lines)


def format_layers(rows: list[ScoredPlan]) -> str:
    """max/mean rank load per layer, one column per plan."""
    named = [row for row in rows if row.score.imbalance is not None]
    if not named:
        return ""
    lines = ["max/mean rank load per layer", "layer" + "".join(f"{row.name:>14}" for row in named)]
    for layer in range(len(named[0].score.imbalance)):
        lines.append(f"{layer:>5}" + "".join(f"{row.score.imbalance[layer]:>14.4f}" for row in named))
    return "\n".join(lines)


def kept_per_rank(plan: PlacementPlan, transitions: np.ndarray) -> np.ndarray:
    """[layers-1, ranks]: share of the transition mass leaving rank r that stays on r.
    transitions: [layers-1, experts, experts]."""
    share = replica_share(plan.presence)
    leaving = np.einsum("lij,lir->lr", transitions, share[:-1])
    staying = np.einsum("lij,lir,ljr->lr", transitions, share[:-1], np.minimum(plan.presence[1:], 1.0),
                        optimize=True)
    return np.where(leaving > 0, staying / np.where(leaving > 0, leaving, 1.0), np.nan)


def _layer_cross(plan_presence: np.ndarray, transitions: np.ndarray) -> np.ndarray:
    share = replica_share(plan_presence)
    kept = np.einsum("lij,lir,ljr->l", transitions, share[:-1], plan_presence[1:], optimize=True)
    total = transitions.sum(axis=(1, 2))
    return 1.0 - kept / np.where(total > 0, total, 1.0)


def plot_plan(plan: PlacementPlan, stats: RoutingStats, path: str, baseline: PlacementPlan | None = None) -> None:
    """Write the three-panel picture of the module doc to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    loads = rank_loads(plan.presence, stats.loads)
    mean = loads.mean(axis=1, keepdims=True)
    has_trans = stats.transitions is not None and stats.transitions.sum() > 0
    fig, axes = plt.subplots(1, 3, figsize=(16, max(4.0, 0.12 * plan.num_layers + 2)))
    image = axes[0].imshow(loads / np.where(mean > 0, mean, 1.0), aspect="auto", cmap="coolwarm",
                           vmin=0.0, vmax=2.0, interpolation="nearest")
    axes[0].set(title="rank load / mean (per layer)", xlabel="rank", ylabel="MoE layer")
    fig.colorbar(image, ax=axes[0])
    if has_trans:
        image = axes[1].imshow(kept_per_rank(plan, stats.transitions), aspect="auto", cmap="viridis",
                               vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=axes[1])
        axes[1].set(title="affinity kept: mass leaving rank r at l\nthat stays on r at l+1",
                    xlabel="rank", ylabel="layer boundary l -> l+1")
        layers = np.arange(plan.num_layers - 1)
        axes[2].plot(layers, _layer_cross(plan.presence, stats.transitions), label=f"{plan.policy}: cross-device")
        if baseline is not None:
            axes[2].plot(layers, _layer_cross(baseline.presence, stats.transitions), label="linear: cross-device")
        null = stats.null()
        axes[2].plot(layers, _layer_cross(plan.presence, null.transitions), ":", label=f"{plan.policy}: load-only null")
    else:
        axes[1].text(0.5, 0.5, "no transitions in the data\n(loads only)", ha="center", va="center")
        axes[1].set_axis_off()
    axes[2].plot(np.arange(plan.num_layers), imbalance_of(loads) - 1.0, "--", label=f"{plan.policy}: max/mean - 1")
    axes[2].set(title="per layer", xlabel="MoE layer", ylim=(0, None))
    axes[2].legend(fontsize=8, loc="best")
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(f"plan {plan.policy}: {plan.num_ranks} ranks, {plan.num_nodes} node(s), "
                 f"{plan.num_slots} slots/layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
