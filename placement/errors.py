"""Typed errors of the placement planner.

Every error subclasses ``ValueError`` (callers that only know "bad input" can catch
that) and carries the offending numbers as attributes, so a CLI or an HTTP layer can
report them without parsing the message.
"""

from __future__ import annotations


class PlacementError(ValueError):
    """Base class of every error raised by ``placement``."""


class PlanError(PlacementError):
    """A placement plan (built in memory or loaded from YAML) is invalid.

    Attributes: ``field`` (the plan field at fault), ``value`` (the bad value, or a
    short summary of it) and ``fix`` (what to change).
    """

    def __init__(self, field: str, value: object, problem: str, fix: str):
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"plan field {field!r} = {value!r}: {problem}. Fix: {fix}")


class TraceError(PlacementError):
    """A routing trace or routing statistics array is malformed.

    Attributes: ``source`` (file or array name), ``field`` and ``value``.
    """

    def __init__(self, source: str, field: str, value: object, problem: str, fix: str):
        self.source = source
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"{source}: {field} = {value!r}: {problem}. Fix: {fix}")


class ConfigError(PlacementError):
    """A policy parameter is out of range or inconsistent with the others.

    Attributes: ``field`` (parameter name), ``value`` and ``fix``.
    """

    def __init__(self, field: str, value: object, problem: str, fix: str):
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"{field} = {value!r}: {problem}. Fix: {fix}")


class LoadCapInfeasible(PlacementError):
    """No plan meets the requested load cap (max rank load / mean rank load).

    Attributes:
        load_cap: the requested cap.
        lower_bound: a proven lower bound on the imbalance any plan with these slot
            counts and replica counts can reach (from the hottest replica's share, or
            from the MILP's dual bound). ``None`` when nothing is proven.
        layer: the layer where the bound (or the failure) occurs.
        best_found: the best imbalance the solver reached, or ``None``.
        proven: True when the cap is proven impossible (``load_cap < lower_bound`` or
            the MILP proved infeasibility); False when a heuristic simply did not
            find a feasible plan.
    """

    def __init__(self, load_cap: float, lower_bound: float | None, layer: int,
                 best_found: float | None, proven: bool, detail: str = ""):
        self.load_cap = load_cap
        self.lower_bound = lower_bound
        self.layer = layer
        self.best_found = best_found
        self.proven = proven
        lb = "none proven" if lower_bound is None else f"{lower_bound:.6f}"
        bf = "none" if best_found is None else f"{best_found:.6f}"
        head = "is impossible" if proven else "was not met by the solver"
        super().__init__(
            f"load_cap = {load_cap} {head} at layer {layer}: proven lower bound on "
            f"max/mean rank load = {lb}, best plan found = {bf}. {detail}"
            "Fix: raise --load-cap above the bound, add redundant slots (--redundant) "
            "for the hot experts, or use the exact solver.")


class SolverError(PlacementError):
    """The MILP/LP solver returned no usable solution (status names the reason)."""

    def __init__(self, solver: str, status: str, detail: str = ""):
        self.solver = solver
        self.status = status
        super().__init__(f"{solver} returned status {status!r}. {detail}".strip())
