"""Tiny random-weight models of every supported family, built with transformers' own
config classes and saved with ``save_pretrained`` (no hub access).

Weights use a large init scale so logits and router scores are well separated: a
greedy comparison then tests the math, not float noise at near-ties.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.15, tie_word_embeddings=False, max_position_embeddings=256)


def hf_config(family: str, **overrides):
    import transformers as T

    if family == "mixtral":
        cfg = T.MixtralConfig(**COMMON, intermediate_size=48, num_hidden_layers=3, num_local_experts=6,
                              num_experts_per_tok=2, eos_token_id=None, bos_token_id=None)
    elif family == "qwen2_moe":
        cfg = T.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=24,
                               shared_expert_intermediate_size=40, num_hidden_layers=4, num_experts=6,
                               num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=False)
    elif family == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=4,
                               num_experts=8, num_experts_per_tok=2, head_dim=16, decoder_sparse_step=2,
                               norm_topk_prob=True)
    elif family == "olmoe":
        cfg = T.OlmoeConfig(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=24, num_hidden_layers=3,
                            num_experts=16, num_experts_per_tok=4, clip_qkv=3.0, eos_token_id=None,
                            pad_token_id=None, bos_token_id=None)
    elif family == "deepseek_v2":
        cfg = T.DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=64,
                                 moe_intermediate_size=24, num_hidden_layers=3, n_routed_experts=8,
                                 num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                 topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                 routed_scaling_factor=1.5, q_lora_rank=None, kv_lora_rank=16,
                                 qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    elif family == "deepseek_v3":
        cfg = T.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=64,
                                 moe_intermediate_size=24, num_hidden_layers=3, n_routed_experts=8,
                                 num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                 n_group=4, topk_group=2, routed_scaling_factor=2.5, q_lora_rank=16,
                                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    elif family == "glm4_moe":
        cfg = T.Glm4MoeConfig(**COMMON, head_dim=16, intermediate_size=64, moe_intermediate_size=24,
                              num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                              first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                              norm_topk_prob=True, use_qk_norm=True, attention_bias=True)
    else:
        raise KeyError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe")


def build_hf_model(family: str, seed: int = 0, **overrides):
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(hf_config(family, **overrides), attn_implementation="eager")
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zero by default: make it matter
                buf.copy_(torch.randn_like(buf) * 0.05)
    return model.eval()


def save_tiny_model(family: str, path: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Build and save a tiny model; returns the transformers model (the reference)."""
    model = build_hf_model(family, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def save_char_tokenizer(path: Path) -> None:
    """A character-level tokenizer for the tiny models' 96-token vocabulary:
    id i < 95 is ``chr(32 + i)``, id 95 is ``</s>`` (end of sequence)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {chr(32 + i): i for i in range(95)} | {"</s>": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["</s>"])
    tok.save(str(Path(path) / "tokenizer.json"))
    (Path(path) / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "add_bos_token": False}))


def save_planted_affinity_model(path: Path, num_experts: int = 4, layers: int = 3, seed: int = 0) -> list[list[int]]:
    """A top-1 Mixtral whose routing has planted inter-layer affinity: expert ``e`` at
    MoE layer 0 is always followed by ``perms[l][e]`` at layer l.

    Attention adds nothing (``o_proj`` = 0) and experts add little, so every layer sees
    (almost) the embedding; layer l's router is layer 0's with its rows permuted, with
    large margins. Returns ``perms`` (``perms[0]`` is the identity).
    """
    from raymoe.workers.model.decoder import MoEForCausalLM
    from raymoe.workers.model.export import save_checkpoint
    from raymoe.workers.model.families import parse_config

    config = parse_config({"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
                           "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
                           "num_local_experts": num_experts, "num_experts_per_tok": 1,
                           "max_position_embeddings": 256})
    g = torch.Generator().manual_seed(seed)
    model = MoEForCausalLM(config)
    perms = [list(range(num_experts))] + [torch.randperm(num_experts, generator=g).tolist() for _ in range(layers - 1)]
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
            if name.endswith("norm.weight"):
                param.fill_(1.0)
        router0 = torch.randn(num_experts, 32, generator=g) * 3.0
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down.mul_(1e-4)
            inverse = torch.argsort(torch.tensor(perms[index]))
            layer.mlp.gate.weight.copy_(router0[inverse])  # row perms[l][e] of layer l is row e of layer 0
    save_checkpoint(model, path)
    return perms


def assert_kv_cache_walk_matches(hf, ours, prompt: list[int], prefill: int, max_seqs: int = 4) -> None:
    """Prefill ``prompt[:prefill]``, then feed the rest one token at a time through the KV
    cache: at every position the logits equal transformers' one pass (1e-5)."""
    from raymoe.workers.model.batch import ForwardBatch
    from raymoe.workers.reference import ReferenceEngine

    engine = ReferenceEngine(ours, max_seqs=max_seqs, block_size=4)
    cache = engine.runner.cache
    cache.set_blocks(1, range(cache.layout.max_blocks, 0, -1))  # the sequence's 4-token blocks in reverse pool order
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
        first = engine.model(ForwardBatch.build([prompt[:prefill]], [0], [1]), engine.runner.cache)
        assert (first[0] - want[prefill - 1]).abs().max().item() <= 1e-5, f"prefill of {prefill} tokens"
        for pos in range(prefill, len(prompt)):
            step = engine.model(ForwardBatch.build([[prompt[pos]]], [pos], [1]), engine.runner.cache)
            assert (step[0] - want[pos]).abs().max().item() <= 1e-5, f"position {pos}"


def _quantized(key: str, value: torch.Tensor) -> bool:
    """What DeepSeek-V3's FP8 checkpoint quantizes: linear weights, not embeddings, norms,
    routers or the LM head."""
    return value.dim() == 2 and key.endswith(".weight") and not any(
        part in key for part in ("embed_tokens", "lm_head", "norm", ".gate.weight"))


FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def fp8_checkpoint(src, dst, block: tuple[int, int]) -> tuple:
    """Write ``src`` FP8-quantized to ``dst`` and, beside it, ``dst``-plain: the same model
    with the dequantized weights in float32. Returns (fp8 dir, plain dir, quantized keys)."""
    from safetensors.torch import load_file, save_file

    from raymoe.workers.model.quantization import dequantize, quantize

    plain = dst.parent / f"{dst.name}-plain"
    for path in (dst, plain):
        shutil.copytree(src, path)
    tensors = load_file(src / "model.safetensors")
    fp8, deq, keys = {}, {}, []
    for key, value in tensors.items():
        if _quantized(key, value):
            q, scale_inv = quantize(value, block)
            fp8[key], fp8[key + "_scale_inv"] = q, scale_inv
            deq[key] = dequantize(q, scale_inv, block, torch.float32)
            keys.append(key)
        else:
            fp8[key] = deq[key] = value
    save_file(fp8, dst / "model.safetensors")
    save_file(deq, plain / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {**FP8, "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config))
    return dst, plain, keys
