"""The engine on a CUDA GPU: exactness first, then the kernel benchmark, in one bounded run.

First the service's warm-up (`engine.planner.warm_up_calls`), timed: on a machine whose Triton
cache is cold it compiles the Triton binaries the service needs, and /readyz stays 503 that long.
(a) Every pattern and edge shape of tests/test_engine_reference.py, causal and not, in float32
    and bfloat16 (as the planner picks, and again on the structured kernels where it picks the
    masked one for a small problem), plus each structured kernel on medium shapes (many tiles,
    class padding, the flash local window), short runs, and head dims the CUDA kernels pad
    (float16 too), against the float64 reference of tests/reference.py computed on the CPU: one
    PASS or FAIL line each. They run in --check-workers processes side by side (8, or fewer
    CPUs): they need 120 Triton binaries, each compiled at its first launch (1.2 to 2 s each for
    sm_90 on the project's 2-core machine), which one process would compile one after another.
    Then more than 65535 classes or blocks on the grid's head axis (`grid_checks`), and merges in
    place on the Triton merge, repeated (`in_place_merge_checks`).
(b) bench.kernels on the GPU in bfloat16 for n up to 131072 against dense flash SDPA and
    compiled FlexAttention, with the 131072-token peak-memory row, the sliding-window scaling
    and the first call for a new shape; JSON (and the plot) under --out.
(c) fixed(128, 8) on its Triton kernel against its fused-SDPA plan (CUDA's fallback) with the
    summary piece in the default and 1 to 32 row ranges, at n = 4096 to 131072; and a decode
    step on the kernel with its keys split between programs (`key_splits`) and unsplit.
(d) a few query rows at the end of 65536 and 131072 keys (decode steps, short chunks), per
    pattern, in bfloat16: the engine's structured kernels against dense flash SDPA and the masked kernel
    (`bench.kernels --decode`); and at 65536 keys with grouped query heads (H = 32 over 8,
    D = 128), which the plans take in one run, the query heads of a key/value head as its rows.
(e) small problems (n = 32 to 256): each pattern's structured plan against the masked kernel, the
    choice `planner.SMALL_KEYS` makes, measured on the CPU only until then (`bench.kernels --small`).
(f) the unions with fixed at n = 16384 and 65536 against dense flash SDPA: their fixed step one
    Triton launch (many fused calls before: `bench.cuda_ops`).
(g) the merge of two bfloat16 partials (H = 8, D = 64) at n = 16384 and 131072, into float32 and
    into bfloat16: the Triton merge against `merge_to`'s torch ops.

Exits 1 if any check fails or raises, 2 if CUDA is missing: it never skips a check quietly.
FlexAttention is compiled at n = 16384 and 131072 only (`--flex-n` with no value: not at all),
and no new compile starts after --flex-budget seconds of benchmark (each is said so). On a fresh
H200 host (cold Triton cache, 16 cores) the whole run took 221-322 s, 153 s without
FlexAttention; the warm-up's compiles took 50-127 s of it (127 s once the band's kernel came). The command below gives it 540 s. Every
line goes to the log as it comes, so a run cut short still says what it did.

    python3 -m bench.gpu_check --out "$OUT"

The engine needs pydantic, which the H200 image lacks and cannot fetch: carry it as wheels.
Here, in the repository root (Python 3.12 there):

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 -d .whl pydantic==2.14.4 pydantic-core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0

then run there, carrying `.whl`:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; \
    PYTHONUNBUFFERED=1 timeout 540 python3 -m bench.gpu_check --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from engine import attention, kernels  # noqa: E402
from engine.attention import backend_for  # noqa: E402
from engine.kernels import triton_band, triton_merge  # noqa: E402
from engine.kernels.band import flash_window_supported  # noqa: E402
from engine.kernels.device import kernel_device, runs_on_triton  # noqa: E402
from engine.kernels.fixed import fused_fixed_attention  # noqa: E402
from engine.kernels.merge import torch_merge_to  # noqa: E402
from engine.kernels.triton_fixed import matches_contract, triton_fixed_attention  # noqa: E402
from engine.patterns import parse_pattern  # noqa: E402
from engine.planner import warm_up_calls  # noqa: E402
from planner_support import structured_at_every_size  # noqa: E402
from reference import reference_attention  # noqa: E402
from test_engine_reference import PATTERNS, SHAPES  # noqa: E402

from bench import kernels as bench_kernels  # noqa: E402
from bench.kernels import outcome  # noqa: E402

TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SW = lambda w: {"type": "sliding_window", "window": w}  # noqa: E731
ST = lambda s: {"type": "strided", "stride": s}  # noqa: E731
FX = lambda l, c: {"type": "fixed", "block": l, "summary": c}  # noqa: E731
UNION = lambda w, s: {"type": "union", "patterns": [SW(w), ST(s)]}  # noqa: E731
UNION3 = {"type": "union", "patterns": [SW(50), ST(64), FX(128, 8)]}
WINDOW_FIXED = {"type": "union", "patterns": [SW(256), FX(128, 8)]}
STRIDES = {"type": "union", "patterns": [SW(100), ST(64), ST(48)]}  # the second skips multiples of the first


def compare(out, lse, q, k, v, pattern, causal, dtype) -> str | None:
    """None when (out, lse) from the GPU match the float64 CPU reference, else why not."""
    ref_out, ref_lse = reference_attention(q.cpu(), k.cpu(), v.cpu(), pattern, causal=causal)
    out, lse = out.cpu().double(), lse.cpu().double()
    tol = TOLERANCE[dtype]
    empty = torch.isinf(ref_lse)
    if not torch.equal(torch.isinf(lse), empty):
        return "rows with no key differ (lse -inf)"
    for name, got, want in (("out", out, ref_out), ("lse", lse[~empty], ref_lse[~empty])):
        if not torch.allclose(got, want, atol=tol, rtol=tol):  # NaN never passes
            return f"{name} off by up to {(got - want).abs().max().item():.3g} (tolerance {tol} + {tol} x |ref|)"
    return None


def inputs(shape, dtype, device, seed=0):
    b, h, hkv, lq, lk, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g).to(device, dtype), torch.randn(b, hkv, lk, d, generator=g).to(device, dtype),
            torch.randn(b, hkv, lk, dv, generator=g).to(device, dtype))


def both_ways(name: str, run, q, k, v, pattern, causal: bool):
    """(name, run) as the planner picks, and once more on the structured kernels where it picks the
    masked kernel for a small problem (`planner.SMALL_KEYS`), which CUDA must get right too."""
    yield name, run
    shape = (q.shape[1], q.shape[2], k.shape[2], causal, kernel_device(q.device))
    picked = backend_for(parse_pattern(pattern), *shape)
    with structured_at_every_size():
        structured = backend_for(parse_pattern(pattern), *shape)
    if structured != picked:
        def on_structured():
            with structured_at_every_size():
                return run()
        yield f"{name} structured ({structured})", on_structured


def cases(device):
    """(name, callable -> (out, lse), q, k, v, pattern, causal, dtype) for every check."""
    for dtype in (torch.float32, torch.bfloat16):
        dname = str(dtype).removeprefix("torch.")
        for pname, pattern in PATTERNS.items():
            for sname, shape in SHAPES.items():
                if pattern["type"] == "per_head" and shape[1] % len(pattern["patterns"]):
                    continue  # refused by design; tests/test_engine_reference.py checks the error
                for causal in (True, False):
                    q, k, v = inputs(shape, dtype, device)
                    run = (lambda q=q, k=k, v=v, p=pattern, c=causal: attention(q, k, v, p, causal=c, return_lse=True))
                    name = f"engine {pname} {sname} {'causal' if causal else 'noncausal'} {dname}"
                    for name, run in both_ways(name, run, q, k, v, pattern, causal):
                        yield name, run, q, k, v, pattern, causal, dtype
        # Medium shapes: many band tiles, padded classes, summary per block and in ranges, D = 64.
        for lq, lk in ((2048, 2048), (1500, 2001)):
            shape = (1, 2, 2, lq, lk, 64, 64)
            q, k, v = inputs(shape, dtype, device, seed=1)
            s = 1 / 8
            for name, run, pattern, causal in (
                ("band w=256", lambda: kernels.band_attention(q, k, v, window=256, scale=s), SW(256), True),
                ("band w=33", lambda: kernels.band_attention(q, k, v, window=33, scale=s), SW(33), True),
                ("band w=256 noncausal", lambda: kernels.band_attention(q, k, v, window=256, scale=s, causal=False),
                 SW(256), False),
                ("strided s=64", lambda: kernels.strided_attention(q, k, v, stride=64, scale=s), ST(64), True),
                ("strided s=37", lambda: kernels.strided_attention(q, k, v, stride=37, scale=s), ST(37), True),
                ("fixed 128,8", lambda: kernels.fixed_attention(q, k, v, block=128, summary=8, scale=s), FX(128, 8),
                 True),
                ("fixed 100,100", lambda: kernels.fixed_attention(q, k, v, block=100, summary=100, scale=s),
                 FX(100, 100), True),
                ("fixed 16,2", lambda: kernels.fixed_attention(q, k, v, block=16, summary=2, scale=s),
                 FX(16, 2), True),
                ("fused fixed 128,8 (CUDA's fallback to the Triton kernel)",
                 lambda: fused_fixed_attention(q, k, v, block=128, summary=8, scale=s), FX(128, 8), True),
                ("fused fixed 16,2 (summary ranges)", lambda: fused_fixed_attention(q, k, v, block=16, summary=2, scale=s),
                 FX(16, 2), True),
                ("union 128+128", lambda: kernels.band_strided_attention(q, k, v, window=128, strides=(128,), scale=s),
                 UNION(128, 128), True),
                ("union 100+64", lambda: kernels.band_strided_attention(q, k, v, window=100, strides=(64,), scale=s),
                 UNION(100, 64), True),
                ("union 100+64 noncausal", lambda: kernels.band_strided_attention(
                    q, k, v, window=100, strides=(64,), scale=s, causal=False), UNION(100, 64), False),
                ("union 100+64+48", lambda: attention(q, k, v, STRIDES, scale=s, return_lse=True), STRIDES, True),
                ("union 100+64+48 noncausal", lambda: attention(
                    q, k, v, STRIDES, scale=s, causal=False, return_lse=True), STRIDES, False),
                ("masked union3", lambda: kernels.masked_attention(q, k, v, parse_pattern(UNION3), scale=s, causal=True),
                 UNION3, True),
                ("masked window+fixed noncausal", lambda: kernels.masked_attention(
                    q, k, v, parse_pattern(WINDOW_FIXED), scale=s, causal=False), WINDOW_FIXED, False),
                ("band+fixed", lambda: attention(q, k, v, WINDOW_FIXED, scale=s, return_lse=True), WINDOW_FIXED, True),
                ("band+strided+fixed", lambda: attention(q, k, v, UNION3, scale=s, return_lse=True), UNION3, True),
            ):
                yield f"kernel {name} lq={lq} lk={lk} {dname}", run, q, k, v, pattern, causal, dtype
        # Short runs at the end of long keys: strided's own classes, fixed's blocks in natural order.
        for lq, lk in ((1, 3001), (5, 3001), (63, 2048)):
            q, k, v = inputs((1, 4, 2, lq, lk, 64, 64), dtype, device, seed=2)
            for pattern in (SW(256), ST(64), ST(37), FX(128, 8), UNION(128, 128), UNION3, WINDOW_FIXED, STRIDES):
                run = (lambda q=q, k=k, v=v, p=pattern: attention(q, k, v, p, return_lse=True))
                yield f"short run {pattern} lq={lq} lk={lk} {dname}", run, q, k, v, pattern, True, dtype
    # Head dims the CUDA kernels pad once (not multiples of 8; q's and v's differing, as 40 / 24, at
    # which fixed's Triton kernel answered wrong in half precision until q's and v's features took one
    # tile width; v's over the flash kernel's 256), in float16 too.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        dname = str(dtype).removeprefix("torch.")
        for shape in ((1, 4, 2, 100, 130, 12, 20), (1, 2, 2, 100, 100, 5, 5), (1, 2, 2, 64, 64, 32, 300),
                      (1, 2, 2, 300, 300, 40, 24)):
            q, k, v = inputs(shape, dtype, device, seed=3)
            for pattern in ({"type": "dense"}, SW(16), ST(8), FX(16, 4), UNION(12, 8)):
                run = (lambda q=q, k=k, v=v, p=pattern: attention(q, k, v, p, return_lse=True))
                name = f"head dims d={shape[5]} dv={shape[6]} {pattern} {dname}"
                for name, run in both_ways(name, run, q, k, v, pattern, True):
                    yield name, run, q, k, v, pattern, True, dtype


def grid_checks(device, n: int = 140000) -> tuple[int, int]:
    """More than 65535 classes or blocks on the CUDA grid's head axis (`within_grid`), at n = 140000,
    bfloat16: strided(n / 2) against its closed form (row i attends i and i - n / 2), fixed(2, 1)
    against the masked kernel (a float64 reference would be a 2e10-element mask)."""
    s, scale = n // 2, 0.125
    q, k, v = inputs((1, 1, 1, n, n, 64, 64), torch.bfloat16, device, seed=4)

    def against(run, expected):
        (out, lse), (want_out, want_lse) = run(), expected()
        worst = max((out.cpu().double() - want_out.cpu().double()).abs().max().item(),
                    (lse.cpu().double() - want_lse.cpu().double()).abs().max().item())
        return None if worst <= 3e-2 else f"off by up to {worst:.3g}"

    results = [
        outcome(f"grid strided({s}) n={n} bfloat16", lambda: against(
            lambda: attention(q, k, v, ST(s), scale=scale, return_lse=True), lambda: _two_key_rows(q, k, v, s, scale))),
        outcome(f"grid fixed(2, 1) n={n} bfloat16", lambda: against(
            lambda: attention(q, k, v, FX(2, 1), scale=scale, return_lse=True),
            lambda: kernels.masked_attention(q, k, v, parse_pattern(FX(2, 1)), scale=scale, causal=True))),
    ]
    return results.count(True), results.count(False)


def in_place_merge_checks(device, rounds: int = 20, rows: int = 16384, block: int = 128) -> tuple[int, int]:
    """Merges in place (out and lse a's own), as fixed's plan and a union's folds make them, on the
    Triton merge against `torch_merge_to`, `rounds` times each: threads of one program read what
    others write, a race the interpreter cannot show (on an H200 it once cost fixed's in-place
    merges 0.3). A transposed view as fixed(block, c)'s row ranges merge into (position in the
    block as heads, the block as rows), and a plain one; H = 8, `rows` rows, D = 64."""
    g = torch.Generator().manual_seed(5)
    results = []
    transposed = lambda x: x.view(8, -1, block, x.shape[-1]).transpose(1, 2)  # noqa: E731
    for name, view in (("transposed", transposed), ("plain", lambda x: x)):
        for out_dtype in (torch.float32, torch.bfloat16):
            a_out = torch.randn(8, rows, 64, generator=g).to(device, out_dtype)
            a_lse = (torch.randn(8, rows, generator=g) * 4).to(device)
            b_out = torch.randn(8, rows, 64, generator=g).to(device, torch.bfloat16)
            b_lse = (torch.randn(8, rows, generator=g) * 4).to(device)

            def views(out, lse, view=view):  # lse viewed as out without its features
                return view(out), view(lse.unsqueeze(-1)).squeeze(-1)

            b = views(b_out, b_lse)

            def differs(a_out=a_out, a_lse=a_lse, b=b, views=views, out_dtype=out_dtype):
                want_out, want_lse = views(a_out.clone(), a_lse.clone())
                torch_merge_to(want_out, want_lse, (want_out, want_lse), b)
                tol = 1e-5 if out_dtype == torch.float32 else 2.0**-7  # two bfloat16 ulps: lerp rounds so
                for _ in range(rounds):
                    out, lse = views(a_out.clone(), a_lse.clone())
                    triton_merge.triton_merge_to(out, lse, (out, lse), b)
                    if not (torch.allclose(out.float(), want_out.float(), atol=tol, rtol=tol)
                            and torch.allclose(lse, want_lse, atol=1e-5, rtol=1e-5)):
                        worst = max((out.float() - want_out.float()).abs().max().item(),
                                    (lse - want_lse).abs().max().item())
                        return f"off by up to {worst:.3g}"
                return None

            results.append(outcome(f"in-place merge {name} into {out_dtype} x{rounds}", differs))
    return results.count(True), results.count(False)


def _two_key_rows(q, k, v, s, scale):
    """Causal strided(s) over n <= 2s positions in float64: row i attends key i, and i - s if any."""
    q, k, v = (x[0, 0].double().cpu() for x in (q, k, v))
    own = (q * k).sum(-1) * scale
    back = torch.full_like(own, float("-inf"))
    back[s:] = (q[s:] * k[:-s]).sum(-1) * scale
    lse = torch.logaddexp(own, back)
    v_back = torch.cat([torch.zeros_like(v[:s]), v[:-s]])
    out = (own - lse).exp()[:, None] * v + (back - lse).exp()[:, None] * v_back
    return out[None, None], lse[None, None]


def check(device, workers: int = 1) -> tuple[int, int]:
    """(passed, failed) over every case of `cases`, in `workers` processes side by side, each
    taking every workers-th case: a GPU compiles each Triton binary at its first launch, about a
    second each and 120 binaries for these checks, which one process compiles one after another.
    A worker that dies counts as one failure (its cases print no line)."""
    if workers == 1:
        return check_share(str(device), 0, 1)
    threads = max(1, (os.cpu_count() or 1) // workers)  # the float64 references run on the CPU
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        shares = [pool.submit(check_share, str(device), index, workers, threads) for index in range(workers)]
        passed = failed = 0
        for index, share in enumerate(shares):
            try:
                done = share.result()
            except Exception:  # noqa: BLE001
                print(f"FAIL check worker {index} of {workers}: died\n{traceback.format_exc()}", flush=True)
                done = (0, 1)
            passed, failed = passed + done[0], failed + done[1]
    return passed, failed


def check_share(device: str, index: int, workers: int, threads: int | None = None) -> tuple[int, int]:
    """(passed, failed) over cases index, index + workers, ... of `cases` on `device`."""
    if threads:
        torch.set_num_threads(threads)
    results = [outcome(name, lambda run=run, q=q, k=k, v=v, p=pattern, c=causal, t=dtype:
                       compare(*run(), q, k, v, p, c, t))
               for at, (name, run, q, k, v, pattern, causal, dtype) in enumerate(cases(torch.device(device)))
               if at % workers == index]
    return results.count(True), results.count(False)


def warm_up(device: torch.device) -> float | None:
    """Seconds the service's warm-up takes here through the engine, or None if it failed (said in
    a FAIL line)."""
    started = time.perf_counter()

    def run() -> None:
        for q, pattern, causal in warm_up_calls(device):
            q = q.to(device)
            attention(q, q, q, pattern, causal=causal)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if not outcome(f"the service's warm-up on {device}", run):
        return None
    seconds = time.perf_counter() - started
    print(f"the service's warm-up: {seconds:.1f} s", flush=True)
    return seconds


def band_on_kernel(device: torch.device, causal: bool) -> bool:
    """Whether bfloat16 sliding-window calls of D = 64 run on the band's Triton kernel here: its
    variant passed its probe (a failed one is logged, and takes flash's local window)."""
    return runs_on_triton(device) and triton_band.matches_contract(device, torch.bfloat16, 64, 64, causal, False)


def fixed_on_kernel(device: torch.device) -> bool:
    """Whether the benchmark's fixed calls (bfloat16, D = 64, causal) run on the Triton kernel here:
    its variant passed its probe (a failed one is logged, and takes the fused plan)."""
    return runs_on_triton(device) and matches_contract(device, torch.bfloat16, 64, 64, True, 0, False)


def fixed_kernels(device: torch.device, ns=(4096, 16384, 65536, 131072)) -> list[dict]:
    """(c): seconds of fixed(128, 8) in bfloat16, H = 8, D = 64, on the Triton kernel and on the
    fused-SDPA plan with its summary piece in the default and 1, 2, 4, 8, 16 and 32 row ranges.
    Where CUDA runs the plan (past n = 16384) the best count was 4 at 65536 and 16 at 131072, of
    1, 4 and 16: too few to set `_range_count` there."""
    rows = []
    for n in ns:
        q, k, v = bench_kernels.inputs(n, 8, 64, torch.bfloat16, device)
        fns = {f"fused ranges={r or 'default'}": (
            lambda r=r: fused_fixed_attention(q, k, v, block=128, summary=8, scale=0.125, ranges=r))
            for r in (None, 1, 2, 4, 8, 16, 32)}
        if fixed_on_kernel(device):  # else its probe failed, said at the start
            fns["triton"] = lambda: triton_fixed_attention(q, k, v, block=128, summary=8, scale=0.125)
            row = q[..., -1:, :]  # a decode step: its keys split between programs, or all in one
            fns["triton decode"] = lambda: triton_fixed_attention(row, k, v, block=128, summary=8, scale=0.125)
            fns["triton decode unsplit"] = lambda: triton_fixed_attention(row, k, v, block=128, summary=8,
                                                                          scale=0.125, splits=1)
        for name, seconds in bench_kernels.best_times(fns, device).items():
            rows.append({"n": n, "kernel": name, "seconds": seconds})
            print(f"fixed(128, 8) n={n} {name}: {rows[-1]['seconds'] * 1000:.3f} ms", flush=True)
    return rows


def merge_on_kernel(device: torch.device, out_dtype: torch.dtype) -> bool:
    """Whether merges of bfloat16 partials of 64 features into `out_dtype` run on the Triton merge
    here: its variant passed its probe (a failed one is logged, and takes the torch ops)."""
    return runs_on_triton(device) and triton_merge.matches_contract(device, torch.bfloat16, torch.bfloat16,
                                                                    out_dtype, 64)


def merges(device: torch.device, ns=(16384, 131072)) -> list[dict]:
    """(g): seconds of one merge of two bfloat16 partials, H = 8, D = 64, into float32 and into
    bfloat16, on the Triton merge and in torch ops."""
    rows = []
    for n in ns:
        g = torch.Generator().manual_seed(n)
        a, b = ((torch.randn(1, 8, n, 64, generator=g).to(device, torch.bfloat16),
                 torch.randn(1, 8, n, generator=g).to(device)) for _ in range(2))
        lse = torch.empty(1, 8, n, device=device)
        for out_dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(1, 8, n, 64, dtype=out_dtype, device=device)
            fns = {"torch ops": lambda: torch_merge_to(out, lse, a, b)}
            if merge_on_kernel(device, out_dtype):  # else its probe failed, said in the log
                fns["triton"] = lambda: triton_merge.triton_merge_to(out, lse, a, b)
            for name, seconds in bench_kernels.best_times(fns, device).items():
                rows.append({"n": n, "out_dtype": str(out_dtype), "merge": name, "seconds": seconds})
                print(f"merge n={n} into {out_dtype} {name}: {rows[-1]['seconds'] * 1000:.3f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to rehearse the script")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    p.add_argument("--flex-n", type=int, nargs="*", default=[16384, 131072],
                   help="n at which FlexAttention is compiled and run (each compile takes seconds)")
    p.add_argument("--flex-budget", type=float, default=170.0,
                   help="seconds into the benchmark after which FlexAttention runs are skipped, loudly")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--check-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that run the (a) checks side by side (and compile their Triton binaries)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("FAIL: CUDA is not available (torch", torch.__version__, ")", flush=True)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}",
          flush=True)
    warm_s = warm_up(device)
    if device.type == "cuda":
        print(f"the band on the Triton kernel (bfloat16): causal {band_on_kernel(device, True)}, non-causal "
              f"{band_on_kernel(device, False)}; flash local window: causal {flash_window_supported(device, True)}, "
              f"non-causal {flash_window_supported(device, False)}; fixed on the Triton kernel: "
              f"{fixed_on_kernel(device)}; merges on the Triton merge: into float32 "
              f"{merge_on_kernel(device, torch.float32)}, into bfloat16 {merge_on_kernel(device, torch.bfloat16)}",
              flush=True)
    passed, failed = check(device, args.check_workers)
    if device.type == "cuda":  # the CPU has no grid limit, and these are minutes on it
        for more in (grid_checks(device), in_place_merge_checks(device)):
            passed, failed = passed + more[0], failed + more[1]
    passed, failed = passed + (warm_s is not None), failed + (warm_s is None)
    summary = {"passed": passed, "failed": failed, "warm_up_s": warm_s, "check_s": time.perf_counter() - started}
    print(f"checks: {passed} passed, {failed} failed in {summary['check_s']:.0f} s", flush=True)
    if not args.skip_bench:
        bench_kernels.STARTED = time.perf_counter()
        bench_kernels.main([
            "--device", args.device, "--dtypes", "bfloat16", "--flex-dtypes", "bfloat16", "--bf16-n", "0",
            "--n", *map(str, args.n), "--flex-n", *map(str, args.flex_n), "--flex-budget", str(args.flex_budget),
            "--masked-max-n", "16384", "--repeats", "5", "--slow", "30", "--turn-s", "0.05",
            "--memory-n", "131072", "--scaling-n", "16384", "32768", "65536", "131072",
            "--first-call-n", "12289", "--out", str(args.out / "gpu_kernels.json"),
        ])
        summary["fixed_kernels"] = fixed_kernels(device)
        summary["merges"] = merges(device)
        bench_kernels.main(["--decode", "--device", args.device, "--dtypes", "bfloat16", "--decode-lk", "65536", "131072",
                            "--decode-lq", "1", "16", "--repeats", "3", "--turn-s", "0.05",
                            "--out", str(args.out / "gpu_decode.json")])
        bench_kernels.main(["--decode", "--device", args.device, "--dtypes", "bfloat16", "--decode-lk", "65536",
                            "--decode-lq", "1", "16", "--heads", "32", "--decode-kv-heads", "8", "--dim", "128",
                            "--repeats", "3", "--turn-s", "0.05", "--out", str(args.out / "gpu_decode_gqa.json")])
        bench_kernels.main(["--small", "--device", args.device, "--repeats", "2", "--turn-s", "0.05",
                            "--out", str(args.out / "gpu_small.json")])
        bench_kernels.main(["--device", args.device, "--dtypes", "bfloat16", "--bf16-n", "0", "--n", "16384", "65536",
                            "--patterns", "window_fixed", "window_strided_fixed", "--no-flex", "--masked-max-n", "0",
                            "--memory-n", "0", "--first-call-n", "0", "--scaling-n", "--repeats", "3",
                            "--turn-s", "0.05", "--out", str(args.out / "gpu_unions_fixed.json")])
    summary["total_s"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    print(f"{'FAILED' if failed else 'ALL PASSED'}: {passed} passed, {failed} failed; total {summary['total_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
