"""Checks of rendered KubeRay manifests, without a Kubernetes cluster:

- against the KubeRay CRDs' own schemas (``spec.versions[].schema.openAPIV3Schema``),
  strictly: a field the CRD does not declare is an error here, where the API server
  would silently prune it (a typo that would vanish on ``kubectl apply``);
- ``serveConfigV2`` against Ray Serve's own config schema (``ServeDeploySchema``), its
  applications' import paths importable and their arguments accepted by the builder;
- the raymoe deployment config in the ConfigMap against ``raymoe.cluster.config``.

Each check returns a list of messages (empty: fine), each naming the object and the path.
Input that is not a Kubernetes object at all (a binary file, broken YAML, a document that
is not a mapping, a ``spec`` that is not a mapping) is a ``ManifestError`` instead, from
``load_documents`` and ``check_object``: the checks above cannot even start on it.
"""

from __future__ import annotations

import copy
import functools
import importlib
from pathlib import Path

import yaml

CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MANIFESTS = "YAML manifests such as `raymoe k8s render` or `helm template` output"


class ManifestError(ValueError):
    """A manifest file or document that is not a Kubernetes object; names the file, the
    document (1-based, None for the whole file), the field, the value and the fix."""

    def __init__(self, source: str, field: str, value: object, problem: str, fix: str,
                 document: int | None = None):
        self.source, self.document, self.field, self.value, self.fix = source, document, field, value, fix
        where = source if document is None else f"{source} document {document}"
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        super().__init__(f"{where}: {field} = {shown}: {problem}. Fix: {fix}")


def load_documents(data: bytes, source: str) -> list[tuple[int, object]]:
    """(document number from 1, parsed document) for every non-empty YAML document of a
    file's bytes; ManifestError when the bytes are not UTF-8 or not YAML."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(source, "byte", f"0x{data[exc.start]:02x} at offset {exc.start}",
                            "not UTF-8 text (a binary file?)", f"pass {MANIFESTS}") from None
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ManifestError(source, "YAML", where, f"not valid YAML ({problem})", "fix the YAML there") from None
    except RecursionError:
        raise ManifestError(source, "YAML", "nesting", "nested too deeply to parse", f"pass {MANIFESTS}") from None
    return [(number, doc) for number, doc in enumerate(documents, 1) if doc is not None]


def check_object(doc: object, source: str = "<manifest>", document: int | None = None) -> dict:
    """``doc`` if it has the shape of a Kubernetes object (a mapping with string
    ``apiVersion`` and ``kind``, mapping ``metadata``; a mapping ``spec`` for the KubeRay
    kinds, a string-to-string ``data`` for a ConfigMap), else ManifestError."""
    def refuse(field: str, value: object, problem: str, fix: str):
        raise ManifestError(source, field, value, problem, fix, document)

    if not isinstance(doc, dict):
        what = {str: "string", int: "number", float: "number", bool: "boolean", list: "sequence"}.get(
            type(doc), type(doc).__name__)
        refuse("document", doc, f"a YAML {what}, not a Kubernetes object",
               "each YAML document must be a mapping with apiVersion, kind and metadata")
    for field in ("apiVersion", "kind"):
        if not isinstance(doc.get(field), str) or not doc[field]:
            refuse(field, doc.get(field), "missing or not a string", f"give every object its {field}, e.g. "
                   + ("ray.io/v1" if field == "apiVersion" else "RayService"))
    kind = doc["kind"]
    if not isinstance(doc.get("metadata"), dict):
        refuse("metadata", doc.get("metadata"), f"the {kind}'s metadata is missing or not a mapping",
               "write metadata: {name: ...}")
    if kind in CRD_FILES and not isinstance(doc.get("spec"), dict):
        refuse("spec", doc.get("spec"), f"a {kind}'s spec must be a mapping", f"write the {kind} spec as the "
               "CRD describes it (e.g. `raymoe k8s render` output)")
    if kind == "ConfigMap" and "data" in doc:
        data = doc["data"]
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            refuse("data", data, "a ConfigMap's data must map keys to strings", "quote the values, or use "
                   "`|` blocks for files")
    return doc


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

    # libyaml's loader where PyYAML has it (same objects): the CRDs are 2.4 MB, ~6 s of CPU in pure Python, ~1.3 s in C
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((Path(crd_dir) / CRD_FILES[kind]).read_text(), Loader=loader)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return jsonschema.Draft7Validator(strict(entry["schema"]["openAPIV3Schema"]))
    raise KeyError(f"{kind} CRD has no version {version}")


def crd_errors(obj: dict, crd_dir: str | Path) -> list[str]:
    """Messages for every place ``obj`` (a RayService or RayJob) breaks its CRD."""
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        return [f"{kind}: no CRD to check against (known: {sorted(CRD_FILES)})"]
    api_version = obj.get("apiVersion")
    group, _, version = api_version.partition("/") if isinstance(api_version, str) else ("", "", "")
    if group != "ray.io":
        return [f"{kind}: apiVersion {api_version!r} is not ray.io/<version>"]
    try:
        validator = crd_validator(str(crd_dir), kind, version)
    except KeyError as exc:
        return [f"{kind}: apiVersion {api_version!r}: {exc.args[0]}; use ray.io/v1"]
    metadata = obj.get("metadata")
    name = metadata.get("name", "?") if isinstance(metadata, dict) else "?"
    return [f"{kind} {name}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))]


def serve_config_errors(text: str) -> list[str]:
    """serveConfigV2 (a YAML string) as Ray Serve reads it, then each application's builder."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(text, str):
        return [f"serveConfigV2: {text!r} is not a string (the Serve config, as a YAML string)"]
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
        if app.import_path == "raymoe.deploy.server:build_app":
            from pydantic import ValidationError as ArgsError

            from raymoe.deploy.server import ServeArgs

            try:
                ServeArgs(**(app.args or {}))
            except ArgsError as exc:
                errors.append(f"serveConfigV2 application {app.name}: args: {exc}")
        elif not callable(builder):
            errors.append(f"serveConfigV2 application {app.name}: {app.import_path} is not callable")
    return errors


def config_map_errors(obj: dict) -> list[str]:
    """The raymoe deployment config (and plan) in the ConfigMap, as the pods will load them."""
    from raymoe.cluster.config import DeploymentConfigError, parse_config

    errors = []
    text = obj["data"]["deployment.yaml"]
    if not isinstance(text, str):
        return [f"ConfigMap {obj['metadata']['name']}: deployment.yaml: {text!r} is not a string (the YAML file)"]
    try:
        parse_config(yaml.safe_load(text), "ConfigMap deployment.yaml")
    except (DeploymentConfigError, KeyError, yaml.YAMLError) as exc:
        errors.append(f"ConfigMap {obj['metadata']['name']}: deployment.yaml: {exc}")
    return errors


def manifest_errors(objects: list[dict], crd_dir: str | Path) -> list[str]:
    """Every check above, for every object it applies to."""
    errors = []
    for obj in objects:
        try:
            check_object(obj)
        except ManifestError as exc:
            errors.append(str(exc))
            continue
        kind = obj.get("kind")
        if kind in CRD_FILES:
            errors += crd_errors(obj, crd_dir)
        if kind == "RayService":
            errors += serve_config_errors(obj["spec"].get("serveConfigV2", ""))
        if kind == "ConfigMap" and "deployment.yaml" in obj.get("data", {}):
            errors += config_map_errors(obj)
    return errors
