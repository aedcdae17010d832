"""An expert rank of a served deployment is SIGKILLed while 16 streams decode: the engine
recovers inside the step (new actor, new process group, replay from the committed
tokens), every stream completes with exactly the text it gets alone, and /metrics counts
the recovery. On the fault tests' application (``fault_server``), so the main servers
are untouched."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx2 as httpx
import openai
import pytest

from tests.e2e.conftest import FAULT_APP, alone, metric, metric_samples

PROMPTS = [f"class C{i}:\n    def m(self):" for i in range(16)]
NEW_TOKENS = 48


def expert_worker_pid(app: str) -> int:
    """PID of the ExpertWorker actor created by ``app``'s live replica (its owner)."""
    from ray._private.state import actors

    table = actors().values()
    replica = [a for a in table if a["Name"].startswith(f"SERVE_REPLICA::{app}#") and a["State"] == "ALIVE"]
    assert len(replica) == 1
    owner = replica[0]["Address"]  # the replica's worker process: IP and port
    workers = [a for a in table if a["ActorClassName"].endswith("ExpertWorker") and a["State"] == "ALIVE"
               and (a["OwnerAddress"]["IPAddress"], a["OwnerAddress"]["Port"]) == (owner["IPAddress"], owner["Port"])]
    assert len(workers) == 1, workers
    return workers[0]["Pid"]


async def _decode_and_kill(server) -> list[str]:
    async with openai.AsyncOpenAI(base_url=server.openai_base, api_key="unused", max_retries=0, timeout=180) as c:
        streams = [await c.completions.create(model=server.model, prompt=p, max_tokens=NEW_TOKENS, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True}) for p in PROMPTS]
        iters = [s.__aiter__() for s in streams]
        texts = [(await it.__anext__()).choices[0].text for it in iters]  # all 16 are decoding
        os.kill(expert_worker_pid(FAULT_APP), signal.SIGKILL)

        async def rest(i: int) -> None:
            async for chunk in iters[i]:
                texts[i] += chunk.choices[0].text if chunk.choices else ""

        await asyncio.gather(*(rest(i) for i in range(len(iters))))
        return texts


@pytest.mark.slow
def test_expert_rank_killed_while_16_streams_decode(fault_server, reference):
    server = fault_server
    texts = asyncio.run(_decode_and_kill(server))
    for prompt, text in zip(PROMPTS, texts):
        assert text == alone(reference, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).text, prompt
    samples = metric_samples(httpx.get(f"{server.base_url}/metrics", timeout=30).text)
    assert metric(samples, "raymoe_recoveries_total") == 1
    assert metric(samples, "raymoe_recovery_seconds_count") == 1
    health = httpx.get(f"{server.base_url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["alive"] == health.json()["actors"] == 2
