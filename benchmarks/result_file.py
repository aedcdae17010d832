"""One JSON file per benchmark run, named after the run's arguments, recording what
produced it.

Every benchmark writes ``{"meta": {...}, ...its data}``. ``meta`` holds the benchmark's
name, the exact command line, the date, the machine, the package versions and the git
commit, so a table rendered from the file (``python -m raymoe.benchmarks.results_md``) can print
the command above it. Without ``--out`` the file is ``benchmarks/results/<stem>.json``,
with one ``_<tag><value>`` part per argument in ``always`` and per other argument whose
value differs from its default: ``layouts --ranks 2`` writes ``layouts_r2.json`` and
``layouts --ranks 4`` ``layouts_r4.json``, so two runs never overwrite each other.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
_NOT_IN_NAME = {"out", "help"}


def default_path(stem: str, parser: argparse.ArgumentParser, args: argparse.Namespace,
                 always: dict[str, str] | None = None, ignore: tuple[str, ...] = ()) -> Path:
    """``RESULTS_DIR / <stem>[_<tag><value>...].json``.

    ``always``: argument dest -> tag, in the name even at its default (``{"ranks": "r"}``).
    ``ignore``: dests that do not change the results (ports, output folders).
    """
    always = always or {}
    parts = []
    for action in parser._actions:  # argparse keeps the declared order here
        dest = action.dest
        if dest in _NOT_IN_NAME or dest in ignore or not action.option_strings:
            continue
        value = getattr(args, dest)
        if dest not in always and value == action.default:
            continue
        tag = always.get(dest, dest.replace("_", "-"))
        text = _name_part(value)
        parts.append(tag if value is True else f"{tag}{'-' if text[:1].isalpha() else ''}{text}")
    return RESULTS_DIR / ("_".join([stem, *parts]) + ".json")


def _name_part(value: object) -> str:
    text = Path(value).name if isinstance(value, Path) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "-", text.replace(",", "+"))


def machine() -> str:
    """``x86_64, 2 CPU cores, no GPU`` (or the GPU's name when torch sees one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = "no GPU"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{platform.machine()}, {cores} CPU cores, {gpu}"


def _packages() -> dict[str, str]:
    """Versions of the packages the run imported (and Python's)."""
    found = {"python": platform.python_version()}
    for name in ("numpy", "torch", "ray", "transformers", "deepspeed", "highspy"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            found[name] = str(module.__version__)
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_meta(module: str, argv: list[str] | None, args: argparse.Namespace | None = None, **extra) -> dict:
    """What produced a result: ``module`` is the benchmark's module (``raymoe.benchmarks.layouts``),
    ``argv`` its arguments (``None``: this process's); ``extra`` goes in as it is."""
    argv = sys.argv[1:] if argv is None else list(argv)
    python = ".venv/bin/python" if Path(sys.prefix).name == ".venv" else "python"  # the project's venv, or not
    meta = {"benchmark": module.rsplit(".", 1)[-1],
            "command": " ".join([python, "-m", module, *map(shlex.quote, argv)]),
            "date": datetime.date.today().isoformat(), "machine": machine(),
            "load_average": [round(x, 1) for x in os.getloadavg()], "packages": _packages(),
            "git": _git_commit()}
    if args is not None:
        meta["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {**meta, **extra}


def write(path: Path, meta: dict, data: dict, default=float) -> Path:
    """Write ``{"meta": meta, **data}`` to ``path`` (its folder created) and return it;
    ``default`` turns what JSON cannot hold (numpy scalars) into what it can."""
    if "meta" in data:
        raise ValueError("write(): the data must not have its own 'meta' key; pass it as meta")
    if "packages" in meta:  # what the run imported by its end (run_meta may have been called before)
        meta = {**meta, "packages": {**meta["packages"], **_packages()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **data}, indent=2, default=default) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path
