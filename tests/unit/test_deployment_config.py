"""Deployment config: every bad field is named, with its value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raymoe.cluster.config import DeploymentConfig, DeploymentConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "configs" / "tiny.yaml"


def test_example_config_loads():
    config = load_config(EXAMPLE)
    assert isinstance(config, DeploymentConfig)
    assert config.expert_ranks == 2 and config.placement.policy == "linear" and config.ray.address is None


def test_defaults_need_only_the_model():
    config = parse_config({"model": "m"})
    assert config.layout == "disaggregated" and config.batching.max_seqs == 256 and config.backend == "auto"


@pytest.mark.parametrize("data,field", [
    ({"model": "m", "expert_ranks": 0}, "expert_ranks"),
    ({"model": "m", "expert_ranks": "two"}, "expert_ranks"),
    ({"model": "m", "layout": "ring"}, "layout"),
    ({"model": "m", "dtype": "int4"}, "dtype"),
    ({"model": "m", "backend": "mpi"}, "backend"),
    ({"model": "m", "placement": {"policy": "magic"}}, "placement.policy"),
    ({"model": "m", "batching": {"max_seqs": -1}}, "batching.max_seqs"),
    ({"model": "m", "batching": {"max_seqs_typo": 3}}, "batching.max_seqs_typo"),
    ({"model": "m", "batching": {"kv_cache_memory": "lots"}}, "batching.kv_cache_memory"),
    ({"model": "m", "batching": {"kv_cache_memory": "4 parsecs"}}, "batching.kv_cache_memory"),
    ({"model": "m", "batching": {"kv_cache_memory": 0}}, "batching.kv_cache_memory"),
    ({"model": "m", "batching": {"block_size": 0}}, "batching.block_size"),
    ({"model": "m", "batching": {"max_num_batched_tokens": 0}}, "batching.max_num_batched_tokens"),
    ({"model": "m", "batching": {"max_num_batched_tokens": 100}}, "batching.max_num_batched_tokens"),  # < max_seqs
    ({"model": "m", "batching": {"prefix_caching": "yes"}}, "batching.prefix_caching"),
    ({"model": "m", "ray": {"strategy": "CLUSTERED"}}, "ray.strategy"),
    ({"model": "m", "resources": {"cpus_per_actor": 0}}, "resources.cpus_per_actor"),
    ({"model": "m", "resources": {"gpus_per_actor": "many"}}, "resources.gpus_per_actor"),
    ({"model": "m", "collective_timeout_s": True}, "collective_timeout_s"),
    ({"model": "m", "expert_rank": 2}, "expert_rank"),
    ({"expert_ranks": 2}, "model"),
    ({"model": "m", "batching": 5}, "batching"),
])
def test_bad_field_is_named(data, field):
    with pytest.raises(DeploymentConfigError) as err:
        parse_config(data, "cfg.yaml")
    assert err.value.field == field
    assert f"'{field}'" in str(err.value) and str(err.value).startswith("cfg.yaml:")


@pytest.mark.parametrize("value, expected", [(None, None), (4096, 4096), ("512MiB", 512 << 20), ("4GiB", 4 << 30),
                                             ("2 GB", 2 * 10**9), ("1.5KiB", 1536)])
def test_kv_cache_memory_takes_units(value, expected):
    from raymoe.cluster.config import memory_bytes

    config = parse_config({"model": "m", "batching": {"kv_cache_memory": value}})
    assert memory_bytes(config.batching.kv_cache_memory) == expected


def test_unknown_field_lists_known_ones():
    with pytest.raises(DeploymentConfigError, match="known fields") as err:
        parse_config({"model": "m", "ranks": 2})
    assert "expert_ranks" in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(DeploymentConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(DeploymentConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text(yaml.safe_dump(["a", "list"]))
    with pytest.raises(DeploymentConfigError, match="mapping"):
        load_config(bad)


def test_cli_overrides_are_validated():
    config = parse_config({"model": "m"})
    assert config.replace(expert_ranks=4).expert_ranks == 4
    with pytest.raises(DeploymentConfigError, match="expert_ranks"):
        config.replace(expert_ranks=-3)
