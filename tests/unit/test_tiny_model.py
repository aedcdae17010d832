"""The shipped tiny model (models/tiny-moe) and the exporter that wrote it.

(a) the checkpoint loads in transformers' MixtralForCausalLM with raymoe's logits;
(b) ``save_checkpoint`` then ``load_model`` is the identity, and transformers reads the
    export, for every family the exporter writes;
(c) the shipped tokenizer round-trips Python source.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny_models import hf_config
from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.checkpoint import load_model
from raymoe.workers.model.decoder import MoEForCausalLM
from raymoe.workers.model.errors import UnsupportedModelError
from raymoe.workers.model.export import hf_config as export_config
from raymoe.workers.model.export import save_checkpoint
from raymoe.workers.model.families import parse_config
from raymoe.workers.tokenizer import Tokenizer

TINY = Path(__file__).resolve().parents[2] / "models" / "tiny-moe"
SNIPPET = '''def fib(n: int) -> list[int]:
    """The first n Fibonacci numbers."""
    a, b, out = 0, 1, []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out  # ünïcode, tabs\tand "quotes"
'''
EXPORT_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def _hf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """transformers' logits ``[len(ids), V]``; fails if any weight was missing or left over."""
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0]


def _random_model(family: str, seed: int = 0) -> MoEForCausalLM:
    """A raymoe model of ``family`` with random weights, large enough to separate logits."""
    config = parse_config(hf_config(family).to_dict())
    torch.manual_seed(seed)
    model = MoEForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.15 + (1.0 if "norm" in name else 0.0))
    return model.eval()


# (a) the shipped checkpoint --------------------------------------------------------


def test_shipped_checkpoint_matches_transformers():
    import transformers

    config = json.loads((TINY / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert (TINY / "model.safetensors").stat().st_size <= 20_000_000
    ids = Tokenizer(TINY).encode(SNIPPET)
    ours = load_model(TINY)
    with torch.no_grad():
        got = ours(ForwardBatch.build([ids], [0]), all_logits=True)
    want = _hf_logits(TINY, ids)
    assert type(transformers.AutoConfig.from_pretrained(TINY)).__name__ == "MixtralConfig"
    assert got.shape == want.shape == (len(ids), config["vocab_size"])
    # Trained logits reach |10-20|, where one float32 ulp is ~1e-6 and summation order alone
    # moves the result by ~1e-5: an element-wise bound of 1e-5 + 1e-6 * |logit| (the random
    # tiny models of every family keep the plain 1e-5, test_model_equivalence.py).
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


def test_shipped_model_has_learned_python():
    """Trained, not random: the held-out snippet's loss is far below log(V)."""
    model, ids = load_model(TINY), Tokenizer(TINY).encode(SNIPPET)
    with torch.no_grad():
        logits = model(ForwardBatch.build([ids[:-1]], [0]), all_logits=True)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert loss < 0.75 * torch.log(torch.tensor(float(model.config.vocab_size))).item(), loss


# (b) save_checkpoint round trip ----------------------------------------------------


@pytest.mark.parametrize("family", EXPORT_FAMILIES)
def test_save_checkpoint_round_trip(family, tmp_path):
    model = _random_model(family)
    save_checkpoint(model, tmp_path)
    assert parse_config(json.loads((tmp_path / "config.json").read_text())) == model.config
    reloaded = load_model(tmp_path)
    prompts = [[5, 17, 33, 2, 90, 41, 7], [11, 3, 60]]
    batch = ForwardBatch.build(prompts, [0, 0])
    with torch.no_grad():
        want = model(batch, all_logits=True)
        assert torch.equal(reloaded(batch, all_logits=True), want)
    diff = (_hf_logits(tmp_path, prompts[0]) - want[: len(prompts[0])]).abs().max().item()
    assert diff <= 1e-5, f"{family}: max |transformers - raymoe| = {diff}"


def test_save_checkpoint_dtype_and_extras(tmp_path):
    model = _random_model("mixtral")
    save_checkpoint(model, tmp_path, extra_config={"initializer_range": 0.02}, dtype=torch.bfloat16)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["dtype"] == "bfloat16" and data["initializer_range"] == 0.02
    reloaded = load_model(tmp_path)
    for (name, ours), theirs in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(ours.to(torch.bfloat16).float(), theirs), name


def test_moge_config_round_trips():
    config = parse_config(hf_config("mixtral").to_dict(), moge_groups=2)
    assert export_config(config)["moge_num_groups"] == 2
    assert parse_config(export_config(config)) == config


def test_deepseek_export_is_refused():
    config = parse_config(hf_config("deepseek_v3").to_dict())
    with pytest.raises(UnsupportedModelError, match="model_type"):
        export_config(config)


# (c) tokenizer --------------------------------------------------------------------


def test_tokenizer_round_trips_python_source():
    tok = Tokenizer(TINY)
    config = json.loads((TINY / "config.json").read_text())
    ids = tok.encode(SNIPPET)
    assert ids[0] == tok.bos_token_id == config["bos_token_id"]
    assert tok.eos_token_id == config["eos_token_id"]
    assert tok.vocab_size == config["vocab_size"]
    assert len(ids) < len(SNIPPET) / 2  # BPE merges, not bytes
    assert tok.decode(ids) == SNIPPET


def test_loading_and_shape_checks_leave_torch_dynamo_unimported():
    """A process that loads a model (every actor, replica and CLI does) builds it on the
    meta device; some meta ops (``normal_``, ``cat``) run Python references that import
    ``torch._dynamo``, about 2 s of CPU per process. None of them may run."""
    import subprocess
    import sys

    code = ("import sys\nfrom raymoe.workers.model.checkpoint import Checkpoint, load_model\n"
            f"Checkpoint({str(TINY)!r}).check_shapes()\nload_model({str(TINY)!r})\n"
            f"load_model({str(TINY)!r}, with_experts=False)\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
