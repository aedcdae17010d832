"""Node pinning: a placement plan's node n is the Ray node labelled ``<node_label>=n``.

A hierarchical plan (``placement/``, ``num_nodes > 1``) puts expert rank r on node
``r // (num_ranks // num_nodes)``: experts that exchange many tokens share a node. The
runtime honours that when the deployment config names a node label
(``ray.node_label: raymoe.io/node``): every Ray node of plan node n is started with that
label (``ray start --labels raymoe.io/node=n``; KubeRay: a worker group per plan node
with ``labels: {raymoe.io/node: "n"}``), and expert rank r's placement-group bundle gets
the label selector ``{node_label: str(node_of_rank(r))}`` (Ray's
``bundle_label_selector``). The disaggregated front-end has no node in the plan; its
bundle has no selector and goes where the placement-group strategy puts it.

Without ``ray.node_label`` nothing is pinned and ranks spread over nodes by
``ray.strategy`` alone.
"""

from __future__ import annotations

from raymoe.cluster.config import DeploymentConfig, DeploymentConfigError

Selector = dict[str, str]


def rank_nodes(plan) -> list[int]:
    """The plan node of each expert rank (rank r -> r // ranks_per_node)."""
    return [plan.node_of_rank(r) for r in range(plan.num_ranks)]


def bundle_label_selectors(plan, layout: str, node_label: str | None) -> list[Selector] | None:
    """One label selector per placement-group bundle, in bundle order (disaggregated:
    front-end first, then expert ranks 0..R-1; coherent: ranks 0..R-1), or None when
    ``node_label`` is None (no pinning)."""
    if node_label is None:
        return None
    ranks = [{node_label: str(node)} for node in rank_nodes(plan)]
    return ([{}] + ranks) if layout == "disaggregated" else ranks


def check_pinning(config: DeploymentConfig, plan) -> None:
    """Refuse a strategy that cannot hold the plan's nodes, before asking Ray."""
    if config.ray.node_label is None or plan.num_nodes == 1:
        return
    if config.ray.strategy == "STRICT_PACK":
        raise DeploymentConfigError(
            "ray.strategy", "STRICT_PACK", f"the plan puts expert ranks on {plan.num_nodes} nodes and "
            f"ray.node_label pins them there, but STRICT_PACK keeps every actor on one node; use PACK or SPREAD")
    if config.ray.strategy == "STRICT_SPREAD" and plan.ranks_per_node > 1:
        raise DeploymentConfigError(
            "ray.strategy", "STRICT_SPREAD", f"the plan puts {plan.ranks_per_node} expert ranks on each node, but "
            f"STRICT_SPREAD allows one actor per node; use PACK or SPREAD")


def missing_node_labels(selectors: list[Selector] | None, nodes: list[dict]) -> list[Selector]:
    """The selectors that no alive node satisfies. ``nodes``: ``ray.nodes()`` entries
    (``Alive``, ``Labels``)."""
    labels = [n.get("Labels") or {} for n in nodes if n.get("Alive")]
    missing = []
    for selector in selectors or []:
        if selector and selector not in missing and \
                not any(all(have.get(k) == v for k, v in selector.items()) for have in labels):
            missing.append(selector)
    return missing


def describe_missing(selectors: list[Selector] | None, nodes: list[dict]) -> str:
    """A sentence for the placement-group timeout error ('' when every label exists)."""
    missing = missing_node_labels(selectors, nodes)
    if not missing:
        return ""
    wanted = ", ".join(f"{k}={v}" for s in missing for k, v in s.items())
    key = next(iter(missing[0]))
    have = sorted({n["Labels"][key] for n in nodes if n.get("Alive") and key in (n.get("Labels") or {})})
    return (f" No alive node has the label {wanted} (nodes labelled {key}: {have or 'none'}); start the "
            f"nodes of plan node n with `ray start --labels {key}=n`, or set ray.node_label: null.")
