"""Property-based fuzzing of the live server from its own OpenAPI spec (schemathesis): every
response to a generated request, valid or not, is no 5xx and is what the spec says (its
status code is documented, its content type and body match the documented ones, the
documented headers are there).

One test per operation, each with its own budget: ``EXAMPLES`` generated requests per
generation mode (valid, then invalid), derandomized, so a run sends the same requests every
time; ``BUDGET_S`` per operation is only a guard for a slow machine (the examples left are
skipped and the test says so). ``test_every_operation_is_fuzzed`` keeps the list of
operations equal to the spec's.

Valid bodies and model names in the path mostly name an unknown model (a quick 404), so
half of them are pointed at the served model, and their token budgets are kept small so that the ones that do
reach the model stay quick; out-of-range values are left as generated (a quick 400).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.conftest import CONTEXT

OPERATIONS = (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
              ("GET", "/v1/models/{model}"), ("POST", "/v1/admin/plan"), ("GET", "/health"), ("GET", "/metrics"),
              ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
EXAMPLES = 50  # per operation and generation mode
BUDGET_S = 20.0  # per operation, both modes: a guard, not reached on an idle machine
SMALL = 6  # tokens a fuzzed request that reaches the model may ask for


def _tame(body, model: str, index: int):
    """Point every other valid body at the served model; keep its token budget small."""
    if not isinstance(body, dict):
        return body
    if index % 2 == 0 and isinstance(body.get("model"), str):
        body["model"] = model
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and SMALL < body[key] < CONTEXT:
            body[key] = SMALL
    if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = SMALL
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > 2:
        body["n"] = 2
    return body


@dataclass
class _Run:
    """One operation's fuzzing: its budget, what it sent and what failed."""

    base_url: str
    model: str
    deadline: float
    calls: int = 0
    skipped: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: dict = field(default_factory=dict)  # (check title, status) -> first report of it

    def record(self, group: FailureGroup, status: int, curl: str) -> None:
        for failure in group.exceptions:
            key = (failure.title, status)
            if key not in self.failures:
                self.failures[key] = f"{failure.title} (HTTP {status}): {failure.message}\n    {curl}"


def _fuzz(run: _Run, operation, mode: GenerationMode) -> None:
    """``EXAMPLES`` generated requests to one operation, every response checked against the spec."""
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        if time.monotonic() > run.deadline:
            run.skipped += 1
            return
        if mode == GenerationMode.POSITIVE:
            case.body = _tame(case.body, run.model, run.calls)
            if "model" in (case.path_parameters or {}) and run.calls % 2 == 0:
                case.path_parameters["model"] = run.model  # GET /v1/models/{model}: the served one, half the time
        run.calls += 1
        response = case.call(base_url=run.base_url, timeout=60)
        run.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as group:
            run.record(group, response.status_code, case.as_curl_command(base_url=run.base_url)[:400])

    try:
        fuzz()
    except Unsatisfiable:  # nothing to negate (an operation without parameters or body)
        assert mode == GenerationMode.NEGATIVE, operation.path


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


def test_every_operation_is_fuzzed(schema):
    found = {(op.method.upper(), op.path) for op in (result.ok() for result in schema.get_all_operations())}
    assert found == set(OPERATIONS), f"update OPERATIONS: the spec has {sorted(found)}"


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_responses_conform_to_the_spec(schema, server, method, path):
    operation = schema[path][method]
    run = _Run(server.base_url, server.model, time.monotonic() + BUDGET_S)
    started = time.monotonic()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        _fuzz(run, operation, mode)
    print(f"\n[fuzz] {method} {path}: {run.calls} requests in {time.monotonic() - started:.1f}s, statuses "
          f"{dict(sorted(run.statuses.items()))}" + (f", {run.skipped} skipped (budget spent)" if run.skipped else ""))
    assert not run.failures, f"{method} {path}: responses that break the spec:\n" + "\n".join(run.failures.values())
    takes_input = bool(list(operation.iter_parameters())) or len(operation.body) > 0
    least = 10 if takes_input else 1  # an operation without input has one request to send
    assert run.calls >= least, f"{method} {path}: only {run.calls} requests ran in the budget of {BUDGET_S:.0f}s"
