"""The runtime's collective counts and bytes against what torch.distributed itself was asked
to do: every actor's torch.distributed is wrapped (``DistProbe``, installed through Ray's
``__ray_call__``), a deployment on gloo generates, and the stats the deployment reports
(fed by ``workers/dispatch/collectives.py``) must equal the probes' counts, call for call and byte
for byte; the same-node transport must then report exactly gloo's counts."""

from __future__ import annotations

import pytest
import ray

from raymoe.benchmarks.baselines.dist_probe import DistProbe
from raymoe.cluster.config import parse_config
from raymoe.cluster.coordinator import Deployment
from tests.cluster.test_runtime import GREEDY, PROMPTS
from raymoe.workers.reference import ReferenceEngine


@pytest.fixture(scope="module")
def models(tiny_model):
    return {"top2": tiny_model("mixtral", seed=5), "top1": tiny_model("mixtral", seed=5, num_experts_per_tok=1)}


def _install(actor) -> None:
    DistProbe.install()


def _read(actor) -> dict:
    return DistProbe.installed().snapshot()


def _uninstall(actor) -> None:
    DistProbe.installed().uninstall()


def reported(stats) -> tuple[int, int, int]:
    """(collectives per actor, of which split-size exchanges, bytes over all actors) as the
    deployment's stats say."""
    metadata = sum(L.metadata_collectives for s in stats.per_step for L in s.layers)
    calls = sum(L.token_collectives + L.metadata_collectives for s in stats.per_step for L in s.layers) + \
        sum(s.coherence_collectives for s in stats.per_step)
    moved = sum(L.dispatch_bytes + L.combine_bytes + L.merge_bytes + L.metadata_bytes
                for s in stats.per_step for L in s.layers) + sum(s.coherence_bytes for s in stats.per_step)
    return calls, metadata, moved


def run(models, layout: str, model: str, ranks: int, backend: str, probe: bool):
    config = parse_config({"model": str(models[model]), "layout": layout, "expert_ranks": ranks, "backend": backend,
                           "resources": {"cpus_per_actor": 0.1}, "batching": {"max_seqs": 4}})
    with Deployment(config) as dep:
        assert dep.backend == backend
        if probe:
            ray.get([a.__ray_call__.remote(_install) for a in dep.actors])
        try:
            outputs = dep.generate_ids(PROMPTS, GREEDY)
            seen = ray.get([a.__ray_call__.remote(_read) for a in dep.actors]) if probe else None
        finally:
            if probe:
                ray.get([a.__ray_call__.remote(_uninstall) for a in dep.actors])
        return outputs, reported(dep.stats), seen


@pytest.mark.parametrize("layout,model,ranks", [("disaggregated", "top2", 2), ("disaggregated", "top1", 3),
                                                ("coherent", "top2", 3), ("coherent", "top1", 2)])
def test_stats_equal_what_torch_distributed_saw(ray_session, models, layout, model, ranks):
    """gloo: the stats == what torch.distributed was asked to do in every actor. The
    same-node transport (backend local) carries the same bytes, in the same collectives
    except the split-size exchanges, whose counts it carries in-band with the rows
    (checked at 2 ranks, one case per layout: each check is a deployment more)."""
    want = ReferenceEngine.from_pretrained(models[model], max_seqs=4).generate_ids(PROMPTS, GREEDY)
    outputs, (calls, metadata, moved), seen = run(models, layout, model, ranks, "gloo", probe=True)
    assert outputs == want and calls > 0 and moved > 0
    assert metadata == 0 if layout == "disaggregated" else metadata > 0  # fixed capacity / exact rows
    for probe in seen:  # every actor issues every collective of the step
        assert sum(probe["calls"].values()) == calls, probe
    assert sum(sum(p["bytes_sent"].values()) for p in seen) == moved
    if ranks == 2:
        local_outputs, local_counts, _ = run(models, layout, model, ranks, "local", probe=False)
        assert local_outputs == want and local_counts == (calls - metadata, 0, moved)
