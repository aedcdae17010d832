"""Typed errors of the model core. Each names the file or field, the value and the fix."""

from __future__ import annotations


class RaymoeModelError(ValueError):
    """Base class: something about a checkpoint or a model config is wrong."""


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
