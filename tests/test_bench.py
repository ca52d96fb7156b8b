"""The benchmark scripts compute what they claim: FlexAttention's mask is the contract's, and
a tiny run writes the table, JSON and plot (no timing is asserted)."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from bench import kernels as bench_kernels
from cuda_emulation import cuda_kernels_on_cpu
from engine.kernels import merge, triton_band, triton_fixed, union
from engine.patterns import parse_pattern
from engine.planner import warm_up_calls
from reference import reference_attention
from service_support import from_json


@pytest.mark.parametrize("name", list(bench_kernels.PATTERNS))
@pytest.mark.parametrize("causal", [True, False])
def test_flex_baseline_attends_the_contract_keys(name, causal):
    spec = bench_kernels.PATTERNS[name]
    n = 300
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    mask = create_block_mask(bench_kernels.mask_mod_for(parse_pattern(spec), causal), None, None, n, n, device="cpu")
    out = flex_attention(q, k, v, block_mask=mask)
    ref_out, _ = reference_attention(q, k, v, spec, causal=causal)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)


def test_masked_sdpa_baseline_attends_the_contract_keys():
    spec = bench_kernels.PATTERNS["union"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(3))
    for causal in (True, False):
        out = bench_kernels.masked_sdpa(parse_pattern(spec), 300, torch.device("cpu"), causal)(q, k, v)
        ref_out, _ = reference_attention(q, k, v, spec, causal=causal)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)


def test_non_causal_benchmark_rows_count_every_pair(tmp_path):
    out = tmp_path / "nc.json"
    bench_kernels.main(["--non-causal", "--n", "256", "--heads", "2", "--repeats", "1", "--turn-s", "0.01", "--no-flex",
                        "--bf16-n", "0", "--memory-n", "0", "--scaling-n", "--first-call-n", "0",
                        "--patterns", "sliding_window", "strided", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["pattern"] for r in rows] == ["sliding_window(256), non-causal", "strided(64), non-causal"]
    assert all(not r["causal"] and r["dense_pairs"] == 2 * 256 * 256 for r in rows)
    # sliding_window(256) spans all 256 keys: simplified to dense, every pair attended
    assert rows[0]["attended_pairs"] == rows[0]["dense_pairs"] and rows[0]["backend"] == "sdpa"
    assert rows[1]["attended_pairs"] == 2 * 256 * (256 // 64) and rows[1]["backend"] == "strided"


def test_tiny_benchmark_run_writes_json_and_plot(tmp_path):
    out = tmp_path / "k.json"
    bench_kernels.main(["--n", "512", "--heads", "2", "--repeats", "1", "--turn-s", "0.01", "--no-flex", "--bf16-n", "512",
                        "--memory-n", "1024", "--scaling-n", "512", "1024", "--first-call-n", "300",
                        "--masked-max-n", "512", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    issue_labels = {bench_kernels.LABELS[name] for name in bench_kernels.ISSUE_PATTERNS}
    assert {r["pattern"] for r in rows} == issue_labels
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in rows:
        assert r["engine_s"] > 0 and r["dense_s"] > 0 and "masked_s" in r
        assert r["efficiency"] == pytest.approx(r["dense_s"] / r["engine_s"] * r["attended_pairs"] / r["dense_pairs"])
    assert result["memory"]["peak_bytes"] > 0
    assert len(result["scaling"]["growth_per_doubling"]) == 1
    ratios = result["bf16_over_fp32"]
    assert ratios.pop("n") == 512 and set(ratios) == issue_labels
    assert all(r > 0 for r in ratios.values())
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"


def test_the_dense_flash_baseline_is_dense_causal_attention_and_its_efficiency_reaches_the_tables():
    """`dense_flash` (on CUDA the flash kernel alone; here torch's CPU flash kernel) computes dense
    causal SDPA, and `markdown` lists each row's efficiency against it where the run measured it."""
    q, k, v = bench_kernels.inputs(64, 2, 16, torch.float32, torch.device("cpu"))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(bench_kernels.dense_flash(q, k, v, True), want)
    row = {"pattern": "strided(64)", "n": 131072, "dtype": "bfloat16", "dense_s": 0.036, "engine_s": 0.0008,
           "speedup": 45.0, "efficiency": 0.7, "dense_flash_s": 0.056, "efficiency_flash": 1.09}
    text = bench_kernels.markdown({"rows": [row, {**row, "n": 4096}]})
    assert "efficiency against the dense flash kernel" in text and "strided(64) n = 131072 1.09 (0.056 s)" in text
    del row["dense_flash_s"], row["efficiency_flash"]
    assert "dense flash" not in bench_kernels.markdown({"rows": [row]})


def test_service_bench_requests_are_answered_and_read_back():
    """bench/service.py's prepared bodies (b64, data, binary) are valid requests whose answers
    its reader understands: run through the app in-process, checked against the engine."""
    from fastapi.testclient import TestClient

    from bench import service as bench_service
    from engine import attention
    from service.app import create_app
    from service.settings import Settings

    spec = {**bench_service.TINY, "n": 40}
    q, k, v = bench_service.tensors(spec)
    expected = attention(q, k, v, spec["pattern"])
    binary_payload, binary_lines = bench_service.binary_body(spec)
    headers = dict(line.split(": ", 1) for line in binary_lines.strip().split("\r\n"))
    with TestClient(create_app(Settings(device="cpu"))) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the app did not get ready"
            time.sleep(0.02)
        answers = [client.post("/attention", content=bench_service.body(spec, enc),
                               headers={"Content-Type": "application/json"}) for enc in ("b64", "data")]
        answers.append(client.post("/attention", content=binary_payload, headers=headers))
    for r in answers:
        assert r.status_code == 200, r.text
        meta = bench_service.answer_meta({name.lower(): value for name, value in r.headers.items()}, r.content)
        assert meta["batch"]["requests"] == 1 and meta["timing_ms"]["total"] > 0
    n = int(answers[2].headers["inference-header-content-length"])
    got = torch.frombuffer(bytearray(answers[2].content[n:]), dtype=torch.float32).reshape(expected.shape)
    assert torch.equal(got, from_json(answers[0].json()["output"]))  # binary and base64 carry the same bits
    # The service's worker runs small calls on fewer threads, which may change the last bit.
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_grouped_query_decode_rows(tmp_path):
    out = tmp_path / "g.json"
    bench_kernels.main(["--decode", "--decode-lq", "1", "--decode-lk", "300", "--heads", "4", "--decode-kv-heads", "2",
                        "--dim", "16", "--repeats", "1", "--turn-s", "0.01", "--patterns", "strided", "--out", str(out)])
    rows = json.loads(out.read_text())["decode"]
    assert {(r["heads"], r["kv_heads"], r["layers"]) for r in rows} == {(4, 2, 1)}
    assert all(min(r["engine_s"], r["masked_s"], r["dense_s"], r["sdpa_s"]) > 0 for r in rows)


def test_decode_rows_over_layers_take_each_layers_caches_in_turn(tmp_path, monkeypatch):
    read = {}  # each timed function's keys, call by call (dense's under None, the pattern's under it)
    engine_attention = bench_kernels.attention
    monkeypatch.setattr(bench_kernels, "attention",
                        lambda q, k, v, p: (read.setdefault(p, []).append(k), engine_attention(q, k, v, p))[1])
    out = tmp_path / "l.json"
    bench_kernels.main(["--decode", "--decode-lq", "1", "--decode-lk", "300", "--decode-layers", "3", "--heads", "2",
                        "--dim", "16", "--repeats", "2", "--turn-s", "0.01", "--patterns", "strided", "--out", str(out)])
    assert {r["layers"] for r in json.loads(out.read_text())["decode"]} == {3}
    assert len(read) == 1 + 1 + len(bench_kernels.DECODE_EXTRA)  # dense, strided and the extra patterns
    for keys in read.values():
        first = keys[:3]  # a warm-up call and two rounds: at least 3 calls, however loaded the machine
        assert len(first) == 3 and not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
        assert [k.data_ptr() for k in keys] == [first[i % 3].data_ptr() for i in range(len(keys))]  # in turn


@pytest.mark.parametrize("causal", [True, False])
def test_grouped_prefills_time_grouped_heads_against_repeated_ones(tmp_path, causal):
    out = tmp_path / "gp.json"
    bench_kernels.main(["--grouped", "2", "--n", "300", "--heads", "4", "--dim", "16", "--repeats", "1",
                        "--turn-s", "0.01", "--patterns", "strided", "fixed", "--out", str(out),
                        *([] if causal else ["--non-causal"])])
    rows = json.loads(out.read_text())["grouped"]
    assert {(r["pattern"], r["n"], r["heads"], r["kv_heads"], r["causal"]) for r in rows} == {
        (bench_kernels.LABELS[name], 300, 4, 2, causal) for name in ("strided", "fixed")}
    for r in rows:
        assert min(r["grouped_s"], r["repeated_s"]) > 0
        assert r["repeated_peak_bytes"] > 0 and r["grouped_peak_bytes"] > 0


def test_decode_benchmark_writes_each_kernels_time(tmp_path):
    out = tmp_path / "d.json"
    bench_kernels.main(["--decode", "--decode-lq", "1", "3", "--decode-lk", "700", "--heads", "2", "--repeats", "1",
                        "--turn-s", "0.01", "--dtypes", "float32", "bfloat16", "--out", str(out)])
    rows = json.loads(out.read_text())["decode"]
    assert {(r["dtype"], r["lq"], r["lk"]) for r in rows} == {
        (dtype, lq, 700) for dtype in ("float32", "bfloat16") for lq in (1, 3)}
    assert {r["pattern"] for r in rows} == {*(bench_kernels.LABELS[p] for p in bench_kernels.ISSUE_PATTERNS),
                                            *bench_kernels.DECODE_EXTRA}
    for r in rows:
        assert min(r["engine_s"], r["masked_s"], r["dense_s"], r["sdpa_s"]) > 0
    assert {r["backend"] for r in rows} == {"band", "strided", "fixed", "band+strided", "masked"}  # Lk 700: short


def test_small_benchmark_times_both_plans_and_names_the_choice(tmp_path):
    out = tmp_path / "s.json"
    bench_kernels.main(["--small", "--small-n", "24", "200", "--heads", "2", "--dim", "16", "--repeats", "1",
                        "--turn-s", "0.01", "--out", str(out)])
    rows = json.loads(out.read_text())["small"]
    assert {(r["n"], r["causal"], r["pattern"]) for r in rows} == {
        (n, causal, label) for n in (24, 200) for causal in (True, False) for label in bench_kernels.SMALL_PATTERNS}
    fixed = {(r["n"], r["causal"]): r for r in rows if r["pattern"] == "fixed(16, 2)"}
    assert {r["backend"] for r in fixed.values()} == {"masked", "fixed"}  # small: masked; n = 200: its own
    assert all(r["structured_s"] > 0 for r in fixed.values())
    assert all(r["masked_s"] > 0 and r["dense_s"] > 0 for r in rows)


@pytest.mark.parametrize("kernels", ["cpu", "cuda_emulated"])
def test_gpu_check_cases_pass_on_the_cpu(kernels):
    """bench/gpu_check.py's exactness checks, a sample of them, run here as on CUDA: the harness
    works, and the small shapes run both as the planner picks and on the structured kernels. Each
    runs as it is made, as there (the medium shapes' checks read the loop's latest tensors). A
    second sample runs on CUDA's branches, emulated (all 1,504 passed so on 2026-12-03: 3 minutes)."""
    from bench import gpu_check
    from cuda_emulation import cuda_kernels_on_cpu

    names = []
    sample = {"cpu": 0, "cuda_emulated": 4}[kernels]
    with cuda_kernels_on_cpu() if kernels == "cuda_emulated" else contextlib.nullcontext():
        for i, (name, run, q, k, v, pattern, causal, dtype) in enumerate(gpu_check.cases(torch.device("cpu"))):
            names.append(name)
            if i % 9 == sample or " structured (" in name and i % 3 == sample % 3:
                assert gpu_check.compare(*run(), q, k, v, pattern, causal, dtype) is None, name
    twice = [name.split(" structured (")[0] for name in names if " structured (" in name]
    assert twice and set(twice) <= set(names)


def test_gpu_check_times_the_service_warm_up_and_fails_if_it_does(monkeypatch, capsys):
    """gpu_check first runs the service's warm-up calls through the engine and times them (on a
    cold GPU its Triton compiles); a warm-up that raises is a FAIL line and no time."""
    from bench import gpu_check

    calls = []
    monkeypatch.setattr(gpu_check, "attention", lambda q, k, v, pattern, causal: calls.append((pattern, causal)))
    assert gpu_check.warm_up(torch.device("cpu")) > 0
    assert calls == [(pattern, causal) for _, pattern, causal in warm_up_calls(torch.device("cpu"))]
    assert "PASS the service's warm-up on cpu" in capsys.readouterr().out

    def fails(*args, **kwargs):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(gpu_check, "attention", fails)
    assert gpu_check.warm_up(torch.device("cpu")) is None
    assert "FAIL the service's warm-up on cpu: raised" in capsys.readouterr().out


def test_gpu_check_workers_run_each_check_once_between_them(monkeypatch, capsys):
    """`check_share`: worker i of n runs cases i, i + n, ...; together each case once, their PASS and
    FAIL counts adding up to the whole."""
    from bench import gpu_check

    ran = []
    monkeypatch.setattr(gpu_check, "cases", lambda device: (
        (f"case {i}", lambda i=i: ran.append(i) or (i, None), None, None, None, None, True, torch.float32)
        for i in range(23)))
    monkeypatch.setattr(gpu_check, "compare", lambda out, lse, *rest: "off" if out == 5 else None)
    shares = [gpu_check.check_share("cpu", index, 3) for index in range(3)]
    assert sorted(ran) == list(range(23)) and ran[:8] == [0, 3, 6, 9, 12, 15, 18, 21]
    assert [sum(counts) for counts in shares] == [8, 8, 7]
    assert tuple(map(sum, zip(*shares))) == (22, 1)
    assert "FAIL case 5: off" in capsys.readouterr().out


def test_cuda_ops_counts_each_case_of_the_cuda_plans(tmp_path, capsys):
    """`bench.cuda_ops`: a row per pattern, a cell per case, the JSON beside; a one-call plan is
    one launch and no plan reads a device value back."""
    from bench import cuda_ops

    out = tmp_path / "ops.json"
    assert cuda_ops.main(["--n", "512", "--patterns", "sliding_window(256)", "union(sliding 128, fixed(128, 8))",
                          "--out", str(out)]) == 0
    counts = json.loads(out.read_text())["counts"]
    assert set(counts) == {"sliding_window(256)", "union(sliding 128, fixed(128, 8))"}
    assert all(set(cells) == set(cuda_ops.CASES) for cells in counts.values())
    assert all(c["host_reads"] == 0 and 0 < c["launches"] <= c["all"] for cells in counts.values() for c in cells.values())
    # the band's Triton kernel and its out and lse's allocations (flash's local window without Triton)
    assert counts["sliding_window(256)"]["causal prefill"]["launches"] == (3 if triton_band.triton else 1)
    assert len(capsys.readouterr().out.splitlines()) == 4  # the header, its rule and two rows


@pytest.mark.skipif(triton_fixed.triton is None, reason="Triton is not installed")
def test_gpu_check_times_each_merge_on_the_triton_merge_and_in_torch_ops():
    from bench import gpu_check
    from cuda_emulation import cuda_kernels_on_cpu

    with cuda_kernels_on_cpu():
        rows = gpu_check.merges(torch.device("cpu"), ns=(64,))
    assert sorted((r["out_dtype"], r["merge"]) for r in rows) == sorted(
        (dtype, merge) for dtype in ("torch.float32", "torch.bfloat16") for merge in ("torch ops", "triton"))
    assert all(r["n"] == 64 and r["seconds"] > 0 for r in rows)


@pytest.mark.skipif(triton_fixed.triton is None, reason="Triton is not installed")
def test_gpu_check_compares_each_in_place_merge_with_the_torch_ops(monkeypatch, capsys):
    """`in_place_merge_checks` passes the Triton merge and fails one that reads a's lse after
    writing it (what a race between a program's threads does), for each of its four merges."""
    from bench import gpu_check
    from cuda_emulation import cuda_kernels_on_cpu

    from engine.kernels import triton_merge

    with cuda_kernels_on_cpu():
        assert gpu_check.in_place_merge_checks(torch.device("cpu"), rounds=1, rows=256, block=4) == (4, 0)
        launch = triton_merge.triton_merge_to

        def racing(out, lse, a, b):
            a_lse = a[1]
            torch.logaddexp(a_lse, b[1], out=lse)  # a's lse overwritten before it is read
            launch(out, lse, (a[0], a_lse), b)

        monkeypatch.setattr(triton_merge, "triton_merge_to", racing)
        assert gpu_check.in_place_merge_checks(torch.device("cpu"), rounds=1, rows=256, block=4) == (0, 4)
    assert capsys.readouterr().out.count("FAIL in-place merge") == 4


@pytest.mark.skipif(triton_fixed.triton is None, reason="Triton is not installed")
def test_cuda_ops_counts_fixed_on_the_triton_kernel_or_its_fused_plan(tmp_path):
    """fixed is one Triton launch (and its two outputs' allocations) where Triton runs, many calls
    on its fused-SDPA plan otherwise."""
    from bench import cuda_ops

    launches = {}
    for flags in ([], ["--fused-fixed"]):
        out = tmp_path / "ops.json"
        assert cuda_ops.main(["--n", "512", "--patterns", "fixed(128, 8)", "--out", str(out), *flags]) == 0
        launches[bool(flags)] = json.loads(out.read_text())["counts"]["fixed(128, 8)"]["causal prefill"]["launches"]
    assert launches[False] == 3 and launches[True] > 10, launches


@pytest.mark.skipif(triton_band.triton is None, reason="Triton is not installed")
def test_gpu_band_checks_pass_here_and_fail_a_wrong_kernel(monkeypatch, capsys):
    """bench/gpu_band.py's checks in Triton's interpreter, on a sample of its shapes in the default
    tiles and one swept tile size; a kernel whose output is off is a FAIL line, counted."""
    from bench import gpu_band

    shapes = gpu_band.SHAPES[:2]
    passed, failed = gpu_band.check(torch.device("cpu"), shapes, gpu_band.SWEEP[:1])
    assert (passed, failed) == (6 * len(shapes), 0)  # 3 dtypes x 2 causalities; the sweep: D = 64 shapes only
    real = triton_band.triton_band_attention

    def off(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out * 1.1, lse

    monkeypatch.setattr(triton_band, "triton_band_attention", off)
    passed, failed = gpu_band.check(torch.device("cpu"), shapes[:1], [])
    assert (passed, failed) == (0, 6) and capsys.readouterr().out.count("FAIL") == 6


def _plans_run(monkeypatch, kernel_module, kernel_name: str, other_times, n: int) -> tuple[dict, list[dict]]:
    """({row name: (whether each call of the kernel had a seed, the merges)}, the rows) of a GPU
    script's `other_times` with every timed callable run once after a first (probing) call, on
    CUDA's branches in Triton's interpreter."""
    seeds, merges, ran = [], [], {}
    real_kernel, real_union_merge, real_merge = getattr(kernel_module, kernel_name), union.merge_to, merge.merge_to
    monkeypatch.setattr(kernel_module, kernel_name,
                        lambda *a, **kw: seeds.append(kw.get("seed") is not None) or real_kernel(*a, **kw))
    monkeypatch.setattr(union, "merge_to", lambda *a: merges.append(1) or real_union_merge(*a))
    monkeypatch.setattr(merge, "merge_to", lambda *a: merges.append(1) or real_merge(*a))

    def once(fns, device):
        for key, fn in fns.items():
            fn()  # a first call probes its kernel's variant
            seeds.clear(), merges.clear()
            fn()
            ran[key] = (tuple(seeds), len(merges))
        return {key: 0.0 for key in fns}

    monkeypatch.setattr(bench_kernels, "best_times", once)
    with cuda_kernels_on_cpu():  # flash's window, which gpu_band's decode rows time, is CUDA's op
        rows = other_times(torch.device("cpu"), n)
    return ran, rows


@pytest.mark.skipif(triton_band.triton is None, reason="Triton is not installed")
def test_gpu_band_times_the_unions_band_seeded_merged_after_and_without_the_kernel(monkeypatch):
    """bench/gpu_band.py's engine rows run the plans they name: the union's band seeded with its
    stride's partial (one band launch, no merge), merged after the band's launch, or off the kernel
    (every call run once here, at a toy size)."""
    from bench import gpu_band

    ran, rows = _plans_run(monkeypatch, triton_band, "triton_band_attention", gpu_band.other_times, 300)
    label = "engine union(sliding 128, strided 128)"
    assert ran[f"{label} with the kernel"] == ((True,), 0)
    assert ran[f"{label} merged after the kernel"][0] == (False,) and ran[f"{label} merged after the kernel"][1] > 0
    assert ran[f"{label} without"][0] == () and ran["engine sliding_window(256) with the kernel"][0] == (False,)
    assert {row["kernel"] for row in rows} == set(ran)


@pytest.mark.skipif(triton_fixed.triton is None, reason="Triton is not installed")
def test_gpu_fixed_times_the_unions_fixed_step_continuing_and_merged_after(monkeypatch):
    """bench/gpu_fixed.py's engine rows: a union's fixed step continues the other step's partial
    (seeded, no merge) or, in the rows that say so, is merged with it after the kernel."""
    from bench import gpu_fixed

    ran, rows = _plans_run(monkeypatch, triton_fixed, "triton_fixed_attention", gpu_fixed.other_times, 300)
    for label in gpu_fixed.PATTERNS:
        if "union" in label:
            assert ran[f"engine {label}"] == ((True,), 0)
            assert ran[f"engine {label} merged after the kernel"][0] == (False,)
            assert ran[f"engine {label} merged after the kernel"][1] > 0
    assert ran["engine fixed(128, 8)"] == ((False,), 0) and {row["kernel"] for row in rows} == set(ran)


@pytest.mark.skipif(triton_fixed.triton is None, reason="Triton is not installed")
def test_the_gpu_scripts_without_their_sweeps_check_the_default_tiles_and_time_the_rest(tmp_path):
    """`--no-sweep` (a short GPU session's run): the default tiles' checks, no tile sweep, and
    gpu_fixed's engine rows (gpu_band's need flash's window: a GPU's); rehearsed here at toy sizes."""
    from bench import gpu_band, gpu_fixed

    assert gpu_fixed.main(["--device", "cpu", "--out", str(tmp_path), "--no-sweep"]) == 0
    fixed = json.loads((tmp_path / "gpu_fixed.json").read_text())
    assert (fixed["passed"], fixed["failed"], fixed["sweep"]) == (12, 0, [])
    assert any("merged after the kernel" in row["kernel"] for row in fixed["other"])
    assert gpu_band.main(["--device", "cpu", "--out", str(tmp_path), "--no-sweep"]) == 0
    band = json.loads((tmp_path / "gpu_band.json").read_text())
    assert (band["passed"], band["failed"], band["sweep"]) == (12, 0, [])


@pytest.mark.skipif(triton_fixed.triton is None, reason="Triton is not installed")
def test_gpu_fixed_checks_pass_here_and_fail_a_wrong_kernel(monkeypatch, capsys):
    """bench/gpu_fixed.py's checks in Triton's interpreter, on a sample of its shapes (a union's
    step among them) in the default tiles and one swept tile size; a kernel whose log-sum-exp is
    off is a FAIL line, counted."""
    from bench import gpu_fixed

    shapes = [gpu_fixed.SHAPES[1], (1, 2, 1, 70, 300, 16, 16, 16, 2, 20, (5,)),
              (1, 1, 1, 130, 700, 64, 64, 16, 4, 0, ())]
    passed, failed = gpu_fixed.check(torch.device("cpu"), shapes, gpu_fixed.SWEEP[:1])
    assert (passed, failed) == (6 * len(shapes) + 1, 0)  # 3 dtypes x 2 causalities; the sweep: D = 64, no strides
    real = triton_fixed.triton_fixed_attention

    def off(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out, lse + 0.1

    monkeypatch.setattr(triton_fixed, "triton_fixed_attention", off)
    passed, failed = gpu_fixed.check(torch.device("cpu"), shapes[:1], [])
    assert (passed, failed) == (0, 6) and capsys.readouterr().out.count("FAIL") == 6


def test_gpu_dense_checks_pass_on_cudas_branches_and_fail_a_wrong_log_sum_exp(monkeypatch, capsys):
    """bench/gpu_dense.py's checks of cuDNN's path, on CUDA's branches emulated (where SDPA picks
    cuDNN), on its small shapes; a cuDNN whose log-sum-exp is off fails every fused call's check
    and the engine's dense ones (strided(7) at Lq < Lk runs on masked calls, not cuDNN)."""
    from bench import gpu_dense
    from cuda_emulation import STAND_INS, cuda_kernels_on_cpu

    monkeypatch.setattr(gpu_dense, "FUSED_SHAPES", [s for s in gpu_dense.FUSED_SHAPES if s[2] * s[3] < 5e6])
    monkeypatch.setattr(gpu_dense, "ENGINE_CASES", [c for c in gpu_dense.ENGINE_CASES if c[2] * c[3] < 5e6])
    cases = len(gpu_dense.FUSED_SHAPES) + len(gpu_dense.ENGINE_CASES)
    with cuda_kernels_on_cpu(cudnn=True):
        assert gpu_dense.check(torch.device("cpu")) == (cases, 0)
    real = STAND_INS["_scaled_dot_product_cudnn_attention"]

    def lse_off(*args, **kwargs):
        out, lse, *rest = real(*args, **kwargs)
        return out, lse + 0.5, *rest

    monkeypatch.setitem(STAND_INS, "_scaled_dot_product_cudnn_attention", lse_off)
    capsys.readouterr()
    with cuda_kernels_on_cpu(cudnn=True):
        assert gpu_dense.check(torch.device("cpu")) == (1, cases - 1)
    passing = [line for line in capsys.readouterr().out.splitlines() if line.startswith("PASS")]
    assert len(passing) == 1 and "'stride': 7" in passing[0]
