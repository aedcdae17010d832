"""The serving layer's parts without a server: incremental text, chat templates, the
engine loop (driving the single-process reference engine from many asyncio tasks) and
the metrics arithmetic. No Ray, no HTTP: fast."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raymoe.deploy.chat import FALLBACK_TEMPLATE, ChatRenderer, ChatTemplateError
from raymoe.deploy.engine_loop import EngineLoop, EngineStoppedError, FailEvent, FinishEvent, TokenEvent
from raymoe.deploy.metrics import ServingMetrics
from raymoe.deploy.text_stream import TextStream
from tests.e2e.conftest import metric, metric_samples
from raymoe.workers.engine import finish_text
from raymoe.workers.sampling import SamplingParams
from raymoe.workers.scheduler import Request, Scheduler
from raymoe.workers.stats import LayerTraffic, StepStats
from raymoe.workers.tokenizer import Tokenizer

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "tiny-moe"


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer(SHIPPED)  # the shipped model's BPE tokenizer is in the repository


class _Seq:  # what finish_text reads: the output ids and the request's stop strings
    def __init__(self, ids, stop):
        self.output_ids = ids
        self.request = type("R", (), {"params": SamplingParams(stop=stop)})()


@settings(max_examples=150, deadline=None)
@given(text=st.text(min_size=1, max_size=40), stop=st.lists(st.text(min_size=1, max_size=3), max_size=2))
def test_streamed_pieces_concatenate_to_the_final_text(bpe, text, stop):
    """Byte-level BPE splits characters across tokens; stop strings may straddle tokens."""
    ids = bpe.encode(text)[1:]  # without BOS
    final = finish_text(bpe, _Seq(ids, tuple(stop)))
    stream = TextStream(bpe.incremental().push, tuple(stop))
    pieces = [stream.push(t) for t in ids]
    assert all("\ufffd" not in p or "\ufffd" in text for p in pieces)
    assert "".join(pieces) + stream.finish(final) == final


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 4095), min_size=1, max_size=40))
def test_incremental_decoding_is_a_prefix_of_the_whole_decode(bpe, ids):
    """Any token ids, invalid UTF-8 and special tokens too: after every token the pieces
    are a prefix of decoding all the tokens so far, and with the held characters they
    are all of it, but for an incomplete last character."""
    decoder = bpe.incremental()
    out = ""
    for n, token in enumerate(ids, 1):
        out += decoder.push(token)
        whole = bpe.decode(ids[:n])
        assert whole.startswith(out)
        assert (out + decoder.held()) == whole.rstrip("\ufffd") or whole.endswith("\ufffd")


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 4095), min_size=1, max_size=30),
       stop=st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=2))
def test_the_scheduler_stops_at_the_first_token_whose_text_holds_a_stop_string(bpe, ids, stop):
    """Stop strings are searched in a window of the text decoded a token at a time; it
    stops at the token where decoding the whole output again would first find one."""
    from raymoe.workers.scheduler import Request, Scheduler

    def first_stop(tokens):
        for n in range(1, len(tokens) + 1):
            text = bpe.decode(tokens[:n])
            if any(s in text for s in stop):
                return n
        return None

    params = SamplingParams(stop=tuple(stop), max_new_tokens=len(ids) + 1, ignore_eos=True)
    scheduler = Scheduler(1, 1000, (), bpe, 4096)
    scheduler.add(Request("r", [3], params))
    stopped = None
    for n, token in enumerate(ids, 1):
        (seq,) = scheduler.schedule()
        if scheduler.commit([seq], [token]):
            stopped = n
            break
    assert stopped == first_stop(ids)


def test_stop_string_prefix_is_held_back_until_it_is_decided():
    stream = TextStream(chr, ("END",))
    assert [stream.push(ord(c)) for c in "abE"] == ["a", "b", ""]
    assert stream.push(ord("x")) == "Ex"  # not the stop string after all
    assert [stream.push(ord(c)) for c in "EN"] == ["", ""]
    assert stream.finish("abEx") == ""  # the engine cut the text before "END"


def test_incremental_text_never_decodes_the_whole_output(bpe, monkeypatch):
    """A 4,000-token stream with a stop string: the text comes from tokenizers'
    DecodeStream (a window of a few tokens per step), and the only whole-list decodes
    left are of the few tokens of an unfinished character."""
    calls = []
    real = bpe.decode
    monkeypatch.setattr(bpe, "decode", lambda ids: calls.append(len(ids)) or real(ids))
    ids = real.__self__.encode("the quick brown fox jumps over the lazy dog. héllo wörld " * 300)[1:4001]
    stream = TextStream(bpe.incremental().push, ("never appears",))
    pieces = [stream.push(t) for t in ids]
    assert len(ids) == 4000 and "".join(pieces) == real(ids)
    assert max(calls, default=0) <= 4


def test_fallback_chat_template():
    r = ChatRenderer({})
    assert r.source == "fallback" and "assistant:" in FALLBACK_TEMPLATE
    text = r.render([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "system: be brief\nuser: hi\nassistant:"


def test_checkpoint_chat_template_named_list_bos_and_errors():
    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    config = {"bos_token": {"content": "<s>"}, "chat_template": [{"name": "tool_use", "template": "x"},
                                                                 {"name": "default", "template": template}]}
    assert ChatRenderer(config).render([{"role": "user", "content": "hi"}]) == "<s><user>hi"
    assert ChatRenderer(config, tokenizer_adds_bos=True).render([{"role": "user", "content": "hi"}]) == "<user>hi"
    strict = {"chat_template": "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"}
    with pytest.raises(ChatTemplateError, match="user first"):
        ChatRenderer(strict).render([{"role": "system", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="checkpoint"):
        ChatRenderer({"chat_template": "{% for %}"})


@pytest.fixture(scope="module")
def reference_engine(tmp_path_factory):
    from tests.tiny_models import save_char_tokenizer, save_tiny_model
    from raymoe.workers.reference import ReferenceEngine

    path = tmp_path_factory.mktemp("loop-model")
    save_tiny_model("mixtral", path, seed=3)
    save_char_tokenizer(path)

    def make(**kwargs):
        return ReferenceEngine.from_pretrained(path, max_seqs=4, **kwargs)
    return make


async def _collect(loop: EngineLoop, prompt: list[int], params: SamplingParams):
    stream = await loop.submit(prompt, params)
    tokens, done = [], None
    async for event in stream:
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
        elif isinstance(event, FinishEvent):
            done = event.completion
    return tokens, done


def test_engine_loop_batches_concurrent_callers(reference_engine):
    prompts = [[5 + i, 17, 33 + i][: 1 + i % 3] for i in range(10)]
    params = [SamplingParams(max_new_tokens=3 + i, ignore_eos=True) for i in range(10)]
    want = [c.output_ids for c in reference_engine(max_seq_len=64).generate_ids(prompts, params)]
    engine = reference_engine(max_seq_len=64)
    loop = EngineLoop(engine, idle_wait_s=0.05).start()
    try:
        async def main():
            return await asyncio.gather(*(_collect(loop, p, sp) for p, sp in zip(prompts, params)))
        results = asyncio.run(main())
    finally:
        loop.stop()
    for (tokens, done), expected in zip(results, want):
        assert tokens == done.output_ids == expected
    assert max(s.sequences for s in engine.stats.per_step) == 4  # 10 callers, 4 slots, one batch


def test_engine_loop_abort_and_refusals(reference_engine):
    engine = reference_engine(max_seq_len=256)
    engine.max_queue = 1
    loop = EngineLoop(engine, idle_wait_s=0.05).start()
    try:
        async def main():
            from raymoe.workers.engine import QueueFullError
            from raymoe.workers.scheduler import RequestError

            with pytest.raises(RequestError):
                await loop.submit(list(range(300)), SamplingParams())  # longer than max_seq_len
            long = SamplingParams(max_new_tokens=250, ignore_eos=True)
            running = []
            for _ in range(4):  # the 4 KV slots, each running once it has a token
                running.append(await loop.submit([1, 2], long))
                assert isinstance(await anext(aiter(running[-1])), TokenEvent)
            waiting = await loop.submit([1, 2], long)  # no free slot: waits, and fills the queue of 1
            with pytest.raises(QueueFullError):
                await loop.submit([1, 2], long)
            for s in running + [waiting]:
                loop.abort(s.request_id)
            return await _collect(loop, [3, 4], SamplingParams(max_new_tokens=2))
        tokens, done = asyncio.run(main())
        assert len(tokens) == 2 and done.finish_reason == "length"
        assert not engine.has_work()  # the aborted requests left nothing behind
    finally:
        loop.stop()


def test_engine_loop_failure_reaches_every_caller(reference_engine):
    engine = reference_engine(max_seq_len=32)
    original = engine.executor.execute
    calls = []

    def failing(step):
        calls.append(step)
        if len(calls) == 3:
            raise RuntimeError("expert rank 1 died")
        return original(step)
    engine.executor.execute = failing
    loop = EngineLoop(engine, idle_wait_s=0.05).start()

    async def main():
        stream = await loop.submit([1, 2, 3], SamplingParams(max_new_tokens=10, ignore_eos=True))
        events = [e async for e in stream]
        assert isinstance(events[-1], FailEvent) and "expert rank 1 died" in events[-1].error.reason
        with pytest.raises(EngineStoppedError):
            await loop.submit([1], SamplingParams())
    asyncio.run(main())
    assert not loop.running and isinstance(loop.failure, RuntimeError)


def _scheduler(running: int) -> Scheduler:
    """A scheduler with ``running`` sequences admitted (never stepped)."""
    scheduler = Scheduler(4, 64)
    for i in range(running):
        scheduler.add(Request(str(i), [1, 2], SamplingParams()))
    scheduler.schedule()
    return scheduler


def test_kv_cache_metrics_follow_the_pool(reference_engine):
    """Blocks used and total, the prefix cache's queries and hits, and the tokens of each
    step by kind, from a real engine: the same 40-token prompt twice (the second time its
    first 2 blocks are cached)."""
    engine = reference_engine(max_seq_len=128)
    m = ServingMetrics("m")
    prompt = list(range(3, 43))
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    seen_used = []
    for wave in range(2):
        engine.add_request(prompt, params)
        while engine.has_work():
            m.on_step(engine, engine.step(), 0.01)
            seen_used.append(metric(metric_samples(m.render().decode()), "raymoe_kv_blocks_used"))
    samples = metric_samples(m.render().decode())
    pool = engine.scheduler.pool
    assert metric(samples, "raymoe_kv_blocks_total") == pool.num_blocks
    assert max(seen_used) == 3 and metric(samples, "raymoe_kv_blocks_used") == 0  # 40 tokens + 2 new: 3 blocks
    assert metric(samples, "raymoe_kv_cache_usage_perc") == 0
    assert metric(samples, "raymoe_prefix_cache_queries_total") == 80
    assert metric(samples, "raymoe_prefix_cache_hits_total") == 32  # the second time: 2 full blocks of 16
    assert metric(samples, "raymoe_preemptions_total") == 0
    assert metric(samples, "raymoe_step_batched_tokens_sum", kind="prefill") == 40 + 8
    assert metric(samples, "raymoe_step_batched_tokens_sum", kind="decode") == 2 * 2  # 3 tokens: 1 from the prefill


def test_balancedness_is_mean_over_max_rank_load():
    m = ServingMetrics("m", moe_layer_ids=(1, 3))

    class Engine:  # what on_step reads
        scheduler = _scheduler(running=2)
        stats = type("T", (), {"per_step": []})()

    def traffic(pairs):
        return LayerTraffic(pairs, pairs, 10, 10, 0, 2, 1)
    Engine.stats.per_step.append(StepStats(6, 2, [traffic([3, 1]), traffic([2, 2])]))
    m.on_step(Engine, None, 0.01)
    Engine.stats.per_step.append(StepStats(6, 2, [traffic([1, 3]), traffic([4, 0])]))
    m.on_step(Engine, None, 0.01)
    samples = metric_samples(m.render().decode())
    assert metric(samples, "raymoe_expert_balancedness", layer=1) == pytest.approx(1.0)  # 4 / 4
    assert metric(samples, "raymoe_expert_balancedness", layer=3) == pytest.approx(4 / 6)  # mean 4, max 6
    assert metric(samples, "raymoe_expert_rank_load_total", layer=3, rank=0) == 6
    assert metric(samples, "raymoe_running_sequences") == 2
    assert metric(samples, "raymoe_step_sequences_count") == 2
    assert ("raymoe_cross_device_fraction", (("layer", "1"),)) not in samples  # disaggregated: not reported


def test_cross_device_fraction_from_the_coherent_layouts_transitions():
    m = ServingMetrics("m", moe_layer_ids=(0,))

    class Engine:
        scheduler = _scheduler(running=0)
        stats = type("T", (), {"per_step": []})()

    for hosted, stayed in ((10, 6), (10, 9)):
        Engine.stats.per_step.append(StepStats(10, 1, [LayerTraffic([5, 5], [5, 5], 0, 0, 0, 1, 1, 0, hosted, stayed)]))
        m.on_step(Engine, None, 0.01)
    samples = metric_samples(m.render().decode())
    assert metric(samples, "raymoe_cross_device_fraction", layer=0) == pytest.approx(5 / 20)
    assert metric(samples, "raymoe_stayed_tokens_total", layer=0) == 15


def test_unknown_fields_are_logged_once_capped_and_quoted(caplog):
    """Lenient mode names the ignored fields in one warning line, quoted (a name cannot
    forge a log line) and at most ten; strict mode refuses the first with a 400."""
    import logging

    from raymoe.deploy.errors import APIError
    from raymoe.deploy.service import ModelService

    lenient, strict = ModelService("m", None, None, None), ModelService("m", None, None, None, strict_fields=True)
    names = ["evil\nINFO forged line"] + [f"f{i}" for i in range(12)]
    with caplog.at_level(logging.WARNING, logger="raymoe.serve"):
        lenient.check_fields(names)
        lenient.check_fields([])
    [record] = caplog.records
    assert "'evil\\nINFO forged line'" in record.getMessage() and "\n" not in record.getMessage()
    assert record.getMessage().count("'f") == 9 and "and 3 more" in record.getMessage()
    with pytest.raises(APIError) as err:
        strict.check_fields(["store"])
    assert err.value.status == 400 and err.value.param == "store"
