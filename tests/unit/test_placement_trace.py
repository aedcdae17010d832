"""Trace and statistics input: formats, validation errors, statistics against loops."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raymoe.placement.errors import TraceError
from raymoe.placement.trace import RoutingStats, load_stats, load_trace, trace_from_array


def write_raymoe_trace(path, ids: np.ndarray, num_experts: int, seq_ids=None) -> None:
    """A trace file as docs/formats.md describes it."""
    tokens, layers, top_k = ids.shape
    np.savez_compressed(path, topk_ids=ids.astype(np.int32), topk_weights=np.full(ids.shape, 1 / top_k, np.float32),
                        seq_ids=np.arange(tokens) % 3 if seq_ids is None else seq_ids,
                        positions=np.arange(tokens) // 3, is_prompt=np.arange(tokens) < 2,
                        moe_layers=np.arange(layers, dtype=np.int32) * 2 + 1, num_experts=np.int64(num_experts),
                        version=np.int64(1))


def naive_stats(ids: np.ndarray, num_experts: int):
    tokens, layers, top_k = ids.shape
    loads = np.zeros((layers, num_experts))
    trans = np.zeros((layers - 1, num_experts, num_experts))
    coact = np.zeros((layers, num_experts, num_experts))
    for t in range(tokens):
        for l in range(layers):
            for a in ids[t, l]:
                loads[l, a] += 1
                for b in ids[t, l]:
                    if a != b:
                        coact[l, a, b] += 1
                if l + 1 < layers:
                    for b in ids[t, l + 1]:
                        trans[l, a, b] += 1
    return loads, trans, coact


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 30), st.integers(1, 4), st.integers(2, 7), st.integers(1, 3))
def test_stats_match_loops(seed, tokens, layers, num_experts, top_k):
    top_k = min(top_k, num_experts)
    rng = np.random.default_rng(seed)
    ids = np.stack([[rng.choice(num_experts, top_k, replace=False) for _ in range(layers)] for _ in range(tokens)])
    stats = trace_from_array(ids, num_experts).stats()
    loads, trans, coact = naive_stats(ids, num_experts)
    np.testing.assert_array_equal(stats.loads, loads)
    np.testing.assert_array_equal(stats.transitions, trans)
    if top_k > 1:
        np.testing.assert_array_equal(stats.coactivation, coact)
    else:
        assert stats.coactivation is None


def test_reads_raymoe_npz_and_exflow_npy(tmp_path):
    ids = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[3, 0], [1, 2]], [[2, 1], [0, 3]]])
    write_raymoe_trace(tmp_path / "t.npz", ids, 6)
    trace = load_trace(tmp_path / "t.npz")
    assert trace.num_experts == 6 and trace.top_k == 2 and trace.num_layers == 2
    np.testing.assert_array_equal(trace.topk_ids, ids)
    assert trace.is_prompt.tolist() == [True, True, False, False]
    np.save(tmp_path / "exflow.npy", ids[:, :, 0])
    exflow = load_trace(tmp_path / "exflow.npy", num_experts=4)
    assert exflow.top_k == 1 and exflow.topk_ids.shape == (4, 2, 1)
    split = trace.split(0.5)
    assert set(split.fit.seq_ids.tolist()).isdisjoint(split.held_out.seq_ids.tolist())
    assert split.fit.num_tokens + split.held_out.num_tokens == 4


def test_ragged_trace_is_a_typed_error(tmp_path):
    with pytest.raises(TraceError, match="ragged") as info:
        trace_from_array([[0, 1, 2], [0, 1]], 4)
    assert info.value.value == [2, 3]
    np.save(tmp_path / "ragged.npy", np.array([[0, 1], [0]], dtype=object), allow_pickle=True)
    with pytest.raises(TraceError):
        load_trace(tmp_path / "ragged.npy")


def test_expert_id_out_of_range_names_position_and_value(tmp_path):
    ids = np.zeros((5, 3, 2), dtype=np.int64)
    ids[:, :, 1] = 1
    ids[3, 2, 1] = 9
    with pytest.raises(TraceError) as info:
        trace_from_array(ids, 8)
    assert info.value.field == "topk_ids[3, 2, 1]" and info.value.value == 9
    write_raymoe_trace(tmp_path / "bad.npz", ids, 8)
    with pytest.raises(TraceError, match=r"out of range \[0, 8\)"):
        load_trace(tmp_path / "bad.npz")
    with pytest.raises(TraceError, match="out of range"):
        trace_from_array(-ids, 8)


def test_other_malformed_traces():
    with pytest.raises(TraceError, match="repeats"):
        trace_from_array(np.array([[[1, 1]]]), 4)
    with pytest.raises(TraceError, match="integers"):
        trace_from_array(np.array([[0.5, 1.0]]), 4)
    with pytest.raises(TraceError, match="seq_ids.shape"):
        trace_from_array(np.zeros((3, 2), dtype=int), 4, seq_ids=np.arange(2))
    with pytest.raises(TraceError, match="dimensions|shape"):
        trace_from_array(np.zeros((2, 2, 2, 2), dtype=int), 4)


def test_aggregate_statistics_validation(tmp_path):
    loads = np.arange(12.0).reshape(3, 4)
    with pytest.raises(TraceError, match="transitions.shape"):
        RoutingStats.from_arrays(loads, transitions=np.zeros((3, 4, 4)))
    with pytest.raises(TraceError, match="negative"):
        RoutingStats.from_arrays(-loads)
    coact = np.zeros((3, 4, 4))
    coact[0, 0, 1] = 2
    with pytest.raises(TraceError, match="not symmetric"):
        RoutingStats.from_arrays(loads, coactivation=coact)
    np.save(tmp_path / "loads.npy", loads)
    assert load_stats(tmp_path / "loads.npy").num_experts == 4
    np.savez(tmp_path / "stats.npz", loads=loads, transitions=np.ones((2, 4, 4)), top_k=2)
    stats = load_stats(tmp_path / "stats.npz")
    assert stats.top_k == 2 and stats.transitions.shape == (2, 4, 4)
    null = stats.null()
    assert null.transitions.shape == (2, 4, 4)
