import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Ray kills an actor by asking its process to exit and sends SIGKILL only after this long
# (5 s by default): a SIGSTOPped (hung) actor's bundle stays taken that long, and so its
# replacement waits. RELIABILITY.md gives the same advice for clusters.
os.environ.setdefault("RAY_kill_worker_timeout_milliseconds", "500")

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (embedded, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, namespace="raymoe-tests", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(family="mixtral", seed=0, **config_overrides) -> Path``: a tiny random
    checkpoint (``tests/tiny_models.py``), built once per session and shared read-only by
    every test that asks for the same one. Tests that edit a checkpoint build their own."""
    from tests.tiny_models import save_tiny_model

    built: dict = {}

    def make(family: str = "mixtral", seed: int = 0, **overrides):
        key = (family, seed, tuple(sorted(overrides.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"{family}-{seed}")
            save_tiny_model(family, path, seed=seed, **overrides)
            built[key] = path
        return built[key]

    return make
