"""Property-based fuzzing of the live server from its own OpenAPI spec (schemathesis):
no generated request, valid or not, gets a 5xx. Bounded: a fixed number of examples per
operation and generation mode, and an overall time budget after which the remaining
examples are skipped.

Valid bodies mostly name an unknown model (a quick 404), so a share of them is pointed
at the served model, and their token budgets are kept small so that the ones that do
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

from tests.e2e.conftest import CONTEXT

EXAMPLES = 60  # per operation and generation mode
BUDGET_S = 30.0
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
    """What the fuzzing of every operation shares."""

    base_url: str
    model: str
    deadline: float
    calls: int = 0
    failures: list = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)


def _fuzz(run: _Run, operation, mode: GenerationMode) -> None:
    """Up to EXAMPLES generated requests to one operation (none once the budget is spent)."""
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        if time.monotonic() > run.deadline:
            return
        if mode == GenerationMode.POSITIVE:
            case.body = _tame(case.body, run.model, run.calls)
        run.calls += 1
        response = case.call(base_url=run.base_url, timeout=60)
        run.statuses[(operation.path, response.status_code)] += 1
        if response.status_code >= 500:
            run.failures.append(f"{response.status_code} {response.text[:300]}\n  {case.as_curl_command()}")

    try:
        fuzz()
    except Unsatisfiable:  # nothing to negate (an operation without parameters or body)
        assert mode == GenerationMode.NEGATIVE, operation.path


@pytest.mark.slow
def test_generated_requests_never_get_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {(op.method.upper(), op.path) for op in operations}
    assert ("POST", "/v1/completions") in paths and ("POST", "/v1/chat/completions") in paths
    run = _Run(server.base_url, server.model, time.monotonic() + BUDGET_S)
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(run, operation, mode)
    assert not run.failures, "\n".join(run.failures[:5])
    assert run.calls > 50  # the budget let it run a meaningful number of requests
    print(f"\n[fuzz] {run.calls} requests in {time.monotonic() - run.deadline + BUDGET_S:.0f}s: {dict(run.statuses)}")
