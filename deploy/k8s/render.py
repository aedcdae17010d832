"""``raymoe k8s render``: the KubeRay manifests of a raymoe deployment, from the Helm
chart's values and a raymoe deployment config, without ``helm``.

    python -m raymoe.deploy.k8s.render render --config deploy/configs/tiny.yaml [-f my-values.yaml] \\
        [--set workers.nodes=2] [--release raymoe] [--benchmark] [--out manifests.yaml]
    python -m raymoe.deploy.k8s.render values --config deploy/configs/tiny.yaml > values-tiny.yaml   # for helm -f

Values are layered as in Helm: the chart's ``values.yaml``, then what the deployment
config implies (``--config``: its fields, the model directory's name, its placement plan
and the plan's node count), then ``-f`` files, then ``--set``. The result is checked
against the chart's ``values.schema.json`` (what ``helm install`` checks) and then
against the rules a schema cannot state (ranks per node, GPUs, the plan's shape); the
deployment config the pods will read is validated by ``raymoe.cluster.config``. Every refusal
is a ``ValuesError`` naming the value's path, the value and the fix.

``add_arguments(parser)`` / ``run(args)`` are what ``cluster/cli.py`` wires up as ``raymoe k8s``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import yaml

from raymoe.deploy.k8s import manifests as k8s_manifests
from raymoe.cluster.config import DeploymentConfigError, load_config, parse_config

CHART = Path(__file__).resolve().parent.parent / "helm" / "raymoe"  # deploy/helm/raymoe


class ValuesError(ValueError):
    """A chart value that cannot work; names its dotted path, the value and the fix."""

    def __init__(self, path: str, value: object, fix: str):
        self.path, self.value, self.fix = path, value, fix
        shown = repr(value) if len(repr(value)) <= 120 else repr(value)[:117] + "..."
        super().__init__(f"chart value '{path}' = {shown}: {fix}")


# -- values --------------------------------------------------------------------------------

def merge(base: dict, override: dict) -> dict:
    """Helm's merge: mappings merge key by key, anything else replaces (None deletes)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None and key in out and isinstance(out[key], dict):
            del out[key]
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(assignment: str) -> dict:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is read as YAML."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path:
        raise ValuesError("--set", assignment, "write key.path=value, e.g. workers.nodes=2")
    return _nest(path, yaml.safe_load(raw) if raw else "")


def values_from_config(config_path: str | Path) -> dict:
    """What a raymoe deployment YAML says about the chart's values."""
    config = load_config(config_path)
    with open(config_path) as f:
        raw = yaml.safe_load(f)
    raymoe = {k: v for k, v in raw.items() if k != "model"}
    ray = {k: v for k, v in (raymoe.get("ray") or {}).items() if k != "address"}
    raymoe["ray"] = ray
    placement = dict(raymoe.get("placement") or {})
    values: dict = {"model": {"path": Path(config.model).name}}
    if placement.pop("plan", None):
        from raymoe.placement.plan import PlacementPlan

        plan_path = _resolve(config.placement.plan, Path(config_path).parent)
        plan = PlacementPlan.load(plan_path)
        values["placementPlan"] = Path(plan_path).read_text()
        if plan.num_nodes > 1:
            values["workers"] = {"nodes": plan.num_nodes}
    raymoe["placement"] = placement
    values["raymoe"] = raymoe
    return values


def _resolve(path: str, config_dir: Path) -> str:
    for candidate in (Path(path), config_dir / path):
        if candidate.exists():
            return str(candidate)
    raise DeploymentConfigError("placement.plan", path, f"no such file (looked here and in {config_dir})")


def load_values(config: str | Path | None = None, files: list[str | Path] = (), sets: list[str] = (),
                set_files: list[str] = ()) -> dict:
    """Chart defaults < the deployment config < ``files`` < ``sets`` < ``set_files`` (key=path:
    the file's text as the value, as ``helm --set-file``)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if config:
        values = merge(values, values_from_config(config))
    for path in files:
        values = merge(values, yaml.safe_load(Path(path).read_text()) or {})
    for assignment in sets:
        values = merge(values, parse_set(assignment))
    for assignment in set_files:
        key, sep, path = assignment.partition("=")
        if not sep or not key or not path:
            raise ValuesError("--set-file", assignment, "write key.path=FILE, e.g. placementPlan=plan.yaml")
        values = merge(values, _nest(key, Path(path).read_text()))
    return values


def _nest(path: str, value: object) -> dict:
    for key in reversed(path.split(".")):
        value = {key: value}
    return value


def check_schema(values: dict) -> None:
    """values.schema.json, as ``helm install`` applies it; the first error, by path."""
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(values), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        path = ".".join(map(str, error.absolute_path)) or "<root>"
        message = error.message if len(error.message) <= 300 else error.message[:297] + "..."
        raise ValuesError(path, error.instance, f"breaks values.schema.json: {message}")


def check_values(values: dict) -> None:
    """The schema, then the rules that join several values."""
    check_schema(values)
    raymoe, workers = values["raymoe"], values["workers"]
    ranks, nodes = raymoe.get("expert_ranks", 2), workers["nodes"]
    pinned = (raymoe.get("ray") or {}).get("node_label")
    if pinned and ranks % nodes:
        raise ValuesError("workers.nodes", nodes, f"must divide raymoe.expert_ranks = {ranks} (plan node of rank r "
                          f"is r // (ranks / nodes)); change either, or set raymoe.ray.node_label: null")
    gpus = (raymoe.get("resources") or {}).get("gpus_per_actor", "auto")
    per_actor = 1 if gpus == "auto" else gpus
    if workers["gpusPerNode"] and pinned and workers["gpusPerNode"] < per_actor * (ranks // nodes):
        raise ValuesError("workers.gpusPerNode", workers["gpusPerNode"],
                          f"each node runs {ranks // nodes} expert ranks of {per_actor} GPU: needs at least "
                          f"{per_actor * (ranks // nodes)}")
    if values["model"]["storage"]["type"] == "uri" and not values["model"]["storage"]["uri"]["uri"]:
        raise ValuesError("model.storage.uri.uri", "", "set the checkpoint's URI, e.g. s3://bucket/models/NAME")
    if values.get("placementPlan"):
        _check_plan(values["placementPlan"], ranks, nodes)
    try:
        parse_config(k8s_manifests.deployment_config(values), "values.raymoe")
    except DeploymentConfigError as exc:
        raise ValuesError(f"raymoe.{exc.field}", exc.value, exc.fix) from None


def _check_plan(text: str, ranks: int, nodes: int) -> None:
    import tempfile

    from raymoe.placement.errors import PlacementError
    from raymoe.placement.plan import PlacementPlan

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        try:
            plan = PlacementPlan.load(f.name)
        except PlacementError as exc:
            raise ValuesError("placementPlan", "<plan file>", f"not a valid plan: {exc}") from None
    if plan.num_ranks != ranks:
        raise ValuesError("placementPlan", f"num_ranks: {plan.num_ranks}",
                          f"raymoe.expert_ranks is {ranks}; rebuild the plan with `raymoe plan --ranks {ranks}`")
    if plan.num_nodes not in (1, nodes):
        raise ValuesError("workers.nodes", nodes, f"the plan places ranks on {plan.num_nodes} nodes; set "
                          f"workers.nodes={plan.num_nodes} or rebuild the plan with --nodes {nodes}")


def render(values: dict, release: str = "raymoe", managed_by: str = "Helm") -> list[dict]:
    """The checked values -> manifests (ConfigMap, RayService, [Service, ServiceMonitor], [RayJob])."""
    check_values(values)
    objects = k8s_manifests.render_objects(values, release)
    if managed_by != "Helm":
        for obj in objects:
            obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] = managed_by
    return objects


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, the ConfigMap's files) as readable ``|`` blocks."""


_BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


# -- command line --------------------------------------------------------------------------

DEFAULT_CRDS = CHART.parent.parent / "k8s" / "crds"  # package data: KubeRay's CRDs, see its README.md


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="k8s_command", required=True)
    check = sub.add_parser("check", help="check manifests (e.g. `helm template` output) against the KubeRay CRDs, "
                                         "Ray Serve's config schema and raymoe.cluster.config")
    check.add_argument("files", nargs="+", type=Path, help="multi-document YAML files; - for stdin")
    check.add_argument("--crds", type=Path, default=DEFAULT_CRDS,
                       help="directory with ray.io_rayservices.yaml and ray.io_rayjobs.yaml (KubeRay's helm-chart/"
                            "kuberay-operator/crds)")
    for name, help_text in (("render", "print the manifests (RayService, RayJob, ...) as YAML"),
                            ("values", "print the chart values the deployment config implies (helm -f)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, help="raymoe deployment YAML (deploy/configs/*.yaml)")
        p.add_argument("-f", "--values", dest="values", action="append", default=[], type=Path,
                       help="a values file, as for helm (repeatable; later ones win)")
        p.add_argument("--set", dest="sets", action="append", default=[], help="key.path=value (repeatable)")
        p.add_argument("--set-file", dest="set_files", action="append", default=[],
                       help="key.path=FILE: the file's text as the value (e.g. placementPlan=plan.yaml)")
        p.add_argument("--out", type=Path, help="write here instead of stdout")
        if name == "render":
            p.add_argument("--release", default="raymoe", help="Helm release name (object names derive from it)")
            p.add_argument("--benchmark", action="store_true", help="include the benchmark RayJob")


def check_files(files: list[Path], crds: Path) -> int:
    """Check every object of ``files`` (``-``: stdin). Exit status: 0 all good, 1 some
    object breaks a check, 2 some input is not Kubernetes objects at all (one error line
    per such file or document on stderr; the other objects are still checked)."""
    from raymoe.deploy.k8s.validate import MANIFESTS, ManifestError, check_object, load_documents, manifest_errors

    objects, malformed = [], []
    for path in files:
        source = "<stdin>" if str(path) == "-" else str(path)
        try:
            try:
                data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
            except OSError as exc:
                raise ManifestError(source, "path", source, f"cannot be read ({exc.strerror})",
                                    f"pass files of {MANIFESTS}") from None
            for number, doc in load_documents(data, source):
                try:
                    objects.append(check_object(doc, source, number))
                except ManifestError as exc:
                    malformed.append(exc)
        except ManifestError as exc:
            malformed.append(exc)
    if not objects and not malformed:
        sources = ", ".join("<stdin>" if str(p) == "-" else str(p) for p in files)
        malformed.append(ManifestError(sources, "objects", 0, "no Kubernetes objects to check", f"pass {MANIFESTS}"))
    errors = manifest_errors(objects, crds)
    for problem in malformed:
        print(f"raymoe k8s check: error: {problem}", file=sys.stderr)
    for error in errors:
        print(f"raymoe k8s check: {' '.join(error.split())}", file=sys.stderr)  # one line each
    kinds = ", ".join(f"{o['kind']} {o['metadata'].get('name')}" for o in objects)
    bad = len(malformed) + len(errors)
    print(f"{len(objects)} objects ({kinds}): {'ok' if not bad else f'{bad} errors'}")
    return 2 if malformed else 1 if errors else 0


def run(args: argparse.Namespace) -> int:
    from raymoe.placement.errors import PlacementError

    if args.k8s_command == "check":
        return check_files(args.files, args.crds)
    try:
        sets = list(args.sets) + (["benchmark.enabled=true"] if getattr(args, "benchmark", False) else [])
        values = load_values(args.config, args.values, sets, args.set_files)
        if args.k8s_command == "values":
            implied = values_from_config(args.config) if args.config else {}
            check_values(values)
            text = yaml.safe_dump(implied, sort_keys=False)
        else:
            objects = render(values, args.release, managed_by="raymoe")
            text = yaml.dump_all(objects, Dumper=_BlockDumper, sort_keys=False)
    except (ValuesError, DeploymentConfigError, PlacementError, OSError, yaml.YAMLError) as exc:
        print(f"raymoe k8s: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raymoe k8s", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
