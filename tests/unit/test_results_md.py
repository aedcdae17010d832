"""benchmarks/RESULTS.md cannot drift from its data: every table in it is what
``python -m raymoe.benchmarks.results_md`` renders from the committed JSON in benchmarks/results/,
every result file is rendered somewhere, and two benchmark runs never share a file."""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path

import pytest

from raymoe.benchmarks import result_file
from raymoe.benchmarks.results_md import RESULTS_DIR, VIEWS, RenderError, parse_blocks, render_block, render_document

RESULTS_MD = RESULTS_DIR.parent / "RESULTS.md"
# Tables that describe, not measure (no number in them comes from a run).
DESCRIPTIVE_TABLES = {"| row | processes | what runs |"}


def _outside_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line that is not inside a marked block."""
    lines, inside = text.split("\n"), set()
    for block in parse_blocks(text):
        inside.update(range(block.start, block.end + 1))
    return [(i + 1, line) for i, line in enumerate(lines) if i not in inside]


def test_results_md_is_what_its_json_renders_to():
    text = RESULTS_MD.read_text()
    rendered = render_document(text)
    diff = "".join(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True), "RESULTS.md",
                                        "rendered from benchmarks/results", n=1))
    assert rendered == text, (f"RESULTS.md differs from its JSON; run `python -m raymoe.benchmarks.results_md` (and never "
                              f"edit a table by hand):\n{diff[:4000]}")


def test_every_table_is_inside_a_rendered_block():
    text = RESULTS_MD.read_text()
    outside = _outside_blocks(text)
    stray = []
    for (number, line), (_, after) in zip(outside, outside[1:]):
        markdown_table = line.startswith("|") and re.fullmatch(r"\|( ?:?-+:? ?\|)+", after.strip())
        text_table = re.fullmatch(r"-+( +-+)+", after.strip()) is not None  # a fixed-width table's rule
        if (markdown_table and line.strip() not in DESCRIPTIVE_TABLES) or text_table:
            stray.append(f"line {number}: {line[:100]}")
    assert not stray, "tables outside <!-- table: ... --> blocks (render them from a JSON file):\n" + "\n".join(stray)


def test_every_result_file_is_rendered():
    used = {name for block in parse_blocks(RESULTS_MD.read_text()) for name in block.files}
    files = {path.name for path in RESULTS_DIR.glob("*.json")}
    assert files - used == set(), f"result files no block of RESULTS.md renders: {sorted(files - used)}"
    assert used - files == set(), f"blocks naming files that do not exist: {sorted(used - files)}"


def test_every_block_starts_with_the_command_of_each_file():
    text = RESULTS_MD.read_text()
    for block in parse_blocks(text):
        body = render_block(block.view, block.files)
        commands = re.findall(r"^Command: `[^`]+` \(JSON: `benchmarks/results/([^`]+)`\)", body, re.M)
        assert commands == list(block.files), f"block {block.view} {block.files}: command lines for {commands}"
        assert body.startswith("Command: `")


def test_rendering_twice_changes_nothing():
    once = render_document(RESULTS_MD.read_text())
    assert render_document(once) == once


@pytest.mark.parametrize(("text", "match"), [
    ("<!-- table: nosuchview runtime.json -->\n<!-- end -->", "unknown view 'nosuchview'"),
    ("<!-- table: runtime missing.json -->\n<!-- end -->", "missing.json: no such result file"),
    ("<!-- table: runtime runtime.json -->\ntext", "line 1: block 'runtime' is never closed"),
    ("text\n<!-- end -->", "line 2: <!-- end --> without an opening"),
    ("<!-- table: runtime -->\n<!-- end -->", "line 1: malformed marker"),
    ("<!-- table: runtime runtime.json -->\n<!-- table: runtime runtime.json -->\n<!-- end -->",
     "line 2: a block opens inside the block of line 1"),
])
def test_bad_markers_are_refused_with_the_line(text, match):
    with pytest.raises(RenderError, match=re.escape(match)):
        render_document(text)


def test_prose_outside_the_blocks_is_kept():
    text = "# Title\n\nhand-written prose\n\n<!-- table: runtime runtime.json -->\nstale table\n<!-- end -->\n\nmore\n"
    rendered = render_document(text)
    assert rendered.startswith("# Title\n\nhand-written prose\n\n<!-- table: runtime runtime.json -->\n\nCommand: `")
    assert rendered.endswith("\n\n<!-- end -->\n\nmore\n")
    assert "stale table" not in rendered
    assert "| tiny-moe | reference |" in rendered


def test_every_view_is_used():
    used = {block.view for block in parse_blocks(RESULTS_MD.read_text())}
    assert set(VIEWS) - used == set(), f"views no block uses (remove them or add a block): {set(VIEWS) - used}"


def _layouts_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()  # the shape of benchmarks/layouts.py's arguments
    parser.add_argument("--model", type=Path, default=Path("models/tiny-moe"))
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--load-cap", type=float, default=None)
    parser.add_argument("--port", type=int, default=18321)
    parser.add_argument("--out", type=Path)
    return parser


@pytest.mark.parametrize(("argv", "name"), [
    (["--ranks", "2"], "layouts_r2.json"),
    ([], "layouts_r4.json"),
    (["--ranks", "4", "--port", "1234", "--out", "x.json"], "layouts_r4.json"),
    (["--ranks", "4", "--batch", "16"], "layouts_r4_batch16.json"),
    (["--load-cap", "1.05", "--model", "/data/other model"], "layouts_model-other-model_r4_load-cap1.05.json"),
])
def test_the_file_name_follows_from_the_arguments(argv, name):
    parser = _layouts_parser()
    args = parser.parse_args(argv)
    path = result_file.default_path("layouts", parser, args, always={"ranks": "r"}, ignore=("port",))
    assert path == RESULTS_DIR / name


def test_a_result_file_records_what_produced_it(tmp_path):
    args = _layouts_parser().parse_args(["--ranks", "2"])
    meta = result_file.run_meta("raymoe.benchmarks.layouts", ["--ranks", "2"], args, model="tiny-moe")
    path = result_file.write(tmp_path / "layouts_r2.json", meta, {"rows": []})
    assert meta["command"].endswith("-m raymoe.benchmarks.layouts --ranks 2")
    assert {"date", "machine", "packages", "args"} <= set(meta)
    assert path.read_text().startswith('{\n  "meta": {\n    "benchmark": "layouts",')
    with pytest.raises(ValueError, match="own 'meta' key"):
        result_file.write(tmp_path / "x.json", meta, {"meta": {}})
