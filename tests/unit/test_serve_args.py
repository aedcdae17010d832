"""`raymoe serve`'s arguments and the Serve builder's: a chat template that replaces the
checkpoint's, the deployment YAML's fields overridden from the command line
(``--model DIR`` needs no YAML of its own), and ``--version``."""

from __future__ import annotations

import pytest

from tests.tiny_models import save_char_tokenizer, save_tiny_model
from raymoe.workers.tokenizer import Tokenizer


def test_chat_template_setting_takes_a_file_or_the_template_and_refuses_a_broken_one(tmp_path, monkeypatch):
    """``raymoe serve --chat-template`` / the builder's ``chat_template``: read and compiled
    at the edge; the prompt encoder then renders with it instead of the checkpoint's."""
    from raymoe.deploy.prompts import PromptEncoder
    from raymoe.deploy.settings import ServeArgsError, settings_from_args

    base = {"config": "deploy/configs/tiny.yaml"}
    assert settings_from_args(base).chat_template is None
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}")
    text, source = settings_from_args({**base, "chat_template": str(tmp_path / "t.jinja")}).chat_template
    assert source == f"--chat-template {tmp_path / 't.jinja'}" and text.startswith("{% for m")
    inline = settings_from_args({**base, "chat_template": "<{{ messages[0].content }}>"}).chat_template
    assert inline == ("<{{ messages[0].content }}>", "--chat-template (inline)")
    with pytest.raises(ServeArgsError, match="chat_template.*no such file"):
        settings_from_args({**base, "chat_template": str(tmp_path / "missing.jinja")})
    with pytest.raises(ServeArgsError, match="chat_template.*does not compile"):
        settings_from_args({**base, "chat_template": "{% for %}"})

    save_char_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("checkpoint's {{ messages[0].content }}")
    encoder = PromptEncoder(Tokenizer(tmp_path), 96, 64, chat_template=(text, source))
    assert encoder.chat.source == source
    assert encoder.chat.render([{"role": "user", "content": "hi"}]) == "user=hi;"


def test_serve_takes_the_model_and_the_main_choices_without_a_yaml_of_its_own(tmp_path):
    """``raymoe serve --model DIR --expert-ranks 1 --layout coherent --dtype bfloat16``: the
    flags become builder arguments that override the default config; a bad one names its field."""
    import argparse

    from raymoe.cluster.config import DeploymentConfigError
    from raymoe.deploy import serve_cli
    from raymoe.deploy.settings import ServeArgsError, settings_from_args

    save_tiny_model("mixtral", tmp_path / "m")
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "m"), "--expert-ranks", "1", "--layout", "coherent",
                              "--dtype", "bfloat16", "--served-model-name", "mine", "--address", "auto"])
    assert (args.model, args.expert_ranks, args.layout, args.dtype, args.model_name) == \
        (str(tmp_path / "m"), 1, "coherent", "bfloat16", "mine")
    settings = settings_from_args(serve_cli.app_args(args))
    c = settings.config
    assert (c.model, c.expert_ranks, c.layout, c.dtype, c.ray.address) == \
        (str((tmp_path / "m").resolve()), 1, "coherent", "bfloat16", "auto")
    assert settings.model_name == "mine"
    assert settings_from_args({"config": str(args.config), "model": str(tmp_path / "m")}).model_name == "m"
    with pytest.raises(DeploymentConfigError, match="dtype"):
        settings_from_args({"config": str(args.config), "dtype": "float8"})
    with pytest.raises(ServeArgsError, match="model.*no such file"):
        settings_from_args({"config": str(args.config), "model": str(tmp_path / "nowhere")})
    with pytest.raises(ServeArgsError, match="expert_ranks"):
        settings_from_args({"config": str(args.config), "expert_ranks": 0})


def test_serve_takes_vllms_batching_flags(tmp_path):
    """``--max-num-seqs``, ``--max-model-len``, ``--max-num-batched-tokens``, ``--block-size``,
    ``--kv-cache-memory`` and ``--[no-]enable-prefix-caching`` override the YAML's batching
    section; a bad value names the batching field it lands in."""
    import argparse

    from raymoe.cluster.config import DeploymentConfigError
    from raymoe.deploy import serve_cli
    from raymoe.deploy.settings import settings_from_args

    save_tiny_model("mixtral", tmp_path / "m")
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "m"), "--max-num-seqs", "64", "--max-model-len", "512",
                              "--max-num-batched-tokens", "256", "--block-size", "32", "--kv-cache-memory", "64MiB",
                              "--no-enable-prefix-caching"])
    b = settings_from_args(serve_cli.app_args(args)).config.batching
    assert (b.max_seqs, b.max_seq_len, b.max_num_batched_tokens, b.block_size, b.kv_cache_memory, b.prefix_caching) \
        == (64, 512, 256, 32, "64MiB", False)
    plain = settings_from_args(serve_cli.app_args(parser.parse_args(["--kv-cache-memory", "1000000"])))
    assert plain.config.batching.kv_cache_memory == 1_000_000 and plain.config.batching.prefix_caching
    with pytest.raises(DeploymentConfigError, match="batching.max_num_batched_tokens"):
        settings_from_args(serve_cli.app_args(parser.parse_args(["--max-num-batched-tokens", "8"])))  # < max_seqs


def test_serve_takes_an_api_key_a_log_level_and_strict_fields(tmp_path, monkeypatch):
    """``--api-key`` wins over ``--api-key-env``'s variable; ``--log-level`` reaches the
    replica's settings (its raymoe loggers and Ray Serve's LoggingConfig); a bad level is
    refused by the parser, and by the builder naming ``log_level``."""
    import argparse

    from raymoe.deploy import serve_cli
    from raymoe.deploy.server import app_for
    from raymoe.deploy.settings import ServeArgsError, settings_from_args

    monkeypatch.setenv("RAYMOE_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    plain = settings_from_args(serve_cli.app_args(parser.parse_args([])))
    assert (plain.api_key, plain.log_level, plain.strict_fields) == ("from-env", "info", False)
    given = settings_from_args(serve_cli.app_args(parser.parse_args(["--api-key", "sk-1", "--log-level", "debug",
                                                                     "--strict-fields"])))
    assert (given.api_key, given.log_level, given.strict_fields) == ("sk-1", "debug", True)
    assert app_for(given)._bound_deployment.logging_config["log_level"] == "DEBUG"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-level", "verbose"])
    with pytest.raises(ServeArgsError, match="log_level"):
        settings_from_args({"config": str(serve_cli.DEFAULT_CONFIG), "log_level": "verbose"})


def test_raymoe_and_raymoe_serve_print_the_installed_version(capsys):
    from importlib.metadata import version as installed

    from raymoe.deploy.cli import build_parser

    for argv in (["--version"], ["serve", "--version"]):
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args(argv)
        assert done.value.code == 0
        assert capsys.readouterr().out.strip() == f"raymoe {installed('raymoe')}"
