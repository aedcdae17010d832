"""``LLM``: offline generation in the way vLLM's ``LLM`` is used.

    from raymoe import LLM, SamplingParams

    llm = LLM("models/tiny-moe")                               # the single-process reference engine
    llm = LLM("models/tiny-moe", expert_ranks=2)               # front-end + 2 expert ranks on Ray
    llm = LLM("models/tiny-moe", expert_ranks=4, layout="coherent")
    llm = LLM(config="deploy/configs/tiny.yaml")               # everything a deployment YAML says
    outs = llm.generate(["def parse(", "import os"], SamplingParams(max_new_tokens=32))
    outs[0].text, outs[0].output_ids, outs[0].finish_reason
    llm.close()                                                # or: with LLM(...) as llm: ...

Prompts are text (the checkpoint's tokenizer encodes them) or token ids; one
``SamplingParams`` for all of them or one per prompt. Greedy decoding gives the same
tokens on every engine (the runtime is checked token for token against the reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from raymoe.workers.engine import Completion, Engine
from raymoe.workers.sampling import SamplingParams

Prompts = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]


class LLM:
    """One engine: the reference engine (``expert_ranks`` and ``config`` unset) or a
    deployment on Ray.

    model: a local Hugging Face checkpoint directory (config.json + safetensors).
    config: a deployment YAML path (``deploy/configs/tiny.yaml`` documents every field) or
        a ``DeploymentConfig``; ``model``, ``expert_ranks``, ``layout``, ``plan`` and
        ``dtype``, when given, override it.
    expert_ranks, layout (``disaggregated`` | ``coherent``), plan (a ``raymoe plan`` file):
        run on Ray with these.
    dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
    max_seqs: sequences decoded together.
    """

    def __init__(self, model: str | Path | None = None, *, config=None, expert_ranks: int | None = None,
                 layout: str | None = None, plan: str | Path | None = None, dtype: str | None = None,
                 max_seqs: int | None = None):
        distributed = config is not None or expert_ranks is not None or layout is not None or plan is not None
        if not distributed:
            if model is None:
                raise TypeError("LLM() needs a model directory or a deployment config")
            import torch

            from raymoe.cluster.config import parse_config
            from raymoe.workers.reference import ReferenceEngine

            checked = parse_config({"model": str(model), "dtype": dtype or "float32",
                                    "batching": {"max_seqs": max_seqs or 16}})  # the same field checks
            self.engine: Engine = ReferenceEngine.from_pretrained(checked.model, getattr(torch, checked.dtype),
                                                                  max_seqs=checked.batching.max_seqs)
            return
        from raymoe.cluster.coordinator import Deployment

        self.engine = Deployment(deployment_config(model, config, expert_ranks, layout, plan, dtype, max_seqs))

    def generate(self, prompts: Prompts, params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Completions in prompt order. ``prompts``: a string, a list of strings, a list of
        token ids, or a list of such lists; ``params``: one for all, or one per prompt."""
        params = SamplingParams() if params is None else params
        if isinstance(prompts, str):
            prompts = [prompts]
        elif prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        prompts = list(prompts)
        many = list(params) if not isinstance(params, SamplingParams) else params
        if isinstance(many, list) and len(many) != len(prompts):
            raise ValueError(f"{len(many)} SamplingParams for {len(prompts)} prompts; give one, or one per prompt")
        if all(isinstance(p, str) for p in prompts):
            return self.engine.generate(prompts, many)
        if any(isinstance(p, str) for p in prompts):
            raise TypeError("prompts are all text or all token-id lists, not a mix")
        return self.engine.generate_ids([list(p) for p in prompts], many)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def close(self) -> None:
        """Stop the deployment's actors (nothing to do for the reference engine)."""
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def deployment_config(model, config, expert_ranks, layout, plan, dtype, max_seqs):
    """A DeploymentConfig from a YAML path / config object / nothing, with the overrides."""
    import dataclasses

    from raymoe.cluster.config import DeploymentConfig, load_config, parse_config

    if config is None:
        if model is None:
            raise TypeError("LLM(expert_ranks=...) needs a model directory")
        base = parse_config({"model": str(model), "expert_ranks": expert_ranks or 1})
    elif isinstance(config, DeploymentConfig):
        base = config
    else:
        base = load_config(config)
    changes = {key: value for key, value in (("model", None if model is None else str(model)),
                                             ("expert_ranks", expert_ranks), ("layout", layout), ("dtype", dtype))
               if value is not None}
    if plan is not None:
        changes["placement"] = dataclasses.replace(base.placement, plan=str(plan))
    if max_seqs is not None:
        changes["batching"] = dataclasses.replace(base.batching, max_seqs=max_seqs)
    return base.replace(**changes)
