"""A deployment that cannot start leaves nothing behind: bad configs, plans and
checkpoints given to ``Deployment(...)`` raise their typed error, and afterwards the
cluster holds exactly the actors and placement groups it held before."""

from __future__ import annotations

import json
import math
import time

import pytest
import ray
import torch
import yaml
from safetensors.torch import load_file, save_file

from cluster import coordinator
from cluster.config import DeploymentConfigError, parse_config
from cluster.coordinator import Deployment
from placement.errors import PlanError
from placement.plan import build_plan
from tests.tiny_models import save_tiny_model
from workers.model.errors import CheckpointError, ConfigFieldError, RaymoeModelError

SETTLE_S = 30.0  # how long killed actors and removed placement groups may take to be reported gone


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    save_tiny_model("mixtral", path, seed=3)  # 6 experts, 3 MoE layers
    return path


def _copy(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_tensors(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _live() -> tuple[set, set]:
    """(ids of alive actors, ids of placement groups not removed), from the GCS."""
    actors = {a for a, info in ray._private.state.actors().items() if info["State"] != "DEAD"}
    groups = {g for g, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}
    return actors, groups


def _config(model, **overrides):
    return parse_config({"model": str(model), "expert_ranks": 2, "resources": {"cpus_per_actor": 0.1},
                         "batching": {"max_seqs": 2}, **overrides})


def _truncated(good, tmp):
    path = _copy(good, tmp)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])
    return _config(path)


def _wrong_expert_count(good, tmp):
    path = _copy(good, tmp)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    return _config(path)


def _wrong_shape(good, tmp):
    path = _copy(good, tmp)
    _edit_tensors(path, lambda t: t.__setitem__("model.layers.1.self_attn.q_proj.weight", torch.zeros(16, 32)))
    return _config(path)


def _garbage_plan(good, tmp):
    (tmp / "plan.yaml").write_bytes(b"version: 1\nphy2log: [[\xff")
    return _config(good, placement={"plan": str(tmp / "plan.yaml")})


def _plan_for_other_ranks(good, tmp):
    build_plan("linear", num_layers=3, num_experts=6, num_ranks=3).save(tmp / "plan.yaml")
    return _config(good, placement={"plan": str(tmp / "plan.yaml")})


def _plan_with_huge_header(good, tmp):
    build_plan("linear", num_layers=3, num_experts=6, num_ranks=2).save(tmp / "plan.yaml")
    doc = yaml.safe_load((tmp / "plan.yaml").read_text())
    (tmp / "plan.yaml").write_text(yaml.safe_dump({**doc, "num_ranks": 2**70}))
    return _config(good, placement={"plan": str(tmp / "plan.yaml")})


def _nan_weights_checked(good, tmp):
    path = _copy(good, tmp)
    _edit_tensors(path, lambda t: t["model.layers.2.block_sparse_moe.experts.1.w2.weight"].view(-1).__setitem__(
        0, math.nan))
    return _config(path, check_finite=True)


CASES = [
    (_truncated, CheckpointError),
    (_wrong_expert_count, ConfigFieldError),
    (_wrong_shape, RaymoeModelError),
    (_garbage_plan, PlanError),
    (_plan_for_other_ranks, DeploymentConfigError),
    (_plan_with_huge_header, PlanError),
    (_nan_weights_checked, CheckpointError),
]


@pytest.mark.parametrize("make,error", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_bad_deployment_raises_its_typed_error_and_leaves_nothing(ray_session, good_model, tmp_path, make, error):
    config = make(good_model, tmp_path)
    before = _live()
    with pytest.raises(error):
        Deployment(config)
    deadline = time.time() + SETTLE_S
    while _live() != before and time.time() < deadline:
        time.sleep(0.2)
    actors, groups = _live()
    assert actors <= before[0] and groups <= before[1], (actors - before[0], groups - before[1])


def test_a_good_deployment_starts_after_the_bad_ones(ray_session, good_model):
    with Deployment(_config(good_model)) as dep:
        assert len(dep.actors) == 3


def test_failure_after_the_actors_started_leaves_nothing(ray_session, good_model, tmp_path, monkeypatch):
    """The weights vanish between the driver's checks and the actors' loading: the actors
    die in their constructors, and the deployment kills them and frees its placement group."""
    path = _copy(good_model, tmp_path)
    real = coordinator.load_tokenizer

    def vanish_then_load(model):  # runs after the checks, just before the actors start
        (path / "model.safetensors").unlink()
        return real(model)

    monkeypatch.setattr(coordinator, "load_tokenizer", vanish_then_load)
    before = _live()
    with pytest.raises(ray.exceptions.RayActorError):
        Deployment(_config(path))
    deadline = time.time() + SETTLE_S
    while _live() != before and time.time() < deadline:
        time.sleep(0.2)
    actors, groups = _live()
    assert actors <= before[0] and groups <= before[1], (actors - before[0], groups - before[1])
