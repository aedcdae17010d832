"""The decoder-only MoE language model, single device, plain PyTorch.

Shapes: T = new tokens of the batch, B = sequences, D = hidden, V = vocabulary,
A = activated experts per token. Parallelism lives elsewhere: the forward pass takes
an ``experts`` callable for the routed experts, so the reference engine runs them
here and the distributed front-end sends tokens to expert ranks, with every other
line of the model shared.
"""

from __future__ import annotations

from typing import Callable, Generator, NamedTuple, Protocol

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


class MoERequest(NamedTuple):
    """What one MoE layer asks of the routed experts (an ExpertExecutor's arguments)."""

    moe_index: int
    layer: int
    x: torch.Tensor  # [T, D]
    routing: Routing


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

    # The layer's parts, as every engine runs them (the reference forward below, the
    # coherent layout's per-rank loop): h is the residual stream [T, D], x the MLP input.
    @property
    def index(self) -> int:
        """This layer's position in the model (its KV-cache layer)."""
        return self.self_attn.layer

    def attend(self, h: torch.Tensor, batch: ForwardBatch, cache: KVCache | None) -> torch.Tensor:
        """The attention residual: ``h + attention(norm(h))``."""
        return h + self.self_attn(self.input_layernorm(h), batch, cache)

    def mlp_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.post_attention_layernorm(h)

    def dense(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A dense layer's MLP residual: ``h + mlp(x)``."""
        return h + self.mlp(x)

    def route(self, x: torch.Tensor) -> Routing:
        """A MoE layer's routing of ``x`` (``topk_ids`` / ``topk_weights [T, A]``)."""
        return self.mlp.route(x)

    def moe_output(self, h: torch.Tensor, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """A MoE layer's residual: ``h`` + the routed experts' combined output + the shared experts of ``x``."""
        shared = self.mlp.shared(x)
        return h + (routed if shared is None else routed + shared)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, with_experts: bool = True):
        super().__init__()
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":  # normal_ on meta (load_model, shape checks) imports torch._dynamo: 2 s
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
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

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [T]`` -> the residual stream ``[T, D]``."""
        return self.model.embed_tokens(input_ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm and LM head: ``h [N, D]`` -> ``[N, V]``."""
        return self.lm_head(self.model.norm(h))

    def forward(self, batch: ForwardBatch, cache: KVCache | None = None,
                experts: ExpertExecutor | None = None, on_route: RouteObserver | None = None,
                all_logits: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of each sequence's last new token ``[B, V]`` (``[T, V]`` with all_logits;
        ``[N, V]`` of the token rows ``rows [N]`` when given).

        With ``cache`` the new keys and values are stored and earlier ones attended to;
        without it every sequence must start at position 0.
        """
        run = self.layer_steps(batch, cache, on_route, all_logits, rows)
        try:
            request = next(run)
            while True:
                y = self.model.layers[request.layer].mlp.run_experts(request.x, request.routing) \
                    if experts is None else experts(*request)
                request = run.send(y)
        except StopIteration as done:
            return done.value

    def layer_steps(self, batch: ForwardBatch, cache: KVCache | None = None, on_route: RouteObserver | None = None,
                    all_logits: bool = False, rows: torch.Tensor | None = None
                    ) -> Generator[MoERequest, torch.Tensor, torch.Tensor]:
        """The forward pass as a generator: it yields each MoE layer's request
        ``(moe_index, layer, x [T, D], routing)`` for the routed experts, is sent their
        combined output ``[T, D]``, and returns the logits (as ``forward``). Engines that
        interleave two micro-batches (``workers/overlap.py``) drive two of these."""
        h = self.embed(batch.input_ids)  # [T, D]
        moe_index = 0
        for index, layer in enumerate(self.model.layers):
            h = layer.attend(h, batch, cache)
            x = layer.mlp_input(h)
            if layer.is_moe:
                routing = layer.route(x)
                if on_route is not None:
                    on_route(moe_index, routing)
                y = yield MoERequest(moe_index, index, x, routing)
                h = layer.moe_output(h, x, y)
                moe_index += 1
            else:
                h = layer.dense(h, x)
        if rows is not None:
            return self.logits(h[rows])
        return self.logits(h if all_logits or batch.decode else h[batch.last_token])  # decode: [T] is [B]
