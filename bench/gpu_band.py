"""The band's Triton kernel (engine/kernels/triton_band.py) on a GPU: exact first, then its tiles.

(a) The kernel in its default variant for each dtype and causality, and in every swept tile size
    in bfloat16 at D = 64, against the float64 reference (tests/reference.py's rule, on the CPU) on shapes
    at the edges (n off every tile, Lq < Lk, grouped heads, one head, a window past n, a window
    of 1, a decode row, D != Dv), and at n = 131072 against flash's local window: PASS or FAIL each.
(b) Seconds of sliding_window(w), w = 128, 256, 1024, bfloat16, H = 8, D = 64, per n: dense causal
    attention on the engine's fused call (`dense.fused`: flash's kernel in the runs of 2026-12-04,
    cuDNN's since where SDPA picks it), flash's local window (the band's plan before the kernel) and each tile size (`SWEEP`),
    taking turns in rounds (`bench.kernels.rounds`); FlexAttention with the pattern's block mask at
    w = 256 where --flex-n says; D = 128 at one n; float32 against the band's tiles on the
    memory-efficient kernel; decode rows; and the engine's sliding_window and
    union(sliding_window 128, strided 128) with the kernel and without it (the union also with
    the stride's partial merged after the band's launch, not continued inside it).

Exits 1 if a check fails. On the project's machine (no GPU) `--device cpu` rehearses it in
Triton's interpreter, at toy sizes. Run as bench/gpu_check.py says (pydantic carried as wheels):

    PYTHONUNBUFFERED=1 timeout 300 python3 -m bench.gpu_band --out "$OUT" 2>&1 | tee "$OUT/gpu_band.log"
    python3 -m bench.gpu_band --out "$OUT" --no-sweep --engine-n 16384 65536 131072   # checks, then (c) alone
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import reference  # noqa: E402

from bench import kernels as bench_kernels  # noqa: E402
from bench.kernels import Tiles  # noqa: E402
from engine import attention  # noqa: E402
from engine.kernels import triton_band  # noqa: E402
from engine.kernels.band import _flash_window, band_attention  # noqa: E402
from engine.kernels.dense import fused  # noqa: E402
from engine.patterns import parse_pattern  # noqa: E402

# Tile sizes swept.
SWEEP = [Tiles(64, 64, 4, 3), Tiles(64, 64, 4, 2), Tiles(64, 64, 4, 4), Tiles(64, 128, 4, 3), Tiles(64, 32, 4, 3),
         Tiles(128, 64, 8, 3), Tiles(128, 64, 4, 3), Tiles(128, 128, 8, 3), Tiles(128, 32, 8, 3), Tiles(128, 64, 8, 4)]
# (B, H, Hkv, Lq, Lk, D, Dv, window)
SHAPES = [(1, 1, 1, 37, 37, 16, 16, 5), (2, 4, 2, 100, 130, 16, 8, 33), (1, 2, 1, 1, 3000, 64, 64, 256),
          (1, 2, 2, 150, 150, 64, 64, 1), (1, 1, 1, 200, 200, 32, 32, 500), (1, 2, 1, 130, 200, 24, 40, 64),
          (1, 8, 8, 1000, 1000, 64, 64, 256), (1, 4, 1, 777, 2049, 128, 128, 129), (1, 2, 2, 513, 513, 256, 256, 100),
          (1, 2, 2, 300, 300, 40, 24, 33)]  # fixed's kernel answered wrong at 40 / 24 (docs/kernels.md)


def check(device: torch.device, shapes, sweep) -> tuple[int, int]:
    passed = failed = 0
    runs = [(dtype, causal, None) for dtype in (torch.float32, torch.float16, torch.bfloat16) for causal in (True, False)]
    runs += [(torch.bfloat16, True, config) for config in sweep]
    for dtype, causal, config in runs:
        for b, h, hkv, lq, lk, d, dv, w in shapes:
            if config and d != 64:  # the sweep's head dim (each head dim is a compile of its own)
                continue
            g = torch.Generator().manual_seed(lq * lk + w)
            q = torch.randn(b, h, lq, d, generator=g).to(dtype)
            k, v = torch.randn(b, hkv, lk, d, generator=g).to(dtype), torch.randn(b, hkv, lk, dv, generator=g).to(dtype)
            name = f"{dtype} {'causal' if causal else 'non-causal'} {config} {(b, h, hkv, lq, lk, d, dv, w)}"

            def attempt(q=q, k=k, v=v, w=w, d=d, causal=causal, config=config, dtype=dtype) -> None:
                out, lse = triton_band.triton_band_attention(
                    *(x.to(device) for x in (q, k, v)), window=w, scale=d ** -0.5, causal=causal,
                    variant=config and config.variant())
                ref_out, ref_lse = reference.reference_attention(q, k, v, {"type": "sliding_window", "window": w},
                                                                 causal=causal)
                tol = 2e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(out.cpu().double(), ref_out, atol=tol, rtol=tol)
                torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=tol, rtol=tol)

            ok = bench_kernels.outcome(name, attempt)
            passed, failed = passed + ok, failed + (not ok)
    return passed, failed


def check_long(device: torch.device, n: int, sweep) -> tuple[int, int]:
    """Each tile size at n keys against flash's local window (bfloat16, both ways)."""
    passed = failed = 0
    q, k, v = bench_kernels.inputs(n, 8, 64, torch.bfloat16, device)
    for causal in (True, False):
        ref_out, ref_lse = _flash_window(q, k, v, window=256, scale=0.125, causal=causal)
        for config in [None, *sweep]:
            out, lse = triton_band.triton_band_attention(q, k, v, window=256, scale=0.125, causal=causal,
                                                         variant=config and config.variant())
            err = max((out.float() - ref_out.float()).abs().max().item(), (lse - ref_lse).abs().max().item())
            ok = (torch.allclose(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
                  and torch.allclose(lse, ref_lse, atol=2e-2, rtol=2e-2))
            passed, failed = passed + ok, failed + (not ok)
            print("PASS" if ok else "FAIL", f"n={n} causal={causal} {config} against flash's "
                  f"window: max error {err:.2e}", flush=True)
    return passed, failed


def sweep_times(device: torch.device, ns, windows, sweep, flex_n, dim: int = 64) -> list[dict]:
    rows = []
    flex = bench_kernels.Flex(device) if flex_n else None
    for n in ns:
        q, k, v = bench_kernels.inputs(n, 8, dim, torch.bfloat16, device)
        fns = {"dense fused": lambda: fused(q, k, v, scale=0.125, is_causal=True)}
        for w in windows:
            if device.type == "cuda":
                fns["flash window", w] = lambda w=w: _flash_window(q, k, v, window=w, scale=0.125)
            for config in sweep:
                fns[str(config), w] = lambda w=w, c=config: triton_band.triton_band_attention(
                    q, k, v, window=w, scale=0.125, variant=c.variant())
            if flex and n in flex_n and w == 256:
                run = flex.runner(parse_pattern({"type": "sliding_window", "window": w}), n, True)
                fns["flex", w] = lambda run=run: run(q, k, v)
        times = bench_kernels.best_times(fns, device)
        for key, s in times.items():
            name, w = (key, None) if isinstance(key, str) else key
            rows.append({"n": n, "dim": dim, "window": w, "kernel": name, "seconds": s})
            if w:  # efficiency against dense: (dense / s) / (dense pairs / window pairs)
                pairs = n * w - w * (w - 1) // 2  # row i attends min(w, i + 1) keys
                rows[-1]["efficiency"] = times["dense fused"] / s / (n * (n + 1) / 2 / pairs)
            print(f"n={n} D={dim} w={w} {name}: {s * 1e3:.3f} ms"
                  + (f"  efficiency {rows[-1]['efficiency']:.2f}" if w else ""), flush=True)
    return rows


def other_times(device: torch.device, n: int) -> list[dict]:
    """float32 (the kernel against the band's tiles), decode rows (against flash's window) and the
    engine's plans with the kernel (a union's band continuing its stride's partial, or merged with
    it after) and without it (`triton_band.takes` false)."""
    q, k, v = bench_kernels.inputs(n, 8, 64, torch.float32, device)
    fns = {"float32 triton": lambda: triton_band.triton_band_attention(q, k, v, window=256, scale=0.125)}
    with mock.patch.object(triton_band, "takes", lambda *a, **kw: False):
        fns["float32 tiles"] = lambda: band_attention(q, k, v, window=256, scale=0.125)
        times = bench_kernels.best_times(fns, device)
    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    for lq in (1, 16):
        row = qb[..., -lq:, :]
        fns = {f"decode lq={lq} flash window": lambda row=row: _flash_window(row, kb, vb, window=256, scale=0.125),
               f"decode lq={lq} triton": lambda row=row: triton_band.triton_band_attention(row, kb, vb, window=256,
                                                                                          scale=0.125)}
        times.update(bench_kernels.best_times(fns, device))
    patterns = {"sliding_window(256)": {"type": "sliding_window", "window": 256},
                "union(sliding 128, strided 128)": {"type": "union", "patterns": [
                    {"type": "sliding_window", "window": 128}, {"type": "strided", "stride": 128}]}}
    takes = triton_band.takes
    plans = {"with the kernel": takes, "merged after the kernel": lambda *a, seeded=False: not seeded and takes(*a),
             "without": lambda *a, **kw: False}  # the union's band seeded with its stride's keys, or not
    for label, spec in patterns.items():
        for plan, rule in plans.items():
            if "union" in label or "merged" not in plan:
                with mock.patch.object(triton_band, "takes", rule):
                    fns = {f"engine {label} {plan}": lambda spec=spec: attention(qb, kb, vb, spec)}
                    times.update(bench_kernels.best_times(fns, device))
    return bench_kernels.timed_rows(n, times)


def main(argv: list[str] | None = None) -> int:
    args = bench_kernels.tile_script_parser("python3 -m bench.gpu_band", __doc__.split("\n\n")[0]).parse_args(argv)

    def measure(device: torch.device, rehearsal: bool, sweep: list) -> dict:
        if not args.sweep:
            swept = []
        elif rehearsal:
            swept = sweep_times(device, [256], [16], sweep, [])
        else:
            swept = sweep_times(device, args.n, (128, 256, 1024), sweep, args.flex_n)
            swept += sweep_times(device, [65536], (256,), sweep, [], dim=128)
        # (the rows after the sweep time flash's window, CUDA's own op)
        return {"sweep": swept, "other": [] if rehearsal else [row for n in args.engine_n for row in other_times(device, n)]}

    return bench_kernels.run_tile_script(args, "gpu_band", SHAPES, SWEEP, check, check_long, measure)


if __name__ == "__main__":
    sys.exit(main())
