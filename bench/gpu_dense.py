"""The engine's unmasked fused calls on a GPU: torch's flash kernel against cuDNN's attention.

Where torch's SDPA picks cuDNN for unmasked half-precision inputs (`dense.sdpa_picks_cudnn`), the
engine's dense calls (the dense pattern, strided's one call, a band's or fixed's pieces) take it.
(a) `fused` on cuDNN against the float64 reference (tests/reference.py, on the CPU) on shapes at
    the edges (causal square, Lq < Lk, a decode row, n off every tile, a head dim the kernels pad,
    a batch), and the engine's dense and strided plans: PASS or FAIL each.
(b) Seconds of a causal bfloat16 call (H = 8, D = 64, and D = 128 at 65536): the flash op, the
    cuDNN op, F.scaled_dot_product_attention (torch's pick); and the engine's dense and
    strided(64) with cuDNN and without (`sdpa_picks_cudnn` false), in rounds.

Exits 1 if a check fails. Run as bench/gpu_check.py says (pydantic carried as wheels):

    PYTHONUNBUFFERED=1 timeout 200 python3 -m bench.gpu_dense --out "$OUT" 2>&1 | tee "$OUT/gpu_dense.log"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import reference  # noqa: E402

from bench import kernels as bench_kernels  # noqa: E402
from engine import attention  # noqa: E402
from engine.kernels import dense  # noqa: E402

# (B, H, Lq, Lk, D, causal): `fused` takes is_causal on square problems only.
FUSED_SHAPES = [(1, 8, 1024, 1024, 64, True), (2, 3, 1000, 1000, 64, True), (1, 4, 333, 4097, 128, False),
                (1, 8, 1, 65536, 64, False), (1, 2, 4097, 4097, 48, True), (1, 2, 77, 77, 256, True),
                (1, 1, 8192, 8192, 64, True)]
# (B, H, Lq, Lk, D, pattern)
ENGINE_CASES = [(1, 8, 4096, 4096, 64, None), (1, 8, 4096, 4096, 64, {"type": "strided", "stride": 64}),
                (1, 4, 1000, 3000, 128, {"type": "strided", "stride": 7}), (2, 2, 16, 9000, 64, None)]


def check(device: torch.device) -> tuple[int, int]:
    passed = failed = 0
    cases = [("fused", shape) for shape in FUSED_SHAPES] + [("engine", case) for case in ENGINE_CASES]
    for kind, (b, h, lq, lk, d, extra) in cases:
        g = torch.Generator().manual_seed(lq + lk + d)
        q = torch.randn(b, h, lq, d, generator=g).to(torch.bfloat16)
        k, v = (torch.randn(b, h, lk, d, generator=g).to(torch.bfloat16) for _ in range(2))
        name = f"{kind} {(b, h, lq, lk, d, extra)}"
        try:
            qd, kd, vd = (x.to(device) for x in (q, k, v))
            if kind == "fused":
                picked = dense.sdpa_picks_cudnn(qd, kd, vd, extra, d ** -0.5)
                out, lse = dense.fused(qd, kd, vd, scale=d ** -0.5, is_causal=extra)
                ref_out, ref_lse = reference.reference_attention(q, k, v, None, causal=extra)
            else:
                picked = dense.sdpa_picks_cudnn(qd, qd, qd, True, d ** -0.5)
                out, lse = attention(qd, kd, vd, extra, return_lse=True)
                ref_out, ref_lse = reference.reference_attention(q, k, v, extra)
            torch.testing.assert_close(out.cpu().double(), ref_out, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=2e-2, rtol=2e-2)
            passed += 1
            print(f"PASS {name} (SDPA picks cuDNN: {picked})", flush=True)
        except Exception as e:  # noqa: BLE001 (every failure is reported, none stops the run)
            failed += 1
            print(f"FAIL {name}: {repr(e)[:600]}", flush=True)
    return passed, failed


def times(device: torch.device, ns) -> list[dict]:
    rows = []
    strided = {"type": "strided", "stride": 64}
    for n, d in [(n, 64) for n in ns] + [(n, 128) for n in ns if n == 65536]:
        q, k, v = bench_kernels.inputs(n, 8, d, torch.bfloat16, device)
        s = d ** -0.5
        fns = {
            "flash op": lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=s),
            "cudnn op": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True,
                                                                                   False, scale=s),
            "F.sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "engine dense": lambda: attention(q, k, v, None),
            "engine strided(64)": lambda: attention(q, k, v, strided),
        }
        result = bench_kernels.best_times(fns, device)
        with mock.patch.object(dense, "sdpa_picks_cudnn", lambda *a: False):
            result.update(bench_kernels.best_times({"engine dense, flash": lambda: attention(q, k, v, None),
                                                    "engine strided(64), flash": lambda: attention(q, k, v, strided)},
                                                   device))
        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=s)
        for name, seconds in result.items():
            rows.append({"n": n, "dim": d, "kernel": name, "seconds": seconds, "sdpa_choice": choice})
            print(f"n={n} D={d} {name}: {seconds * 1e3:.3f} ms (SDPA's choice {choice})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu_dense", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, nargs="+", default=[16384, 65536, 131072])
    args = p.parse_args(argv)
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name(device)}",
          flush=True)
    passed, failed = check(device)
    print(f"checks: {passed} passed, {failed} failed", flush=True)
    result = {"passed": passed, "failed": failed, "torch": torch.__version__, "times": times(device, args.n)}
    result["total_s"] = time.perf_counter() - started
    (args.out / "gpu_dense.json").write_text(json.dumps(result, indent=1))
    print(f"{'FAILED' if failed else 'ALL PASSED'}: {passed} passed, {failed} failed; total {result['total_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
