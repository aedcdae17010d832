"""Redundant experts: DeepSeek EPLB's replication and packing, in numpy.

A faithful port of the public DeepSeek EPLB algorithm (MIT): the same four functions,
the same greedy choices and tie-breaking (lowest index first), so that a given
``weight`` yields the same ``phy2log`` (checked against the published worked example
in the tests). Two additions, both no-ops whenever the original already satisfies them:

* replicas of one logical expert never share a GPU (``balanced_packing`` skips packs
  that already hold the label; if none is left it swaps an item out, which always
  exists, see ``_place``);
* a logical expert never gets more replicas than there are GPUs to hold them
  (``max_replicas`` in ``replicate_experts``).

Shapes: ``X`` = rows (layers, or layers x nodes), ``n`` = items per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raymoe.placement.errors import ConfigError


@dataclass(frozen=True, eq=False)
class Packing:
    pack_index: np.ndarray    # int64 [X, n]  pack of each item
    rank_in_pack: np.ndarray  # int64 [X, n]  position of the item inside its pack


@dataclass(frozen=True, eq=False)
class Replication:
    phy2log: np.ndarray  # int64 [X, num_phy]  logical expert of each physical slot
    phyrank: np.ndarray  # int64 [X, num_phy]  replica index of each slot (0 = first copy)
    logcnt: np.ndarray   # int64 [X, num_log]  number of replicas of each logical expert


@dataclass(frozen=True, eq=False)
class EplbResult:
    phy2log: np.ndarray  # int64 [layers, num_replicas]
    log2phy: np.ndarray  # int64 [layers, num_logical, max_replicas], padded with -1
    logcnt: np.ndarray   # int64 [layers, num_logical]
    phyrank: np.ndarray  # int64 [layers, num_replicas]


def balanced_packing(weight: np.ndarray, num_packs: int, labels: np.ndarray | None = None,
                     capacity: np.ndarray | None = None) -> Packing:
    """Pack n weighted items into ``num_packs`` packs of exactly n / num_packs items
    (or ``capacity[p]`` items), heaviest item first into the lightest pack with room.

    weight: [X, n] item weights; labels: [X, n] optional label per item (the logical
    expert of a replica), two items with the same label never share a pack;
    capacity: [num_packs] items per pack, summing to n (default: n / num_packs each).
    Returns pack_index, rank_in_pack: [X, n].
    """
    num_rows, num_items = weight.shape
    if capacity is None:
        assert num_items % num_packs == 0, (num_items, num_packs)
        capacity = np.full(num_packs, num_items // num_packs)
    assert int(np.sum(capacity)) == num_items, (capacity, num_items)
    caps = [int(c) for c in capacity]
    if max(caps) == 1:
        pack_index = np.broadcast_to(np.arange(num_items), (num_rows, num_items)).copy()
        return Packing(pack_index, np.zeros_like(pack_index))
    pack_index = np.full((num_rows, num_items), -1, dtype=np.int64)
    rank_in_pack = np.full((num_rows, num_items), -1, dtype=np.int64)
    for row in range(num_rows):
        row_labels = labels[row] if labels is not None else np.arange(num_items)
        contents: list[list[int]] = [[] for _ in range(num_packs)]
        pack_weights = [0.0] * num_packs
        for item in np.argsort(-weight[row], kind="stable"):
            _place(int(item), weight[row], row_labels, contents, pack_weights, caps)
        for pack, items in enumerate(contents):
            pack_index[row, items] = pack
            rank_in_pack[row, items] = np.arange(len(items))
    return Packing(pack_index, rank_in_pack)


def _place(item: int, weight: np.ndarray, labels: np.ndarray, contents: list[list[int]],
           pack_weights: list[float], caps: list[int]) -> None:
    """Put ``item`` into the lightest pack with room and without its label.

    When every pack with room already holds the label, take a full pack ``q`` without
    the label and move one of its items (whose label the open pack lacks) to the open
    pack. With equal capacities such a swap always exists: fewer packs hold the label
    than it has replicas, replicas <= packs, and the open pack holds fewer distinct
    labels than ``q``.
    """
    label = labels[item]
    has_label = [any(labels[i] == label for i in items) for items in contents]
    open_packs = [p for p in range(len(contents)) if len(contents[p]) < caps[p]]
    free = [p for p in open_packs if not has_label[p]]
    if free:
        pack = min(free, key=pack_weights.__getitem__)
    else:
        opened = min(open_packs, key=pack_weights.__getitem__)
        opened_labels = {labels[i] for i in contents[opened]}
        found = next(((q, y) for q in range(len(contents)) if not has_label[q]
                      for y in contents[q] if labels[y] not in opened_labels), None)
        if found is None:
            raise ConfigError("logcnt", int(sum(labels == label)), f"cannot put the replicas of expert "
                              f"{label} on distinct ranks with capacities {caps}", "use fewer redundant slots")
        pack, moved = found
        contents[pack].remove(moved)
        contents[opened].append(moved)
        pack_weights[pack] -= weight[moved]
        pack_weights[opened] += weight[moved]
    contents[pack].append(item)
    pack_weights[pack] += weight[item]


def replicate_experts(weight: np.ndarray, num_phy: int,
                      max_replicas: int | None = None) -> Replication:
    """Replicate logical experts into ``num_phy`` slots, each new slot going to the
    expert with the largest load per replica (ties: lowest id).

    weight: [X, num_log]; ``max_replicas`` caps the copies of one expert (the number
    of GPUs that could hold them). Returns phy2log, phyrank [X, num_phy], logcnt
    [X, num_log]. Slots [0, num_log) are the first copies, in expert order.
    """
    num_rows, num_log = weight.shape
    assert num_phy >= num_log, (num_phy, num_log)
    phy2log = np.broadcast_to(np.arange(num_phy) % num_log, (num_rows, num_phy)).copy()
    phyrank = np.zeros((num_rows, num_phy), dtype=np.int64)
    logcnt = np.ones((num_rows, num_log), dtype=np.int64)
    rows = np.arange(num_rows)
    for slot in range(num_log, num_phy):
        per_replica = weight / logcnt
        if max_replicas is not None:
            per_replica = np.where(logcnt >= max_replicas, -np.inf, per_replica)
        hottest = np.argmax(per_replica, axis=-1)
        phy2log[:, slot] = hottest
        phyrank[:, slot] = logcnt[rows, hottest]
        logcnt[rows, hottest] += 1
    return Replication(phy2log, phyrank, logcnt)


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a permutation. perm: [X, n] -> [X, n]."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(weight: np.ndarray, num_physical_experts: int,
                                   num_groups: int, num_nodes: int, num_gpus: int) -> Replication:
    """EPLB's hierarchical policy: expert groups to nodes, replicas within nodes,
    replicas to GPUs.

    weight: [layers, num_logical]. Returns phy2log, phyrank [layers, num_physical] with
    slot s on GPU s // (num_physical / num_gpus), and logcnt [layers, num_logical].
    """
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical_experts // num_gpus
    log_per_node = num_logical // num_nodes

    # Step 1: pack groups to nodes (mlog = logical id renumbered node-major)
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    groups = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((groups.pack_index * groups_per_node + groups.rank_in_pack) * group_size)[..., None]
                + np.arange(group_size)).reshape(num_layers, num_logical)
    mlog2log = _inverse(log2mlog)

    # Step 2: construct redundant experts within nodes
    # [num_layers * num_nodes, num_logical // num_nodes]
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, -1).reshape(-1, log_per_node)
    rep = replicate_experts(tokens_per_mlog, num_physical_experts // num_nodes,
                            max_replicas=num_gpus // num_nodes)

    # Step 3: pack physical experts to GPUs, replicas of one expert on distinct GPUs
    # [num_layers * num_nodes, num_physical // num_nodes]
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / rep.logcnt, rep.phy2log, -1)
    packs = balanced_packing(tokens_per_phy, num_gpus // num_nodes, labels=rep.phy2log)
    phy2pphy = packs.pack_index * phy_per_gpu + packs.rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = np.take_along_axis(rep.phy2log, pphy2phy, -1)
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1)
                 + np.arange(0, num_logical, log_per_node)[None, :, None]).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    pphyrank = np.take_along_axis(rep.phyrank, pphy2phy, -1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(rep.logcnt.reshape(num_layers, -1), log2mlog, -1)
    return Replication(pphy2log, pphyrank, logcnt)


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int | None,
                      num_nodes: int, num_gpus: int) -> EplbResult:
    """Entry point of EPLB: the hierarchical policy when ``num_groups % num_nodes == 0``,
    else (or when ``num_groups`` is None) the single-level one.

    weight: [layers, num_logical] load statistics. Returns phy2log [layers,
    num_replicas], log2phy [layers, num_logical, max_replicas] (-1 padded), logcnt
    [layers, num_logical].
    """
    weight = np.asarray(weight, dtype=np.float64)
    num_layers, num_logical = weight.shape
    _check_eplb_shape(num_logical, num_replicas, num_groups, num_nodes, num_gpus)
    if num_groups is not None and num_groups % num_nodes == 0:
        rep = rebalance_experts_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        rep = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_cnt = int(rep.logcnt.max())
    log2phy = np.full((num_layers, num_logical * max_cnt), -1, dtype=np.int64)
    np.put_along_axis(log2phy, rep.phy2log * max_cnt + rep.phyrank,
                      np.broadcast_to(np.arange(num_replicas), (num_layers, num_replicas)), axis=1)
    return EplbResult(rep.phy2log, log2phy.reshape(num_layers, num_logical, max_cnt),
                      rep.logcnt, rep.phyrank)


def _check_eplb_shape(num_logical: int, num_replicas: int, num_groups: int | None,
                      num_nodes: int, num_gpus: int) -> None:
    """Raise ConfigError when EPLB's divisibility requirements do not hold."""
    if num_replicas < num_logical:
        raise ConfigError("num_replicas", num_replicas, f"fewer slots than {num_logical} logical experts",
                          "use num_redundant >= 0")
    if num_replicas % num_gpus:
        raise ConfigError("num_replicas", num_replicas, f"not divisible by {num_gpus} ranks (EPLB packs "
                          "equal slot counts)", f"choose num_redundant so that experts + redundant is a "
                          f"multiple of {num_gpus}, e.g. {-num_logical % num_gpus}")
    if num_replicas > num_logical * num_gpus:
        raise ConfigError("num_replicas", num_replicas, f"more than {num_logical} experts x {num_gpus} "
                          "ranks: some replicas would share a rank", "use fewer redundant slots")
    if num_gpus % num_nodes:
        raise ConfigError("num_nodes", num_nodes, f"does not divide {num_gpus} ranks", "use a divisor")
    if num_groups is not None and num_groups % num_nodes == 0:
        if num_logical % num_groups:
            raise ConfigError("num_groups", num_groups, f"does not divide {num_logical} experts",
                              "use a divisor of the expert count")
        if (num_replicas // num_nodes) % (num_gpus // num_nodes):
            raise ConfigError("num_replicas", num_replicas, "per-node slots not divisible by GPUs per node",
                              "choose num_redundant so that slots per node divide evenly")


def refine_balance(weight: np.ndarray, phy2log: np.ndarray, slot2rank: np.ndarray,
                   ranks_per_domain: int | None = None, max_iter: int = 10000) -> np.ndarray:
    """Lower each layer's heaviest rank by swapping slot contents with another rank.

    Not part of DeepSeek's EPLB (``eplb`` with ``refine=True``). weight: [layers,
    num_logical]; phy2log, slot2rank: [layers, num_slots]. A swap exchanges the
    logical experts of two slots on different ranks (``slot2rank`` is untouched), only
    within a domain of ``ranks_per_domain`` consecutive ranks (a node, for the
    hierarchical policy), never putting two replicas on one rank, and only when the
    larger of the two new loads is below the current maximum. Returns the new phy2log.
    """
    phy2log = phy2log.copy()
    num_ranks = int(slot2rank.max()) + 1
    domain = slot2rank // (ranks_per_domain or num_ranks)
    for layer in range(phy2log.shape[0]):
        cnt = np.bincount(phy2log[layer], minlength=weight.shape[1])
        for _ in range(max_iter):
            if not _refine_step(weight[layer] / np.maximum(cnt, 1), phy2log[layer], slot2rank[layer],
                                domain[layer], num_ranks):
                break
    return phy2log


def _refine_step(share: np.ndarray, row: np.ndarray, ranks: np.ndarray, domain: np.ndarray,
                 num_ranks: int) -> bool:
    """One best swap out of the heaviest rank, applied to ``row`` in place.
    share: [num_logical] load per replica; row, ranks, domain: [num_slots]."""
    w = share[row]
    load = np.bincount(ranks, weights=w, minlength=num_ranks)
    hot = int(np.argmax(load))
    a = np.flatnonzero(ranks == hot)
    b = np.flatnonzero((ranks != hot) & (domain == domain[a[0]]))
    if len(b) == 0:
        return False
    new_hot = load[hot] - w[a][:, None] + w[b][None, :]
    new_other = load[ranks[b]][None, :] - w[b][None, :] + w[a][:, None]
    worst = np.maximum(new_hot, new_other)
    hosted = np.zeros((num_ranks, len(share)), dtype=bool)
    hosted[ranks, row] = True
    clash = hosted[ranks[b]][:, row[a]].T | hosted[hot][row[b]][None, :]
    worst[clash | (row[a][:, None] == row[b][None, :])] = np.inf
    best = int(np.argmin(worst))
    if not worst.flat[best] < load[hot] * (1 - 1e-12):
        return False
    i, j = divmod(best, len(b))
    row[a[i]], row[b[j]] = row[b[j]], row[a[i]]
    return True
