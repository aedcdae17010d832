"""PNG plots of ``benchmarks/compare.py`` and ``benchmarks/cost_model.py`` results.

Each function takes result rows and an output directory and returns the file it wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raymoe.benchmarks.baselines.measure import PHASES, RunResult


def _save(plt, fig, path: Path) -> Path:
    """Lay out, write (110 dpi) and close a figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_vs_batch(rows: list[RunResult], out_dir: Path) -> Path:
    """Prefill and decode tokens/s against batch size, one line per system."""
    plt = _pyplot()
    systems = [s for s in dict.fromkeys(r.system for r in rows) if len({r.batch for r in rows if r.system == s}) > 1]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "decode_tok_s", "decode"), (axes[1], "prefill_tok_s", "prefill")):
        for system in systems:
            mine = sorted((r for r in rows if r.system == system), key=lambda r: r.batch)
            ax.plot([r.batch for r in mine], [getattr(r, key) for r in mine], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (sequences)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title} throughput")
        ax.grid(True, which="both", alpha=0.3)
    if systems:
        axes[0].legend(fontsize=8)
    return _save(plt, fig, out_dir / "compare_throughput.png")


def bytes_per_token(rows: list[RunResult], out_dir: Path) -> Path:
    """Bytes across processes per decoded token at the largest batch, by system, layout and policy."""
    plt = _pyplot()
    big = max(r.batch for r in rows)
    mine = [r for r in rows if r.batch == big and r.processes > 1]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.barh([r.system for r in mine], [r.bytes_per_token / 1024 for r in mine], color="tab:blue")
    for i, r in enumerate(mine):
        ax.text(r.bytes_per_token / 1024, i, f" {r.bytes_per_token / 1024:.1f} KiB, {r.collectives_per_layer:.1f} "
                f"coll/layer", va="center", fontsize=8)
    ax.set_xlabel(f"KiB across processes per decoded token (batch {big})")
    ax.invert_yaxis()
    ax.set_xlim(0, max((r.bytes_per_token for r in mine), default=1) / 1024 * 1.6)
    return _save(plt, fig, out_dir / "compare_bytes_per_token.png")


def rank_load_heatmap(rows: list[RunResult], out_dir: Path) -> Path:
    """(token, expert) pairs per expert rank and MoE layer, divided by the layer's mean, at
    the largest batch: one panel per distinct placement (systems with the same placement
    compute the same pairs, since their routing is the same)."""
    plt = _pyplot()
    big = max(r.batch for r in rows)
    panels: dict[str, RunResult] = {}
    for r in rows:
        if r.batch == big and r.rank_pairs and len(r.rank_pairs[0]) > 1:
            key = str(r.rank_pairs)
            panels.setdefault(key, r)
    panels_list = list(panels.values()) or []
    fig, axes = plt.subplots(1, max(len(panels_list), 1), figsize=(5 * max(len(panels_list), 1), 3.8), squeeze=False)
    for ax, r in zip(axes[0], panels_list):
        pairs = np.asarray(r.rank_pairs, dtype=float)  # [L, R]
        share = pairs / np.maximum(pairs.mean(axis=1, keepdims=True), 1e-9)
        image = ax.imshow(share, cmap="viridis", aspect="auto", vmin=0)
        for (i, j), v in np.ndenumerate(share):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(share.shape[1]))
        ax.set_yticks(range(share.shape[0]))
        ax.set_xlabel("expert rank")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"{r.system}\nmax/mean {share.max(axis=1).mean():.2f} (batch {big})", fontsize=9)
        fig.colorbar(image, ax=ax, label="load / layer mean")
    return _save(plt, fig, out_dir / "compare_rank_load.png")


def time_split(rows: list[RunResult], out_dir: Path) -> Path:
    """Decode time per token by phase at the largest batch, one bar per system."""
    plt = _pyplot()
    big = max(r.batch for r in rows)
    mine = [r for r in rows if r.batch == big]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    left = np.zeros(len(mine))
    for phase in PHASES:
        per_token_ms = np.array([1e3 * r.phase_seconds.get(phase, 0.0) / max(r.batch * r.decode_steps, 1)
                                 for r in mine])
        ax.barh([r.system for r in mine], per_token_ms, left=left, label=phase)
        left += per_token_ms
    ax.set_xlabel(f"decode ms per token by phase (batch {big}; phases as each system measures them)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    return _save(plt, fig, out_dir / "compare_time_split.png")


def cost_model_check(check: dict, out_dir: Path) -> Path:
    """Predicted against measured ms per decode step, one point per (CPU row, phase)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    table = [t for t in check["table"] if t["measured_ms"] > 0.05]  # phases measured as ~0 have no ratio
    measured = np.array([t["measured_ms"] for t in table])
    for key, marker, label in (("predicted_ms", "o", "fitted on all batches"),
                               ("held_out_ms", "x", "fitted without this batch")):
        ax.scatter(measured, [t[key] for t in table], marker=marker, label=label)
    lo, hi = max(measured.min(initial=1e-3) / 2, 1e-3), measured.max(initial=1.0) * 2
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.fill_between([lo, hi], [lo / 1.5, hi / 1.5], [lo * 1.5, hi * 1.5], color="gray", alpha=0.15,
                    label="within 1.5x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured ms per decode step (CPU, per phase)")
    ax.set_ylabel("cost model ms")
    ax.set_title("cost model vs measured CPU runs")
    ax.legend(fontsize=8)
    return _save(plt, fig, out_dir / "compare_cost_model_check.png")


def cost_model_projection(rows: list[dict], out_dir: Path) -> Path:
    """PROJECTED decode tokens/s per GPU against GPUs, one line per (layout, policy)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    keys = list(dict.fromkeys((r["layout"], r["policy"].split(" ")[0]) for r in rows))
    for layout, policy in keys:
        mine = sorted((r for r in rows if r["layout"] == layout and r["policy"].split(" ")[0] == policy),
                      key=lambda r: r["gpus"])
        axes[0].plot([r["gpus"] for r in mine], [r["decode_tok_s"] / r["gpus"] for r in mine], marker="o",
                     label=f"{layout} {policy}")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("GPUs (8 per node)")
    axes[0].set_ylabel("decode tokens/s per GPU")
    axes[0].set_title("PROJECTION (cost model, not measured)")
    axes[0].grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    big = max(r["gpus"] for r in rows)
    mine = [r for r in rows if r["gpus"] == big]
    left = np.zeros(len(mine))
    for phase in ("attention", "dispatch", "experts", "combine", "coherence", "other"):
        v = np.array([r["phase_ms"][phase] for r in mine])
        axes[1].barh([f"{r['layout']} {r['policy']}" for r in mine], v, left=left, label=phase)
        left += v
    axes[1].invert_yaxis()
    axes[1].set_xlabel(f"projected ms per decode step at {big} GPUs")
    axes[1].legend(fontsize=7)
    return _save(plt, fig, out_dir / "compare_cost_model_projection.png")


def cost_model_plots(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if "check" in result:
        paths.append(cost_model_check(result["check"], out_dir))
    if result.get("projection"):
        paths.append(cost_model_projection(result["projection"], out_dir))
    return paths


def draw_all(rows: list[RunResult], ranks: int, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    if not rows:
        return []
    return [throughput_vs_batch(rows, out_dir), bytes_per_token(rows, out_dir), rank_load_heatmap(rows, out_dir),
            time_split(rows, out_dir)]
