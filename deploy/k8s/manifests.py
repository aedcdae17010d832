"""The Kubernetes objects of a raymoe deployment on KubeRay, built from chart values
(``deploy/helm/raymoe/values.yaml``, already validated): pure dicts in, dicts out.

The Helm chart's templates (``deploy/helm/raymoe/templates/``) build the same objects;
``tests/unit/test_helm_chart.py`` compares the two where ``helm`` is installed.

Objects: a ConfigMap (the raymoe deployment config, the placement plan), a RayService
(Serve app ``raymoe.deploy.server:build_app``; head + one worker group per plan node, labelled
for node pinning; a Serve Service for HTTP and gRPC), optionally a Service + ServiceMonitor
for Prometheus, and optionally a RayJob that runs the benchmark suite.
"""

from __future__ import annotations

import copy
import shlex

import yaml

CHART_NAME, CHART_VERSION = "raymoe", "0.1.0"
CONFIG_DIR = "/etc/raymoe"
RESULTS_DIR = "/results"
GRPC_SERVICER = "raymoe.deploy.grpc_stubs.add_RaymoeServiceServicer_to_server"
RAY_METRICS_PORT = 8080


def fullname(release: str) -> str:
    name = release if CHART_NAME in release else f"{release}-{CHART_NAME}"
    return name[:63].rstrip("-")


def labels(release: str, component: str | None = None) -> dict:
    """The labels that select: on pods, Services' selectors and nested objects."""
    out = {"app.kubernetes.io/name": CHART_NAME, "app.kubernetes.io/instance": release}
    if component:
        out["app.kubernetes.io/component"] = component
    return out


def object_labels(release: str, component: str | None = None, managed_by: str = "Helm") -> dict:
    """The labels of a top-level object (Helm's recommended set)."""
    return {**labels(release, component), "app.kubernetes.io/version": CHART_VERSION,
            "app.kubernetes.io/managed-by": managed_by, "helm.sh/chart": f"{CHART_NAME}-{CHART_VERSION}"}


def model_name(values: dict) -> str:
    return values["model"]["name"] or values["model"]["path"].rstrip("/").rsplit("/", 1)[-1]


def deployment_config(values: dict) -> dict:
    """The raymoe deployment config the pods read: values.raymoe plus the model path, the
    plan file and the in-cluster Ray (address null)."""
    config = copy.deepcopy(values["raymoe"])
    config["model"] = f"{values['model']['mountPath'].rstrip('/')}/{values['model']['path']}"
    config.setdefault("ray", {})["address"] = None
    if values.get("placementPlan"):
        config.setdefault("placement", {})["plan"] = f"{CONFIG_DIR}/plan.yaml"
    return config


def config_map(values: dict, release: str) -> dict:
    data = {"deployment.yaml": yaml.safe_dump(deployment_config(values), sort_keys=False)}
    if values.get("placementPlan"):
        data["plan.yaml"] = values["placementPlan"].rstrip("\n") + "\n"
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{fullname(release)}-config", "labels": object_labels(release)}, "data": data}


def serve_config(values: dict) -> dict:
    """serveConfigV2: the raymoe application, HTTP on all interfaces of the head, gRPC."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "0.0.0.0", "port": values["serve"]["httpPort"]},
        "grpc_options": {"port": values["serve"]["grpcPort"], "grpc_servicer_functions": [GRPC_SERVICER]},
        "applications": [{
            "name": "raymoe", "route_prefix": "/", "import_path": "raymoe.deploy.server:build_app",
            "args": {"config": f"{CONFIG_DIR}/deployment.yaml", "model_name": model_name(values),
                     "api_key_env": "RAYMOE_API_KEY"},
        }],
    }


# -- pods ----------------------------------------------------------------------------------

def _model_volume(values: dict) -> dict:
    storage = values["model"]["storage"]
    if storage["type"] == "pvc":
        return {"name": "model", "persistentVolumeClaim": {"claimName": storage["pvc"]["claimName"],
                                                           "readOnly": storage["pvc"].get("readOnly", True)}}
    if storage["type"] == "hostPath":
        return {"name": "model", "hostPath": {"path": storage["hostPath"]["path"],
                                              "type": storage["hostPath"].get("type") or "Directory"}}
    return {"name": "model", "emptyDir": {"sizeLimit": str(storage["uri"]["sizeLimit"])}}


def _init_containers(values: dict) -> list[dict]:
    storage, model = values["model"]["storage"], values["model"]
    if storage["type"] != "uri":
        return []
    uri = storage["uri"]
    env = [{"name": "MODEL_URI", "value": uri["uri"]},
           {"name": "MODEL_DIR", "value": f"{model['mountPath'].rstrip('/')}/{model['path']}"}] + uri.get("env", [])
    container = {"name": "fetch-model", "image": uri["image"], "command": list(uri["command"]), "env": env,
                 "volumeMounts": [{"name": "model", "mountPath": model["mountPath"]}]}
    if uri.get("envFrom"):
        container["envFrom"] = uri["envFrom"]
    return [container]


def _env(values: dict, extra: list[dict]) -> list[dict]:
    env = []
    if values["apiKey"]["existingSecret"]:
        env.append({"name": "RAYMOE_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": values["apiKey"]["existingSecret"], "key": values["apiKey"]["key"]}}})
    return env + list(extra)


def _resources(resources: dict, gpus: int, gpu_resource: str) -> dict:
    out = copy.deepcopy(resources)
    if gpus:
        out.setdefault("limits", {})[gpu_resource] = gpus
        out.setdefault("requests", {})[gpu_resource] = gpus
    return out


def pod_template(values: dict, release: str, role: str, group: dict, gpus: int, ports: list[dict],
                 extra_mounts: tuple[tuple[dict, dict], ...] = (), with_model: bool = True,
                 component: str | None = None) -> dict:
    """A Ray pod: the raymoe image, the config (and model) volumes, GPUs as limits.
    role: "head" or "worker"; group: the head/workers values (nodeSelector, ...);
    component: the pod's app.kubernetes.io/component label (default: role)."""
    mounts = [{"name": "raymoe-config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "raymoe-config", "configMap": {"name": f"{fullname(release)}-config"}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if with_model:
        mounts.append({"name": "model", "mountPath": values["model"]["mountPath"], "readOnly": True})
        volumes.append(_model_volume(values))
    for mount, volume in extra_mounts:
        mounts.append(mount)
        volumes.append(volume)
    image = values["image"]
    container = {"name": f"ray-{role}", "image": f"{image['repository']}:{image['tag']}",
                 "imagePullPolicy": image["pullPolicy"], "ports": ports,
                 "resources": _resources(group.get("resources", {}), gpus, values["workers"]["gpuResource"]),
                 "volumeMounts": mounts}
    env = _env(values, group.get("env") or [])
    if env:
        container["env"] = env
    spec = {"containers": [container], "volumes": volumes}
    init = _init_containers(values) if with_model else []
    if init:
        spec["initContainers"] = init
    for key in ("nodeSelector", "tolerations", "affinity"):
        if group.get(key):
            spec[key] = group[key]
    if values.get("imagePullSecrets"):
        spec["imagePullSecrets"] = values["imagePullSecrets"]
    return {"metadata": {"labels": labels(release, component or role)}, "spec": spec}


def _head_ports(values: dict) -> list[dict]:
    return [{"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001}, {"name": "serve", "containerPort": values["serve"]["httpPort"]},
            {"name": "grpc", "containerPort": values["serve"]["grpcPort"]},
            {"name": "metrics", "containerPort": RAY_METRICS_PORT}]


def head_group(values: dict, release: str, extra_mounts=(), with_model: bool = True,
               component: str | None = None) -> dict:
    params = {"num-cpus": "0", "dashboard-host": "0.0.0.0", **values["head"].get("rayStartParams", {})}
    return {"rayStartParams": params,
            "template": pod_template(values, release, "head", values["head"], 0, _head_ports(values), extra_mounts,
                                     with_model, component)}


def worker_groups(values: dict, release: str, nodes: int, gpus_per_node: int, prefix: str = "node",
                  with_model: bool = True, component: str | None = None) -> list[dict]:
    """One single-pod group per plan node, labelled ``<node_label>=n`` for Ray; the
    disaggregated front-end gets a group of its own (no label)."""
    node_label = values["raymoe"].get("ray", {}).get("node_label")
    ports = [{"name": "metrics", "containerPort": RAY_METRICS_PORT}]
    groups = []
    for node in range(nodes):
        group = {"groupName": f"{prefix}-{node}", "replicas": 1, "minReplicas": 1, "maxReplicas": 1,
                 "rayStartParams": dict(values["workers"].get("rayStartParams", {})),
                 "template": pod_template(values, release, "worker", values["workers"], gpus_per_node, ports,
                                          with_model=with_model, component=component)}
        if node_label:
            group["labels"] = {node_label: str(node)}
        groups.append(group)
    if values["raymoe"].get("layout", "disaggregated") == "disaggregated" and prefix == "node":
        frontend = {**values["workers"], "resources": values["workers"]["frontend"]["resources"]}
        groups.append({"groupName": f"{prefix}-frontend", "replicas": 1, "minReplicas": 1, "maxReplicas": 1,
                       "rayStartParams": dict(values["workers"].get("rayStartParams", {})),
                       "template": pod_template(values, release, "worker", frontend,
                                                values["workers"]["frontend"]["gpus"], ports, with_model=with_model)})
    return groups


def _cluster_spec(values: dict, head: dict, workers: list[dict]) -> dict:
    spec = {"rayVersion": values["rayVersion"], "headGroupSpec": head, "workerGroupSpecs": workers}
    if values["rayAuth"]["mode"] == "token":
        spec["authOptions"] = {"mode": "token"}
    return spec


# -- objects --------------------------------------------------------------------------------

def ray_service(values: dict, release: str) -> dict:
    name, serve = fullname(release), values["serve"]
    service = {"metadata": {"name": f"{name}-serve", "labels": labels(release, "serve")},
               "spec": {"type": serve["service"]["type"],
                        "ports": [{"name": "serve", "port": serve["httpPort"], "targetPort": serve["httpPort"]},
                                  {"name": "grpc", "port": serve["grpcPort"], "targetPort": serve["grpcPort"]}]}}
    if serve["service"].get("annotations"):
        service["metadata"]["annotations"] = serve["service"]["annotations"]
    workers = worker_groups(values, release, values["workers"]["nodes"], values["workers"]["gpusPerNode"])
    return {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": name, "labels": object_labels(release)},
            "spec": {"serveConfigV2": yaml.safe_dump(serve_config(values), sort_keys=False),
                     "serveService": service,
                     "rayClusterConfig": _cluster_spec(values, head_group(values, release), workers)}}


def benchmark_entrypoint(commands: list[str]) -> str:
    script = "; ".join(["set -e", f"mkdir -p {RESULTS_DIR}", *commands,
                        f'for f in {RESULTS_DIR}/*.json; do echo "== $f"; cat "$f"; echo; done'])
    return f"bash -c {shlex.quote(script)}"


def benchmark_job(values: dict, release: str) -> dict:
    bench = values["benchmark"]
    claim = bench.get("resultsClaim")
    results = ({"name": "results", "mountPath": RESULTS_DIR},
               {"name": "results", **({"persistentVolumeClaim": {"claimName": claim}} if claim else {"emptyDir": {}})})
    head = head_group(values, release, extra_mounts=(results,), with_model=False, component="benchmark")
    workers = worker_groups(values, release, bench["workers"]["nodes"], bench["workers"]["gpusPerNode"],
                            prefix="bench", with_model=False, component="benchmark")
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": f"{fullname(release)}-benchmark", "labels": object_labels(release, "benchmark")},
            "spec": {"entrypoint": benchmark_entrypoint(bench["commands"]),
                     "shutdownAfterJobFinishes": True,
                     "ttlSecondsAfterFinished": bench["ttlSecondsAfterFinished"],
                     "activeDeadlineSeconds": bench["activeDeadlineSeconds"],
                     "rayClusterSpec": _cluster_spec(values, head, workers)}}


def metrics_objects(values: dict, release: str) -> list[dict]:
    """A headless Service on the head pods (Serve HTTP port: raymoe's /metrics; Ray's
    metrics port) and a ServiceMonitor scraping both."""
    name, monitor = fullname(release), values["metrics"]["serviceMonitor"]
    selector = {"app.kubernetes.io/name": CHART_NAME, "app.kubernetes.io/instance": release,
                "app.kubernetes.io/component": "head"}
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": f"{name}-metrics", "labels": object_labels(release, "metrics")},
               "spec": {"clusterIP": "None", "selector": selector,
                        "ports": [{"name": "serve", "port": values["serve"]["httpPort"]},
                                  {"name": "ray-metrics", "port": RAY_METRICS_PORT}]}}
    endpoints = [{"port": port, "path": "/metrics", "interval": monitor["interval"]}
                 for port in ("serve", "ray-metrics")]
    service_monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
                       "metadata": {"name": name, "labels": {**object_labels(release, "metrics"),
                                                             **monitor.get("labels", {})}},
                       "spec": {"selector": {"matchLabels": {"app.kubernetes.io/instance": release,
                                                             "app.kubernetes.io/component": "metrics"}},
                                "endpoints": endpoints}}
    return [service, service_monitor]


def render_objects(values: dict, release: str) -> list[dict]:
    objects = [config_map(values, release), ray_service(values, release)]
    if values["metrics"]["serviceMonitor"]["enabled"]:
        objects += metrics_objects(values, release)
    if values["benchmark"]["enabled"]:
        objects.append(benchmark_job(values, release))
    return objects
