"""The decoder-only MoE language model, single device, plain PyTorch.

Shapes: T = new tokens of the batch, B = sequences, D = hidden, V = vocabulary,
A = activated experts per token. Parallelism lives elsewhere: the forward pass takes
an ``experts`` callable for the routed experts, so the reference engine runs them
here and the distributed front-end sends tokens to expert ranks, with every other
line of the model shared.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from raymoe.workers.model.attention import Attention, LatentAttention
from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.config import ModelConfig
from raymoe.workers.model.kv_cache import KVCache
from raymoe.workers.model.linear import linear
from raymoe.workers.model.mlp import GatedMLP
from raymoe.workers.model.moe import MoEBlock
from raymoe.workers.model.norm import RMSNorm
from raymoe.workers.model.router import Routing


class ExpertExecutor(Protocol):
    """Runs the routed experts of one MoE layer: ``x [T, D]`` -> combined ``[T, D]``."""

    def __call__(self, moe_index: int, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor: ...


RouteObserver = Callable[[int, Routing], None]  # (moe_index, routing): traces, load statistics


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, with_experts: bool = True):
        super().__init__()
        attention = LatentAttention if config.attention == "mla" else Attention
        self.self_attn = attention(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.moe_layers[layer]
        if self.is_moe:
            self.mlp = MoEBlock(config, with_experts)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.mlp_bias)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, with_experts: bool = True):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, with_experts) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoEForCausalLM(nn.Module):
    """Parameter names follow the Hugging Face layout (``model.layers.{l}.self_attn...``),
    except routed experts, stacked per layer as ``model.layers.{l}.mlp.experts.{gate_up,down}``."""

    def __init__(self, config: ModelConfig, with_experts: bool = True):
        super().__init__()
        self.config = config
        self.model = Backbone(config, with_experts)
        self.lm_head = linear(config.hidden_size, config.vocab_size, bias=False)

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def local_experts(self, moe_index: int, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The default ExpertExecutor: every expert is on this process."""
        return self.model.layers[layer].mlp.run_experts(x, routing)

    def forward(self, batch: ForwardBatch, cache: KVCache | None = None,
                experts: ExpertExecutor | None = None, on_route: RouteObserver | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Logits of each sequence's last new token ``[B, V]`` (``[T, V]`` with all_logits).

        With ``cache`` the new keys and values are stored and earlier ones attended to;
        without it every sequence must start at position 0.
        """
        h = self.model.embed_tokens(batch.input_ids)  # [T, D]
        moe_index = 0
        for index, layer in enumerate(self.model.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), batch, cache)
            x = layer.post_attention_layernorm(h)
            if layer.is_moe:
                routing = layer.mlp.route(x)
                if on_route is not None:
                    on_route(moe_index, routing)
                y = layer.mlp.run_experts(x, routing) if experts is None else experts(moe_index, index, x, routing)
                shared = layer.mlp.shared(x)
                h = h + (y if shared is None else y + shared)
                moe_index += 1
            else:
                h = h + layer.mlp(x)
        h = self.model.norm(h if all_logits or batch.decode else h[batch.last_token])  # decode: [T] is [B]
        return self.lm_head(h)
