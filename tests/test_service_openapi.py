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


def test_the_backend_field_names_every_kernel_the_planner_picks():
    from engine.patterns import parse_pattern
    from engine.planner import plan
    from service.schemas import Meta

    sw, st, fx = ({"type": "sliding_window", "window": 64}, {"type": "strided", "stride": 64},
                  {"type": "fixed", "block": 64, "summary": 4})
    two_fixed = {"type": "union", "patterns": [sw, fx, {"type": "fixed", "block": 48, "summary": 2}]}  # no structured kernel
    cases = [({"type": "dense"}, 100), (sw, 100), (st, 100), (fx, 100), ({"type": "union", "patterns": [sw, st]}, 100),
             ({"type": "union", "patterns": [sw, fx]}, 100), ({"type": "union", "patterns": [st, fx]}, 100),
             ({"type": "union", "patterns": [sw, st, fx]}, 100), (two_fixed, 100)]
    picked = {plan(parse_pattern(p), lq, 65536, True).backend for p, lq in cases}
    assert picked == {"sdpa", "band", "strided", "fixed", "band+strided", "band+fixed", "strided+fixed",
                      "band+strided+fixed", "masked"}
    description = Meta.model_fields["backend"].description
    assert all(name in description.replace(",", " ").split() for name in picked)
