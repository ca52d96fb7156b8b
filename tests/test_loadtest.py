"""service.loadtest against a live `python -m service` on a loopback port, in both modes."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from service.client import AttentionResult
from service.loadtest import (
    CONNECTIONS_PER_CLIENT,
    DEFAULT_SCENARIO,
    LoadConfig,
    Scenario,
    client_pools,
    local_service,
    main,
    mismatched,
    pooled_cases,
    run,
    write,
)


@pytest.fixture(scope="module")
def url():
    with local_service(log_level="warning") as live:
        yield live


def check_report(report: dict, out) -> None:
    """Every request answered 200, every answer checked and equal to the local engine's."""
    assert report["sent"] > 0
    assert report["answered"] == report["sent"]
    assert report["by_status"] == {"200": report["sent"]}
    assert report["checked"] == report["sent"] and report["mismatches"] == 0
    assert sum(report["batch_sizes"].values()) == report["sent"]
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert set(report["server_ms"]) == {"queue", "compute", "total"}
    assert report["throughput_rps"] > 0 and report["tokens_per_s"] > 0
    assert json.loads((out / "report.json").read_text()) == report
    assert "| sent | answered |" in (out / "report.md").read_text()
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("in_flight", [1, 3, CONNECTIONS_PER_CLIENT, CONNECTIONS_PER_CLIENT + 1, 512])
def test_client_pools_hold_exactly_the_requests_allowed_in_flight(in_flight):
    """--max-connections 4 means 4 requests on the wire, not a client's 8."""
    pools = client_pools(in_flight)
    assert sum(pools) == in_flight and all(1 <= size <= CONNECTIONS_PER_CLIENT for size in pools)


def test_closed_loop(url, tmp_path):
    result = run(LoadConfig(url=url, concurrency=8, duration_s=3.0, progress=False))
    report = write(result, tmp_path)
    check_report(report, tmp_path)
    assert report["mode"] == "closed" and report["wall_s"] >= 3.0
    assert set(report["by_kind"]) <= {shape.name for shape in DEFAULT_SCENARIO.requests}


def test_load_shared_by_two_processes(url, tmp_path):
    tiny = Scenario.model_validate({"requests": [{"heads": 2, "q_len": 32, "head_dim": 16}]})
    cfg = LoadConfig(url=url, concurrency=4, requests=40, processes=2, scenario=tiny, progress=False)
    result = run(cfg)
    report = write(result, tmp_path)
    check_report(report, tmp_path)
    assert report["sent"] == 40
    assert all(0 <= s.scheduled_s <= s.sent_s <= s.done_s <= result.wall_s for s in result.samples)


def test_open_loop_from_the_command_line(url, tmp_path):
    scenario = tmp_path / "mix.yaml"
    scenario.write_text(
        "requests:\n"
        "  - {weight: 3, heads: 4, q_len: 64, head_dim: 32}\n"
        "  - {weight: 1, heads: 8, kv_heads: 2, q_len: 8, k_len: 128, head_dim: 16, dtype: float16,\n"
        "     encoding: data, return_lse: true, pattern: {type: fixed, block: 16, summary: 4}}\n"
        "  - {weight: 1, heads: 4, q_len: 48, head_dim: 16, dtype: bfloat16, encoding: binary, return_lse: true}\n"
    )
    out = tmp_path / "out"
    argv = ["--url", url, "--rate", "40", "--requests", "60", "--scenario", str(scenario), "--out", str(out)]
    assert main(argv + ["--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    check_report(report, out)
    assert report["mode"] == "open" and report["sent"] == 60 and report["rate"] == 40
    assert len(report["by_kind"]) == 3


def test_scenario_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"requests": [{"heads": 6, "kv_heads": 4}]}')
    with pytest.raises(ValidationError, match="kv_heads: 4 key/value heads do not divide q.s 6 heads"):
        Scenario.load(bad)
    with pytest.raises(ValidationError, match="q_len: query length 64 exceeds key length 32"):
        Scenario.model_validate({"requests": [{"q_len": 64, "k_len": 32}]})
    with pytest.raises(ValidationError, match="encoding"):
        Scenario.model_validate({"requests": [{"dtype": "bfloat16", "encoding": "data"}]})
    with pytest.raises(ValueError, match="processes"):
        LoadConfig(url="http://127.0.0.1:9", concurrency=2, processes=3)
    with pytest.raises(ValidationError, match="window"):
        Scenario.model_validate({"requests": [{"pattern": {"type": "sliding_window"}}]})


def test_command_line_refuses_both_or_neither_mode(tmp_path, capsys):
    for load in (["--rate", "5", "--concurrency", "2"], []):
        with pytest.raises(SystemExit):
            main(["--url", "http://127.0.0.1:9", "--out", str(tmp_path), *load])
    assert "--concurrency" in capsys.readouterr().err


@pytest.mark.parametrize("flags, shown", [
    (["--duration", "nan"], "duration_s: Input should be a finite number"),  # ran forever
    (["--timeout", "0"], "timeout_s: Input should be greater than 0"),
    (["--pool", "0"], "pool: Input should be greater than or equal to 1"),  # a traceback from randrange
    (["--requests", "-5"], "requests: Input should be greater than or equal to 1"),  # it named processes
    (["--scenario", "{scenario}"], "bad.yaml: while parsing"),  # a YAML traceback
    (["--scenario", "{impossible}"], "requests[0]: kv_heads: 4 key/value heads do not divide q's 6 heads"),
])
def test_command_line_refuses_bad_values_naming_them(tmp_path, capsys, flags, shown):
    (tmp_path / "bad.yaml").write_text("requests: [\n  {a: 1\n")
    (tmp_path / "impossible.json").write_text('{"requests": [{"heads": 6, "kv_heads": 4}]}')
    flags = [flag.format(scenario=tmp_path / "bad.yaml", impossible=tmp_path / "impossible.json") for flag in flags]
    with pytest.raises(SystemExit) as done:
        main(["--url", "http://127.0.0.1:9", "--concurrency", "1", "--out", str(tmp_path / "out"), *flags])
    assert done.value.code == 2 and shown in capsys.readouterr().err


def test_unreachable_service_is_a_clear_error(tmp_path, capsys):
    argv = ["--url", "http://127.0.0.1:9", "--rate", "5", "--ready-timeout", "0.3", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "http://127.0.0.1:9 was not ready within 0.3 s" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_mismatch_check_catches_swapped_and_wrong_answers():
    scenario = Scenario.model_validate({"requests": [{"heads": 2, "q_len": 16, "head_dim": 8, "return_lse": True}]})
    first, second = pooled_cases(scenario, pool=2, seed=0)[0]
    assert not mismatched(first, AttentionResult(first.output.clone(), first.lse.clone()))
    assert mismatched(first, AttentionResult(second.output, second.lse))  # another request's answer
    assert mismatched(first, AttentionResult(first.output + 1e-2, first.lse))
    assert mismatched(first, AttentionResult(first.output, first.lse + 1e-2))
    assert mismatched(first, AttentionResult(first.output, None))  # lse asked for, none came
