"""The data plane: pack -> all-to-all -> expert compute -> all-to-all -> combine.

Property tests run the local phases with the exchange done by hand (rank r's block of C
rows is what ``all_to_all_single`` delivers to it); one test runs them over a real gloo
group of several processes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.forked import CONTEXT, start_processes
from tests.plans import random_plan
from raymoe.workers.dispatch.disaggregated import pack, run_experts, unpack
from raymoe.workers.dispatch.wire import decode_rows, encode_rows
from raymoe.workers.expert_map import layer_maps
from raymoe.workers.model.config import RouterConfig
from raymoe.workers.model.experts import ExpertStack, combine
from raymoe.workers.model.router import select_experts


def full_stack(num_experts: int, hidden: int, width: int, seed: int) -> ExpertStack:
    g = torch.Generator().manual_seed(seed)
    stack = ExpertStack(num_experts, hidden, width)
    stack.load_state_dict({"gate_up": torch.randn(num_experts, 2 * width, hidden, generator=g) * 0.3,
                           "down": torch.randn(num_experts, hidden, width, generator=g) * 0.3})
    return stack


def rank_stack(full: ExpertStack, experts: tuple[int, ...]) -> ExpertStack:
    stack = ExpertStack(len(experts), full.gate_up.shape[2], full.down.shape[2])
    idx = torch.tensor(experts, dtype=torch.long)
    stack.load_state_dict({"gate_up": full.gate_up.data[idx], "down": full.down.data[idx]})
    return stack


@st.composite
def cases(draw):
    ranks = draw(st.integers(1, 5))
    experts = draw(st.integers(ranks, 12))
    top_k = draw(st.integers(1, min(4, experts)))
    redundant = draw(st.integers(0, ranks - 1))
    tokens = draw(st.integers(1, 24))
    return ranks, experts, top_k, redundant, tokens, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(cases())
def test_dispatch_compute_combine_equals_local_experts(case):
    ranks, experts, top_k, redundant, tokens, seed = case
    hidden, width = 8, 12
    plan = random_plan(experts, ranks, redundant, seed)
    layer_map = layer_maps(plan)[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    routing = select_experts(torch.randn(tokens, experts, generator=g), RouterConfig(experts, top_k))
    full = full_stack(experts, hidden, width, seed)
    packed = pack(x, routing.topk_ids, routing.topk_weights, layer_map)
    capacity = packed.capacity
    assert capacity == tokens and packed.rows.shape[0] == ranks * capacity  # C = T rows for every rank
    outputs = []
    for r in range(ranks):  # what rank r receives: its block of C rows
        rows = packed.rows[r * capacity:(r + 1) * capacity]
        out, pairs = run_experts(rows, rank_stack(full, layer_map.rank_experts[r]), hidden, top_k, x.dtype)
        assert pairs == int(packed.pairs_per_rank[r])
        outputs.append(out)
    assert int(packed.pairs_per_rank.sum()) == tokens * top_k
    got = unpack(torch.cat(outputs), packed)
    rows_idx = torch.arange(tokens).repeat_interleave(top_k)
    want = combine(full(x[rows_idx], routing.topk_ids.reshape(-1)).view(tokens, top_k, hidden), routing.topk_weights)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_pack_sends_each_token_once_per_rank_and_spreads_replicas(case):
    ranks, experts, top_k, redundant, tokens, seed = case
    plan = random_plan(experts, ranks, redundant, seed)
    layer_map = layer_maps(plan)[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 6, generator=g)
    routing = select_experts(torch.randn(tokens, experts, generator=g), RouterConfig(experts, top_k))
    packed = pack(x, routing.topk_ids, routing.topk_weights, layer_map)
    xs, ids, weights = decode_rows(packed.rows, 6, top_k, x.dtype)
    capacity, seen = packed.capacity, set()
    assert capacity == tokens and len(xs) == ranks * capacity
    for rank in range(ranks):
        for token in range(tokens):  # rank r's block: row t is token t (a padding row if no pair is there)
            r = rank * capacity + token
            torch.testing.assert_close(xs[r], x[token], rtol=0, atol=0)
            local = torch.nonzero(ids[r] >= 0).flatten().tolist()
            if local:
                seen.add((token, rank))
            for k in local:
                expert = int(routing.topk_ids[token, k])
                replica = token % int(layer_map.logcnt[expert])
                slot = int(layer_map.log2phy[expert, replica])
                assert int(layer_map.slot_rank[slot]) == rank and int(layer_map.slot_local[slot]) == int(ids[r, k])
                assert float(weights[r, k]) == float(routing.topk_weights[token, k])
            assert all(float(weights[r, k]) == 0.0 for k in range(top_k) if k not in local)
        assert int(packed.rows_per_rank[rank]) == sum(1 for t, q in seen if q == rank)
    assert seen == {(t, int(layer_map.slot_rank[layer_map.log2phy[e, t % layer_map.logcnt[e]]]))
                    for t in range(tokens) for e in routing.topk_ids[t].tolist()}
    assert int(packed.pairs_per_rank.sum()) == tokens * top_k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_encoding_round_trips_bits(dtype):
    x = torch.randn(5, 7).to(dtype)
    ids = torch.tensor([[0, -1], [3, 2], [-1, 1], [7, 7], [0, 0]], dtype=torch.int32)
    w = torch.rand(5, 2)
    x2, ids2, w2 = decode_rows(encode_rows(x, ids, w), 7, 2, dtype)
    assert torch.equal(x2, x) and torch.equal(ids2, ids.long()) and torch.equal(w2, w)


def _gloo_worker(rank: int, world: int, port: int, seed: int, results):
    import torch.distributed as dist

    from raymoe.benchmarks.baselines.dist_probe import DistProbe
    from raymoe.workers.dispatch.collectives import Collectives
    from raymoe.workers.dispatch.disaggregated import exchange_outputs, exchange_tokens

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = Collectives(dist.group.WORLD)
    probe = DistProbe.install()
    experts, top_k, hidden = 7, 2, 8
    plan = random_plan(experts, world - 1, 2, seed)
    layer_map = layer_maps(plan)[0]
    full = full_stack(experts, hidden, 10, seed)
    for tokens in (9, 1, 0):  # the last step sends nothing at all
        g = torch.Generator().manual_seed(seed + tokens)
        x = torch.randn(tokens, hidden, generator=g)
        routing = select_experts(torch.randn(tokens, experts, generator=g), RouterConfig(experts, top_k))
        if rank == 0:
            packed = pack(x, routing.topk_ids, routing.topk_weights, layer_map)
            recv = exchange_tokens(packed.rows, tokens, group)
            back = exchange_outputs(x.new_empty(0, hidden), tokens, group)
            got = unpack(back, packed)
            rows = torch.arange(tokens).repeat_interleave(top_k)
            want = combine(full(x[rows], routing.topk_ids.reshape(-1)).view(tokens, top_k, hidden), routing.topk_weights)
            results.put((tokens, bool(torch.allclose(got, want, atol=1e-6)), recv.shape[0]))
        else:
            nothing = torch.empty(0, hidden * 4 + 8 * top_k, dtype=torch.uint8)
            recv = exchange_tokens(nothing, tokens, group)
            out, _ = run_experts(recv, rank_stack(full, layer_map.rank_experts[rank - 1]), hidden, top_k, x.dtype)
            exchange_outputs(out, tokens, group)
    # what torch.distributed saw == what the collectives counted, call by call and byte by byte
    seen = probe.snapshot()
    counted = group.tally
    results.put(("tally", rank, seen["calls"] == {"all_to_all_single": 6},
                 counted.calls["metadata"] == 0 and counted.calls["dispatch"] == counted.calls["combine"] == 3,
                 seen["bytes_sent"]["all_to_all_single"] == sum(counted.bytes.values()), counted.bytes))
    probe.uninstall()
    dist.destroy_process_group()


def test_round_trip_over_real_gloo_collectives():
    from raymoe.workers.process_group import free_port

    results = CONTEXT.Queue()
    world = 4
    start_processes(_gloo_worker, (world, free_port("127.0.0.1"), 5, results), world)
    got = [results.get(timeout=5) for _ in range(3 + world)]
    assert sorted(g for g in got if g[0] != "tally") == [(0, True, 0), (1, True, 0), (9, True, 0)]
    tallies = sorted(g[1:] for g in got if g[0] == "tally")
    assert [t[:4] for t in tallies] == [(r, True, True, True) for r in range(world)]
    # no metadata; dispatch only from the front-end (C = T rows to every expert rank),
    # combine only from the expert ranks
    assert all(t[4]["metadata"] == 0 for t in tallies)
    row = 8 * 4 + 8 * 2
    assert tallies[0][4]["dispatch"] == (9 + 1 + 0) * (world - 1) * row and tallies[0][4]["combine"] == 0
    assert sum(t[4]["combine"] for t in tallies[1:]) > 0 and all(t[4]["dispatch"] == 0 for t in tallies[1:])


def _symmetric_worker(rank: int, world: int, port: int, results):
    """The GPU benchmark's round trip (every rank sends and hosts experts), here on gloo."""
    from raymoe.benchmarks.gpu_nccl import full_stack, local_stack, round_trip, routed_batch
    from raymoe.placement.build import build_plan
    from raymoe.workers.dispatch.collectives import Collectives
    from raymoe.workers.dispatch.compute import weighted_experts
    from raymoe.workers.process_group import join_groups, leave_groups

    groups = join_groups("gloo", f"127.0.0.1:{port}", rank, world, 30.0)
    layer_map = layer_maps(build_plan("linear", num_layers=1, num_experts=16, num_ranks=world))[0]
    full = full_stack(24, 20, torch.float32, torch.device("cpu"))
    mine = local_stack(full, layer_map.rank_experts[rank])
    x, ids, weights = routed_batch(11, 24, rank, torch.float32, torch.device("cpu"))
    got = round_trip(x, ids, weights, layer_map, mine, Collectives(groups.expert_parallel), world)
    want, _ = weighted_experts(x, ids, weights, full)
    results.put((rank, bool(torch.allclose(got, want, atol=1e-6))))
    leave_groups(groups)


def test_symmetric_round_trip_of_the_gpu_benchmark_on_gloo():
    from raymoe.workers.process_group import free_port

    results = CONTEXT.Queue()
    start_processes(_symmetric_worker, (2, free_port("127.0.0.1"), results), 2)
    assert sorted(results.get(timeout=10) for _ in range(2)) == [(0, True), (1, True)]
