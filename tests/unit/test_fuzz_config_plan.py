"""Deployment configs and placement plans, fuzzed: random mutations of a valid file (wrong
types, unknown fields, out-of-range and huge values, NaN, deleted fields) and garbage
bytes (invalid UTF-8, deep nesting, broken YAML) give either a valid object or the typed
error (``DeploymentConfigError``, ``PlanError``), never another exception.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raymoe.cluster.config import (
    _SECTIONS,
    DeploymentConfig,
    DeploymentConfigError,
    load_config,
    parse_config,
)
from raymoe.placement.errors import PlanError
from raymoe.placement.build import build_plan
from raymoe.placement.plan import PlacementPlan

FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))

BASE_CONFIG = {"model": "models/tiny", "dtype": "float32", "layout": "disaggregated", "expert_ranks": 2,
               "placement": {"policy": "linear"}, "batching": {"max_seqs": 4, "max_seq_len": 128, "max_queue": 8},
               "ray": {"strategy": "PACK", "namespace": "raymoe"},
               "resources": {"cpus_per_actor": 0.25, "gpus_per_actor": "auto", "threads_per_actor": 1},
               "backend": "auto", "collective_timeout_s": 60}

# -- values YAML can hold -------------------------------------------------------------------
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, 1e308]),
                    TEXT, st.sampled_from(["auto", "float32", "coherent", "SPREAD", "gloo", "linear", "", "ray.io/x"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.one_of(TEXT, st.integers()), inner,
                                                                       max_size=3)), max_leaves=6)


def _field_paths() -> list[tuple[str, ...]]:
    """Every config field, as (field,) or (section, field)."""
    paths = []
    for f in dataclasses.fields(DeploymentConfig):
        paths.append((f.name,))
        if f.name in _SECTIONS:
            paths += [(f.name, g.name) for g in dataclasses.fields(_SECTIONS[f.name])]
    return paths + [("no_such_field",), ("batching", "no_such_field")]


PATHS = _field_paths()


@st.composite
def mutated_configs(draw) -> dict:
    """BASE_CONFIG with 1-3 fields set to random values or deleted."""
    doc = yaml.safe_load(yaml.safe_dump(BASE_CONFIG))  # a deep copy
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = doc
        if len(path) == 2:
            if not isinstance(doc.get(path[0]), dict):
                doc[path[0]] = {}
            parent = doc[path[0]]
        if draw(st.integers(0, 5)) == 0:
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(VALUES)
    return doc


def _load_config_bytes(tmp_path_factory, data: bytes):
    path = tmp_path_factory.mktemp("cfg") / "deployment.yaml"
    path.write_bytes(data)
    return load_config(path)


def _config_or_typed_error(load) -> DeploymentConfig | DeploymentConfigError:
    try:
        config = load()
    except DeploymentConfigError as exc:
        assert isinstance(exc.field, str) and str(exc), exc
        return exc
    assert isinstance(config, DeploymentConfig)
    assert config.replace() == config  # a loaded config passes validation again
    return config


@FUZZ
@given(doc=mutated_configs())
def test_mutated_config_is_valid_or_a_typed_error(tmp_path_factory, doc):
    _config_or_typed_error(lambda: _load_config_bytes(tmp_path_factory, yaml.safe_dump(doc).encode()))


@FUZZ
@given(data=VALUES)
def test_any_parsed_value_is_a_config_or_a_typed_error(data):
    _config_or_typed_error(lambda: parse_config(data, "fuzz"))


def _splice(text: bytes, at: int, cut: int, junk: bytes) -> bytes:
    at = at % (len(text) + 1)
    return text[:at] + junk + text[at + cut:]


GARBAGE = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"\xff\xfe\x00", b"model: m\nexpert_ranks: \xff\n", b"- " * 600 + b"x", b"{a: " * 3000,
                     b"model: !!python/object/apply:os.system ['true']\n", b"\x00", b"---\n---\n", b"*x",
                     b"a: &a [*a]\n", b"model: m\nmodel: m2\n"]),
)


@FUZZ
@given(junk=GARBAGE, at=st.integers(0, 10**4), cut=st.integers(0, 40), whole=st.booleans())
def test_garbage_config_bytes_are_a_typed_error(tmp_path_factory, junk, at, cut, whole):
    text = yaml.safe_dump(BASE_CONFIG).encode()
    data = junk if whole else _splice(text, at, cut, junk)
    _config_or_typed_error(lambda: _load_config_bytes(tmp_path_factory, data))


@pytest.mark.parametrize("data,needle", [
    (b"model: m\nexpert_ranks: \xff\n", "not valid YAML"),  # was UnicodeDecodeError
    (b"- " * 600 + b"x", "nested too deeply"),  # was RecursionError
    (b"model: m\nexpert_ranks: .nan\n", "expert_ranks"),
    (b"model: m\nbatching: {max_seqs: 99999999999999999999999}\n", "batching.max_seqs"),
])
def test_named_bad_config_files_are_typed_errors(tmp_path_factory, data, needle):
    result = _config_or_typed_error(lambda: _load_config_bytes(tmp_path_factory, data))
    assert isinstance(result, DeploymentConfigError) and needle in str(result), result


# -- plans ----------------------------------------------------------------------------------
BASE_PLAN = build_plan("eplb", num_layers=2, num_experts=4, num_ranks=2, num_redundant=2,
                       loads=np.array([[9.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 9.0]]))
PLAN_FIELDS = ["version", "policy", "num_layers", "num_experts", "num_ranks", "num_nodes", "num_slots", "params",
               "objectives", "phy2log", "slot2rank", "no_such_field"]


def _plan_doc(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    BASE_PLAN.save(path)
    return yaml.safe_load(path.read_text())


@st.composite
def plan_mutations(draw):
    """(field, how, value): set a header field or a whole map, set one map entry, drop or
    duplicate a row, or delete the field."""
    field = draw(st.sampled_from(PLAN_FIELDS))
    how = draw(st.sampled_from(["set", "entry", "drop_row", "grow_row", "delete"]))
    value = draw(st.one_of(VALUES, st.integers(-2, 6)))
    return field, how, value, draw(st.integers(0, 100)), draw(st.integers(0, 100))


def _mutate(doc: dict, field: str, how: str, value, i: int, j: int) -> None:
    if how == "delete":
        doc.pop(field, None)
    elif how in ("entry", "drop_row", "grow_row") and isinstance(doc.get(field), list) and doc[field]:
        rows = doc[field]
        row = rows[i % len(rows)]
        if how == "drop_row":
            rows.pop(i % len(rows))
        elif how == "grow_row" and isinstance(row, list):
            row.append(value)
        elif isinstance(row, list) and row:
            row[j % len(row)] = value
    else:
        doc[field] = value


def _plan_or_typed_error(path) -> PlacementPlan | PlanError:
    try:
        plan = PlacementPlan.load(path)
    except PlanError as exc:
        assert exc.field and "Fix:" in str(exc), exc
        return exc
    assert (plan.logcnt >= 1).all() and plan.slots_per_rank.min() >= 1  # a loaded plan keeps its invariants
    return plan


@FUZZ
@given(mutations=st.lists(plan_mutations(), min_size=1, max_size=3))
def test_mutated_plan_is_valid_or_a_typed_error(tmp_path_factory, mutations):
    doc = _plan_doc(tmp_path_factory)
    for mutation in mutations:
        _mutate(doc, *mutation)
    path = tmp_path_factory.mktemp("plan") / "mutated.yaml"
    path.write_text(yaml.safe_dump(doc))
    _plan_or_typed_error(path)


@FUZZ
@given(junk=GARBAGE, at=st.integers(0, 10**4), cut=st.integers(0, 40), whole=st.booleans())
def test_garbage_plan_bytes_are_a_typed_error(tmp_path_factory, junk, at, cut, whole):
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    BASE_PLAN.save(path)
    path.write_bytes(junk if whole else _splice(path.read_bytes(), at, cut, junk))
    _plan_or_typed_error(path)


@pytest.mark.parametrize("change,field", [
    (b"version: 1\n\xff", "file"),  # was UnicodeDecodeError
    (b"[" * 1100, "file"),  # was RecursionError
    ({"phy2log": [[2**70] * 6] * 2}, "phy2log"),  # was OverflowError
    ({"num_ranks": 2**70}, "num_ranks"),  # was OverflowError
    ({"num_experts": 10**12}, "num_experts"),  # was an attempt to allocate [layers, 10**12] counts
])
def test_named_bad_plans_are_typed_errors(tmp_path_factory, change, field):
    data = change if isinstance(change, bytes) else yaml.safe_dump({**_plan_doc(tmp_path_factory), **change}).encode()
    path = tmp_path_factory.mktemp("plan") / "bad.yaml"
    path.write_bytes(data)
    result = _plan_or_typed_error(path)
    assert isinstance(result, PlanError) and result.field == field, result
