"""Plain-text tables for the terminal (stderr)."""

from __future__ import annotations

import numpy as np


def format_table(header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_expert_load(loads: np.ndarray, moe_layers: tuple[int, ...]) -> str:
    """Share of routed (token, expert) pairs per expert, one row per MoE layer.

    ``loads [L, E]``: tokens routed to each expert. The last column is the layer's
    imbalance: busiest expert / mean expert load (1.00 = perfectly even).
    """
    num_experts = loads.shape[1]
    header = ["layer"] + [f"e{e}" for e in range(num_experts)] + ["max/mean"]
    rows = []
    for layer, row in zip(moe_layers, loads):
        total = max(int(row.sum()), 1)
        mean = row.sum() / num_experts
        rows.append([layer] + [f"{100 * c / total:.0f}%" for c in row] + [f"{row.max() / mean:.2f}" if mean else "-"])
    return "expert load per MoE layer (share of routed tokens)\n" + format_table(header, rows)
