"""The built wheel works on its own: installed into a fresh folder and run from outside the
checkout, it puts only `raymoe` on the import path and finds its package data (KubeRay
CRDs, the Helm chart, configs, the gRPC stubs, the tiny model)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The wheel built from this checkout, installed (without dependencies) into a folder
    of its own; the environment to run it from elsewhere."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the checkout's files (tracked and new, not ignored): setuptools builds
    # in the source folder and would reuse a stale build/ left there.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    source = tmp / "source"
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp / "dist")],
                   check=True, capture_output=True, timeout=300)
    wheel, = (tmp / "dist").glob("raymoe-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    (tmp / "elsewhere").mkdir()
    return {"cwd": tmp / "elsewhere", "site": tmp / "site",
            "env": dict(os.environ, PYTHONPATH=str(tmp / "site"))}


def run(installed: dict, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=installed["cwd"], env=installed["env"], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_only_raymoe_is_installed(installed):
    top = sorted(p.name for p in installed["site"].iterdir() if not p.name.endswith(".dist-info"))
    assert top == ["bin", "raymoe"] or top == ["raymoe"], top


def test_the_installed_package_is_the_one_that_runs(installed):
    done = run(installed, "-c", "import raymoe.deploy.k8s.render as k; print(k.__file__); print(k.DEFAULT_CRDS)")
    assert done.returncode == 0, done.stderr
    module, crds = done.stdout.split()
    assert Path(module).is_relative_to(installed["site"]) and Path(crds).is_relative_to(installed["site"])
    assert sorted(p.name for p in Path(crds).iterdir()) == ["LICENSE", "README.md", "ray.io_rayjobs.yaml",
                                                            "ray.io_rayservices.yaml"]


def test_k8s_render_and_check_from_the_installed_package(installed):
    rendered = run(installed, "-m", "raymoe.deploy.cli", "k8s", "render", "--benchmark")
    assert rendered.returncode == 0, rendered.stderr
    checked = run(installed, "-m", "raymoe.deploy.cli", "k8s", "check", "-", stdin=rendered.stdout)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "RayService raymoe" in checked.stdout and "RayJob" in checked.stdout and "ok" in checked.stdout


def test_the_public_api_grpc_stubs_and_model_come_with_it(installed):
    code = ("import raymoe, raymoe.deploy.grpc_stubs as g; from raymoe.deploy.cli import DEFAULT_MODEL; "
            "print(raymoe.LLM.__module__, g.raymoe_pb2.__file__, (DEFAULT_MODEL / 'model.safetensors').is_file())")
    done = run(installed, "-c", code)
    assert done.returncode == 0, done.stderr
    module, stubs, model = done.stdout.split()
    assert module == "raymoe.llm" and Path(stubs).is_relative_to(installed["site"]) and model == "True"
