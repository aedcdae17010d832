"""The Helm chart deploy/helm/raymoe: its values against its schema, its templates'
references and structure, `helm lint`, and `helm template` checked against the KubeRay
CRDs and compared with `raymoe k8s render` (helm v4 from the set-up; missing helm fails)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from raymoe.deploy.k8s import render as k8s
from raymoe.deploy.k8s.validate import manifest_errors
from tests.paths import CRDS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "raymoe"
# `make setup` puts a pinned helm v4 into the venv's bin (tools/install_helm.py).
HELM = shutil.which("helm") or shutil.which("helm", path=str(Path(sys.executable).parent))


@pytest.fixture
def helm() -> str:
    if HELM is None:
        pytest.fail("no helm binary on PATH or beside this Python: run `make setup` "
                    "(or `python tools/install_helm.py .venv/bin`)")
    return HELM

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def validator():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    return jsonschema.Draft7Validator(SCHEMA)


def with_value(path: str, value) -> dict:
    values = copy.deepcopy(VALUES)
    *parents, last = path.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return values


def test_values_yaml_is_valid_against_its_schema():
    assert list(validator().iter_errors(VALUES)) == []


@pytest.mark.parametrize("path,value,message", [
    ("image.tag", 1, "is not of type 'string'"),
    ("image.pullPolicy", "Sometimes", "is not one of"),
    ("rayVersion", "latest", "does not match"),
    ("rayAuth.mode", "tls", "is not one of"),
    ("raymoe.layout", "mixed", "is not one of"),
    ("raymoe.expert_ranks", 0, "less than the minimum"),
    ("raymoe.model", "/models/x", "'model' was unexpected"),            # the chart sets it
    ("raymoe.ray.address", "auto", "'address' was unexpected"),         # the chart sets it
    ("raymoe.ray.node_label", "ray.io/node", "is not valid under any of the given schemas"),
    ("raymoe.resources.gpus_per_actor", "all", "is not valid under any of the given schemas"),
    ("raymoe.placement.plan", "plan.yaml", "'plan' was unexpected"),    # use placementPlan
    ("model.path", "/abs/path", "does not match"),
    ("model.storage.type", "nfs", "is not one of"),
    ("model.storage.pvc.claimName", "", "does not match"),
    ("model.storage.pvc.claimName", "Bad_Name", "does not match"),
    ("apiKey.existingSecret", "Not A Name", "does not match"),
    ("serve.httpPort", 70000, "greater than the maximum"),
    ("serve.service.type", "Ingress", "is not one of"),
    ("head.resources.requests.cpu", "lots", "does not match"),
    ("workers.nodes", 0, "less than the minimum"),
    ("workers.gpusPerNode", "4", "is not of type 'integer'"),
    ("workers.tolerations", [{"key": "x", "operator": "Maybe"}], "is not one of"),
    ("workers", {"nodes": 2}, "'gpusPerNode' is a required property"),
    ("metrics.serviceMonitor.interval", "30", "does not match"),
    ("benchmark.commands", [], "should be non-empty"),
    ("worker", {}, "'worker' was unexpected"),                           # a typo at the top
])
def test_bad_values_are_rejected_by_the_schema(path, value, message):
    errors = list(validator().iter_errors(with_value(path, value)))
    assert errors, f"{path}={value!r} was accepted"
    text = "; ".join(e.message for e in errors)
    assert message in text, text


def test_uri_storage_needs_a_uri_and_pvc_a_claim():
    bad = with_value("model.storage", {"type": "uri", "uri": {"uri": "not a uri", "image": "x", "command": ["x"]}})
    assert any("does not match" in e.message for e in validator().iter_errors(bad))
    good = with_value("model.storage", {"type": "uri", "uri": {"uri": "gs://b/m", "image": "x", "command": ["x"]}})
    assert list(validator().iter_errors(good)) == []
    assert list(validator().iter_errors(with_value("model.storage", {"type": "pvc"})))


# -- templates, without helm ------------------------------------------------------------------

TEMPLATES = sorted((CHART / "templates").glob("*"))


def _value_paths(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            yield path
            yield from _value_paths(value, path)


def test_every_value_a_template_reads_is_declared_in_values_yaml():
    declared = set(_value_paths(VALUES))
    used = set()
    for template in TEMPLATES:
        text = template.read_text()
        used |= set(re.findall(r"\.Values\.([A-Za-z_][A-Za-z0-9_.]*)", text))
        used |= set(re.findall(r"\$v\.([A-Za-z_][A-Za-z0-9_.]*)", text))  # $v := .root.Values
    assert used and sorted(used - declared) == []


def test_template_blocks_are_balanced():
    for template in TEMPLATES:
        text = re.sub(r"{{-?\s*/\*.*?\*/\s*-?}}", "", template.read_text(), flags=re.S)
        opened = len(re.findall(r"{{-?\s*(?:if|range|with|define)\b", text))
        closed = len(re.findall(r"{{-?\s*end\s*-?}}", text))
        assert opened == closed, f"{template.name}: {opened} blocks opened, {closed} closed"


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == k8s.k8s_manifests.CHART_NAME
    assert chart["version"] == k8s.k8s_manifests.CHART_VERSION


# -- with helm ----------------------------------------------------------------------------------

SCENARIOS = {
    "defaults": [],
    "tiny-cpu": ["--set", "raymoe.expert_ranks=2", "--set", "workers.gpusPerNode=0", "--set",
                 "raymoe.resources.gpus_per_actor=0", "--set", "workers.frontend.gpus=0"],
    "coherent-uri-key": ["--set", "raymoe.layout=coherent", "--set", "model.storage.type=uri", "--set",
                         "model.storage.uri.uri=s3://bucket/m", "--set", "apiKey.existingSecret=raymoe-key"],
    "monitor-benchmark": ["--set", "metrics.serviceMonitor.enabled=true", "--set", "benchmark.enabled=true"],
}


def helm_template(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, "template", "raymoe", str(CHART), "--kube-version", "1.30.0", *args],
                          capture_output=True, text=True, timeout=120)


def _comparable(obj: dict) -> dict:
    """An object's content with YAML-in-strings parsed (toYaml and PyYAML format differently)."""
    obj = copy.deepcopy(obj)
    obj["metadata"].get("labels", {}).pop("app.kubernetes.io/managed-by", None)
    if obj["kind"] == "RayService":
        obj["spec"]["serveConfigV2"] = yaml.safe_load(obj["spec"]["serveConfigV2"])
    if obj["kind"] == "ConfigMap":
        obj["data"] = {k: yaml.safe_load(v) for k, v in obj["data"].items()}
    return json.loads(json.dumps(obj))  # ints vs floats of equal value compare equal anyway


def test_helm_lint(helm):
    done = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_helm_template_validates_and_equals_k8s_render(helm, name):
    done = helm_template(helm, *SCENARIOS[name])
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert manifest_errors(rendered, CRDS) == []
    sets = [a for a in SCENARIOS[name] if a != "--set"]
    ours = k8s.render(k8s.load_values(None, [], sets))
    assert sorted((o["kind"], o["metadata"]["name"]) for o in rendered) == \
        sorted((o["kind"], o["metadata"]["name"]) for o in ours)
    by_key = {(o["kind"], o["metadata"]["name"]): _comparable(o) for o in ours}
    for obj in rendered:
        assert _comparable(obj) == by_key[(obj["kind"], obj["metadata"]["name"])], obj["kind"]


def test_helm_with_a_hierarchical_plan_equals_k8s_render(helm, tmp_path):
    from raymoe.placement.build import build_plan

    build_plan("linear", num_layers=6, num_experts=16, num_ranks=8, num_nodes=2).save(tmp_path / "plan.yaml")
    done = helm_template(helm, "--set-file", f"placementPlan={tmp_path / 'plan.yaml'}")
    assert done.returncode == 0, done.stderr
    rendered = {(o["kind"], o["metadata"]["name"]): _comparable(o) for o in yaml.safe_load_all(done.stdout) if o}
    ours = k8s.render(k8s.load_values(None, [], [], [f"placementPlan={tmp_path / 'plan.yaml'}"]))
    assert rendered == {(o["kind"], o["metadata"]["name"]): _comparable(o) for o in ours}
    assert rendered[("ConfigMap", "raymoe-config")]["data"]["plan.yaml"]["num_nodes"] == 2
    build_plan("linear", num_layers=6, num_experts=16, num_ranks=4).save(tmp_path / "small.yaml")
    done = helm_template(helm, "--set-file", f"placementPlan={tmp_path / 'small.yaml'}")
    assert done.returncode != 0 and "rebuild the plan with `raymoe plan --ranks 8`" in done.stderr


@pytest.mark.parametrize("args,message", [
    (["--set", "workers.nodes=0"], "at '/workers/nodes': minimum: got 0, want 1"),  # helm v4's schema errors
    (["--set", "raymoe.layout=mixed"], "at '/raymoe/layout': value must be one of"),
    (["--set", "raymoe.expert_ranks=3"], "must divide raymoe.expert_ranks = 3"),
    (["--set", "workers.gpusPerNode=2"], "needs at least 4"),
])
def test_helm_refuses_bad_values(helm, args, message):
    done = helm_template(helm, *args)
    assert done.returncode != 0 and message in done.stderr, done.stderr
