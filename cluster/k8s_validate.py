"""Checks of rendered KubeRay manifests, without a Kubernetes cluster:

- against the KubeRay CRDs' own schemas (``spec.versions[].schema.openAPIV3Schema``),
  strictly: a field the CRD does not declare is an error here, where the API server
  would silently prune it (a typo that would vanish on ``kubectl apply``);
- ``serveConfigV2`` against Ray Serve's own config schema (``ServeDeploySchema``), its
  applications' import paths importable and their arguments accepted by the builder;
- the raymoe deployment config in the ConfigMap against ``cluster.config``.

Each check returns a list of messages (empty: fine), each naming the object and the path.
"""

from __future__ import annotations

import copy
import functools
import importlib
from pathlib import Path

import yaml

CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused: every object that lists ``properties``
    and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``
    gets ``additionalProperties: false`` (what structural pruning would drop)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(crd_dir: str, kind: str, version: str = "v1"):
    import jsonschema

    crd = yaml.safe_load((Path(crd_dir) / CRD_FILES[kind]).read_text())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return jsonschema.Draft7Validator(strict(entry["schema"]["openAPIV3Schema"]))
    raise KeyError(f"{kind} CRD has no version {version}")


def crd_errors(obj: dict, crd_dir: str | Path) -> list[str]:
    """Messages for every place ``obj`` (a RayService or RayJob) breaks its CRD."""
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        return [f"{kind}: no CRD to check against (known: {sorted(CRD_FILES)})"]
    group, _, version = obj.get("apiVersion", "").partition("/")
    if group != "ray.io":
        return [f"{kind}: apiVersion {obj.get('apiVersion')!r} is not ray.io/<version>"]
    validator = crd_validator(str(crd_dir), kind, version)
    name = obj.get("metadata", {}).get("name", "?")
    return [f"{kind} {name}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))]


def serve_config_errors(text: str) -> list[str]:
    """serveConfigV2 (a YAML string) as Ray Serve reads it, then each application's builder."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        raw = yaml.safe_load(text)
        config = ServeDeploySchema.parse_obj(raw)
    except (ValidationError, yaml.YAMLError) as exc:
        return [f"serveConfigV2: {exc}"]
    # Serve ignores unknown top-level fields; a misspelt one would silently mean "default".
    errors = [f"serveConfigV2: unknown field {key!r} (known: {sorted(ServeDeploySchema.model_fields)})"
              for key in raw if key not in ServeDeploySchema.model_fields]
    for app in config.applications:
        module, _, attr = app.import_path.partition(":")
        try:
            builder = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            errors.append(f"serveConfigV2 application {app.name}: import_path {app.import_path!r}: {exc}")
            continue
        if app.import_path == "deploy.server:build_app":
            from pydantic import ValidationError as ArgsError

            from deploy.server import ServeArgs

            try:
                ServeArgs(**(app.args or {}))
            except ArgsError as exc:
                errors.append(f"serveConfigV2 application {app.name}: args: {exc}")
        elif not callable(builder):
            errors.append(f"serveConfigV2 application {app.name}: {app.import_path} is not callable")
    return errors


def config_map_errors(obj: dict) -> list[str]:
    """The raymoe deployment config (and plan) in the ConfigMap, as the pods will load them."""
    from cluster.config import DeploymentConfigError, parse_config

    errors = []
    try:
        parse_config(yaml.safe_load(obj["data"]["deployment.yaml"]), "ConfigMap deployment.yaml")
    except (DeploymentConfigError, KeyError, yaml.YAMLError) as exc:
        errors.append(f"ConfigMap {obj['metadata']['name']}: deployment.yaml: {exc}")
    return errors


def manifest_errors(objects: list[dict], crd_dir: str | Path) -> list[str]:
    """Every check above, for every object it applies to."""
    errors = []
    for obj in objects:
        kind = obj.get("kind")
        if kind in CRD_FILES:
            errors += crd_errors(obj, crd_dir)
        if kind == "RayService":
            errors += serve_config_errors(obj["spec"].get("serveConfigV2", ""))
        if kind == "ConfigMap" and "deployment.yaml" in obj.get("data", {}):
            errors += config_map_errors(obj)
    return errors
