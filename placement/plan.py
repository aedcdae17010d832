"""The placement plan: which rank hosts which expert slot, per MoE layer.

Glossary (DESIGN.md): logical expert ``(l, e)``; physical expert = slot ``s``;
``phy2log[l, s]`` (slot -> logical expert), ``slot2rank[l, s]`` (slot -> rank),
``log2phy[l, e, i]`` (the i-th slot of expert e, padded with -1), ``logcnt[l, e]``
(replicas of e). Rank r lives on node ``r // (num_ranks // num_nodes)``.

Invariants checked by ``validate`` (the runtime sizes its weight buffers and builds its
dispatch tables from them, so a plan that breaks one is refused at load time):

* every logical expert of every layer has at least one slot;
* replicas of one logical expert are on distinct ranks;
* every rank has at least one slot, the same number in every layer, and slot counts
  of two ranks differ by at most one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml

from raymoe.placement.errors import PlanError

PLAN_VERSION = 1


class Layout(NamedTuple):
    """The two maps a policy produces."""
    phy2log: np.ndarray    # int64 [layers, num_slots]
    slot2rank: np.ndarray  # int64 [layers, num_slots]


@dataclass(frozen=True, eq=False)
class PlacementPlan:
    num_ranks: int
    num_nodes: int       # ranks are split evenly over nodes: rank r is on node r // (num_ranks // num_nodes)
    num_experts: int     # logical experts per MoE layer
    phy2log: np.ndarray  # int64 [layers, num_slots]   slot -> logical expert
    slot2rank: np.ndarray  # int64 [layers, num_slots]  slot -> rank
    policy: str
    params: dict         # policy parameters (plain YAML-able values)
    objectives: dict     # objective values it reached (plain floats)

    def __post_init__(self):
        for name in ("phy2log", "slot2rank"):
            arr = np.array(getattr(self, name), dtype=np.int64, copy=True)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        self.validate()

    # ------------------------------------------------------------------ derived maps
    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def ranks_per_node(self) -> int:
        return self.num_ranks // self.num_nodes

    @cached_property
    def logcnt(self) -> np.ndarray:
        """int64 [layers, num_experts]: replicas of each logical expert."""
        return np.stack([np.bincount(row, minlength=self.num_experts) for row in self.phy2log])

    @cached_property
    def log2phy(self) -> np.ndarray:
        """int64 [layers, num_experts, max_replicas]: slots of each expert, ascending, -1 padded."""
        out = np.full((self.num_layers, self.num_experts, int(self.logcnt.max())), -1, dtype=np.int64)
        for layer, row in enumerate(self.phy2log):
            order = np.argsort(row, kind="stable")            # slots grouped by expert, ascending
            starts = np.cumsum(self.logcnt[layer]) - self.logcnt[layer]
            replica = np.arange(self.num_slots) - np.repeat(starts, self.logcnt[layer])
            out[layer, row[order], replica] = order
        return out

    @cached_property
    def slots_per_rank(self) -> np.ndarray:
        """int64 [layers, num_ranks]."""
        return np.stack([np.bincount(row, minlength=self.num_ranks) for row in self.slot2rank])

    @cached_property
    def presence(self) -> np.ndarray:
        """float64 [layers, num_experts, num_ranks]: 1 where a replica of e sits on r."""
        out = np.zeros((self.num_layers, self.num_experts, self.num_ranks))
        layers = np.repeat(np.arange(self.num_layers), self.num_slots)
        out[layers, self.phy2log.ravel(), self.slot2rank.ravel()] = 1.0
        return out

    def rank_experts(self, layer: int, rank: int) -> np.ndarray:
        """int64 [slots on that rank]: logical ids hosted by ``rank`` at ``layer``, in slot order."""
        return self.phy2log[layer, self.slot2rank[layer] == rank]

    def node_of_rank(self, rank: int) -> int:
        return rank // self.ranks_per_node

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise PlanError (field, value, fix) unless every invariant of the module doc holds."""
        self._validate_header()
        p2l, s2r = self.phy2log, self.slot2rank
        if p2l.ndim != 2 or p2l.shape != s2r.shape or p2l.shape[0] == 0:
            raise PlanError("phy2log/slot2rank", f"{p2l.shape}/{s2r.shape}", "shapes differ or are not "
                            "[layers, num_slots]", "write one row of num_slots entries per MoE layer")
        # Before any array sized by a header field: a header far beyond the maps is refused here.
        for name, count, noun in (("num_ranks", self.num_ranks, "rank"), ("num_experts", self.num_experts, "expert")):
            if count > self.num_slots:
                raise PlanError(name, count, f"more than the {self.num_slots} slots per layer, so some {noun} "
                                "has no slot", "use fewer ranks or more (redundant) slots")
        _check_range("phy2log", p2l, self.num_experts, "num_experts")
        _check_range("slot2rank", s2r, self.num_ranks, "num_ranks")
        missing = np.argwhere(self.logcnt == 0)
        if len(missing):
            layer, expert = (int(v) for v in missing[0])
            raise PlanError(f"phy2log[{layer}]", f"expert {expert} absent", f"every logical expert needs a "
                            f"slot ({len(missing)} (layer, expert) pairs have none)", "give it a slot")
        pair = p2l * self.num_ranks + s2r
        for layer, row in enumerate(np.sort(pair, axis=1)):
            dup = np.flatnonzero(row[1:] == row[:-1])
            if len(dup):
                e, r = divmod(int(row[dup[0]]), self.num_ranks)
                raise PlanError(f"slot2rank[{layer}]", f"expert {e} twice on rank {r}",
                                "replicas of one expert must sit on distinct ranks", "move one replica")
        self._validate_slot_counts()

    def _validate_header(self) -> None:
        for name in ("num_ranks", "num_nodes", "num_experts"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise PlanError(name, value, "must be a positive integer", f"set {name} >= 1")
        if self.num_ranks % self.num_nodes:
            raise PlanError("num_nodes", self.num_nodes, f"does not divide num_ranks = {self.num_ranks}",
                            "use a divisor of num_ranks (ranks are split evenly over nodes)")
        if not isinstance(self.policy, str) or not self.policy:
            raise PlanError("policy", self.policy, "must be a non-empty string", "name the policy")
        for name in ("params", "objectives"):
            if not isinstance(getattr(self, name), dict):
                raise PlanError(name, type(getattr(self, name)).__name__, "must be a mapping", f"pass {name}={{}}")

    def _validate_slot_counts(self) -> None:
        spr = self.slots_per_rank
        empty = np.argwhere(spr == 0)
        if len(empty):
            layer, rank = (int(v) for v in empty[0])
            raise PlanError(f"slot2rank[{layer}]", f"rank {rank} has no slot", f"{self.num_slots} slots "
                            f"for {self.num_ranks} ranks", "use fewer ranks or more (redundant) slots")
        changed = np.flatnonzero((spr != spr[0]).any(axis=1))
        if len(changed):
            layer = int(changed[0])
            raise PlanError(f"slot2rank[{layer}]", spr[layer].tolist(), f"slot counts per rank differ from "
                            f"layer 0 ({spr[0].tolist()})", "keep the same slots per rank in every layer")
        if spr[0].max() - spr[0].min() > 1:
            raise PlanError("slot2rank[0]", spr[0].tolist(), "slot counts per rank differ by more than one",
                            "balance the slots over ranks")

    # ------------------------------------------------------------------ YAML
    def save(self, path) -> None:
        """Write the plan as YAML (``version: 1``); ``load`` reads it back."""
        doc = {
            "version": PLAN_VERSION, "policy": self.policy,
            "num_layers": self.num_layers, "num_experts": int(self.num_experts),
            "num_ranks": int(self.num_ranks), "num_nodes": int(self.num_nodes),
            "num_slots": self.num_slots,
            "params": _plain(self.params), "objectives": _plain(self.objectives),
            "phy2log": self.phy2log.tolist(), "slot2rank": self.slot2rank.tolist(),
        }
        text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=1 << 16)
        Path(path).write_text("# raymoe placement plan (placement/README.md)\n" + text)

    @classmethod
    def load(cls, path) -> "PlacementPlan":
        """Read and validate a plan written by ``save``; PlanError names the bad field."""
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError("file", str(path), f"cannot read YAML ({type(exc).__name__}: {exc})",
                            "pass a plan written by raymoe plan") from None
        return cls.loads(text, str(path))

    @classmethod
    def loads(cls, text: str, source: str = "<text>") -> "PlacementPlan":
        """A plan from the YAML text ``save`` writes (e.g. sent to a running server)."""
        try:
            doc = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as exc:
            raise PlanError("file", source, f"cannot read YAML ({type(exc).__name__}: {exc})",
                            "pass a plan written by raymoe plan") from None
        if not isinstance(doc, dict):
            raise PlanError("document", type(doc).__name__, "not a mapping", "pass a plan written by raymoe plan")
        if doc.get("version") != PLAN_VERSION:
            raise PlanError("version", doc.get("version"), f"unsupported (this reader knows {PLAN_VERSION})",
                            "regenerate the plan with this raymoe")
        for name in ("policy", "num_experts", "num_ranks", "num_nodes", "phy2log", "slot2rank"):
            if name not in doc:
                raise PlanError(name, None, "missing", f"add {name}")
        arrays = {name: _int_matrix(doc[name], name) for name in ("phy2log", "slot2rank")}
        plan = cls(num_ranks=doc["num_ranks"], num_nodes=doc["num_nodes"], num_experts=doc["num_experts"],
                   policy=doc["policy"], params=doc.get("params") or {},
                   objectives=doc.get("objectives") or {}, **arrays)
        for name in ("num_layers", "num_slots"):
            if name in doc and doc[name] != getattr(plan, name):
                raise PlanError(name, doc[name], f"disagrees with the maps ({getattr(plan, name)})",
                                "fix the header or the maps")
        return plan


def _check_range(name: str, arr: np.ndarray, bound: int, bound_name: str) -> None:
    bad = np.argwhere((arr < 0) | (arr >= bound))
    if len(bad):
        layer, slot = (int(v) for v in bad[0])
        raise PlanError(f"{name}[{layer}, {slot}]", int(arr[layer, slot]), f"out of range [0, {bound})",
                        f"use values below {bound_name} = {bound}")


def _int_matrix(value, name: str) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(row, list) for row in value):
        raise PlanError(name, type(value).__name__, "not a list of rows", "write one list per layer")
    lengths = sorted({len(row) for row in value})
    if len(lengths) != 1:
        raise PlanError(name, f"row lengths {lengths}", "ragged", "write num_slots entries in every row")
    if not all(isinstance(v, int) and not isinstance(v, bool) for row in value for v in row):
        raise PlanError(name, "non-integer entry", "entries must be integers", "write integer ids")
    try:
        return np.asarray(value, dtype=np.int64)
    except OverflowError:
        raise PlanError(name, "entry beyond int64", "ids must be small integers", "write ids below "
                        "num_experts (phy2log) or num_ranks (slot2rank)") from None


def _plain(value):
    """Convert numpy scalars/arrays and tuples into YAML-safe Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else str(float(value))
    if value is None or isinstance(value, str):
        return value
    raise PlanError("params/objectives", repr(value), "not a plain YAML value", "use numbers, strings, lists")
