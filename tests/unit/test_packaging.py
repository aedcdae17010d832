"""The package's shape: one import root (`raymoe`), every package folder listed in
pyproject.toml, imports only downward between floors (DESIGN.md), no import cycles, no
bare top-level names (`cluster`, `workers`, ...) anywhere."""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
BARE = ("cluster", "workers", "placement", "deploy", "benchmarks")

# Floors, bottom first: an import may stay on its floor or go down, never up. placement is
# pure (arrays in, plan out): it imports nothing else of raymoe. `raymoe` is the public API
# (api/: LLM), above the control plane; the serving layer does not need it.
FLOOR = {"raymoe.placement": 0, "raymoe.workers": 0, "raymoe.cluster": 1, "raymoe": 2, "raymoe.llm": 2,
         "raymoe.deploy": 2, "raymoe.benchmarks": 3}
PURE = {"raymoe.placement": ("raymoe.placement",)}


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file, from pyproject's package-dir."""
    out = {}
    for package, folder in SETUPTOOLS["package-dir"].items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            if "build" in rel.parts:  # setuptools' and old generators' output, not the source
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = modules()


def area(module: str) -> str:
    """The floor key of a module: its second-level package, or raymoe / raymoe.llm."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in FLOOR else parts[0]


def imports_of(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported raymoe module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = set(id(n) for n in tree.body)
    found = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        module_level = id(node) in top or any(id(node) in {id(c) for c in ast.walk(t)} for t in tree.body
                                              if isinstance(t, (ast.If, ast.Try)))
        found += [(n, module_level) for n in names if n == "raymoe" or n.startswith("raymoe.")]
    return found


def test_every_package_folder_is_in_pyproject():
    listed = set(SETUPTOOLS["packages"])
    found = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert {p for p in listed if p not in found} <= {"raymoe.models"}  # a data-only package (the tiny model)


def test_no_folder_shadows_the_import_root():
    assert not (ROOT / "raymoe").exists()


def test_no_bare_top_level_names():
    """`import cluster` works only from a checkout and would load a second copy of it."""
    statement = re.compile(rf"^\s*(from|import)\s+({'|'.join(BARE)})(\.|\s|$)", re.M)
    # `python -m X.y`, `"-m", "X.y"`, `import_path: X.y:attr`, `"X.y:attr"` (quoted dotted names
    # without a colon are config or chart value paths such as "workers.nodes")
    names = '|'.join(BARE)
    module_ref = re.compile(rf"""(-m[\s"',]+|import_path:\s*)(?:{names})\.[a-z_.]+|(["'])(?:{names})\.[a-z_.]+:""")
    bad = []
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for path in (ROOT / f for f in files):
        if not path.is_file() or "data" in path.parts or path.name == "RESULTS.md" or \
                path.match("benchmarks/results_md/source.py"):  # commands as they were run then
            continue
        if path.suffix not in (".py", ".md", ".yaml", ".yml", ".tpl", ".toml", ".proto", "") or \
                path.name == "requirements.lock":
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".py":
            bad += [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for m in statement.finditer(text)]
        for m in module_ref.finditer(text):
            dotted = m.group(0)[len(m.group(1) or m.group(2)):].split(":")[0]
            parts = dotted.split(".")
            quoted = m.group(2) is not None  # "X.y:attr": flagged when X.y is one of our modules
            if not quoted or any(f"raymoe.{'.'.join(parts[:n])}" in MODULES for n in range(2, len(parts) + 1)):
                bad.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert bad == []


def test_imports_go_down_the_floors():
    climbing = []
    for module, path in MODULES.items():
        here = area(module)
        for target, _ in imports_of(path, module):
            there = area(target)
            allowed = PURE.get(here)
            if allowed is not None and not target.startswith(allowed):
                climbing.append(f"{module} -> {target} ({here} is pure)")
            elif FLOOR[there] > FLOOR[here]:
                climbing.append(f"{module} -> {target}")
    assert climbing == []


def test_no_import_cycles():
    graph = defaultdict(set)
    for module, path in MODULES.items():
        for target, module_level in imports_of(path, module):
            if module_level and target in MODULES and target != module:
                graph[module].add(target)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert cycles == []
