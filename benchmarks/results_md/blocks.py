"""The marked blocks of RESULTS.md: find them, render each from its JSON files, put the
rendering back between the markers; the text outside the markers is left as it is."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raymoe.benchmarks.results_md import compare, gpu, placement, runtime, serving
from raymoe.benchmarks.results_md.source import RESULTS_DIR, RenderError, Result, header, load

# view name -> renderer of the block's body (after the command lines); each takes the
# block's files in marker order.
VIEWS: dict[str, Callable[[list[Result]], str]] = {
    "placement": placement.placement_tables,
    "runtime": runtime.runtime_table,
    "step_overhead": runtime.step_overhead_table,
    "quantized_experts": runtime.quantized_experts_table,
    "paged_kv": runtime.paged_kv_table,
    "layouts": runtime.layouts_table,
    "serving": serving.serving_table,
    "compare": compare.compare_table,
    "compare.phases": compare.compare_phases_table,
    "compare.ratios": compare.compare_ratios_table,
    "probe": compare.probe_table,
    "cost_model.check": compare.cost_model_check_table,
    "cost_model.projection": compare.cost_model_projection_table,
    "overload": serving.overload_table,
    "recovery": serving.recovery_table,
    "gpu.core": gpu.core_table,
    "gpu.bf16_kernels": gpu.bf16_kernels_table,
    "gpu.nccl": gpu.nccl_table,
    "gpu.deployment": gpu.deployment_table,
}

START = re.compile(r"^<!-- table: (?P<view>[\w.]+)(?P<files>(?: [\w.+-]+\.json)+) -->$")
END = "<!-- end -->"


@dataclass(frozen=True)
class Block:
    """One marked block: ``lines[start]`` is its opening marker, ``lines[end]`` its ``END``."""

    view: str
    files: tuple[str, ...]
    start: int
    end: int


def parse_blocks(text: str) -> list[Block]:
    """Every block of ``text``, in order; a marker without its end (or nested) is an error."""
    blocks, lines, open_at = [], text.split("\n"), None
    for i, line in enumerate(lines):
        if line.startswith("<!-- table:"):
            match = START.match(line)
            if match is None:
                raise RenderError(f"line {i + 1}: malformed marker {line!r}; write <!-- table: VIEW FILE.json ... -->")
            if open_at is not None:
                raise RenderError(f"line {i + 1}: a block opens inside the block of line {open_at[0] + 1}; close it "
                                  f"with {END}")
            open_at = (i, match["view"], tuple(match["files"].split()))
        elif line == END:
            if open_at is None:
                raise RenderError(f"line {i + 1}: {END} without an opening <!-- table: ... -->")
            blocks.append(Block(open_at[1], open_at[2], open_at[0], i))
            open_at = None
    if open_at is not None:
        raise RenderError(f"line {open_at[0] + 1}: block '{open_at[1]}' is never closed with {END}")
    return blocks


def render_block(view: str, files: tuple[str, ...], results_dir: Path = RESULTS_DIR) -> str:
    """The body of a block: each file's command and machine, then the view's tables."""
    if view not in VIEWS:
        raise RenderError(f"unknown view '{view}'; known: {', '.join(VIEWS)}")
    results = [load(name, results_dir) for name in files]
    try:
        body = VIEWS[view](results)
    except (KeyError, StopIteration, TypeError) as exc:
        raise RenderError(f"view '{view}' cannot render {', '.join(files)}: {type(exc).__name__}: {exc}") from exc
    return "\n\n".join([*(header(r) for r in results), body])


def render_result(view: str, meta: dict, data: dict | list) -> str:
    """A view of data that is not (yet) a file: what a benchmark prints when it ends."""
    result = Result(None, meta, data, legacy=False)
    return "\n\n".join([header(result), VIEWS[view]([result])])


def render_document(text: str, results_dir: Path = RESULTS_DIR) -> str:
    """``text`` with every block's body replaced by its rendering (a blank line each side)."""
    lines = text.split("\n")
    out, done = [], 0
    for block in parse_blocks(text):
        body = render_block(block.view, block.files, results_dir)
        out += lines[done:block.start + 1] + ["", *body.split("\n"), ""]
        done = block.end
    return "\n".join(out + lines[done:])
