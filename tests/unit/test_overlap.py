"""Two-batch overlap (workers/overlap.py): two interleaved micro-batches give the logits of
the step run whole, in the documented collective order; the rule that decides."""

from __future__ import annotations

import pytest
import torch

from raymoe.workers.model.attention import cache_shapes
from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.checkpoint import load_model
from raymoe.workers.model.kv_cache import KVCache
from raymoe.workers.overlap import OverlapRule, halves, two_batch_forward


class RecordingExperts:
    """A SplitExperts computing on this process and recording the order of its halves."""

    def __init__(self, model, micro_batch_of):
        self.model, self.micro_batch_of, self.order = model, micro_batch_of, []

    def send(self, moe_index, layer, x, routing):
        mb = self.micro_batch_of(x)
        self.order.append(f"d{mb}({moe_index})")
        return mb, moe_index, self.model.decoder_layers[layer].mlp.run_experts(x, routing)

    def receive(self, sent):
        mb, moe_index, out = sent
        self.order.append(f"c{mb}({moe_index})")
        return out


def documented_order(layers: int) -> list[str]:
    order = ["d0(0)", "d1(0)"]
    for L in range(layers):
        order.append(f"c0({L})")
        if L + 1 < layers:
            order.append(f"d0({L + 1})")
        order.append(f"c1({L})")
        if L + 1 < layers:
            order.append(f"d1({L + 1})")
    return order


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])  # deepseek_v3: a dense first layer, shared experts
def test_two_micro_batches_equal_the_whole_step(tiny_model, family):
    model = load_model(tiny_model(family, seed=3), torch.float32)
    config = model.config
    prompts = [[5, 17, 33, 2], [11, 3], [60, 61, 62], [9], [4, 4, 8, 1, 2]]
    whole_cache = KVCache.contiguous(cache_shapes(config), len(prompts), 16)
    split_cache = KVCache.contiguous(cache_shapes(config), len(prompts), 16)
    with torch.inference_mode():
        prefill = ForwardBatch.build(prompts, [0] * len(prompts))
        for cache in (whole_cache, split_cache):
            cache.reserve(prefill.max_len + 4)
            model(prefill, cache)
        lengths = [len(p) for p in prompts]
        for step in range(3):
            ids = [[(7 * b + step) % config.vocab_size] for b in range(len(prompts))]
            whole = model(ForwardBatch.build(ids, lengths), whole_cache)
            first, _ = halves(len(prompts))
            batches = [ForwardBatch.build(ids[:first], lengths[:first], list(range(first))),
                       ForwardBatch.build(ids[first:], lengths[first:], list(range(first, len(prompts))))]
            experts = RecordingExperts(model, lambda x: 0 if x.shape[0] == first else 1)
            parts = two_batch_forward([model.layer_steps(b, split_cache) for b in batches], experts)
            torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=0)
            assert experts.order == documented_order(len(config.moe_layer_ids))
            lengths = [n + 1 for n in lengths]


def test_rule_on_off_and_what_never_splits():
    assert OverlapRule("on").split(5, decode=True) == (3, 2)
    assert OverlapRule("off").split(5, decode=True) == (5,)
    for mode in ("auto", "on"):
        rule = OverlapRule(mode)
        assert rule.split(1, decode=True) == (1,)  # one sequence: nothing to overlap
        assert rule.split(6, decode=False) == (6,)  # prefill runs whole
        rule.paused = True
        assert rule.split(6, decode=True) == (6,)  # a routing trace is being recorded
    with pytest.raises(ValueError, match="overlap mode 'sometimes'"):
        OverlapRule("sometimes")


@pytest.mark.parametrize("overlap_faster", [True, False])
def test_auto_alternates_then_keeps_the_faster_mode_per_bucket(overlap_faster):
    rule = OverlapRule("auto", trials=3, recheck=5)
    seen = []
    for _ in range(6):
        split = rule.split(8, decode=True)
        seen.append(len(split))
        fast = (len(split) == 2) == overlap_faster
        rule.observe(split, True, 0.010 if fast else 0.020)
    assert seen == [1, 2, 1, 2, 1, 2]  # whole first, then alternating
    assert rule.decisions() == {8: overlap_faster}
    chosen = 2 if overlap_faster else 1
    assert [len(rule.split(b, decode=True)) for b in (5, 6, 7, 8)] == [chosen] * 4  # one bucket: 5..8
    assert len(rule.split(9, decode=True)) == 1 and rule.decisions()[16] is None  # another bucket measures anew
    for _ in range(10):  # prefill steps are neither samples nor steps towards the recheck
        rule.observe((8,), False, 99.0)
    assert rule.decisions()[8] == overlap_faster
    for _ in range(5):  # recheck: after 5 steps the bucket measures again
        split = rule.split(8, decode=True)
        rule.observe(split, True, 0.01)
    assert rule.decisions()[8] is None


def test_auto_compares_seconds_per_sequence():
    """Samples of different batch sizes in one bucket are compared per sequence."""
    rule = OverlapRule("auto", trials=1)
    rule.observe(rule.split(8, decode=True), True, 0.016)  # whole: 2 ms per sequence
    rule.observe(rule.split(5, decode=True), True, 0.0125)  # split: 2.5 ms per sequence
    assert rule.decisions() == {8: False}
