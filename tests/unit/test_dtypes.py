"""``dtype: auto`` and the dtype names (``workers/model/dtypes.py``): what each checkpoint
declaration resolves to on GPUs and on CPUs, and that the engines load in it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from raymoe.cluster.config import DeploymentConfigError, parse_config
from raymoe.workers.model.dtypes import checkpoint_dtype, resolve
from raymoe.workers.reference import ReferenceEngine


@pytest.mark.parametrize("declared,on_gpu,expected", [
    ("bfloat16", True, "bfloat16"), ("float16", True, "float16"), ("float32", True, "bfloat16"),
    (None, True, "bfloat16"), ("float8_e4m3fn", True, "bfloat16"),
    ("bfloat16", False, "float32"), ("float16", False, "float32"), ("float32", False, "float32"),
    (None, False, "float32"),
])
def test_auto_resolves_by_checkpoint_and_device(declared, on_gpu, expected):
    name, why = resolve("auto", declared, on_gpu)
    assert name == expected
    assert ("GPU" if on_gpu else "CPU") in why and (declared or "no dtype") in why


@pytest.mark.parametrize("asked", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept_anywhere(asked):
    assert resolve(asked, "bfloat16", on_gpu=False) == (asked, "asked for")
    assert resolve(asked, "float32", on_gpu=True) == (asked, "asked for")


def test_an_unknown_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="'int4' is not one of"):
        resolve("int4", None, on_gpu=False)
    with pytest.raises(DeploymentConfigError, match="dtype"):
        parse_config({"model": "m", "dtype": "float64"})


def test_auto_is_the_default():
    assert parse_config({"model": "m"}).dtype == "auto"


@pytest.mark.parametrize("raw,declared", [
    ({"dtype": "bfloat16"}, "bfloat16"),  # transformers >= 4.56 writes dtype
    ({"torch_dtype": "float16"}, "float16"),  # older checkpoints: torch_dtype
    ({"dtype": "bfloat16", "torch_dtype": "float32"}, "bfloat16"),
    ({"torch_dtype": "torch.bfloat16"}, "bfloat16"),
    ({}, None), ({"dtype": None}, None),
])
def test_the_checkpoint_declaration_is_read_from_either_field(raw, declared):
    assert checkpoint_dtype(raw) == declared


def test_the_reference_engine_loads_a_bfloat16_checkpoint_in_float32_on_cpu(tiny_model, tmp_path):
    """A checkpoint that declares bfloat16: auto loads it in float32 on the CPU (the same
    logits as asking for float32); asking for bfloat16 keeps bfloat16."""
    path = tmp_path / "bf16"
    shutil.copytree(tiny_model("mixtral"), path)
    config = json.loads((path / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config))
    auto = ReferenceEngine.from_pretrained(path, max_seqs=1)
    assert {p.dtype for p in auto.model.parameters()} == {torch.float32}
    half = ReferenceEngine.from_pretrained(path, "bfloat16", max_seqs=1)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    explicit = ReferenceEngine.from_pretrained(path, torch.float32, max_seqs=1)
    ids = [3, 14, 15, 9, 26]
    assert auto.model(*_batch(ids)).equal(explicit.model(*_batch(ids)))


def _batch(ids):
    from raymoe.workers.model.batch import ForwardBatch

    return (ForwardBatch.build([ids], [0], [0]),)
