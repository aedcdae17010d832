"""The runtime's collective counts and bytes against what torch.distributed itself was asked
to do: every actor's torch.distributed is wrapped (``DistProbe``, installed through Ray's
``__ray_call__``), a deployment generates, and the stats the deployment reports (fed by
``workers/collectives.py``) must equal the probes' counts, call for call and byte for byte."""

from __future__ import annotations

import pytest
import ray

from raymoe.benchmarks.baselines.dist_probe import DistProbe
from raymoe.cluster.config import parse_config
from raymoe.cluster.coordinator import Deployment
from tests.cluster.test_runtime import GREEDY, PROMPTS
from tests.tiny_models import save_tiny_model
from raymoe.workers.reference import ReferenceEngine


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = {}
    for name, overrides in (("top2", {}), ("top1", {"num_experts_per_tok": 1})):
        paths[name] = tmp_path_factory.mktemp(name)
        save_tiny_model("mixtral", paths[name], seed=3, **overrides)
    return paths


def _install(actor) -> None:
    DistProbe.install()


def _read(actor) -> dict:
    return DistProbe.installed().snapshot()


def _uninstall(actor) -> None:
    DistProbe.installed().uninstall()


def reported(stats) -> tuple[int, int]:
    """(collectives per actor, bytes over all actors) as the deployment's stats say."""
    calls = sum(L.token_collectives + L.metadata_collectives for s in stats.per_step for L in s.layers) + \
        sum(s.coherence_collectives for s in stats.per_step)
    moved = sum(L.dispatch_bytes + L.combine_bytes + L.merge_bytes + L.metadata_bytes
                for s in stats.per_step for L in s.layers) + sum(s.coherence_bytes for s in stats.per_step)
    return calls, moved


@pytest.mark.parametrize("layout,model,ranks", [("disaggregated", "top2", 2), ("disaggregated", "top1", 3),
                                                ("coherent", "top2", 3), ("coherent", "top1", 2)])
def test_stats_equal_what_torch_distributed_saw(ray_session, models, layout, model, ranks):
    config = parse_config({"model": str(models[model]), "layout": layout, "expert_ranks": ranks,
                           "resources": {"cpus_per_actor": 0.1}, "batching": {"max_seqs": 4}})
    ref = ReferenceEngine.from_pretrained(models[model], max_seqs=4)
    with Deployment(config) as dep:
        ray.get([a.__ray_call__.remote(_install) for a in dep.actors])
        try:
            assert dep.generate_ids(PROMPTS, GREEDY) == ref.generate_ids(PROMPTS, GREEDY)
            seen = ray.get([a.__ray_call__.remote(_read) for a in dep.actors])
        finally:
            ray.get([a.__ray_call__.remote(_uninstall) for a in dep.actors])
        calls, moved = reported(dep.stats)
    assert calls > 0 and moved > 0
    for probe in seen:  # every actor issues every collective of the step
        assert sum(probe["calls"].values()) == calls, probe
    assert sum(sum(p["bytes_sent"].values()) for p in seen) == moved
