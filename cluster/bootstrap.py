"""Ray bootstrap: embedded ``ray.init()`` by default, or join an existing cluster; the
placement group that keeps a deployment's actors together."""

from __future__ import annotations

import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from raymoe.cluster.config import DeploymentConfigError, RayConfig
from raymoe.cluster.multinode import describe_missing

EPSILON = 1e-6  # Ray counts resources in units of 1e-4: 3 x 0.1 CPU fits in 0.3
FIELDS = {"CPU": "resources.cpus_per_actor", "GPU": "resources.gpus_per_actor"}  # bundle key -> config field


class ClusterError(RuntimeError):
    """The Ray cluster cannot host the deployment (too few CPUs/GPUs, unreachable)."""


class ClusterCapacityError(DeploymentConfigError, ClusterError):
    """The deployment asks for more CPUs or GPUs than the Ray cluster has at all (not
    merely free now): its placement group could never be reserved. Raised before the
    placement group is created.

    Attributes: ``field`` (the config field to change), ``value`` (its value per actor),
    ``fix``, and ``resource`` ("CPU" or "GPU"), ``actors`` (how many), ``needed``
    (what the check needs: one actor's share, or all actors'), ``available`` (what the
    cluster, or its largest node, has) and ``nodes`` (alive nodes' CPUs and GPUs).
    """

    def __init__(self, resource: str, per_actor: float, actors: int, needed: float, available: float,
                 nodes: list[dict], fix: str):
        self.resource, self.actors, self.needed, self.available, self.nodes = (
            resource, actors, needed, available, nodes)
        super().__init__(FIELDS[resource], int(per_actor) if float(per_actor).is_integer() else per_actor, fix)

    def __reduce__(self):  # picklable: Ray carries it out of a Serve replica
        return type(self), (self.resource, self.value, self.actors, self.needed, self.available, self.nodes,
                            self.fix)


def connect(config: RayConfig) -> None:
    """Start embedded Ray, or join ``config.address`` / ``RAY_ADDRESS``. No-op if connected."""
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=config.namespace, log_to_driver=False)
    else:
        ray.init(namespace=config.namespace, include_dashboard=False, log_to_driver=False)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def _plural(count: float, unit: str) -> str:
    return f"{count:g} {unit}" + ("" if count == 1 else "s")


def _describe_nodes(nodes: list[dict]) -> str:
    shown = "; ".join(f"{_plural(n.get('CPU', 0), 'CPU')}, {_plural(n.get('GPU', 0), 'GPU')}" for n in nodes[:4])
    return f"{len(nodes)} node{'' if len(nodes) == 1 else 's'}: {shown}" + ("; ..." if len(nodes) > 4 else "")


def check_capacity(bundles: list[dict], strategy: str, total: dict, nodes: list[dict], actors: str = "") -> None:
    """Refuse, before any placement group exists, bundles the cluster could never hold.

    bundles: one ``{"CPU": c, "GPU": g}`` per actor; total: ``ray.cluster_resources()``;
    nodes: ``ray.nodes()`` entries (``Alive``, ``Resources``); actors: what the bundles
    are, for the message. Per resource: one bundle fits on some node; all of them fit in
    the cluster; with STRICT_PACK, all fit on one node. Resources the cluster has but
    others hold now are not refused here: ``create_placement_group`` waits for them.
    (An autoscaling cluster is judged by the nodes it has now.)
    """
    alive = [{k: float(v) for k, v in (n.get("Resources") or {}).items() if k in FIELDS}
             for n in nodes if n.get("Alive")]
    count = len(bundles)
    who = f"{count} actors" + (f" ({actors})" if actors else "")
    for resource, field in FIELDS.items():
        per_actor = max((float(b.get(resource, 0)) for b in bundles), default=0.0)
        if per_actor <= 0:
            continue
        need = per_actor * count
        have = float(total.get(resource, 0))
        largest = max((n.get(resource, 0.0) for n in alive), default=0.0)
        asks = (f"the deployment asks for {_plural(per_actor, resource)} per actor x {who} = "
                f"{_plural(need, resource)} in all")
        cluster = f"the Ray cluster has {_plural(have, resource)} ({_describe_nodes(alive)})"
        if largest < per_actor - EPSILON:
            if resource == "GPU":
                lower = f"set {field}: auto or 0 (this cluster has no GPU)" if largest == 0 else \
                    f"set {field}: auto (a share of the GPUs there are) or at most {largest:g}"
            else:
                lower = f"lower {field} to at most {largest:g}"
            raise ClusterCapacityError(resource, per_actor, count, per_actor, largest, alive,
                                       f"{asks}, and no node has {_plural(per_actor, resource)}: {cluster}. Fix: "
                                       f"{lower}, or add nodes with {_plural(per_actor, resource)} or more")
        if have < need - EPSILON or (strategy == "STRICT_PACK" and largest < need - EPSILON):
            room, where = (have, "the cluster has") if have < need - EPSILON else \
                (largest, "one node has (ray.strategy: STRICT_PACK)")
            raise ClusterCapacityError(resource, per_actor, count, need, room, alive,
                                       f"{asks}, more than {where}: {cluster}. Fix: lower {field} to at most "
                                       f"{room / count:.3g} ({_plural(room, resource)} / {count} actors), use "
                                       f"fewer expert_ranks, or add {'GPU ' if resource == 'GPU' else ''}nodes")


def create_placement_group(bundles: list[dict], strategy: str, timeout_s: float = 60.0,
                           label_selectors: list[dict] | None = None, actors: str = ""):
    """One bundle per actor (``label_selectors``: the node labels each bundle needs, see
    ``cluster/multinode.py``); refuses at once what the cluster could never hold
    (``check_capacity``), else waits until the cluster has reserved them all."""
    check_capacity(bundles, strategy, ray.cluster_resources(), ray.nodes(), actors)
    pg = placement_group(bundles, strategy=strategy, bundle_label_selector=label_selectors)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        need = {k: sum(b.get(k, 0) for b in bundles) for k in FIELDS}
        free = {k: v for k, v in ray.available_resources().items() if k in FIELDS}
        raise ClusterError(
            f"the cluster could not reserve {len(bundles)} bundles ({need}) with strategy {strategy} "
            f"in {timeout_s:.0f}s; free now: {free} (the cluster has them, other work holds them). Wait for it to "
            f"finish, lower resources.cpus_per_actor / resources.gpus_per_actor, use fewer expert_ranks, or add "
            f"nodes.{describe_missing(label_selectors, ray.nodes())}"
        ) from None
    return pg
