"""openapi.json at the repository root is the app's document, regenerated from the code."""

from __future__ import annotations

import json

from service.openapi import PATH, render


def test_committed_openapi_json_matches_the_app():
    assert PATH.exists(), "openapi.json is missing: run `python -m service.openapi`"
    assert json.loads(PATH.read_text()) == json.loads(render()), "openapi.json is stale: run `python -m service.openapi`"


def test_the_document_describes_the_request_and_every_error_status():
    doc = json.loads(render())
    post = doc["paths"]["/attention"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/AttentionRequest"}
    assert {"200", "401", "413", "422", "429", "503", "504"} <= set(post["responses"])
    request = doc["components"]["schemas"]["AttentionRequest"]
    assert {"q", "k", "v", "pattern", "causal", "scale", "return_lse", "timeout_ms", "encoding"} == set(request["properties"])
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


def test_the_backend_field_names_every_kernel_family():
    from engine.planner import KERNEL_FAMILY_PATTERNS, KERNEL_FAMILY_TOKENS, plan
    from service.schemas import Meta

    description = Meta.model_fields["backend"].description.replace(",", " ").split()
    n = KERNEL_FAMILY_TOKENS  # the warm-up's length: there each pattern takes a family of its own
    backends = [plan(pattern, n, n, True, "cpu").backend for pattern in KERNEL_FAMILY_PATTERNS]
    assert len(set(backends)) == len(backends) and all(backend in description for backend in backends)
