"""The runtime on a real multi-node Ray cluster: a head (no CPUs) and two worker nodes,
each its own ``ray start`` process with its own IP on the loopback range and its own
node label (``cluster/local_cluster.py``).

The test session's embedded Ray (``ray_session``) is another cluster, and a driver
process can join only one, so every multi-node driver runs in a subprocess; its tokens
are compared with the single-process reference engine's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raymoe.cluster.config import DeploymentConfigError, parse_config
from tools.local_cluster import NODE_LABEL, LocalCluster
from raymoe.cluster.multinode import bundle_label_selectors, check_pinning, describe_missing, missing_node_labels
from raymoe.placement.build import build_plan
from raymoe.placement.plan import PlacementPlan
from raymoe.placement.trace import load_trace
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11, 3], [60, 61, 62, 63, 9, 8, 70, 71]]
NEW_TOKENS = 8
DRIVER_TIMEOUT_S = 150

# Runs a deployment on the cluster named by the config / RAY_ADDRESS; prints where every
# actor runs (node IP and labels), the rendezvous address and the greedy tokens.
PROBE = """
import json, sys
import ray
from raymoe.cluster.config import load_config
from raymoe.cluster.coordinator import Deployment
from raymoe.workers.sampling import SamplingParams

config = load_config(sys.argv[1])
with Deployment(config) as dep:
    where = ray.get([a.where.remote() for a in dep.actors])
    labels = {n["NodeManagerAddress"]: n.get("Labels", {}) for n in ray.nodes() if n["Alive"]}
    outs = dep.generate_ids(json.loads(sys.argv[2]), SamplingParams(max_new_tokens=int(sys.argv[3]), ignore_eos=True))
    head = ray.util.get_node_ip_address()
print(json.dumps({"rendezvous": dep.rendezvous, "driver_ip": head, "labels": labels,
                  "actors": [{"ip": w["node_ip"], "pid": w["pid"]} for w in where],
                  "outputs": [c.output_ids for c in outs]}))
"""


@pytest.fixture(scope="module")
def local_cluster():
    started = time.monotonic()
    cluster = LocalCluster(workers=2, cpus=2, head_cpus=0).start()
    print(f"local cluster up in {time.monotonic() - started:.0f}s", file=sys.stderr)
    try:
        yield cluster
    finally:
        temp_root = cluster.temp_root
        cluster.stop()
        assert cluster.leftover_pids() == [] and not temp_root.exists()


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("mixtral", seed=11)  # 6 experts, top-2, 3 MoE layers


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    engine = ReferenceEngine.from_pretrained(model, max_seqs=4)
    return [c.output_ids for c in engine.generate_ids(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS,
                                                                              ignore_eos=True))]


def write_config(path: Path, model: Path, **fields) -> Path:
    doc = {"model": str(model), "resources": {"cpus_per_actor": 0.5}, "batching": {"max_seqs": 4}, **fields}
    parse_config(doc)  # a bad test config fails here, not in the subprocess
    path.write_text(yaml.safe_dump(doc))
    return path


def probe(cluster: LocalCluster, config: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(config), json.dumps(PROMPTS), str(NEW_TOKENS)],
                          cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_strict_spread_puts_ranks_on_different_nodes(local_cluster, model, reference, tmp_path):
    """Coherent layout, 2 ranks, STRICT_SPREAD: one rank per worker node (the head has no
    CPUs); the process group meets at rank 0's node IP; tokens equal the reference's."""
    config = write_config(tmp_path / "spread.yaml", model, layout="coherent", expert_ranks=2,
                          ray={"strategy": "STRICT_SPREAD"})
    out = probe(local_cluster, config)
    ips = [a["ip"] for a in out["actors"]]
    assert len(set(ips)) == 2 and set(ips) <= {"127.0.0.2", "127.0.0.3"}, ips
    assert out["driver_ip"] not in ips  # the driver is on the head, the ranks are not
    host = out["rendezvous"].rsplit(":", 1)[0]
    assert host == ips[0] and host != "127.0.0.1"
    assert out["outputs"] == reference


@pytest.mark.slow
def test_hierarchical_plan_pins_expert_ranks_to_labelled_nodes(local_cluster, model, reference, tmp_path):
    """record -> hierarchical affinity plan over 2 nodes -> deploy with ray.node_label: expert
    rank r runs on the Ray node labelled raymoe.io/node = r // 2, although PACK alone would
    put every actor on one node."""
    ref = ReferenceEngine.from_pretrained(model, max_seqs=4)
    ref.record_trace()
    ref.generate_ids([[3 + i, 40 + 2 * i, 7, 81 - i] for i in range(12)],
                     SamplingParams(max_new_tokens=12, ignore_eos=True))
    ref.save_trace(tmp_path / "trace.npz")
    plan = build_plan("affinity", num_layers=3, num_experts=6, num_ranks=4, num_nodes=2,
                      trace=load_trace(tmp_path / "trace.npz").stats(), solver="heuristic", restarts=2)
    assert plan.params.get("hierarchical", True) and plan.num_nodes == 2
    plan.save(tmp_path / "plan.yaml")
    config = write_config(tmp_path / "pinned.yaml", model, expert_ranks=4,
                          placement={"plan": str(tmp_path / "plan.yaml")},
                          ray={"strategy": "PACK", "node_label": NODE_LABEL}, resources={"cpus_per_actor": 0.25})
    out = probe(local_cluster, config)
    frontend, *ranks = out["actors"]
    for rank, actor in enumerate(ranks):
        assert out["labels"][actor["ip"]].get(NODE_LABEL) == str(plan.node_of_rank(rank)), (rank, actor, out)
    assert out["rendezvous"].rsplit(":", 1)[0] == frontend["ip"]
    assert out["outputs"] == reference


@pytest.mark.slow
def test_generate_cli_with_ray_address_equals_reference_cli(local_cluster, model, tmp_path):
    """`raymoe generate --config` with `ray.address` set (no RAY_ADDRESS) vs the reference
    engine's `raymoe generate --model`: the same token ids on stdout."""
    config = write_config(tmp_path / "cli.yaml", model, expert_ranks=2,
                          ray={"address": local_cluster.address, "strategy": "SPREAD"})
    env = local_cluster.env()
    env.pop("RAY_ADDRESS")
    ids = [arg for p in PROMPTS for arg in ("--prompt-ids", ",".join(map(str, p)))]
    common = [sys.executable, "-m", "raymoe.deploy.cli", "generate", *ids, "--max-new-tokens", str(NEW_TOKENS),
              "--ignore-eos"]
    runtime = subprocess.run(common + ["--config", str(config)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=DRIVER_TIMEOUT_S)
    assert runtime.returncode == 0, runtime.stderr[-4000:]
    assert local_cluster.address in runtime.stderr  # it said which cluster it joined
    ref = subprocess.run(common + ["--model", str(model)], cwd=ROOT, capture_output=True, text=True,
                         timeout=DRIVER_TIMEOUT_S)
    assert ref.returncode == 0, ref.stderr[-4000:]
    assert runtime.stdout == ref.stdout and len(runtime.stdout.splitlines()) == len(PROMPTS)


# -- node pinning without a cluster ------------------------------------------------------

def _plan(ranks: int, nodes: int) -> PlacementPlan:
    return build_plan("linear", num_layers=2, num_experts=8, num_ranks=ranks, num_nodes=nodes)


def test_bundle_selectors_follow_the_plan_nodes():
    plan = _plan(4, 2)
    node = {"raymoe.io/node": "0"}, {"raymoe.io/node": "1"}
    assert bundle_label_selectors(plan, "disaggregated", "raymoe.io/node") == [{}, node[0], node[0], node[1], node[1]]
    assert bundle_label_selectors(plan, "coherent", "raymoe.io/node") == [node[0], node[0], node[1], node[1]]
    assert bundle_label_selectors(plan, "coherent", None) is None


@pytest.mark.parametrize("strategy,ranks,nodes,ok", [
    ("STRICT_PACK", 4, 2, False), ("STRICT_PACK", 4, 1, True), ("STRICT_SPREAD", 4, 2, False),
    ("STRICT_SPREAD", 2, 2, True), ("PACK", 4, 2, True), ("SPREAD", 4, 4, True)])
def test_strategies_that_cannot_hold_the_plan_are_refused(strategy, ranks, nodes, ok):
    config = parse_config({"model": "m", "expert_ranks": ranks,
                           "ray": {"strategy": strategy, "node_label": "raymoe.io/node"}})
    if ok:
        check_pinning(config, _plan(ranks, nodes))
    else:
        with pytest.raises(DeploymentConfigError, match=f"ray.strategy.*{strategy}.*use PACK or SPREAD"):
            check_pinning(config, _plan(ranks, nodes))


@pytest.mark.parametrize("label", ["", "ray.io/node", "Raymoe.io/node", "a b", "x/", "/x", 3, "-a"])
def test_bad_node_labels_are_refused(label):
    with pytest.raises(DeploymentConfigError, match="ray.node_label.*raymoe.io/node") as err:
        parse_config({"model": "m", "ray": {"node_label": label}})
    assert err.value.field == "ray.node_label" and err.value.value == label


def test_missing_labels_are_named():
    nodes = [{"Alive": True, "Labels": {"raymoe.io/node": "0"}}, {"Alive": False, "Labels": {"raymoe.io/node": "1"}},
             {"Alive": True, "Labels": {}}]
    selectors = [{}, {"raymoe.io/node": "0"}, {"raymoe.io/node": "1"}]
    assert missing_node_labels(selectors, nodes) == [{"raymoe.io/node": "1"}]
    message = describe_missing(selectors, nodes)
    assert "raymoe.io/node=1" in message and "['0']" in message and "ray start --labels" in message
    assert describe_missing(selectors[:2], nodes) == "" and describe_missing(None, nodes) == ""
