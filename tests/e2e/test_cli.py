"""``raymoe serve`` (``python -m raymoe.deploy.serve_cli``) and the Serve config file: the config is a
valid Ray Serve deploy config whose application builds; bad arguments fail fast with a
typed message and exit code 2; Ctrl-C stops it as SIGTERM does. Its real run (its own
embedded Ray, the URL line, real clients, the drain on SIGTERM) is tests/e2e/test_shutdown.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_is_a_valid_serve_deploy_config_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from raymoe.deploy.server import RaymoeServer, build_app
    from raymoe.deploy.settings import ServerSettings

    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text()))
    assert schema.http_options.host == "127.0.0.1"
    assert schema.grpc_options.grpc_servicer_functions == ["raymoe.deploy.grpc_stubs.add_RaymoeServiceServicer_to_server"]
    [app] = schema.applications
    assert app.import_path == "raymoe.deploy.server:build_app"
    built = build_app(app.args)
    settings = built._bound_deployment.init_args[0]
    assert isinstance(settings, ServerSettings) and settings.model_name == "tiny-moe"
    assert Path(settings.config.model).is_absolute() and (Path(settings.config.model) / "config.json").is_file()
    assert built._bound_deployment.func_or_class.__name__ == RaymoeServer.func_or_class.__name__


def test_api_key_comes_from_the_environment(monkeypatch):
    from raymoe.deploy.settings import settings_from_args

    monkeypatch.setenv("RAYMOE_TEST_KEY", "s3cret")
    settings = settings_from_args({"config": "deploy/configs/tiny.yaml", "api_key_env": "RAYMOE_TEST_KEY"})
    assert settings.api_key == "s3cret" and "s3cret" not in repr(settings)
    monkeypatch.delenv("RAYMOE_TEST_KEY")
    assert settings_from_args({"config": "deploy/configs/tiny.yaml", "api_key_env": "RAYMOE_TEST_KEY"}).api_key is None


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raymoe.deploy.serve_cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["--config", "no/such.yaml"], "'config' = 'no/such.yaml'"),
    (["--config", "deploy/serve_config.yaml"], "unknown field"),  # a Serve config is not a deployment config
])
def test_bad_arguments_fail_fast_with_exit_code_2(args, needle):
    started = time.time()
    result = _cli(*args)
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert "Started a local Ray instance" not in result.stderr and time.time() - started < 30


def test_bad_checkpoint_fails_before_ray_starts(tmp_path):
    (tmp_path / "model").mkdir()
    config = tmp_path / "deployment.yaml"
    config.write_text(yaml.safe_dump({"model": str(tmp_path / "model")}))
    result = _cli("--config", str(config))
    assert result.returncode == 2 and "config.json" in result.stderr, result.stderr


def test_sigint_and_sigterm_both_ask_to_stop_and_a_second_one_to_stop_at_once():
    """Ctrl-C stops ``raymoe serve`` as SIGTERM does (its real run on its own embedded Ray,
    stopped by SIGTERM with requests in flight, is tests/e2e/test_shutdown.py)."""
    from raymoe.deploy.serve_cli import Signals

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for first, second in ((signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)):
            signals = Signals()
            os.kill(os.getpid(), first)
            assert signals.first.wait(5) and not signals.second.is_set()
            signals.wait()  # returns: the first signal came
            os.kill(os.getpid(), second)
            assert signals.second.wait(5) and signals.count == 2
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
