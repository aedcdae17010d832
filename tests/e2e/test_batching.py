"""Requests from many clients share the runtime's continuous batching: 32 concurrent
requests of different lengths each get the greedy text they would get alone, and the
server's metrics show decode steps that computed many sequences together."""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import openai

from tests.e2e.conftest import alone, metric, metric_samples

WORDS = ["def", "class", "import", "return", "for i in range", "while True", "print", "lambda x", "yield", "async"]


def _requests(count: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens) pairs of different lengths."""
    out = []
    for i in range(count):
        prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 6))
        out.append((prompt, 4 + (i * 7) % 29))
    return out


async def _complete_all(server, requests) -> list[str]:
    async with openai.AsyncOpenAI(base_url=server.openai_base, api_key="unused", max_retries=0, timeout=120) as c:
        calls = [c.completions.create(model=server.model, prompt=p, max_tokens=n, temperature=0,
                                      extra_body={"ignore_eos": True}) for p, n in requests]
        return [r.choices[0].text for r in await asyncio.gather(*calls)]


def test_32_concurrent_requests_are_batched_and_each_gets_its_alone_text(server, reference):
    requests = _requests(32)
    before = metric_samples(httpx.get(f"{server.base_url}/metrics").text)
    texts = asyncio.run(_complete_all(server, requests))
    after = metric_samples(httpx.get(f"{server.base_url}/metrics").text)

    for (prompt, n), text in zip(requests, texts):
        assert text == alone(reference, prompt, max_new_tokens=n, ignore_eos=True).text, prompt

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    steps = delta("raymoe_step_sequences_count")
    sequences = delta("raymoe_step_sequences_sum")
    tokens = sum(n for _, n in requests)
    assert delta("raymoe_generation_tokens_total") == tokens
    assert sequences == tokens  # every step computed one token per running sequence
    assert steps < tokens / 4, (steps, tokens)  # serialised would take one step per token
    assert delta("raymoe_step_sequences_count") - delta("raymoe_step_sequences_bucket", le="8.0") > 0  # > 8 at once
    assert sequences / steps > 4
