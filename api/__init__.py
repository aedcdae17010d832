"""raymoe: distributed expert-parallel serving of Mixture-of-Experts models on Ray.

    from raymoe import LLM, SamplingParams

    with LLM("models/tiny-moe") as llm:                       # single process (reference engine)
        print(llm.generate(["def parse("], SamplingParams(max_new_tokens=24))[0].text)
    with LLM("models/tiny-moe", expert_ranks=2) as llm:       # front-end + 2 expert ranks on Ray
        ...

The subpackages are the design card's folders (DESIGN.md): ``raymoe.workers`` (model,
actors, data plane), ``raymoe.placement`` (pure planning), ``raymoe.cluster`` (control
plane), ``raymoe.deploy`` (serving, CLI, Kubernetes), ``raymoe.benchmarks``. Names here are
loaded on first use, so ``import raymoe.placement`` stays light (no torch, no Ray).
"""

from __future__ import annotations

__all__ = ["LLM", "SamplingParams", "Completion"]

_EXPORTS = {"LLM": "raymoe.llm", "SamplingParams": "raymoe.workers.sampling", "Completion": "raymoe.workers.engine"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'raymoe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
