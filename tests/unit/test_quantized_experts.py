"""Weight-only int8 / int4 routed experts (``workers/model/quantized_experts.py``): the
packing round-trips, the kernels compute the dequantized weights' product, a quantized
stack equals a float stack holding the dequantized weights, and what the kernels cannot
take is refused naming the field. The runtime's expert ranks against the reference
engine, quantized alike: tests/cluster/test_runtime.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymoe.cluster.config import DeploymentConfigError, parse_config
from raymoe.workers.model.experts import ExpertStack
from raymoe.workers.model.quantized_experts import (
    ExpertQuantizationError,
    QuantizedExpertStack,
    check_quantizable,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
    quantize_stack,
    stack_nbytes,
)
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "tiny-moe"


def _stack(experts=4, hidden=64, inter=128, seed=0) -> ExpertStack:
    torch.manual_seed(seed)
    stack = ExpertStack(experts, hidden, inter)
    with torch.no_grad():
        stack.gate_up.copy_(torch.randn_like(stack.gate_up) * 0.1)
        stack.down.copy_(torch.randn_like(stack.down) * 0.1)
    return stack.eval()


def _dequantized(stack: ExpertStack, mode: str, group: int) -> ExpertStack:
    """A float stack holding what ``mode`` keeps of ``stack``'s weights."""
    out = _stack(stack.num_experts, stack.down.shape[1], stack.down.shape[2])
    with torch.no_grad():
        for name in ("gate_up", "down"):
            for e in range(stack.num_experts):
                w = getattr(stack, name)[e]
                if mode == "int8":
                    q, s = quantize_int8(w)
                    deq = q.float() * s[:, None]
                else:
                    deq = dequantize_int4(*quantize_int4(w, group), group)
                getattr(out, name)[e].copy_(deq)
    return out


@pytest.mark.parametrize("mode,group,bound", [("int8", 32, 0.01), ("int4", 32, 0.1), ("int4", 64, 0.12)])
def test_quantized_weights_stay_close(mode, group, bound):
    w = torch.randn(96, 128) * 0.1
    if mode == "int8":
        q, s = quantize_int8(w)
        deq = q.float() * s[:, None]
        assert q.dtype == torch.int8 and s.shape == (96,)
    else:
        q, sz = quantize_int4(w, group)
        deq = dequantize_int4(q, sz, group)
        assert int(q.min()) >= 0 and int(q.max()) <= 15 and sz.shape == (128 // group, 96, 2)
    error = ((deq - w).norm() / w.norm()).item()
    assert 0 < error < bound, error


@pytest.mark.parametrize("mode,group", [("int8", 32), ("int4", 32), ("int4", 64)])
def test_a_quantized_stack_equals_a_float_stack_of_its_dequantized_weights(mode, group):
    stack = _stack()
    quantized = quantize_stack(stack, mode, group)
    assert isinstance(quantized, QuantizedExpertStack) and quantized.num_experts == 4
    reference = _dequantized(stack, mode, group)
    x, ids = torch.randn(11, 64), torch.tensor([3, 0, 0, 2, 1, 3, 3, 0, 2, 2, 1])
    with torch.no_grad():
        got, want = quantized(x, ids), reference(x, ids)
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item() + 1e-6
        one = quantized(x[4:5], ids[4:5])  # a row's result does not depend on the rows beside it
        assert torch.equal(one, got[4:5])


def test_quantized_experts_are_smaller():
    stack = _stack(8, 128, 256)
    full = stack_nbytes(stack)
    int8, int4 = stack_nbytes(quantize_stack(stack, "int8")), stack_nbytes(quantize_stack(stack, "int4", 64))
    assert full / int8 > 3.5 and int8 > int4  # fp32 -> 1 byte per weight + a scale per row; 4 bits + group scales
    assert quantize_stack(stack, "none") is stack


@pytest.mark.parametrize("mode,group,hidden,inter,device,field", [
    ("int3", 32, 64, 96, "cpu", "quantization.experts"),
    ("int4", 16, 64, 96, "cpu", "quantization.group_size"),
    ("int4", 64, 64, 96, "cpu", "quantization.group_size"),  # 96 is not a multiple of 64
    ("int4", 32, 64, 96, "cuda", "quantization.experts"),  # CPU kernels only
    ("int8", 32, 64, 96, "cuda", "quantization.experts"),
])
def test_what_the_kernels_cannot_take_is_refused_by_field(mode, group, hidden, inter, device, field):
    with pytest.raises(ExpertQuantizationError) as err:
        check_quantizable(mode, group, hidden, inter, device)
    assert err.value.field == field


def test_the_config_section_is_validated():
    assert parse_config({"model": "m"}).quantization.experts == "none"
    assert parse_config({"model": "m", "quantization": {"experts": "int4", "group_size": 64}}).quantization.group_size \
        == 64
    for bad, field in (({"experts": "fp4"}, "quantization.experts"), ({"group_size": 48}, "quantization.group_size"),
                       ({"bits": 4}, "quantization.bits")):
        with pytest.raises(DeploymentConfigError) as err:
            parse_config({"model": "m", "quantization": bad})
        assert err.value.field == field


def test_the_reference_engine_runs_quantized_experts():
    """Every MoE layer's experts quantized. On the shipped trained model, int8 keeps the
    float engine's 20 greedy tokens on this prompt (the perplexity over held-out text:
    ``python -m raymoe.benchmarks.quantized_experts``)."""
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    prompt = list(range(3, 40))
    out = {}
    for mode in ("none", "int8", "int4"):
        engine = ReferenceEngine.from_pretrained(SHIPPED, expert_quantization=(mode, 32), max_seqs=1)
        kinds = {type(layer.mlp.experts) for layer in engine.model.model.layers if layer.is_moe}
        assert kinds == {ExpertStack if mode == "none" else QuantizedExpertStack}
        out[mode] = engine.generate_ids([prompt], params)[0].output_ids
    assert len(out["int4"]) == 20 and out["int8"] == out["none"]
