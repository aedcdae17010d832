"""The paged KV cache and the scheduler around it (issue 16): the block pool's invariants
(hypothesis), preemption when the pool runs out, prefix caching, chunked prefill, abort
and recovery mid-prefill. Every output is compared with the same requests run without
the feature (greedy, token for token) on the shipped model."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raymoe.workers.block_pool import BlockPool
from raymoe.workers.engine import Replay
from raymoe.workers.model.attention import cache_shapes
from raymoe.workers.model.checkpoint import load_model
from raymoe.workers.model.kv_cache import KVCacheBudgetError, plan_layout, token_bytes
from raymoe.workers.reference import LocalExecutor, ReferenceEngine
from raymoe.workers.sampling import SamplingParams
from tests.paths import ROOT

MODEL = ROOT / "models" / "tiny-moe"
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


# -- the block pool -------------------------------------------------------------------------
OPS = st.lists(st.tuples(st.sampled_from(["allocate", "free", "register", "lookup", "clear"]),
                         st.integers(0, 11)), max_size=120)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_block_pool_never_hands_a_block_out_twice(ops):
    """Random allocations, frees, registrations, lookups and cache clears: no block is in two
    states, a lookup returns only a block whose rows hold that exact key, and once every
    holder lets go every reference count is 0 again. Keys whose Python hashes collide
    (parents -1 and -2: ``hash(-1) == hash(-2)``) are told apart."""
    pool = BlockPool(5)
    held: list[int] = []  # one entry per reference a holder has
    content: dict[int, tuple] = {}  # block -> the key its rows hold, while the pool caches it
    for op, x in ops:
        key = (-1 - x % 2, (x % 3,))
        if op == "allocate":
            block = pool.allocate()
            if block is None:
                assert pool.num_free == 0
            else:
                assert block not in held and pool.refs[block] == 1
                content.pop(block, None)  # its rows will be written anew
                held.append(block)
        elif op == "free" and held:
            pool.free(held.pop(x % len(held)))
        elif op == "register" and held:
            block = held[x % len(held)]
            if block not in content and key not in content.values():
                pool.register(block, key)
                content[block] = key
        elif op == "lookup":
            found = pool.lookup(key)
            assert (found is not None) == (key in content.values())
            if found is not None:
                assert content[found[0]] == key
                held.append(found[0])
        elif op == "clear":
            pool.clear_cache()
            content.clear()
        pool.check()
        assert Counter(held) == Counter({b: r for b, r in enumerate(pool.refs) if r})
    for block in held:
        pool.free(block)
    pool.check()
    assert not any(pool.refs) and pool.num_free == pool.num_blocks
    with pytest.raises(ValueError, match="not held"):
        pool.free(0)


def test_colliding_hashes_are_different_keys():
    assert hash((-1, (5,))) == hash((-2, (5,)))
    pool = BlockPool(2)
    block = pool.allocate()
    pool.register(block, (-1, (5,)))
    assert pool.lookup((-2, (5,))) is None and pool.lookup((-1, (5,)))[0] == block


def test_a_budget_below_one_sequence_is_refused():
    shapes = [((2, 8), (2, 8))] * 3
    per_token = token_bytes(shapes, torch.float32)
    assert per_token == 3 * 2 * 16 * 4
    assert plan_layout(shapes, torch.float32, per_token * 64, 64, 16).num_blocks == 4
    with pytest.raises(KVCacheBudgetError, match="batching.kv_cache_memory"):
        plan_layout(shapes, torch.float32, per_token * 63, 64, 16)


# -- the scheduler, through the reference engine ----------------------------------------
@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


def _prompts(n: int, lengths: tuple[int, int], seed: int = 0, prefix: list[int] = ()) -> list[list[int]]:
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(2, 4096) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def _outputs(engine, prompts, params=GREEDY) -> list[list[int]]:
    return [c.output_ids for c in engine.generate_ids(prompts, params)]


def _drained(engine) -> None:
    """Nothing is held once every request is done (cached prefix blocks stay evictable)."""
    pool = engine.scheduler.pool
    pool.check()
    assert pool.num_used == 0 and not engine.scheduler.running and not engine.scheduler.waiting


def test_a_small_pool_preempts_and_the_outputs_stay(model):
    prompts = _prompts(6, (20, 40), seed=1)
    want = _outputs(ReferenceEngine(model, max_seqs=8, block_size=4, prefix_caching=False), prompts)
    per_block = token_bytes(cache_shapes(model.config), torch.float32) * 4
    engine = ReferenceEngine(model, max_seqs=8, max_seq_len=80, block_size=4, kv_cache_memory=40 * per_block,
                             prefix_caching=False)
    assert engine.scheduler.kv.num_blocks == 40  # 6 sequences need up to 6 * 13 blocks
    assert _outputs(engine, prompts) == want
    assert engine.scheduler.stats.preemptions > 0
    _drained(engine)


def test_prefix_caching_shares_blocks_and_changes_no_token(model):
    """A first request fills the cache; then concurrent requests with the same 64-token
    prefix and different suffixes start from its blocks (and from each other's)."""
    prefix = _prompts(1, (64, 64), seed=2)[0]
    first, rest = [prefix + [7, 8, 9]], _prompts(5, (1, 20), seed=3, prefix=prefix)
    cold = ReferenceEngine(model, max_seqs=8, prefix_caching=False)
    want = _outputs(cold, first) + _outputs(cold, rest)
    engine = ReferenceEngine(model, max_seqs=8)
    got = _outputs(engine, first)
    assert engine.scheduler.stats.hit == 0
    got += _outputs(engine, rest)
    assert got == want
    assert engine.scheduler.stats.hit >= 5 * 64  # every later request skipped the prefix's 4 blocks
    _drained(engine)
    # the whole prompt cached: all but its last token's block is reused, and the output is the same
    assert _outputs(engine, first) == want[:1]


def test_a_prompt_longer_than_the_step_budget_is_prefilled_in_chunks(model):
    """A 300-token prompt arrives while 3 sequences decode: with a budget of 64 tokens a
    step, it takes 5 steps to prefill, the decodes go on meanwhile, and every output is the
    one without chunking."""
    short, long = _prompts(3, (5, 10), seed=4), _prompts(1, (300, 300), seed=5)
    params = [GREEDY] * 3 + [SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)]
    want = _outputs(ReferenceEngine(model, max_seqs=8, max_num_batched_tokens=None), short + long, params)
    engine = ReferenceEngine(model, max_seqs=8, max_num_batched_tokens=64)
    ids = [engine.add_request(p, GREEDY) for p in short]
    engine.step()
    ids.append(engine.add_request(long[0], params[3]))
    done, sizes = {}, []
    while engine.has_work():
        result = engine.step()
        sizes.append((engine.scheduler.stats.prefill, engine.scheduler.stats.decode))
        done.update({c.request_id: c.output_ids for c in result.finished})
    assert [done[i] for i in ids] == want
    assert all(p + d <= 64 for p, d in sizes)
    assert sizes[:5] == [(61, 3)] * 4 + [(56, 3)]  # the prompt's chunks beside the 3 decodes
    _drained(engine)


def test_abort_mid_prefill_frees_its_blocks(model):
    engine = ReferenceEngine(model, max_seqs=4, max_num_batched_tokens=32)
    rid = engine.add_request(_prompts(1, (200, 200), seed=6)[0], GREEDY)
    engine.step()
    assert engine.scheduler.running[0].cached == 32 and engine.scheduler.pool.num_used == 2
    assert engine.abort(rid)
    _drained(engine)
    prompts = _prompts(2, (5, 9), seed=7)
    assert _outputs(engine, prompts) == _outputs(ReferenceEngine(model, max_seqs=4), prompts)


class LosingExecutor:
    """Runs steps with ``inner`` but loses the whole KV cache on the ``after``-th step (as
    a replaced actor does: its cache starts at zeros) and says so with ``Replay``, as the
    Ray executor does after a recovery."""

    def __init__(self, inner: LocalExecutor, after: int):
        self.inner, self.runner, self.after = inner, inner.runner, after

    def execute(self, step):
        self.after -= 1
        if self.after == 0:
            for tensor in self.runner.cache.k + self.runner.cache.v:
                tensor.zero_()
            raise Replay()
        return self.inner.execute(step)


def test_recovery_mid_prefill_replays_the_same_tokens(model):
    """The cache is lost while a long prompt is half prefilled and three sequences share a
    cached prefix: the replay re-prefills what each sequence committed, and no cached
    block is trusted any more (a later request with another prefix cached before the loss
    computes it again)."""
    prefix, other = _prompts(2, (48, 48), seed=8)
    prompts = _prompts(3, (2, 6), seed=9, prefix=prefix) + _prompts(1, (150, 150), seed=10)
    cold = ReferenceEngine(model, max_seqs=8, max_num_batched_tokens=64, prefix_caching=False)
    want = _outputs(cold, prompts) + _outputs(cold, [other + [6, 7]])
    engine = ReferenceEngine(model, max_seqs=8, max_num_batched_tokens=64)
    _outputs(engine, [prefix + [5], other + [5]])  # both prefixes' 3 blocks are cached now
    engine.executor = LosingExecutor(engine.executor, after=2)  # the second step: the long prompt's second chunk
    got = _outputs(engine, prompts)
    assert engine.executor.after < 0 and engine.scheduler.stats.hit == 3 * 48  # lost once, after the hits
    assert got + _outputs(engine, [other + [6, 7]]) == want
    assert engine.scheduler.stats.hit == 3 * 48  # nothing cached before the loss was reused after it
    _drained(engine)


def test_a_deployment_refuses_a_budget_below_one_sequence_before_any_actor():
    """Checked before Ray is even reached, naming the field and the bytes one sequence needs."""
    from raymoe.cluster.config import DeploymentConfigError, parse_config
    from raymoe.cluster.coordinator import Deployment

    config = parse_config({"model": str(MODEL), "batching": {"kv_cache_memory": "1MiB", "max_seq_len": 1024}})
    with pytest.raises(DeploymentConfigError, match="batching.kv_cache_memory") as err:
        Deployment(config)
    assert "at least 3145728" in str(err.value)  # 1,024 tokens x 3 KiB (6 layers x 2 x 2 heads x 32 x 4 bytes)
