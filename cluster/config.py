"""Deployment config: one YAML file, loaded once into frozen dataclasses.

Every bad field raises ``DeploymentConfigError`` naming the field (dotted path), the
value and the fix. Unknown fields are refused, so a typo never silently means "default".
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raymoe.workers.model.dtypes import CHOICES as DTYPES
from raymoe.workers.model.quantized_experts import GROUP_SIZES as INT4_GROUP_SIZES
from raymoe.workers.model.quantized_experts import MODES as EXPERT_QUANTIZATION
from raymoe.workers.overlap import MODES as OVERLAP_MODES

LAYOUTS = ("disaggregated", "coherent")
BACKENDS = ("auto", "gloo", "nccl", "local")
STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
BUILTIN_POLICIES = ("linear", "round_robin")


class DeploymentConfigError(ValueError):
    def __init__(self, field_name: str, value: object, fix: str, source: str = ""):
        self.field, self.value, self.fix, self.source = field_name, value, fix, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config field '{field_name}' = {value!r}: {fix}")


@dataclass(frozen=True)
class PlacementConfig:
    policy: str = "linear"  # linear | round_robin (built in); ignored when plan is set
    plan: str | None = None  # a plan file written by `raymoe plan`


@dataclass(frozen=True)
class BatchingConfig:
    max_seqs: int = 256  # sequences running together, their KV-cache blocks permitting
    max_seq_len: int = 1024  # prompt + generated tokens per sequence
    max_num_batched_tokens: int = 2048  # tokens per step: a longer prompt is prefilled in chunks beside the decodes
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_memory: int | str | None = None  # KV-cache bytes per actor holding one ("4GiB"); None: 16 x max_seq_len
    prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before
    max_queue: int = 256  # waiting requests beyond which new ones are refused
    overlap: str = "auto"  # two micro-batches per decode step (disaggregated): auto (measured), on, off
    max_wait_s: float | None = None  # refuse a request whose expected wait for a KV slot is longer (None: no limit)


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: embedded ray.init(); "auto" or host:port joins a cluster
    strategy: str = "PACK"  # placement group strategy for the front-end + expert ranks
    namespace: str = "raymoe"
    node_label: str | None = None  # e.g. raymoe.io/node: pin plan node n's expert ranks to nodes labelled n


# A Kubernetes-style label key (what `ray start --labels` accepts): [prefix/]name; ray.io/ is Ray's own.
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class ResourcesConfig:
    cpus_per_actor: float = 0.25
    gpus_per_actor: str | float = "auto"  # "auto": 1 per actor when the cluster has GPUs, else 0
    threads_per_actor: int = 1  # torch intra-op threads in each actor (CPU runs)


@dataclass(frozen=True)
class RecoveryConfig:
    max_attempts: int = 3  # recoveries tried for one step before its error is raised (0: fail at once)
    step_timeout_s: float = 600.0  # a step silent this long counts as hung even if no collective timed out
    settle_s: float = 10.0  # after one rank fails, how long the others get to return before counting as hung
    fallback_to_replicas: bool = True  # a standby serves a failed expert rank's place on replicas while it reloads


@dataclass(frozen=True)
class QuantizationConfig:
    experts: str = "none"  # none | int8 (per channel) | int4 (per group): routed experts' weights, at load (CPU)
    group_size: int = 32  # int4: input columns per scale (32, 64, 128 or 256)


@dataclass(frozen=True)
class DeploymentConfig:
    model: str
    dtype: str = "auto"  # or float32 / bfloat16 / float16; auto: workers/model/dtypes.py
    moge_groups: int | None = None
    layout: str = "disaggregated"
    expert_ranks: int = 2
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    backend: str = "auto"
    collective_timeout_s: float = 120.0
    check_finite: bool = False  # scan every weight for NaN/Inf before any actor starts; refuse if found

    def replace(self, **changes: Any) -> "DeploymentConfig":
        """A copy with top-level fields changed (CLI overrides), validated again."""
        config = dataclasses.replace(self, **changes)
        validate(config)
        return config


_SECTIONS = {"placement": PlacementConfig, "batching": BatchingConfig, "ray": RayConfig,
             "resources": ResourcesConfig, "recovery": RecoveryConfig, "quantization": QuantizationConfig}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _build(cls, data: Any, prefix: str, source: str):
    if not isinstance(data, dict):
        raise DeploymentConfigError(prefix or "<root>", data, "expected a mapping of fields", source)
    known = _fields(cls)
    odd = [key for key in data if not isinstance(key, str)]  # YAML allows `1: x`, `null: x`, `[a]: x`
    if odd:
        name = f"{prefix}.{odd[0]}" if prefix else str(odd[0])
        raise DeploymentConfigError(name, data[odd[0]], f"not a field name; known fields: {sorted(known)}", source)
    unknown = sorted(set(data) - set(known))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise DeploymentConfigError(name, data[unknown[0]], f"unknown field; known fields: {sorted(known)}", source)
    kwargs = {}
    for name, value in data.items():
        if prefix == "" and name in _SECTIONS:
            value = _build(_SECTIONS[name], value if value is not None else {}, name, source)
        kwargs[name] = value
    if prefix == "" and "model" not in kwargs:
        raise DeploymentConfigError("model", None, "required: the model directory", source)
    return cls(**kwargs)


def _check(ok: bool, name: str, value: object, fix: str, source: str) -> None:
    if not ok:
        raise DeploymentConfigError(name, value, fix, source)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def memory_bytes(value: int | str | None) -> int | None:
    """``batching.kv_cache_memory`` in bytes: an integer, or a number with a unit
    ("512MiB", "4GiB", "2GB"); None stays None. ValueError on anything else."""
    if value is None or _is_int(value):
        return value
    match = _MEMORY.match(value) if isinstance(value, str) else None
    if not match or match.group(2) not in _UNITS:
        raise ValueError(value)
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def validate(c: DeploymentConfig, source: str = "") -> None:
    """Bounds and choices of every field."""
    _check(isinstance(c.model, str) and bool(c.model), "model", c.model, "a model directory path", source)
    _check(c.dtype in DTYPES, "dtype", c.dtype, f"one of {list(DTYPES)}", source)
    q = c.quantization
    _check(q.experts in EXPERT_QUANTIZATION, "quantization.experts", q.experts, f"one of {list(EXPERT_QUANTIZATION)}",
           source)
    _check(q.group_size in INT4_GROUP_SIZES, "quantization.group_size", q.group_size,
           f"one of {list(INT4_GROUP_SIZES)}", source)
    _check(c.moge_groups is None or (_is_int(c.moge_groups) and c.moge_groups >= 1), "moge_groups",
           c.moge_groups, "null or an integer >= 1", source)
    _check(c.layout in LAYOUTS, "layout", c.layout, f"one of {list(LAYOUTS)}", source)
    _check(_is_int(c.expert_ranks) and 1 <= c.expert_ranks <= 1024, "expert_ranks", c.expert_ranks,
           "an integer in [1, 1024]", source)
    _check(c.layout != "coherent" or c.expert_ranks <= 62, "expert_ranks", c.expert_ranks,
           "at most 62 with layout: coherent (partial-output bitmasks are 62 bits)", source)
    p = c.placement
    _check(p.plan is None or (isinstance(p.plan, str) and bool(p.plan)), "placement.plan", p.plan,
           "null or the path of a plan file written by `raymoe plan`", source)
    _check(p.policy in BUILTIN_POLICIES, "placement.policy", p.policy,
           f"one of {list(BUILTIN_POLICIES)}, or set placement.plan to a plan file from `raymoe plan`", source)
    b = c.batching
    _check(_is_int(b.max_seqs) and 1 <= b.max_seqs <= 4096, "batching.max_seqs", b.max_seqs,
           "an integer in [1, 4096]", source)
    _check(_is_int(b.max_seq_len) and 2 <= b.max_seq_len <= 1 << 20, "batching.max_seq_len", b.max_seq_len,
           "an integer in [2, 1048576]", source)
    _check(_is_int(b.max_queue) and b.max_queue >= 1, "batching.max_queue", b.max_queue, "an integer >= 1", source)
    _check(_is_int(b.max_num_batched_tokens) and 1 <= b.max_num_batched_tokens <= 1 << 20,
           "batching.max_num_batched_tokens", b.max_num_batched_tokens,
           "an integer in [1, 1048576] (tokens per step)", source)
    _check(b.max_num_batched_tokens >= b.max_seqs, "batching.max_num_batched_tokens", b.max_num_batched_tokens,
           f"at least batching.max_seqs ({b.max_seqs}): every running sequence's decode must fit one step", source)
    _check(_is_int(b.block_size) and 1 <= b.block_size <= 1024, "batching.block_size", b.block_size,
           "an integer in [1, 1024] (tokens per KV-cache block; 16 is the usual choice)", source)
    try:
        kv_bytes = memory_bytes(b.kv_cache_memory)
    except ValueError:
        kv_bytes = -1
    _check(kv_bytes is None or kv_bytes >= 1, "batching.kv_cache_memory", b.kv_cache_memory,
           "null (room for 16 sequences of batching.max_seq_len) or bytes per actor: an integer or a number "
           "with a unit such as '512MiB' or '4GiB'", source)
    _check(isinstance(b.prefix_caching, bool), "batching.prefix_caching", b.prefix_caching, "true or false", source)
    _check(b.max_wait_s is None or (_is_number(b.max_wait_s) and 0 < b.max_wait_s <= 3600), "batching.max_wait_s",
           b.max_wait_s, "null (no limit) or seconds in (0, 3600]", source)
    _check(b.overlap in OVERLAP_MODES, "batching.overlap", b.overlap,
           f"one of {list(OVERLAP_MODES)} (auto: measured per batch size; on: always split decode steps in two; "
           "off: never)", source)
    r = c.ray
    _check(r.address is None or (isinstance(r.address, str) and bool(r.address)), "ray.address", r.address,
           "null (embedded Ray), 'auto', or host:port of a cluster head", source)
    _check(r.strategy in STRATEGIES, "ray.strategy", r.strategy, f"one of {list(STRATEGIES)}", source)
    _check(isinstance(r.namespace, str) and bool(r.namespace), "ray.namespace", r.namespace, "a name", source)
    _check(r.node_label is None or (isinstance(r.node_label, str) and bool(LABEL_KEY.match(r.node_label))
                                    and not r.node_label.startswith("ray.io/")), "ray.node_label", r.node_label,
           "null (no node pinning) or a node label key such as raymoe.io/node ([prefix/]name, not ray.io/...)",
           source)
    res = c.resources
    _check(_is_number(res.cpus_per_actor) and 0 < res.cpus_per_actor <= 256, "resources.cpus_per_actor",
           res.cpus_per_actor, "a number in (0, 256]", source)
    _check(res.gpus_per_actor == "auto" or (_is_number(res.gpus_per_actor) and 0 <= res.gpus_per_actor <= 8),
           "resources.gpus_per_actor", res.gpus_per_actor, "'auto' or a number in [0, 8]", source)
    _check(_is_int(res.threads_per_actor) and 1 <= res.threads_per_actor <= 256, "resources.threads_per_actor",
           res.threads_per_actor, "an integer in [1, 256]", source)
    rc = c.recovery
    _check(_is_int(rc.max_attempts) and 0 <= rc.max_attempts <= 100, "recovery.max_attempts", rc.max_attempts,
           "an integer in [0, 100]", source)
    _check(_is_number(rc.step_timeout_s) and 1 <= rc.step_timeout_s <= 86400, "recovery.step_timeout_s",
           rc.step_timeout_s, "seconds in [1, 86400]", source)
    _check(_is_number(rc.settle_s) and 0 < rc.settle_s <= 3600, "recovery.settle_s", rc.settle_s,
           "seconds in (0, 3600]", source)
    _check(isinstance(rc.fallback_to_replicas, bool), "recovery.fallback_to_replicas", rc.fallback_to_replicas,
           "true or false", source)
    _check(isinstance(c.check_finite, bool), "check_finite", c.check_finite, "true or false", source)
    _check(c.backend in BACKENDS, "backend", c.backend, f"one of {list(BACKENDS)}", source)
    _check(_is_number(c.collective_timeout_s) and 1 <= c.collective_timeout_s <= 3600, "collective_timeout_s",
           c.collective_timeout_s, "seconds in [1, 3600]", source)


def parse_config(data: Any, source: str = "") -> DeploymentConfig:
    """A mapping (parsed YAML) -> validated DeploymentConfig."""
    try:
        config = _build(DeploymentConfig, data, "", source)
    except TypeError as exc:  # a section given as a non-mapping value
        raise DeploymentConfigError("<root>", data, f"malformed config ({exc})", source) from None
    validate(config, source)
    return config


def load_config(path: str | Path) -> DeploymentConfig:
    """Read a deployment YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DeploymentConfigError("<file>", str(path), f"cannot read the file ({exc.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DeploymentConfigError("<file>", str(path), f"not valid YAML ({exc})") from None
    except RecursionError:
        raise DeploymentConfigError("<file>", str(path), "nested too deeply to parse: a deployment config is a few "
                                    "levels of mappings") from None
    return parse_config(data, str(path))
