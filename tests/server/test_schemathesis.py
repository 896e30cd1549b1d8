"""Schemathesis (4.x) over our own /openapi.json, against a real server on the tiny checkpoint.

The schema declares every route's response model, its streams, each error status it returns
and the bearer key (server/openapi.py), so the checks can hold the server to it: no 5xx, every
status, content type, header and body as documented, schema-invalid bodies refused, and the key
required. Not checked: that every schema-valid body is accepted (`positive_data_acceptance`),
since a body can be well-formed and still name a model that is not served, a conversation in the
wrong order or token ids outside the vocabulary, which are 4xx by design.

Half the generated requests get the served model's name, so the 200 paths are tested as well.
A small --max-model-len keeps generations short; the number of examples bounds the time.
"""

from __future__ import annotations

import itertools

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS

from tests.server.conftest import API_KEY, MODEL, start_server, stop_server

EXAMPLES = 30  # per operation
NOT_APPLICABLE = {"positive_data_acceptance"}
_alternate = itertools.cycle([True, False])


@pytest.fixture(scope="module", params=[True, False], ids=["keyed", "open"])
def short_server(request, hf_dir, tmp_path_factory):
    """With API keys (the schema then declares the bearer scheme), and without: a wrong body must
    meet the body's checks, which a server with keys answers only once the key is right."""
    log = tmp_path_factory.mktemp("schemathesis") / "server.log"
    server = start_server(hf_dir, log, "--max-model-len", "48", api_key=request.param)
    server.keyed = request.param
    yield server
    stop_server(server)


def checks() -> list:
    found = [check for check in CHECKS.get_all() if check.__name__ not in NOT_APPLICABLE]
    names = {check.__name__ for check in found}
    assert {"not_a_server_error", "response_schema_conformance", "status_code_conformance"} <= names
    return found


def exercise(operation, mode: GenerationMode, server) -> None:
    """EXAMPLES generated requests to one operation, each checked. Valid ones carry the key;
    invalid ones go as generated (a missing or wrong key is one of the ways to be invalid)."""
    auth = (
        {"Authorization": f"Bearer {API_KEY}"} if mode is GenerationMode.POSITIVE and server.keyed else None
    )

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
        database=None,
    )  # fmt: skip
    def run(case) -> None:
        if mode is GenerationMode.POSITIVE and next(_alternate):  # the served model: 200 paths too
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL
            if case.path_parameters and "model_id" in case.path_parameters:
                case.path_parameters["model_id"] = MODEL
        case.call_and_validate(headers=auth, checks=checks(), timeout=60)

    try:
        run()
    except Unsatisfiable:
        # A negative value for what takes anything (a path segment): nothing to send wrong.
        assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET", operation.label
    assert server.process.poll() is None, "the server died"


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_the_server_keeps_to_its_schema(short_server, mode):
    headers = {"Authorization": f"Bearer {API_KEY}"} if short_server.keyed else {}
    schema = schemathesis.openapi.from_url(f"{short_server.url}/openapi.json", headers=headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 10  # every route
    if mode is GenerationMode.NEGATIVE:  # only what takes input can be sent a wrong one
        operations = [op for op in operations if list(op.iter_parameters()) or op.body]
        posts = {"POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize", "POST /detokenize"}
        assert posts <= {op.label for op in operations}
    for operation in operations:
        exercise(operation, mode, short_server)
