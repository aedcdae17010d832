"""`raymoe k8s render` (python -m raymoe.deploy.k8s.render): the RayService / RayJob manifests rendered
from a raymoe deployment config and the chart's values, checked against the real KubeRay
CRD schemas (strictly: undeclared fields are errors), Ray Serve's own config schema and
cluster.config. No Kubernetes cluster and no helm needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from raymoe.deploy.k8s import render as k8s
from raymoe.cluster.config import DeploymentConfigError
from raymoe.deploy.k8s.validate import crd_errors, manifest_errors, serve_config_errors
from raymoe.placement.build import build_plan
from tests.paths import CRDS

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "deploy" / "configs" / "tiny.yaml"


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {obj["kind"]: obj for obj in objects}


def render(config=TINY, sets=(), files=()) -> dict[str, dict]:
    objects = k8s.render(k8s.load_values(config, list(files), list(sets)))
    assert manifest_errors(objects, CRDS) == []
    return by_kind(objects)


def pods(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]


def test_cli_renders_manifests_that_validate_against_the_crds(tmp_path):
    out = tmp_path / "manifests.yaml"
    done = subprocess.run([sys.executable, "-m", "raymoe.deploy.k8s.render", "render", "--config", str(TINY), "--benchmark",
                           "--set", "metrics.serviceMonitor.enabled=true", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    objects = [d for d in yaml.safe_load_all(out.read_text()) if d]
    assert [o["kind"] for o in objects] == ["ConfigMap", "RayService", "Service", "ServiceMonitor", "RayJob"]
    assert manifest_errors(objects, CRDS) == []
    check = subprocess.run([sys.executable, "-m", "raymoe.deploy.k8s.render", "check", str(out), "--crds", str(CRDS)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "5 objects" in check.stdout and check.stdout.rstrip().endswith("ok")


def test_rayservice_runs_the_raymoe_app_with_the_config_it_mounts():
    objs = render()
    service, config_map = objs["RayService"], objs["ConfigMap"]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    shipped = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    assert app["import_path"] == shipped["applications"][0]["import_path"] == "raymoe.deploy.server:build_app"
    assert serve["grpc_options"]["grpc_servicer_functions"] == shipped["grpc_options"]["grpc_servicer_functions"]
    assert app["args"] == {"config": "/etc/raymoe/deployment.yaml", "model_name": "tiny-moe",
                           "api_key_env": "RAYMOE_API_KEY"}
    deployment = yaml.safe_load(config_map["data"]["deployment.yaml"])
    tiny = yaml.safe_load(TINY.read_text())
    assert deployment["model"] == "/models/tiny-moe" and deployment["ray"]["address"] is None
    assert {k: deployment[k] for k in ("layout", "expert_ranks", "batching")} == \
        {k: tiny[k] for k in ("layout", "expert_ranks", "batching")}
    cluster = service["spec"]["rayClusterConfig"]
    for pod in pods(cluster):  # the Serve replica may land on any pod: all of them mount both
        mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["/etc/raymoe"] == "raymoe-config" and mounts["/models"] == "model"
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["raymoe-config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no actors on the head
    ports = {p["name"]: p["port"] for p in service["spec"]["serveService"]["spec"]["ports"]}
    assert ports == {"serve": 8000, "grpc": 9000}


def test_one_labelled_worker_group_per_plan_node_and_a_frontend_group():
    cluster = render(sets=["workers.nodes=2", "workers.gpusPerNode=1"])["RayService"]["spec"]["rayClusterConfig"]
    groups = cluster["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["node-0", "node-1", "node-frontend"]
    assert [g.get("labels") for g in groups] == [{"raymoe.io/node": "0"}, {"raymoe.io/node": "1"}, None]
    for group in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1 and group["replicas"] == group["maxReplicas"] == 1
    coherent = render(sets=["raymoe.layout=coherent", "raymoe.expert_ranks=4", "workers.nodes=2"])
    assert [g["groupName"] for g in coherent["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]] == \
        ["node-0", "node-1"]


def test_hierarchical_plan_sets_the_node_count_and_rides_in_the_configmap(tmp_path):
    plan = build_plan("linear", num_layers=6, num_experts=16, num_ranks=4, num_nodes=2)
    plan.save(tmp_path / "plan.yaml")
    config = tmp_path / "deployment.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(TINY.read_text()), "expert_ranks": 4,
                                      "placement": {"plan": "plan.yaml"}}))
    objs = render(config)
    groups = objs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g.get("labels") for g in groups[:2]] == [{"raymoe.io/node": "0"}, {"raymoe.io/node": "1"}]
    data = objs["ConfigMap"]["data"]
    assert yaml.safe_load(data["deployment.yaml"])["placement"]["plan"] == "/etc/raymoe/plan.yaml"
    assert np.array_equal(yaml.safe_load(data["plan.yaml"])["slot2rank"], plan.slot2rank.tolist())
    with pytest.raises(k8s.ValuesError, match="workers.nodes.*plan places ranks on 2 nodes"):
        render(config, sets=["workers.nodes=4"])


@pytest.mark.parametrize("sets,check", [
    (["model.storage.type=hostPath", "model.storage.hostPath.path=/data/models"],
     lambda spec: spec["volumes"][-1]["hostPath"] == {"path": "/data/models", "type": "Directory"}),
    (["model.storage.type=uri", "model.storage.uri.uri=s3://bucket/models/tiny-moe"],
     lambda spec: spec["initContainers"][0]["env"][:2] == [
         {"name": "MODEL_URI", "value": "s3://bucket/models/tiny-moe"},
         {"name": "MODEL_DIR", "value": "/models/tiny-moe"}]
     and "emptyDir" in spec["volumes"][-1]),
    (["apiKey.existingSecret=raymoe-api-key"],
     lambda spec: spec["containers"][0]["env"][0] == {"name": "RAYMOE_API_KEY", "valueFrom": {
         "secretKeyRef": {"name": "raymoe-api-key", "key": "api-key"}}}),
    (["workers.nodeSelector.pool=gpu", "head.tolerations=[]"], lambda spec: True),
])
def test_storage_and_secret_options_render_valid_pods(sets, check):
    cluster = render(sets=sets)["RayService"]["spec"]["rayClusterConfig"]
    assert all(check(pod["spec"]) for pod in pods(cluster))


def test_benchmark_rayjob_runs_the_suite_and_keeps_its_results():
    job = render(sets=["benchmark.enabled=true", "benchmark.resultsClaim=bench-results"])["RayJob"]
    spec = job["spec"]
    assert "python -m raymoe.benchmarks.runtime" in spec["entrypoint"] and "python -m raymoe.benchmarks.layouts" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "results", "persistentVolumeClaim": {"claimName": "bench-results"}} in head["volumes"]
    assert [g["groupName"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]] == ["bench-0", "bench-1"]


@pytest.mark.parametrize("sets,path,fix", [
    (["raymoe.expert_ranks=3"], "workers.nodes", "must divide raymoe.expert_ranks = 3"),
    (["workers.gpusPerNode=2"], "workers.gpusPerNode", "needs at least 4"),
    (["model.storage.type=uri"], "model.storage.uri.uri", "does not match '^[a-z][a-z0-9+.-]*://.+'"),
    (["raymoe.layout=mixed"], "raymoe.layout", "is not one of"),
    (["raymoe.ray.address=auto"], "raymoe.ray", "'address' was unexpected"),
    (["workers.node=2"], "workers", "'node' was unexpected"),
    (["serve.httpPort=0"], "serve.httpPort", "less than the minimum"),
])
def test_bad_values_are_refused_with_path_and_fix(sets, path, fix):
    with pytest.raises(k8s.ValuesError) as err:
        k8s.render(k8s.load_values(None, [], sets))
    assert err.value.path == path and fix in str(err.value)


def test_bad_config_and_plan_are_refused(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(TINY.read_text()), "layout": "sideways"}))
    with pytest.raises(DeploymentConfigError, match="layout"):
        k8s.load_values(config)
    build_plan("linear", num_layers=6, num_experts=16, num_ranks=4).save(tmp_path / "plan.yaml")
    with pytest.raises(k8s.ValuesError, match="placementPlan.*rebuild the plan with `raymoe plan --ranks 8`"):
        k8s.render(k8s.load_values(None, [], [], [f"placementPlan={tmp_path / 'plan.yaml'}"]))
    done = subprocess.run([sys.executable, "-m", "raymoe.deploy.k8s.render", "render", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "raymoe k8s: error:" in done.stderr and "layout" in done.stderr


def test_values_command_round_trips_through_helm_style_values_files(tmp_path):
    done = subprocess.run([sys.executable, "-m", "raymoe.deploy.k8s.render", "values", "--config", str(TINY)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (tmp_path / "tiny-values.yaml").write_text(done.stdout)
    via_file = k8s.render(k8s.load_values(None, [tmp_path / "tiny-values.yaml"]))
    assert via_file == k8s.render(k8s.load_values(TINY))


def test_crd_check_is_strict_about_undeclared_fields_and_types():
    service = render()["RayService"]
    group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["replica"] = 1  # a typo the API server would silently prune
    group["maxReplicas"] = "one"
    errors = crd_errors(service, CRDS)
    assert any("'replica' was unexpected" in e for e in errors)
    assert any("workerGroupSpecs.0.maxReplicas" in e and "not of type 'integer'" in e for e in errors)
    assert any("unknown field 'proxy_locaton'" in e
               for e in serve_config_errors("proxy_locaton: HeadOnly\napplications: []\n"))
    assert any("import_path" in e for e in serve_config_errors(
        "applications:\n- {name: x, import_path: 'raymoe.deploy.server:nope'}\n"))


@pytest.mark.parametrize("values_file", sorted((ROOT / "deploy" / "k8s").glob("values-*.yaml")), ids=lambda p: p.name)
def test_example_values_render_valid_manifests(values_file):
    objs = render(files=[values_file], sets=["benchmark.enabled=true"])
    assert {"ConfigMap", "RayService", "RayJob"} <= set(objs)


def test_check_refuses_what_is_not_kubernetes_objects_one_line_each(tmp_path):
    """Binary files, broken YAML, documents that are not mappings, a spec that is not a
    mapping: exit 2, one error line per file or document (naming it, the field and the
    value), no traceback; the good objects beside them are still checked."""
    good = tmp_path / "good.yaml"
    assert k8s.main(["render", "--config", str(TINY), "--out", str(good)]) == 0
    files = {"binary.bin": b"\xca\xfe\x00\x01" * 64, "broken.yaml": b"a: [1, 2\n", "empty.yaml": b"",
             "scalar.yaml": b"hello\n", "list.yaml": b"- a\n- b\n",
             "spec.yaml": b"apiVersion: ray.io/v1\nkind: RayService\nmetadata: {name: svc}\nspec: 3\n---\n"
                          b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: 3\n---\n7\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / name) for name in files]
    done = subprocess.run([sys.executable, "-m", "raymoe.deploy.k8s.render", "check", str(good), *paths, "--crds", str(CRDS)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    expected = [(f"{tmp_path / 'binary.bin'}: byte = '0xca at offset 0': not UTF-8 text"),
                (f"{tmp_path / 'broken.yaml'}: YAML = 'line 2, column 1': not valid YAML"),
                (f"{tmp_path / 'scalar.yaml'} document 1: document = 'hello': a YAML string, not a Kubernetes object"),
                (f"{tmp_path / 'list.yaml'} document 1: document = ['a', 'b']: a YAML sequence"),
                (f"{tmp_path / 'spec.yaml'} document 1: spec = 3: a RayService's spec must be a mapping"),
                (f"{tmp_path / 'spec.yaml'} document 2: data = 3: a ConfigMap's data must map keys to strings"),
                (f"{tmp_path / 'spec.yaml'} document 3: document = 7: a YAML number")]
    assert len(lines) == len(expected), lines  # empty.yaml holds no object, and the other files do
    for line, needle in zip(lines, expected):
        assert line.startswith("raymoe k8s check: error: ") and needle in line and "Fix:" in line, (line, needle)
    assert done.stdout.startswith("2 objects (ConfigMap raymoe-config, RayService raymoe): 7 errors")
    nothing = subprocess.run([sys.executable, "-m", "raymoe.deploy.k8s.render", "check", str(tmp_path / "empty.yaml")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 2 and "objects = 0: no Kubernetes objects to check" in nothing.stderr


def test_manifest_errors_report_malformed_objects_instead_of_raising():
    messages = manifest_errors([{"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "s"},
                                 "spec": 3}, "text", {"apiVersion": "ray.io/v9", "kind": "RayJob",
                                                      "metadata": {"name": "j"}, "spec": {}}], CRDS)
    assert "spec = 3" in messages[0] and "document = 'text'" in messages[1]
    assert messages[2] == "RayJob: apiVersion 'ray.io/v9': RayJob CRD has no version v9; use ray.io/v1"
    assert serve_config_errors(3) == ["serveConfigV2: 3 is not a string (the Serve config, as a YAML string)"]
