"""benchmarks/RESULTS.md's tables, rendered from the JSON files in benchmarks/results/.

Every table of RESULTS.md sits between two markers:

    <!-- table: VIEW FILE [FILE ...] -->
    ...rendered, never edited by hand...
    <!-- end -->

``VIEW`` names a renderer (``VIEWS`` in ``blocks.py``), ``FILE`` a JSON file in
benchmarks/results/. A block starts with the exact command that produced each of its
files, the machine and the date, then the table; the prose between blocks is written by
hand.

    python -m raymoe.benchmarks.results_md           # rewrite the blocks of benchmarks/RESULTS.md
    python -m raymoe.benchmarks.results_md --check   # exit 1 if a block differs from its JSON

``tests/unit/test_results_md.py`` runs the check, so a table cannot drift from its data.
The renderers import only the standard library: rendering needs no torch or Ray.
"""

from raymoe.benchmarks.results_md.blocks import VIEWS, Block, parse_blocks, render_block, render_document, render_result
from raymoe.benchmarks.results_md.source import RESULTS_DIR, RenderError, load

__all__ = ["RESULTS_DIR", "VIEWS", "Block", "RenderError", "load", "parse_blocks", "render_block", "render_document",
           "render_result"]
