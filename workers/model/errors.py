"""Typed errors of the model core. Each names the file or field, the value and the fix."""

from __future__ import annotations


class RaymoeModelError(ValueError):
    """Base class: something about a checkpoint or a model config is wrong."""

    def __reduce__(self):  # picklable whatever a subclass's __init__ takes (Ray carries it from actors)
        return _rebuild, (type(self), str(self), self.__dict__)


def _rebuild(cls: type, message: str, state: dict) -> RaymoeModelError:
    error = cls.__new__(cls)
    ValueError.__init__(error, message)
    error.__dict__.update(state)
    return error


class CheckpointError(RaymoeModelError):
    """A checkpoint file is missing, unreadable or inconsistent.

    Attributes: ``path`` (the file), ``problem`` (what is wrong), ``fix`` (what to do).
    """

    def __init__(self, path: str, problem: str, fix: str = ""):
        self.path, self.problem, self.fix = str(path), problem, fix
        message = f"{self.path}: {problem}"
        super().__init__(message + (f". Fix: {fix}" if fix else ""))


class ConfigFieldError(RaymoeModelError):
    """A field of ``config.json`` has a value raymoe cannot use.

    Attributes: ``path``, ``field``, ``value``, ``expected``.
    """

    def __init__(self, path: str, field: str, value: object, expected: str):
        self.path, self.field, self.value, self.expected = str(path), field, value, expected
        super().__init__(f"{self.path}: field '{field}' = {value!r}; expected {expected}")


class UnsupportedModelError(ConfigFieldError):
    """The checkpoint is a model family or feature raymoe does not implement."""


class WeightShapeError(CheckpointError):
    """A tensor in the checkpoint has the wrong shape for the config."""

    def __init__(self, path: str, key: str, got: tuple, expected: tuple, hint: str = ""):
        self.key, self.got, self.expected = key, tuple(got), tuple(expected)
        super().__init__(
            path,
            f"tensor '{key}' has shape {list(got)}, config.json implies {list(expected)}",
            hint or "check that config.json belongs to these weights",
        )


class MissingWeightError(CheckpointError):
    """A tensor the config requires is absent from every shard."""

    def __init__(self, path: str, key: str, fix: str = ""):
        self.key = key
        super().__init__(
            path,
            f"tensor '{key}' is not in the checkpoint",
            fix or "the checkpoint is incomplete or config.json does not match it",
        )


class QuantizedWeightError(CheckpointError):
    """A tensor of the checkpoint is quantized (a float8 or integer dtype, or a scale /
    packed-weight tensor such as ``weight_scale_inv`` or ``qweight``) while config.json
    declares no quantization.

    Attributes: ``key`` (the first such tensor), ``dtype`` (the header's, e.g. ``F8_E4M3``,
    or torch's once read, e.g. ``float8_e4m3fn``; None when its name gave it away) and
    ``count`` (how many such tensors).
    """

    def __init__(self, path: str, key: str, dtype: str | None, count: int = 1, declared: bool = False):
        """``declared``: config.json declares FP8 block quantization, and this tensor does
        not fit it (a float8 weight without its scale, or a tensor of another scheme)."""
        self.key, self.dtype, self.count = key, dtype, count
        what = f"has dtype {dtype}" if dtype else "is a quantization scale or packed weight"
        others = f" ({count} such tensors)" if count > 1 else ""
        if declared:
            super().__init__(
                path,
                f"tensor '{key}' {what}{others}, which FP8 block quantization does not explain: a float8 weight "
                f"needs its '<name>_scale_inv' block scales, and no other scale or packed tensor is read",
                "the checkpoint is incomplete, or uses another quantization scheme than its config.json says",
            )
            return
        super().__init__(
            path,
            f"tensor '{key}' {what}{others}: the checkpoint is quantized, but config.json has no "
            "quantization_config",
            "raymoe loads unquantized (float32, bfloat16 or float16) weights, or FP8 with weight_block_size "
            "declared in quantization_config: use the original checkpoint",
        )


class NonFiniteWeightError(CheckpointError):
    """Tensors of a checkpoint hold NaN or Inf values (``Checkpoint.check_finite``).

    Attributes: ``key`` (the first bad tensor), ``nan`` and ``inf`` (its counts),
    ``numel`` (its size) and ``bad_keys`` (every bad tensor of the checkpoint).
    """

    def __init__(self, path: str, key: str, nan: int, inf: int, numel: int, bad_keys: list[str]):
        self.key, self.nan, self.inf, self.numel, self.bad_keys = key, nan, inf, numel, list(bad_keys)
        others = f"; {len(bad_keys)} tensors are not finite: {', '.join(bad_keys[:5])}" + (
            ", ..." if len(bad_keys) > 5 else "") if len(bad_keys) > 1 else ""
        super().__init__(
            path,
            f"tensor '{key}' holds {nan} NaN and {inf} Inf values (of {numel}){others}",
            "re-export the checkpoint, or set check_finite: false to load it anyway",
        )
