"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, seeded.

Sampling is stateless: the n-th generated token of a request is drawn with a generator
seeded from ``(seed, n)``. A seeded request therefore gives the same tokens whatever
else shares its batch and whichever process samples it (any rank of the coherent
layout, or a replay after a fault). Engines give unseeded requests a random seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; names the field, the value and the range."""

    def __init__(self, field_name: str, value: object, expected: str):
        self.field, self.value, self.expected = field_name, value, expected
        super().__init__(f"sampling parameter '{field_name}' = {value!r}; expected {expected}")


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 and top_p 1.0 mean no filtering."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens, isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             "an integer >= 1"),
            ("temperature", self.temperature, isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100,
             "a number in [0, 100]"),
            ("top_p", self.top_p, isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("seed", self.seed, self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
             "null or an integer in [0, 2**63)"),
        ]
        for name, value, ok, expected in checks:
            if not ok or isinstance(value, bool):
                raise SamplingParamsError(name, value, expected)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_seed(self) -> "SamplingParams":
        """These params with a random seed filled in, if none was given."""
        if self.seed is not None:
            return self
        return replace(self, seed=int(torch.randint(0, 2**62, (1,)).item()))


def token_generator(seed: int, index: int) -> torch.Generator:
    """The generator for the ``index``-th generated token of a request seeded ``seed``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63 - 1))


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``logits [V]`` -> probabilities ``[V]`` after temperature, top-k and top-p."""
    logits = logits.float()
    # Shift before dividing: with a tiny temperature the best token stays finite (0), the others -inf.
    logits = (logits - logits.max()) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p, and always the most likely token
        drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= params.top_p
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def _argmax(logits: torch.Tensor) -> list[int]:
    """Index of each row's first maximum (NaN counts as the maximum), as torch.argmax.

    Several rows on CPU go to numpy's vectorised argmax. Measured in the tiny model's
    decode loop (V = 4096), torch against numpy: 1 row 27 against 36 us, 2 rows 35 against
    37, 8 rows 86 against 40, 32 rows 294 against 66.
    """
    if logits.shape[0] > 1 and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return np.argmax(logits.detach().numpy(), axis=-1).tolist()
    return logits.argmax(dim=-1).tolist()


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> list[int]:
    """One token per row of ``logits [B, V]``; ``indices[b]`` is how many tokens row b's
    request has generated before this one (seeded requests only)."""
    greedy = _argmax(logits)
    if all(p.greedy for p in params):
        return greedy
    out = []
    for row, (p, index) in enumerate(zip(params, indices)):
        if p.greedy:
            out.append(greedy[row])
        else:
            probs = _filtered_probs(logits[row].float().cpu(), p)
            out.append(int(torch.multinomial(probs, 1, generator=token_generator(p.seed, index))))
    return out
