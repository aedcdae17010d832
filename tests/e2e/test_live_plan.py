"""A new placement plan loaded into the running server (``POST /v1/admin/plan``) while 16
streams decode: expert weights move between the ranks, and every stream still gets
exactly the greedy text it gets alone."""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import openai

from tests.e2e.conftest import alone
from tests.plans import linear_plan, random_plan

PROMPTS = [f"def f{i}(x): return x * {i} +" for i in range(16)]
NEW_TOKENS = 40


def plan_text(plan, tmp_path) -> str:
    path = tmp_path / f"{plan.policy}.yaml"
    plan.save(path)
    return path.read_text()


async def _decode_with_plan_change(server, new_plan: str) -> tuple[list[str], dict]:
    async with openai.AsyncOpenAI(base_url=server.openai_base, api_key="unused", max_retries=0, timeout=120) as c, \
            httpx.AsyncClient(timeout=120) as http:
        streams = [await c.completions.create(model=server.model, prompt=p, max_tokens=NEW_TOKENS, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True}) for p in PROMPTS]
        texts = [""] * len(streams)
        iters = [s.__aiter__() for s in streams]
        for i, it in enumerate(iters):  # every stream has its first tokens: all 16 are decoding
            texts[i] += (await it.__anext__()).choices[0].text
        response = await http.post(f"{server.base_url}/v1/admin/plan", json={"plan": new_plan})

        async def rest(i: int) -> None:
            async for chunk in iters[i]:
                texts[i] += chunk.choices[0].text if chunk.choices else ""

        await asyncio.gather(*(rest(i) for i in range(len(iters))))
        return texts, {"status": response.status_code, **response.json()}


def test_plan_change_while_16_streams_decode(server, reference, tmp_path):
    new = random_plan(6, 2, 2, seed=3, layers=3)  # replicas: 8 slots per layer
    texts, moved = asyncio.run(_decode_with_plan_change(server, plan_text(new, tmp_path)))
    try:
        assert moved["status"] == 200, moved
        assert moved["object"] == "placement_plan" and moved["experts_moved"] > 0 and moved["bytes_moved"] > 0
        for prompt, text in zip(PROMPTS, texts):
            assert text == alone(reference, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).text, prompt
    finally:  # the shared server goes back to its linear plan
        back = httpx.post(f"{server.base_url}/v1/admin/plan", json={"plan": plan_text(linear_plan(6, 2, 3), tmp_path)},
                          timeout=60)
        assert back.status_code == 200, back.text


def test_bad_plans_are_refused_and_the_server_keeps_serving(server, reference, tmp_path):
    url = f"{server.base_url}/v1/admin/plan"
    cases = {
        "not yaml": "{[",
        "wrong rank count": plan_text(linear_plan(6, 3, 3), tmp_path),
        "wrong layer count": plan_text(linear_plan(6, 2, 2), tmp_path),
        "missing field": "version: 1\npolicy: linear\n",
    }
    for name, text in cases.items():
        r = httpx.post(url, json={"plan": text}, timeout=30)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["param"] == "plan", (name, r.text)
    r = httpx.post(url, json={"plan": "x", "extra": 1}, timeout=30)
    assert r.status_code in (400, 422) and "extra" in r.text
    body = {"model": server.model, "prompt": "def g(", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    ok = httpx.post(f"{server.openai_base}/completions", json=body, timeout=60)
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["text"] == alone(reference, "def g(", max_new_tokens=5, ignore_eos=True).text


def test_plan_change_needs_the_api_key(guarded_server, tmp_path):
    r = httpx.post(f"{guarded_server.base_url}/v1/admin/plan", json={"plan": plan_text(linear_plan(6, 2, 3), tmp_path)},
                   timeout=30)
    assert r.status_code == 401
