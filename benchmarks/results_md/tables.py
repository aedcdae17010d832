"""Markdown and fixed-width tables, the two forms RESULTS.md uses."""

from __future__ import annotations


def md_table(header: list[str], rows: list[list[object]], align: str = "") -> str:
    """A GitHub markdown table; ``align``: one letter per column, ``r`` right-aligns it
    (``---:``), anything else (or a missing letter) leaves the default."""
    rule = ["---:" if align[i:i + 1] == "r" else "---" for i in range(len(header))]
    lines = [header, rule, *([str(c) for c in row] for row in rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def text_table(header: list[str], rows: list[list[object]]) -> str:
    """Right-aligned columns in a fenced code block (the terminal tables of the benchmarks)."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(["```", *lines, "```"])


def pct(part: float, total: float) -> str:
    return f"{100 * part / (total or 1.0):.0f}%"
