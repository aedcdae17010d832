"""``raymoe plan`` end to end, in process (python -m raymoe.placement.cli uses the same main)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from raymoe.placement.cli import main
from raymoe.placement.plan import PlacementPlan
from raymoe.placement.synthetic import planted_affinity_trace


@pytest.fixture()
def trace_file(tmp_path):
    trace, _ = planted_affinity_trace(600, 4, 16, 2, seed=1)
    tokens = trace.num_tokens
    path = tmp_path / "trace.npz"
    np.savez_compressed(path, topk_ids=trace.topk_ids.astype(np.int32),
                        topk_weights=np.full(trace.topk_ids.shape, 0.5, np.float32), seq_ids=np.arange(tokens) % 8,
                        positions=np.arange(tokens) // 8, is_prompt=np.zeros(tokens, bool),
                        moe_layers=np.arange(4, dtype=np.int32), num_experts=np.int64(16), version=np.int64(1))
    return path


def test_build_compare_save_and_report(trace_file, tmp_path, capsys):
    out, png = tmp_path / "plan.yaml", tmp_path / "plan.png"
    status = main(["--trace", str(trace_file), "--ranks", "4", "--nodes", "2", "--policy", "affinity",
                   "--redundant", "4", "--load-cap", "1.5", "--holdout", "0.5", "--out", str(out),
                   "--batch-sizes", "16,64", "--no-progress"])
    text = capsys.readouterr().out
    assert status == 0
    for needle in ("linear", "round_robin", "affinity+4r", "cross-dev", "inter-node", "held-back",
                   "per-step imbalance", "max/mean rank load per layer", "slots/rank"):
        assert needle in text
    plan = PlacementPlan.load(out)
    assert plan.policy == "affinity" and plan.num_slots == 20 and plan.num_nodes == 2
    assert plan.objectives["imbalance_max"] <= 1.5
    status = main(["--report", str(out), "--trace", str(trace_file), "--plot", str(png)])
    assert status == 0 and png.stat().st_size > 10_000
    assert "stored objectives" in capsys.readouterr().out


def test_loads_only_and_eplb(tmp_path, capsys):
    rng = np.random.default_rng(0)
    loads = rng.pareto(1.5, size=(3, 16)) * 100
    np.save(tmp_path / "loads.npy", loads)
    status = main(["--loads", str(tmp_path / "loads.npy"), "--ranks", "4", "--policy", "eplb", "--redundant", "4",
                   "--refine", "--out", str(tmp_path / "eplb.yaml")])
    text = capsys.readouterr().out
    assert status == 0 and "n/a" in text          # no transitions: cross-device is not defined
    assert PlacementPlan.load(tmp_path / "eplb.yaml").params["refine"] is True


def test_bad_input_exits_2_with_the_reason(tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.array([[0, 1], [2, 9]]))
    assert main(["--trace", str(tmp_path / "bad.npy"), "--num-experts", "4", "--ranks", "2"]) == 2
    assert "out of range [0, 4)" in capsys.readouterr().err
    assert main(["--trace", str(tmp_path / "missing.npz"), "--ranks", "2"]) == 2
    assert "no such file" in capsys.readouterr().err
    np.save(tmp_path / "ok.npy", np.array([[0, 1], [2, 3], [1, 0]]))
    assert main(["--trace", str(tmp_path / "ok.npy"), "--ranks", "8"]) == 2
    assert "more ranks than slots" in capsys.readouterr().err


def test_placement_never_imports_ray_torch_distributed_or_grpc():
    code = ("import sys, raymoe.placement, raymoe.placement.cli, raymoe.placement.build, raymoe.placement.report, "
            "raymoe.placement.synthetic\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'grpc') or m.startswith('torch')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def _bad_files(tmp_path) -> dict[str, object]:
    """Files `raymoe plan` must refuse, by name -> (the field or reason its error names)."""
    ids = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]])
    np.savez(tmp_path / "good.npz", topk_ids=ids, num_experts=np.int64(4))
    whole = (tmp_path / "good.npz").read_bytes()
    np.save(tmp_path / "good.npy", ids[:, :, 0])
    array = (tmp_path / "good.npy").read_bytes()
    files = {
        "random.npz": (np.random.default_rng(0).bytes(3000), "signature"),
        "random.npy": (b"\x01" + np.random.default_rng(1).bytes(3000), "signature"),
        "empty.npz": (b"", "size = 0"),
        "empty.npy": (b"", "size = 0"),
        "truncated.npz": (whole[: len(whole) // 2], "truncated or corrupt"),
        "truncated.npy": (array[:-8], "truncated or corrupt"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "objects.npy", np.array([[1], [1, 2]], dtype=object), allow_pickle=True)
    np.save(tmp_path / "complex.npy", np.ones((3, 4), dtype=complex))
    np.save(tmp_path / "strings.npy", np.array([["a", "b"]]))
    np.save(tmp_path / "three_d.npy", np.ones((2, 3, 4)))
    np.savez(tmp_path / "vector_version.npz", topk_ids=ids, version=np.array([1, 2]))
    np.savez(tmp_path / "string_top_k.npz", loads=np.ones((2, 4)), top_k=np.array("two"))
    return {name: needle for name, (_, needle) in files.items()} | {
        "objects.npy": "pickled Python objects", "complex.npy": "dtype = 'complex128'", "strings.npy": "dtype",
        "three_d.npy": "shape", "vector_version.npz": "version = [1, 2]", "string_top_k.npz": "top_k = 'two'"}


def _plan(*args: str, module: str = "raymoe.placement.cli") -> subprocess.CompletedProcess:
    prefix = ["plan"] if module == "raymoe.deploy.cli" else []
    return subprocess.run([sys.executable, "-m", module, *prefix, *args, "--ranks", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("option", ["--trace", "--loads"])
def test_unreadable_or_wrong_files_exit_2_with_one_line_naming_the_file(tmp_path, option):
    """`python -m raymoe.placement.cli` is `raymoe plan` without the torch import (the same run())."""
    for name, needle in _bad_files(tmp_path).items():
        if (option, name) in (("--trace", "string_top_k.npz"), ("--loads", "vector_version.npz"),
                              ("--trace", "three_d.npy")):  # not that option's file: no such field read
            continue
        done = _plan(option, str(tmp_path / name))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (name, done.stderr)
        assert lines[0].startswith(f"raymoe plan: error: {tmp_path / name}: ") and needle in lines[0], (name, lines)
        assert "Traceback" not in done.stderr and "Fix:" in lines[0]


def test_raymoe_plan_command_reports_a_truncated_trace_in_one_line(tmp_path):
    _bad_files(tmp_path)
    done = _plan("--trace", str(tmp_path / "truncated.npz"), module="raymoe.deploy.cli")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert f"{tmp_path / 'truncated.npz'}: contents = '.npz': truncated or corrupt (BadZipFile" in line
    done = _plan("--trace", str(tmp_path / "good.npz"), "--out", str(tmp_path / "no" / "dir" / "plan.yaml"))
    assert done.returncode == 2 and "cannot write" in done.stderr and "Traceback" not in done.stderr, done.stderr
