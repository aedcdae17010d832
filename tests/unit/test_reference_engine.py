"""The reference engine: continuous batching, sampling, stop conditions, traces, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raymoe.deploy.cli import main
from tests.tiny_models import save_char_tokenizer, save_tiny_model
from raymoe.workers.model.checkpoint import load_model
from raymoe.workers.reference import ReferenceEngine
from raymoe.workers.sampling import SamplingParams, SamplingParamsError
from raymoe.workers.scheduler import RequestError
from raymoe.workers.tokenizer import load_tokenizer

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11, 3], [60, 61, 62, 63, 9, 8, 70], [1], [44, 45, 46, 47, 48]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    save_tiny_model("qwen2_moe", path, seed=3)
    save_char_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    return ReferenceEngine(load_model(model_dir), load_tokenizer(model_dir), max_seqs=8)


def _alone(engine, prompt, params):
    return engine.generate_ids([prompt], params)[0].output_ids


def test_continuous_batching_gives_each_request_its_solo_output(engine):
    """Five requests through two slots: requests join as others leave, outputs unchanged."""
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (3, 9, 5, 12, 2)]
    solo = [_alone(engine, p, sp) for p, sp in zip(PROMPTS, params)]
    small = ReferenceEngine(engine.model, max_seqs=2)
    batched = small.generate_ids(PROMPTS, params)
    assert [c.output_ids for c in batched] == solo
    assert [len(c.output_ids) for c in batched] == [3, 9, 5, 12, 2]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)
    first = _alone(engine, PROMPTS[0], params)
    assert _alone(engine, PROMPTS[0], params) == first
    mixed = engine.generate_ids(PROMPTS[:3], [params, SamplingParams(max_new_tokens=4, temperature=0.7, seed=9),
                                              SamplingParams(max_new_tokens=7)])
    assert mixed[0].output_ids == first
    other_seed = _alone(engine, PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=1.3, seed=99, ignore_eos=True))
    assert other_seed != first  # 12 tokens at temperature 1.3 from a 96-token vocabulary


def test_degenerate_sampling_equals_greedy(engine):
    greedy = _alone(engine, PROMPTS[2], SamplingParams(max_new_tokens=10, ignore_eos=True))
    for params in (SamplingParams(max_new_tokens=10, temperature=0.8, top_k=1, seed=5, ignore_eos=True),
                   SamplingParams(max_new_tokens=10, temperature=0.8, top_p=1e-6, seed=5, ignore_eos=True)):
        assert _alone(engine, PROMPTS[2], params) == greedy


def test_stop_token_and_stop_string(engine):
    full = engine.generate_ids([PROMPTS[1]], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    stop_id = full.output_ids[5]
    cut = _alone(engine, PROMPTS[1], SamplingParams(max_new_tokens=16, stop_token_ids=(stop_id,), ignore_eos=True))
    assert cut == full.output_ids[: full.output_ids.index(stop_id) + 1]
    stop_text = full.text[6:8]
    out = engine.generate_ids([PROMPTS[1]], SamplingParams(max_new_tokens=16, stop=(stop_text,), ignore_eos=True))[0]
    assert out.finish_reason == "stop" and stop_text not in out.text
    assert full.text.startswith(out.text) and len(out.text) <= full.text.index(stop_text)


def test_eos_ends_generation(engine):
    full = _alone(engine, PROMPTS[0], SamplingParams(max_new_tokens=20, ignore_eos=True))
    eos_engine = ReferenceEngine(engine.model, engine.tokenizer, max_seqs=2)
    eos_engine.scheduler.eos_token_ids = {full[3]}
    out = eos_engine.generate_ids([PROMPTS[0]], SamplingParams(max_new_tokens=20))[0]
    assert out.output_ids == full[: full.index(full[3]) + 1] and out.finish_reason == "stop"


@pytest.mark.parametrize("kwargs,field", [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                                          ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"seed": -1}, "seed")])
def test_bad_sampling_params_named(kwargs, field):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field


@pytest.mark.parametrize("prompt,field", [([], "prompt"), ([1, 500], "prompt"), ([1] * 300, "prompt")])
def test_bad_prompts_rejected_before_running(engine, prompt, field):
    small = ReferenceEngine(engine.model, max_seqs=2, max_seq_len=256)
    with pytest.raises(RequestError) as err:
        small.generate_ids([prompt], SamplingParams())
    assert err.value.field == field


def test_trace_records_every_token_and_layer(engine):
    config = engine.model.config
    traced = ReferenceEngine(engine.model, max_seqs=4)
    traced.runner.record_trace(True)
    recorder = traced.recorder
    out = traced.generate_ids(PROMPTS[:2], SamplingParams(max_new_tokens=4, ignore_eos=True))
    fed = sum(len(p) for p in PROMPTS[:2]) + sum(len(c.output_ids) - 1 for c in out)
    ids = recorder.topk_ids
    assert ids.shape == (fed, len(config.moe_layer_ids), config.top_k)
    assert recorder.loads().sum(1).tolist() == [fed * config.top_k] * len(config.moe_layer_ids)
    # the recorded routing is the model's: replay one prompt token by hand
    with torch.no_grad():
        x = engine.model.model.embed_tokens(torch.tensor(PROMPTS[0][:1]))
        layer0 = engine.model.model.layers[0]
        h = x + layer0.self_attn(layer0.input_layernorm(x), *_single(PROMPTS[0][:1]))
        want = layer0.mlp.route(layer0.post_attention_layernorm(h)).topk_ids[0].tolist()
    assert ids[0, 0].tolist() == want


def _single(tokens):
    from raymoe.workers.model.batch import ForwardBatch
    return ForwardBatch.build([tokens], [0]), None


def test_cli_generate_text_trace_and_load(model_dir, tmp_path, capsys):
    trace = tmp_path / "trace.npz"
    rc = main(["generate", "--model", str(model_dir), "--prompt", "def f(x):", "--prompt", "import os",
               "--max-new-tokens", "6", "--ignore-eos", "--record-trace", str(trace), "--expert-load"])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out.startswith("def f(x):") and "import os" in captured.out
    assert "expert load per MoE layer" in captured.err and "max/mean" in captured.err
    data = np.load(trace)
    assert data["version"] == 1 and data["topk_ids"].shape[1:] == (3, 2)
    assert data["is_prompt"].sum() == len("def f(x):") + len("import os")


def test_cli_reports_bad_input_without_traceback(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    bad = model_dir.parent / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["generate", "--model", str(bad), "--prompt", "x"]) == 2
    assert "model_type" in capsys.readouterr().err


def test_streamed_tokens_add_up_to_the_completion(engine):
    small = ReferenceEngine(engine.model, engine.tokenizer, max_seqs=2)
    ids = [small.add_request(p, SamplingParams(max_new_tokens=6, temperature=0.9, ignore_eos=True)) for p in PROMPTS[:3]]
    streamed, done = {i: [] for i in ids}, {}
    while small.has_work():
        result = small.step()
        for rid, token in result.tokens.items():
            streamed[rid].append(token)
        done.update({c.request_id: c.output_ids for c in result.finished})
    assert streamed == done and all(len(v) == 6 for v in done.values())


def test_abort_frees_the_slot_for_the_next_request(engine):
    small = ReferenceEngine(engine.model, max_seqs=1)
    first = small.add_request(PROMPTS[0], SamplingParams(max_new_tokens=50, ignore_eos=True))
    second = small.add_request(PROMPTS[1], SamplingParams(max_new_tokens=3, ignore_eos=True))
    small.step()
    assert small.scheduler.free_slots == [] and len(small.scheduler.waiting) == 1
    assert small.abort(first) and not small.abort("no-such-request")
    assert small.scheduler.free_slots == [0]
    result = small.step()
    assert list(result.tokens) == [second]


@pytest.mark.parametrize("kwargs", [{"temperature": 1.4e-45}, {"temperature": 0.7, "top_p": 5e-324},
                                    {"temperature": 100.0, "top_k": 1}])
def test_extreme_sampling_values_sample_the_best_token(engine, kwargs):
    """Found by the API fuzzer: tiny temperatures or top_p once gave NaN probabilities."""
    greedy = _alone(engine, PROMPTS[3], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert _alone(engine, PROMPTS[3], SamplingParams(max_new_tokens=5, seed=3, ignore_eos=True, **kwargs)) == greedy
