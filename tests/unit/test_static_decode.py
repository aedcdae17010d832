"""Fixed-shape decode steps (workers/model/static_decode.py), the shape CUDA graphs replay:
padded to a bucket, attention over the cache's whole window under a device-built mask,
they give the ordinary decode step's logits and tokens. The capture itself needs CUDA."""

from __future__ import annotations

import pytest
import torch

from raymoe.workers.model.attention import cache_shapes
from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.checkpoint import load_model
from raymoe.workers.model.kv_cache import KVCache, KVLayout
from raymoe.workers.model.static_decode import DecodeGraphs, StaticDecode, bucket_for
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams

PROMPTS = [[5, 17, 33, 2], [11, 3], [60, 61, 62]]


def test_buckets():
    assert [bucket_for(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert bucket_for(5, 6) == 6  # the largest size is a bucket of its own
    for bad in (0, 17):
        with pytest.raises(ValueError, match=f"{bad} sequences"):
            bucket_for(bad, 16)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "glm4_moe"])  # GQA, MLA's latent cache, partial RoPE
def test_static_step_equals_the_ordinary_decode_step(tiny_model, family):
    model = load_model(tiny_model(family, seed=5), torch.float32)
    shapes, slots = cache_shapes(model.config), [2, 0, 1]  # slots out of order: the cache is gathered
    ordinary = KVCache.contiguous(shapes, 3, 64)
    static = KVCache(shapes, 4, KVLayout.for_sequences(3, 32))  # slot 3 (scratch block) takes the padding rows
    for slot in range(3):
        static.set_blocks(slot, range(2 * slot, 2 * slot + 2))
    lengths = [len(p) for p in PROMPTS]
    with torch.inference_mode():
        prefill = ForwardBatch.build(PROMPTS, [0] * 3, slots)
        ordinary.reserve(prefill.max_len)
        model(prefill, ordinary)
        model(prefill, static)
        step = StaticDecode(model, static, bucket_for(3, 8), pad_slot=3)
        assert step.bucket == 4 and step.window == 32
        for n in range(4):
            ids = [[(13 * b + n) % model.config.vocab_size] for b in range(3)]
            batch = ForwardBatch.build(ids, lengths, slots)
            ordinary.reserve(batch.max_len)
            want = model(batch, ordinary)
            step.load([i[0] for i in ids], lengths, slots)
            got = step.run()[:3]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            lengths = [x + 1 for x in lengths]


def test_static_step_refuses_what_it_cannot_hold(tiny_model):
    model = load_model(tiny_model("mixtral", seed=5), torch.float32)
    cache = KVCache.contiguous(cache_shapes(model.config), 3, 8, block_size=4)
    step = StaticDecode(model, cache, 2, pad_slot=2)
    with pytest.raises(ValueError, match="3 rows do not fit a bucket of 2"):
        step.load([1, 2, 3], [0, 0, 0], [0, 1, 2])
    with pytest.raises(ValueError, match="position 8 is outside the static window of 8"):
        step.load([1], [8], [0])
    with pytest.raises(ValueError, match="CUDA graphs need"):
        DecodeGraphs(model, cache, 2)
    with pytest.raises(ValueError, match="CUDA graphs need"):
        ReferenceEngine(model, max_seqs=2, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_equal_eager_decode(tiny_model):
    """bfloat16 (grouped experts with device offsets): graphs on, graphs off, same tokens."""
    path = tiny_model("mixtral", seed=5)
    engines = [ReferenceEngine(load_model(path, torch.bfloat16).to("cuda"), max_seqs=4, max_seq_len=64,
                               cuda_graphs=graphs) for graphs in (False, True)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    outputs = [e.generate_ids(PROMPTS, params) for e in engines]
    assert outputs[0] == outputs[1]
    assert set(engines[1].runner.graphs.graphs) >= {4}  # 3 sequences decode in the bucket of 4
