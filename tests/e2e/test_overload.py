"""Overload: offered about 4x what it sustains, the server refuses the excess with 429 and
a Retry-After, serves every request it admits with exactly the text it gets alone, keeps
nothing behind once the load is gone, and serves the next request at once.

First the admission policy on its own (``raymoe.deploy.admission``: pure, no server), then a live
app of its own: 2 KV slots, a queue of 4 and ``max_wait_s`` 0.5, so both limits refuse.
Counts and correctness only; latency under overload is measured by benchmarks/overload.py.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx2 as httpx
import pytest

from raymoe.deploy.admission import AdmissionPolicy, WaitTooLongError, refusal, wait_steps
from tests.e2e.conftest import _deploy, alone, metric, metric_samples
from raymoe.workers.engine import QueueFullError
from raymoe.workers.sampling import SamplingParams
from raymoe.workers.model.kv_cache import KVLayout
from raymoe.workers.scheduler import Request, Scheduler

PROMPTS = ["def add(a, b):", "import os", "class A:", "for x in y:", "print('hi')", "while True:"]
MAX_TOKENS = 8
LOAD_S = 10.0  # the overload phase
FACTOR = 4.0


# -- the policy, without a server ---------------------------------------------------------
def _scheduler(max_seqs: int, running: list[tuple[int, int]], waiting: list[int]) -> Scheduler:
    """``running``: (max_new_tokens, generated so far) per sequence; ``waiting``: max_new_tokens."""
    s = Scheduler(max_seqs=max_seqs, max_seq_len=1000)
    for i, (budget, done) in enumerate(running):
        s.add(Request(f"r{i}", [1, 2], SamplingParams(max_new_tokens=budget)))
        s.schedule()[-1].output_ids.extend([7] * done)
    for i, budget in enumerate(waiting):
        s.add(Request(f"w{i}", [1, 2], SamplingParams(max_new_tokens=budget)))
    return s


@pytest.mark.parametrize("max_seqs, running, waiting, steps", [
    (2, [], [], 0),  # free slots
    (2, [(10, 0)], [], 0),  # one slot still free
    (2, [(10, 0), (10, 4)], [], 6),  # the second frees after its 6 remaining tokens
    (2, [(10, 0), (10, 4)], [3], 9),  # the waiting one takes that slot for 3 steps, then the first frees at 10
    (2, [(10, 0), (10, 4)], [3, 20], 10),
    (1, [(5, 0)], [5, 5], 15),  # one slot: each request in turn
    (2, [], [4, 4, 4], 4),  # a burst taken before any step: two start now, the third after 4
])
def test_wait_steps_walks_the_slots_in_order(max_seqs, running, waiting, steps):
    assert wait_steps(_scheduler(max_seqs, running, waiting)) == steps


def test_wait_steps_counts_kv_blocks_too():
    """Rows are free, but the two running sequences' whole lengths take the pool's 4
    blocks: one more request waits until the second frees its 2 blocks, after 20 steps."""
    s = Scheduler(max_seqs=4, max_seq_len=32, kv=KVLayout(num_blocks=4, block_size=16, max_blocks=2))
    for i, (budget, done) in enumerate([(30, 0), (30, 10)]):
        s.add(Request(f"r{i}", [1, 2], SamplingParams(max_new_tokens=budget)))
        s.schedule()[-1].output_ids.extend([7] * done)
    assert s.max_seqs - len(s.running) == 2 and wait_steps(s) == 20
    s.add(Request("w", [1, 2], SamplingParams(max_new_tokens=20)))  # takes those 2 blocks from step 20 to 40
    assert wait_steps(s) == 30  # the next to free: the first sequence's, after its 30 steps


def test_refusal_by_count_then_by_expected_wait():
    s = _scheduler(2, [(10, 0), (10, 4)], [3])  # a new request would wait 9 steps
    assert refusal(AdmissionPolicy(max_queue=4), s, step_s=0.1) is None
    full = refusal(AdmissionPolicy(max_queue=1), s, step_s=0.1)
    assert type(full) is QueueFullError and full.retry_after_s == 1  # 0.9 s, rounded up to whole seconds
    late = refusal(AdmissionPolicy(max_queue=4, max_wait_s=0.5), s, step_s=0.25)
    assert isinstance(late, WaitTooLongError) and late.expected_wait_s == 2.25 and late.retry_after_s == 3
    assert refusal(AdmissionPolicy(max_queue=4, max_wait_s=0.5), s, step_s=None) is None  # no step timed yet
    assert refusal(AdmissionPolicy(max_queue=4, max_wait_s=5.0), s, step_s=0.25) is None


@pytest.mark.parametrize("value", [0, -1.0, "1s", True, 1e9])
def test_max_wait_s_is_validated(value):
    from raymoe.cluster.config import DeploymentConfigError, parse_config

    assert parse_config({"model": "m", "batching": {"max_wait_s": 1.5}}).batching.max_wait_s == 1.5
    with pytest.raises(DeploymentConfigError, match="batching.max_wait_s"):
        parse_config({"model": "m", "batching": {"max_wait_s": value}})


def test_engine_loop_judges_a_submission_by_its_first_choice(chat_model):
    """n choices on an idle engine are admitted even when the later ones must wait for the
    earlier ones' slots; a request arriving behind them is refused by the expected wait."""
    from raymoe.deploy.engine_loop import EngineLoop, FinishEvent
    from raymoe.workers.reference import ReferenceEngine

    engine = ReferenceEngine.from_pretrained(chat_model, max_seqs=2, max_seq_len=64)
    loop = EngineLoop(engine, idle_wait_s=0.05, max_wait_s=0.01)
    loop.step_s = 0.1  # as if measured before the first step (any real step is over 0.01 / 29 s)
    loop.start()
    long = SamplingParams(max_new_tokens=30, ignore_eos=True)

    async def main():
        streams = await loop.submit_all([([5, 6], long)] * 4)  # 2 start, 2 wait 30 steps: one submission
        with pytest.raises(WaitTooLongError) as refused:
            await loop.submit([5, 6], long)
        for stream in streams:
            events = [e async for e in stream]
            assert isinstance(events[-1], FinishEvent) and len(events) == 31
        return refused.value
    try:
        refused = asyncio.run(main())
    finally:
        loop.stop()
    assert refused.expected_wait_s > 0.01 and refused.retry_after_s >= 1
    assert not engine.has_work()


# -- a live server -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_server(tmp_path_factory, serve_instance, chat_model):
    return _deploy(tmp_path_factory, serve_instance, chat_model, "overload", "/overload",
                   {"max_seqs": 2, "max_queue": 4, "max_wait_s": 0.5}, None, expert_ranks=1)


def _body(server, i: int) -> dict:
    return {"model": server.model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True}


async def _sustained_rate(server, client) -> float:
    """Requests/s two back-to-back clients get (shapes the load; nothing is asserted on it)."""
    async def one_client(offset: int) -> None:
        for i in range(4):
            r = await client.post(f"{server.openai_base}/completions", json=_body(server, offset + i))
            assert r.status_code == 200, r.text
    started = time.perf_counter()
    await asyncio.gather(one_client(0), one_client(4))
    return 8 / (time.perf_counter() - started)


async def _overload(server) -> tuple[float, list[tuple[int, httpx.Response]]]:
    """Poisson arrivals at FACTOR x the sustained rate for LOAD_S: (rate, [(prompt index, response)])."""
    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1024)) as client:
        rate = FACTOR * await _sustained_rate(server, client)

        async def send(i: int):
            return i, await client.post(f"{server.openai_base}/completions", json=_body(server, i))
        tasks, due, started = [], 0.0, time.perf_counter()
        while (due := due + rng.expovariate(rate)) < LOAD_S:
            await asyncio.sleep(max(0.0, started + due - time.perf_counter()))
            tasks.append(asyncio.create_task(send(len(tasks))))
        return rate, list(await asyncio.gather(*tasks))


def _settled(server, before: dict, answered: dict[int, int], patience_s: float = 20.0) -> dict:
    """/metrics once the server has counted every answer and its loop reported idle (both
    happen just after the client has its response); the last scrape if that takes longer."""
    deadline = time.monotonic() + patience_s
    while True:
        after = metric_samples(httpx.get(f"{server.base_url}/metrics", timeout=30).text)
        counted = all(metric(after, "raymoe_requests_total", route="/v1/completions", status=status)
                      - metric(before, "raymoe_requests_total", route="/v1/completions", status=status) == n
                      for status, n in answered.items())
        idle = all(metric(after, g) == 0 for g in ("raymoe_queue_depth", "raymoe_running_sequences",
                                                    "raymoe_open_streams"))
        if (counted and idle) or time.monotonic() > deadline:
            return after
        time.sleep(0.2)


@pytest.mark.slow
def test_overload_refuses_the_excess_and_serves_the_rest_exactly(small_server, reference):
    s = small_server
    before = metric_samples(httpx.get(f"{s.base_url}/metrics", timeout=30).text)
    rate, results = asyncio.run(_overload(s))
    statuses = [r.status_code for _, r in results]
    print(f"\n[overload] {rate:.1f} req/s for {LOAD_S:g} s: {len(results)} sent, {statuses.count(200)} x 200, "
          f"{statuses.count(429)} x 429")
    assert set(statuses) == {200, 429}, sorted(set(statuses))  # no 5xx, no other refusal
    want = {p: alone(reference, p, max_new_tokens=MAX_TOKENS, ignore_eos=True).text for p in PROMPTS}
    for i, response in results:
        if response.status_code == 200:  # admitted: exactly the text it gets alone
            assert response.json()["choices"][0]["text"] == want[PROMPTS[i % len(PROMPTS)]], i
        else:  # refused: whole seconds to wait, and the OpenAI error object
            assert response.headers["Retry-After"].isdigit() and int(response.headers["Retry-After"]) >= 1
            error = response.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full", error

    answered = {200: statuses.count(200) + 8, 429: statuses.count(429)}  # + the 8 that measured the rate
    after = _settled(s, before, answered)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)
    for status, count in answered.items():
        assert delta("raymoe_requests_total", route="/v1/completions", status=status) == count, status
    assert delta("raymoe_admission_refused_total", reason="queue_full") + \
        delta("raymoe_admission_refused_total", reason="wait") == answered[429]
    for gauge in ("raymoe_queue_depth", "raymoe_running_sequences", "raymoe_open_streams"):
        assert metric(after, gauge) == 0, gauge  # nothing held once every request is answered
    ok = httpx.post(f"{s.openai_base}/completions", json=_body(s, 0), timeout=60)  # right after the load
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == want[PROMPTS[0]]
