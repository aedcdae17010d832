"""Ray bootstrap: embedded ``ray.init()`` by default, or join an existing cluster; the
placement group that keeps a deployment's actors together."""

from __future__ import annotations

import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from cluster.config import RayConfig
from cluster.multinode import describe_missing


class ClusterError(RuntimeError):
    """The Ray cluster cannot host the deployment (too few CPUs/GPUs, unreachable)."""


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


def create_placement_group(bundles: list[dict], strategy: str, timeout_s: float = 60.0,
                           label_selectors: list[dict] | None = None):
    """One bundle per actor (``label_selectors``: the node labels each bundle needs, see
    ``cluster/multinode.py``); waits until the cluster has reserved them all."""
    pg = placement_group(bundles, strategy=strategy, bundle_label_selector=label_selectors)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        need = {k: sum(b.get(k, 0) for b in bundles) for k in ("CPU", "GPU")}
        raise ClusterError(
            f"the cluster could not reserve {len(bundles)} bundles ({need}) with strategy {strategy} "
            f"in {timeout_s:.0f}s; available: {ray.available_resources()}. Lower resources.cpus_per_actor, "
            f"use fewer expert_ranks, or add nodes.{describe_missing(label_selectors, ray.nodes())}"
        ) from None
    return pg
