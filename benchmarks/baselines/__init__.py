"""The systems ``benchmarks/compare.py`` runs side by side, one module each.

- ``reference``: raymoe's single-process reference engine (the greedy text every row must match)
- ``raymoe_deployment``: raymoe's distributed runtime (disaggregated and coherent layouts)
- ``hf_transformers``: the model's own ``transformers`` implementation, ``generate`` with its KV cache
- ``naive_ray``: one Ray remote call per expert per MoE layer, tokens through the object store
- ``deepspeed_ep``: DeepSpeed-MoE expert parallelism (``deepspeed.moe.layer.MoE``, ``ep_size`` = ranks)

Every system is fed the same checkpoint directory (so the same expert weights) and the
same prompts, and reports a ``measure.RunResult``.
"""
