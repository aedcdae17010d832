"""``raymoe serve`` (``python -m raymoe.deploy.serve_cli``) and the Serve config file: the config is a
valid Ray Serve deploy config whose application builds; bad arguments fail fast with a
typed message and exit code 2; the command starts its own embedded Ray, prints the URL,
serves real clients and stops cleanly on SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import yaml

from tests.e2e.conftest import free_port

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


@pytest.mark.slow
def test_cli_serves_on_its_own_embedded_ray_and_stops_on_sigint(tmp_path, chat_model):
    config = tmp_path / "deployment.yaml"
    config.write_text(yaml.safe_dump({"model": str(chat_model), "expert_ranks": 1,
                                      "resources": {"cpus_per_actor": 0.1}, "batching": {"max_seq_len": 64}}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the test session's
    proc = subprocess.Popen([sys.executable, "-m", "raymoe.deploy.serve_cli", "--config", str(config), "--port", str(port),
                             "--no-grpc", "--model-name", "cli-model"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = _read_line(proc, timeout=150)
        assert f"http://127.0.0.1:{port}/v1" in line and "cli-model" in line, line
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as client:
            out = client.completions.create(model="cli-model", prompt="hi", max_tokens=5, temperature=0)
        assert out.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first stdout line (the URL), or fail with stderr's tail after ``timeout`` seconds."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        proc.kill()
        pytest.fail(f"no URL line within {timeout}s; stderr:\n{proc.stderr.read()[-3000:]}")
    return box[0]
