"""Schemathesis against the committed openapi.json, sent to the service under a real uvicorn on
loopback: no 5xx, and every response (errors included) conforms to the document: its status,
content type, headers and body schema. Every default check runs except "a schema-valid request is
accepted": the cross-field rules (shapes that agree, a b64 length that fits the shape) are not
expressible in JSON Schema, so most schema-valid requests are rightly refused with 422.

CI runs ATTN_FUZZ_EXAMPLES (default 50) generated cases per operation; a longer run:

    ATTN_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q tests/test_service_fuzz.py
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import schemathesis
from schemathesis.checks import positive_data_acceptance
from hypothesis import HealthCheck, settings as hypothesis_settings

from service.openapi import PATH
from service_support import live_server, settings

KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("ATTN_FUZZ_EXAMPLES", "50"))
schema = schemathesis.openapi.from_dict(json.loads(PATH.read_text()))
# What the cases got back, by operation and status (the checks also send requests of their own,
# e.g. without the key or with other methods): the figures the last test asserts.
tried: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module")
def base_url():
    # Small limits, so that generated shapes are refused (413) or computed cheaply; an API key, so
    # that schemathesis also checks that requests without it (or with a wrong one) are refused.
    with live_server(settings(max_tokens_per_request=4096, max_tensor_elements=1 << 16, max_body_bytes=1 << 20,
                              max_heads=64, api_keys=KEY)) as url:
        yield url


@schema.parametrize()
@hypothesis_settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_every_response_conforms(case, base_url):
    response = case.call_and_validate(
        base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, excluded_checks=[positive_data_acceptance],
        timeout=30,
    )
    tried[(case.operation.label, response.status_code)] += 1


def test_fuzz_figures():
    """The run above tried cases on every operation, none answered 5xx."""
    if not tried:
        pytest.skip("the fuzz cases did not run in this session")
    by_operation = Counter(op for op, _ in tried.elements())
    by_status = Counter(status for _, status in tried.elements())
    print(f"fuzz: {sum(tried.values())} cases, by operation {dict(by_operation)}, by status {dict(by_status)}")
    assert set(by_operation) == {f"{m.upper()} {p}" for p, ops in schema.raw_schema["paths"].items() for m in ops}
    assert by_operation["POST /attention"] >= EXAMPLES
    assert not [key for key in tried if key[1] >= 500]
    assert by_status[200] > 0 and by_status[422] > 0  # some generated requests were computed, some refused
