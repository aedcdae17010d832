"""A result file as the renderers see it: its data, and what produced it.

Files written by ``benchmarks/result_file.py`` carry their own ``meta`` (command, date,
machine). A few committed files predate it; ``LEGACY`` gives their command, date and
machine as the RESULTS.md of their run recorded them, and the header says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"

_CPU = "x86_64, 2 CPU cores shared with other work, no GPU; Python 3.11.7, torch 2.13.0+cpu, Ray 2.60.0"
_H100 = ("1 x NVIDIA H100 80GB HBM3 (driver 580.159.04), 16 cores, on a lent machine; Python 3.12.3, "
         "torch 2.11.0+cu130 (NCCL 2.28.9), Ray 2.60.0 carried in")
LEGACY: dict[str, dict] = {
    "runtime.json": {"command": ".venv/bin/python -m benchmarks.runtime --large-experts 16 --out "
                                "benchmarks/results/runtime.json",
                     "date": "2026-11-22", "machine": _CPU + ", load average 4-5 during the run"},
    "recovery.json": {"command": ".venv/bin/python -m benchmarks.recovery --repeats 3", "date": "2026-11-22",
                      "machine": _CPU},
    "compare_cost_model.json": {"command": ".venv/bin/python -m benchmarks.cost_model", "date": "2026-11-22",
                                "machine": _CPU},
    "gpu_core.json": {"command": "python3 -m benchmarks.gpu core --out gpu_core.json", "date": "2026-11-22",
                      "machine": _H100 + "; first lease", "bf16_attention": "cuDNN attention"},
    "gpu_core_nocudnn.json": {"command": "python3 -m benchmarks.gpu core --dtypes bfloat16 --no-cudnn-attention "
                                         "--out gpu_core_nocudnn.json",
                              "date": "2026-11-22", "machine": _H100 + "; first lease",
                              "bf16_attention": "no cuDNN attention"},
    "gpu_nccl.json": {"command": "python3 -m benchmarks.gpu nccl --out gpu_nccl.json", "date": "2026-11-22",
                      "machine": _H100 + "; first lease"},
    "gpu_deployment.json": {"command": "python3 -m benchmarks.gpu deployment --batches 8,32 --out "
                                       "gpu_deployment.json",
                            "date": "2026-11-22", "machine": _H100 + "; first lease"},
    "gpu_core_bf16_sdpa.json": {"command": "python3 -m benchmarks.gpu core --dtypes bfloat16 --out "
                                           "gpu_core_bf16_sdpa.json",
                                "date": "2026-11-22", "machine": _H100 + "; second lease",
                                "bf16_attention": "flash / efficient / math"},
}


class RenderError(ValueError):
    """A block cannot be rendered: unknown view, missing file or missing field."""


@dataclass(frozen=True)
class Result:
    """One JSON file: ``data`` is its content without ``meta`` (a list stays a list);
    ``name``: the file's name in benchmarks/results (None: data not written there)."""

    name: str | None
    meta: dict
    data: object
    legacy: bool

    def __getitem__(self, key):
        return self.data[key]

    @property
    def rows(self) -> list:
        """The file's rows: the list itself, or its ``rows`` field."""
        return self.data if isinstance(self.data, list) else self.data["rows"]


def load(name: str, results_dir: Path = RESULTS_DIR) -> Result:
    path = Path(results_dir) / name
    if not path.is_file():
        raise RenderError(f"{path}: no such result file (run the benchmark that writes it, or fix the marker)")
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "command" in data.get("meta", {}):
        meta = data["meta"]
        return Result(name, meta, {k: v for k, v in data.items() if k != "meta"}, legacy=False)
    if name not in LEGACY:
        raise RenderError(f"{path}: no meta.command and not in results_md.source.LEGACY; write it with "
                          "benchmarks/result_file.py")
    if isinstance(data, dict) and "meta" in data:
        data = {k: v for k, v in data.items() if k != "meta"}
    return Result(name, LEGACY[name], data, legacy=True)


def header(result: Result) -> str:
    """``Command: ...`` and ``Machine: ...; date ...`` for the top of a block."""
    meta = result.meta
    where = f" (JSON: `benchmarks/results/{result.name}`)" if result.name else ""
    lines = [f"Command: `{meta['command']}`{where}  "]
    if result.legacy:
        lines.append(f"Machine: {meta['machine']}; date {meta['date']} (as RESULTS.md recorded them: this JSON "
                     "predates recorded commands).")
        return "\n".join(lines)
    versions = meta.get("packages", {})
    parts = [meta["machine"]]
    if versions:
        parts.append(", ".join(f"{'Python' if k == 'python' else k} {v}" for k, v in versions.items()))
    load_average = meta.get("load_average")
    if isinstance(load_average, list) and len(load_average) == 3:
        parts.append("load average " + ", ".join(map(str, load_average)) + " at the start")
    parts.append(f"date {meta['date']}" + (f", git {meta['git']}" if meta.get("git") else ""))
    lines.append("Machine: " + "; ".join(parts) + ".")
    return "\n".join(lines)
