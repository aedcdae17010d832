"""The single-process fast paths give the same bits as the plain computations they replace.

Grouped and few-row experts == the per-expert loop; the fused q/k/v (and gate/up)
projection == the separate projections, through loading, moving and replacing weights;
the KV cache read as a view == read as a copy; the decode path == the general path;
RoPE, RMSNorm, router and greedy sampling == their textbook formulas.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tiny_models import save_tiny_model
from raymoe.workers.model.attention import cache_shapes
from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.checkpoint import load_model
from raymoe.workers.model.config import RouterConfig
from raymoe.workers.model.experts import FEW_ROWS, ExpertStack
from raymoe.workers.model.kv_cache import KVCache, KVLayout
from raymoe.workers.model.linear import FusedLinear, linear
from raymoe.workers.model.mlp import GatedMLP
from raymoe.workers.model.norm import RMSNorm
from raymoe.workers.model.rope import apply_rope, rope_cos_sin, rope_tables
from raymoe.workers.model.router import select_experts
from raymoe.workers.sampling import SamplingParams, sample

# ----------------------------------------------------------------------------- experts


def _stack(experts: int, hidden: int, width: int, dtype: torch.dtype, seed: int) -> ExpertStack:
    g = torch.Generator().manual_seed(seed)
    stack = ExpertStack(experts, hidden, width)
    with torch.no_grad():
        stack.gate_up.copy_(torch.randn(stack.gate_up.shape, generator=g) * 0.2)
        stack.down.copy_(torch.randn(stack.down.shape, generator=g) * 0.2)
    return stack.to(dtype)


def _expert_loop(stack: ExpertStack, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The reference: rows sorted by expert, one ``F.linear`` pair per expert."""
    order = torch.argsort(ids, stable=True)
    out, start = torch.empty_like(x), 0
    for expert, count in enumerate(torch.bincount(ids, minlength=stack.num_experts).tolist()):
        rows = order[start:start + count]
        gate, up = F.linear(x[rows], stack.gate_up[expert]).chunk(2, dim=-1)
        out[rows] = F.linear(F.silu(gate) * up, stack.down[expert])
        start += count
    return out


@st.composite
def expert_cases(draw):
    experts = draw(st.sampled_from([1, 2, 3, 8, 16]))
    rows = draw(st.sampled_from([0, 1, 2, 3, FEW_ROWS, FEW_ROWS + 1, 7, 16, 64, 200, 512]))
    hidden, width = draw(st.sampled_from([(128, 64), (32, 24), (24, 10), (16, 8)]))  # (24, 10): no grouped_mm
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    distinct = draw(st.booleans()) and rows <= experts  # a decoding token's top-k: no expert twice
    return experts, rows, hidden, width, dtype, distinct, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=80, deadline=None)
@given(expert_cases())
def test_expert_paths_equal_the_per_expert_loop(case):
    experts, rows, hidden, width, dtype, distinct, seed = case
    stack = _stack(experts, hidden, width, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    ids = torch.randperm(experts, generator=g)[:rows] if distinct else torch.randint(0, experts, (rows,), generator=g)
    with torch.inference_mode():
        want = _expert_loop(stack, x, ids)
        assert torch.equal(stack(x, ids), want)
        assert torch.equal(stack._loop(x, ids), want)
        if stack._grouped_mm_runs(x) and rows:
            assert torch.equal(stack._grouped(x, ids), want)


def test_expert_rows_do_not_depend_on_the_other_rows():
    """A row's output is the same alone, with a few others (few-row path) and with many
    (grouped path), as long as its expert has the same number of rows in the call."""
    stack = _stack(16, 128, 64, torch.float32, 0)
    x = torch.randn(64, 128)
    ids = torch.cat([torch.arange(15), torch.full((49,), 15)])  # experts 0..14 once each, 15 for the rest
    with torch.inference_mode():
        many = stack(x, ids)
        for row in range(15):  # experts 0..14 have one row in the big call, as here
            assert torch.equal(stack(x[row:row + 1], ids[row:row + 1]), many[row:row + 1])
            pair = [row, (row + 1) % 15]
            assert torch.equal(stack(x[pair], ids[pair]), many[pair])


# ----------------------------------------------------------------------------- fused projections


def _filled(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 2, 5, 64])
def test_fused_projection_equals_the_separate_ones(bias, tokens):
    q, k, v = (_filled(linear(128, n, bias), seed) for seed, n in enumerate((128, 64, 64)))
    fused = FusedLinear(q, k, v)
    x = torch.randn(tokens, 128)
    with torch.no_grad():
        assert torch.equal(fused(x), torch.cat([q(x), k(x), v(x)], -1))
        assert fused.weight.data_ptr() == q.weight.data_ptr()  # the parameters are views into it


def test_fused_projection_follows_loads_moves_and_replacements():
    mlp = _filled(GatedMLP(32, 48))
    x = torch.randn(3, 32)

    def check():
        with torch.no_grad():
            assert torch.equal(mlp.gate_up(x), torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1))

    check()
    with torch.no_grad():
        mlp.up_proj.weight.mul_(2.0)  # in place: the fused tensor sees it
    check()
    assert list(mlp.state_dict()) == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    state = {name: t.clone() * 3.0 for name, t in mlp.state_dict().items()}
    mlp.load_state_dict(state)
    check()
    mlp.load_state_dict({name: t * 0.5 for name, t in state.items()}, assign=True)  # new parameters
    check()
    mlp = mlp.to(torch.float64)
    x = x.double()
    check()
    mlp.to_empty(device="cpu").load_state_dict(state)
    x = x.float()
    mlp.float()
    check()


def test_fused_projection_passes_gradients_to_its_parameters():
    q, k = _filled(linear(8, 4)), _filled(linear(8, 2), 1)
    fused = FusedLinear(q, k)
    fused(torch.randn(3, 8)).sum().backward()
    assert q.weight.grad is not None and k.weight.grad is not None


# ----------------------------------------------------------------------------- attention paths


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    save_tiny_model("mixtral", path)
    return load_model(path)


def _decode_logits(model, lengths: list[int], slots: list[int], general: bool = False,
                   cache: KVCache | None = None) -> torch.Tensor:
    """Prefill ``lengths`` prompts into ``slots``, then one decode step's logits."""
    cache = cache or KVCache.contiguous(cache_shapes(model.config), 8, 64)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    with torch.inference_mode():
        model(ForwardBatch.build(prompts, [0] * len(prompts), slots), cache)
        batch = ForwardBatch.build([[i + 1] for i in range(len(lengths))], lengths, slots)
        assert batch.decode
        if general:  # the same step through padding and masks
            batch = dataclasses.replace(batch, decode=False, _memo={})
        return model(batch, cache)


@pytest.mark.parametrize("lengths", [[9], [9, 9, 9], [9, 5, 12, 7]])
def test_decode_path_equals_the_general_path(mixtral, lengths):
    slots = list(range(len(lengths)))
    assert torch.equal(_decode_logits(mixtral, lengths, slots), _decode_logits(mixtral, lengths, slots, general=True))


def test_interleaved_block_tables_equal_contiguous_ones(mixtral):
    """Sequences whose blocks interleave in the pool (a shuffled pool of 4-token blocks,
    scattered block-table rows) read exactly what contiguous blocks give."""
    lengths, shapes = [9, 5, 12, 7], cache_shapes(mixtral.config)
    contiguous = _decode_logits(mixtral, lengths, [0, 1, 2, 3])
    layout = KVLayout(num_blocks=40, block_size=4, max_blocks=5)
    cache = KVCache(shapes, 8, layout)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1)).tolist()
    slots = [5, 1, 6, 2]
    for i, slot in enumerate(slots):
        cache.set_blocks(slot, order[i::4][:4])  # sequence i takes every fourth block of the shuffle
    assert torch.equal(contiguous, _decode_logits(mixtral, lengths, slots, cache=cache))


def test_block_table_rows_name_pool_rows():
    cache = KVCache([((2, 4), (2, 4))], 3, KVLayout(num_blocks=6, block_size=4, max_blocks=3))
    cache.set_blocks(1, [5, 0])
    assert cache.token_rows(torch.tensor([1, 1, 1]), torch.tensor([0, 3, 4])).tolist() == [20, 23, 0]
    blocks = cache.context_blocks(torch.tensor([1, 0]), 6)
    assert blocks.tolist() == [[5, 0], [6, 6]]  # an unused slot reads the scratch block (6)
    cache.k[0].copy_(torch.arange(28.0)[:, None, None].expand(28, 2, 4))  # row r holds r
    keys, _ = cache.read(0, blocks, 6)
    assert keys.shape == (2, 6, 2, 4)
    assert keys[:, :, 0, 0].tolist() == [[20, 21, 22, 23, 0, 1], [24, 25, 26, 27, 24, 25]]
    with pytest.raises(ValueError, match="do not fit"):
        cache.set_blocks(0, [1, 2, 3, 4])


def test_from_tokens_marks_decode_steps():
    positions = torch.tensor([4, 7, 2])
    batch = ForwardBatch.from_tokens(torch.tensor([1, 2, 3]), torch.tensor([3, 4, 5]), positions)
    assert batch.decode and (batch.min_len, batch.max_len) == (3, 8)
    batch = ForwardBatch.from_tokens(torch.tensor([1, 2, 3]), torch.tensor([5, 3, 4]), positions)
    assert not batch.decode  # tokens not in slot order
    batch = ForwardBatch.from_tokens(torch.tensor([1, 2]), torch.tensor([3, 3]), torch.tensor([4, 5]))
    assert not batch.decode and batch.max_new == 2
    empty = ForwardBatch.from_tokens(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long),
                                     torch.tensor([], dtype=torch.long))
    assert empty.num_tokens == 0 and not empty.decode


def test_decode_build_has_the_general_fields():
    tokens, starts, slots = [[5], [6], [7]], [3, 0, 8], [4, 0, 2]
    decode = ForwardBatch.build(tokens, starts, slots)
    general = ForwardBatch.build([t * 2 for t in tokens], starts, slots)  # two new tokens each
    assert decode.decode and not general.decode
    assert decode.positions.tolist() == starts and decode.lengths.tolist() == [4, 1, 9]
    assert decode.seq_index.tolist() == decode.last_token.tolist() == [0, 1, 2]
    assert decode.query_index.tolist() == [0, 0, 0] and decode.slots.tolist() == slots
    assert decode.token_slots.tolist() == slots and general.token_slots.tolist() == [4, 4, 0, 0, 2, 2]


# ----------------------------------------------------------------------------- small ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleave", [False, True])
def test_rope_equals_the_rotate_half_formula(dtype, interleave):
    positions = torch.tensor([0, 3, 17, 250])
    x = torch.randn(4, 6, 32).to(dtype)
    cos, sin = rope_cos_sin(positions, 32, 10000.0, dtype)
    cos, sin = cos[:, None, :], sin[:, None, :]
    if interleave:
        c, s = cos[..., :16], sin[..., :16]
        want = torch.cat((x[..., 0::2] * c - x[..., 1::2] * s, x[..., 1::2] * c + x[..., 0::2] * s), -1)
    else:
        want = x * cos + torch.cat((-x[..., 16:], x[..., :16]), -1) * sin
    assert torch.equal(apply_rope(x, rope_tables(positions, 32, 10000.0, dtype, interleave)), want)


@pytest.mark.parametrize("shape", [(1, 128), (32, 128), (7, 4, 16), (3, 4096)])
def test_rms_norm_equals_the_float32_formula(shape):
    norm = _filled(RMSNorm(shape[-1], 1e-5))
    x = torch.randn(*shape) * 3
    want = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    with torch.no_grad():
        assert torch.equal(norm(x), want)


@pytest.mark.parametrize("norm", [False, True])
def test_router_topk_weights_equal_gathered_scores(norm):
    cfg = RouterConfig(num_experts=16, top_k=2, norm_topk_prob=norm)
    logits = torch.randn(40, 16)
    routing = select_experts(logits, cfg)
    scores = logits.softmax(-1)
    ids = scores.topk(2, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    assert torch.equal(routing.topk_ids, ids) and torch.equal(routing.topk_weights, weights)


def test_greedy_sampling_is_torch_argmax():
    logits = torch.randn(6, 4096)
    logits[0, 5] = logits[0, 100] = 50.0  # a tie: the first index wins
    logits[1, 7] = logits[1, 4000] = float("nan")  # NaN counts as the maximum
    logits[2] = float("-inf")
    logits[3, 4095] = 60.0
    want = logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams()] * 6, [0] * 6) == want == [5, 7, 0, 4095] + want[4:]
    assert sample(logits.double(), [SamplingParams()] * 6, [0] * 6) == want


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])  # GQA, MLA
def test_decodes_beside_a_prompt_chunk_attend_apart(tiny_model, family):
    """Two decoding sequences beside a 9-token prompt chunk: attention runs them as two
    parts (no padding of the decodes to 9 queries), with the logits of one padded batch."""
    model = load_model(tiny_model(family, seed=2))
    logits = []
    for split in (True, False):
        cache = KVCache.contiguous(cache_shapes(model.config), 4, 32, block_size=4)
        with torch.inference_mode():
            model(ForwardBatch.build([[3, 4, 5, 6, 7], [8, 9, 10]], [0, 0], [0, 2]), cache)
            batch = ForwardBatch.build([[11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [21]], [5, 0, 3], [0, 1, 2])
            parts = batch.parts()
            assert [p.num_seqs for p, _ in parts] == [2, 1]
            assert [t.tolist() for _, t in parts] == [[0, 10], list(range(1, 10))]
            if not split:
                batch._memo["parts"] = [(batch, None)]
            logits.append(model(batch, cache))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)
