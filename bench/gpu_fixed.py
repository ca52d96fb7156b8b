"""fixed's Triton kernel (engine/kernels/triton_fixed.py) on a GPU: exact first, then its tiles.

(a) The kernel in its default variant for each dtype and causality, also as a union's step (a
    distance, skipped strides), and in every swept tile size in bfloat16 at D = 64, against the
    float64 reference (tests/reference.py's fixed step, on the CPU) on shapes at the edges (n off
    every tile, Lq < Lk, grouped heads, one head, a block off the tiles, a decode row, D != Dv,
    D = 256), and at n = 131072 against the fused-SDPA plan: PASS or FAIL each.
(b) Seconds of fixed(128, 8), bfloat16, H = 8, D = 64, per n: dense causal attention on the
    engine's fused call, the fused-SDPA plan (`fused_fixed_attention`), each tile size (`SWEEP`),
    FlexAttention with the pattern's block mask where --flex-n says, taking turns in rounds
    (`bench.kernels.rounds`); decode rows; the engine's fixed and its unions with a window and a
    stride (whose fixed step skips the stride's keys), their fixed step continuing the other
    step's partial and merged with it after the kernel.

Exits 1 if a check fails. On the project's machine (no GPU) `--device cpu` rehearses it in
Triton's interpreter, at toy sizes. Run as bench/gpu_check.py says (pydantic carried as wheels):

    PYTHONUNBUFFERED=1 timeout 300 python3 -m bench.gpu_fixed --out "$OUT" 2>&1 | tee "$OUT/gpu_fixed.log"
    python3 -m bench.gpu_fixed --out "$OUT" --no-sweep --engine-n 16384 65536 131072   # checks, then the rest
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
from engine.kernels import triton_fixed  # noqa: E402
from engine.kernels.dense import fused  # noqa: E402
from engine.kernels.fixed import fused_fixed_attention  # noqa: E402
from engine.patterns import attended_pairs, parse_pattern  # noqa: E402

# Tile sizes swept.
SWEEP = [Tiles(64, 64, 4, 3), Tiles(64, 64, 4, 4), Tiles(64, 128, 4, 3), Tiles(128, 64, 8, 3), Tiles(128, 64, 4, 3),
         Tiles(128, 128, 8, 3), Tiles(128, 32, 4, 3)]
# (B, H, Hkv, Lq, Lk, D, Dv, block, summary, min_distance, skip_strides)
SHAPES = [(1, 1, 1, 37, 37, 16, 16, 8, 2, 0, ()), (2, 4, 2, 100, 130, 16, 8, 16, 4, 0, ()),
          (1, 2, 1, 1, 3000, 64, 64, 128, 8, 0, ()), (1, 4, 4, 4000, 4000, 64, 64, 64, 8, 0, ()),
          (1, 4, 1, 777, 3001, 128, 128, 100, 6, 0, ()), (1, 2, 2, 600, 2500, 64, 64, 32, 4, 130, ()),
          (1, 2, 2, 600, 2500, 64, 64, 32, 4, 257, (64, 7)), (1, 2, 2, 513, 513, 256, 256, 64, 8, 0, ()),
          (1, 2, 2, 300, 300, 40, 24, 7, 3, 0, ())]
FIXED = {"type": "fixed", "block": 128, "summary": 8}
PATTERNS = {"fixed(128, 8)": FIXED,
            "union(sliding 256, fixed(128, 8))": {"type": "union", "patterns": [
                {"type": "sliding_window", "window": 256}, FIXED]},
            "union(sliding 256, strided 128, fixed(128, 8))": {"type": "union", "patterns": [
                {"type": "sliding_window", "window": 256}, {"type": "strided", "stride": 128}, FIXED]}}


def check(device: torch.device, shapes, sweep) -> tuple[int, int]:
    passed = failed = 0
    runs = [(dtype, causal, None) for dtype in (torch.float32, torch.float16, torch.bfloat16)
            for causal in (True, False)]
    runs += [(torch.bfloat16, True, config) for config in sweep]
    for dtype, causal, config in runs:
        for shape in shapes:
            b, h, hkv, lq, lk, d, dv, block, summary, distance, strides = shape
            if config and (d != 64 or strides):  # the sweep's variant (each is a compile of its own)
                continue
            g = torch.Generator().manual_seed(lq * lk + block)
            q = torch.randn(b, h, lq, d, generator=g).to(dtype)
            k, v = torch.randn(b, hkv, lk, d, generator=g).to(dtype), torch.randn(b, hkv, lk, dv, generator=g).to(dtype)
            kwargs = dict(block=block, summary=summary, causal=causal, min_distance=distance, skip_strides=strides)
            name = f"{dtype} {'causal' if causal else 'non-causal'} {config} {shape}"

            def attempt(q=q, k=k, v=v, kwargs=kwargs, config=config, d=d, dtype=dtype) -> None:
                out, lse = triton_fixed.triton_fixed_attention(*(x.to(device) for x in (q, k, v)), scale=d ** -0.5,
                                                               variant=config and config.variant(), **kwargs)
                ref_out, ref_lse = reference.fixed_step_reference(q, k, v, scale=d ** -0.5, **kwargs)
                tol = 2e-5 if dtype == torch.float32 else 2e-2
                reference.assert_matches_reference(out.cpu(), lse.cpu(), ref_out, ref_lse, tol=tol)

            ok = bench_kernels.outcome(name, attempt)
            passed, failed = passed + ok, failed + (not ok)
    return passed, failed


def check_long(device: torch.device, n: int, sweep) -> tuple[int, int]:
    """Each tile size at n keys against the fused-SDPA plan (bfloat16, causal)."""
    passed = failed = 0
    q, k, v = bench_kernels.inputs(n, 8, 64, torch.bfloat16, device)
    ref_out, ref_lse = fused_fixed_attention(q, k, v, block=128, summary=8, scale=0.125)
    for config in [None, *sweep]:
        out, lse = triton_fixed.triton_fixed_attention(q, k, v, block=128, summary=8, scale=0.125,
                                                       variant=config and config.variant())
        err = max((out.float() - ref_out.float()).abs().max().item(), (lse - ref_lse).abs().max().item())
        ok = (torch.allclose(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
              and torch.allclose(lse, ref_lse, atol=2e-2, rtol=2e-2))
        passed, failed = passed + ok, failed + (not ok)
        print("PASS" if ok else "FAIL", f"n={n} {config} against the fused plan: "
              f"max error {err:.2e}", flush=True)
    return passed, failed


def sweep_times(device: torch.device, ns, sweep, flex_n) -> list[dict]:
    rows = []
    flex = bench_kernels.Flex(device) if flex_n else None
    for n in ns:
        q, k, v = bench_kernels.inputs(n, 8, 64, torch.bfloat16, device)
        fns = {"dense fused": lambda: fused(q, k, v, scale=0.125, is_causal=True),
               "fused plan": lambda: fused_fixed_attention(q, k, v, block=128, summary=8, scale=0.125)}
        for config in sweep:
            fns[str(config)] = lambda c=config: triton_fixed.triton_fixed_attention(
                q, k, v, block=128, summary=8, scale=0.125, variant=c.variant())
        if flex and n in flex_n:
            run = flex.runner(parse_pattern(FIXED), n, True)
            fns["flex"] = lambda run=run: run(q, k, v)
        times = bench_kernels.best_times(fns, device)
        # efficiency against dense: (dense / s) / (dense pairs / attended pairs)
        pairs_ratio = n * (n + 1) / 2 / attended_pairs(parse_pattern(FIXED), 1, 1, n, n, True)
        for name, s in times.items():
            rows.append({"n": n, "kernel": name, "seconds": s,
                         "efficiency": times["dense fused"] / s / pairs_ratio})
            print(f"n={n} {name}: {s * 1e3:.3f} ms  efficiency {rows[-1]['efficiency']:.2f}", flush=True)
    return rows


def other_times(device: torch.device, n: int) -> list[dict]:
    """Decode rows (the kernel against the fused plan) and the engine's plans: the unions' fixed
    step continuing the other step's partial, and merged with it after the kernel instead."""
    q, k, v = bench_kernels.inputs(n, 8, 64, torch.bfloat16, device)
    fns = {}
    for lq in (1, 16):
        row = q[..., -lq:, :]
        fns[f"decode lq={lq} fused plan"] = lambda row=row: fused_fixed_attention(row, k, v, block=128, summary=8,
                                                                                 scale=0.125)
        fns[f"decode lq={lq} triton"] = lambda row=row: triton_fixed.triton_fixed_attention(
            row, k, v, block=128, summary=8, scale=0.125)
    times = bench_kernels.best_times(fns, device)
    times.update(bench_kernels.best_times({f"engine {label}": lambda spec=spec: attention(q, k, v, spec)
                                           for label, spec in PATTERNS.items()}, device))
    takes = triton_fixed.takes
    with mock.patch.object(triton_fixed, "takes", lambda *a, seeded=False: not seeded and takes(*a)):
        times.update(bench_kernels.best_times({f"engine {label} merged after the kernel": lambda spec=spec: attention(
            q, k, v, spec) for label, spec in PATTERNS.items() if "union" in label}, device))
    return bench_kernels.timed_rows(n, times)


def main(argv: list[str] | None = None) -> int:
    args = bench_kernels.tile_script_parser("python3 -m bench.gpu_fixed", __doc__.split("\n\n")[0]).parse_args(argv)

    def measure(device: torch.device, rehearsal: bool, sweep: list) -> dict:
        ns, flex_n, engine_n = ([300], [], [300]) if rehearsal else (args.n, args.flex_n, args.engine_n)
        return {"sweep": sweep_times(device, ns, sweep, flex_n) if args.sweep else [],
                "other": [row for n in engine_n for row in other_times(device, n)]}

    return bench_kernels.run_tile_script(args, "gpu_fixed", SHAPES, SWEEP, check, check_long, measure)


if __name__ == "__main__":
    sys.exit(main())
