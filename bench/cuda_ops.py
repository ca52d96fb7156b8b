"""Ops per engine call on CUDA's plans, counted on any machine by the emulation of
tests/cuda_emulation.py: all aten ops, those that are not views (each a kernel launch on a GPU,
bar a few on small host tensors), and reads of a device value on the host (each a wait for
every queued kernel). Where a call is a few hundred microseconds on a GPU, these are its cost.
The counts do not depend on the machine. Triton kernels run in Triton's interpreter here and count
as the one launch each is on a GPU; `--fused-fixed` counts fixed's fused-SDPA plan instead (CUDA's
fallback where Triton is missing).

    .venv/bin/python -m bench.cuda_ops            # docs/kernels.md's table (bfloat16, H = 1, D = 64, Lk = 4096)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from unittest.mock import patch

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cuda_emulation import counted_call  # noqa: E402

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the engine defines its Triton kernels

SW, ST, FX = ({"type": "sliding_window", "window": 128}, {"type": "strided", "stride": 128},
              {"type": "fixed", "block": 128, "summary": 8})
PATTERNS = {
    "sliding_window(256)": {"type": "sliding_window", "window": 256},
    "strided(64)": {"type": "strided", "stride": 64},
    "fixed(128, 8)": FX,
    "union(sliding 128, strided 128)": {"type": "union", "patterns": [SW, ST]},
    "union(sliding 128, fixed(128, 8))": {"type": "union", "patterns": [SW, FX]},
    "union(strided 128, fixed(128, 8))": {"type": "union", "patterns": [ST, FX]},
    "union(sliding 128, strided 128, fixed(128, 8))": {"type": "union", "patterns": [SW, ST, FX]},
}
CASES = {"causal prefill": (True, None), "decode step": (True, 1), "non-causal": (False, None)}


def count_ops(pattern: dict, lq: int, lk: int, causal: bool) -> dict[str, int]:
    """{all, launches, host_reads} for one call after a first (which may probe the flash window)."""
    q = torch.randn(1, 1, lq, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, lk, 64, dtype=torch.bfloat16) for _ in range(2))
    _, count = counted_call(q, k, v, pattern, causal=causal)
    return {"all": count.total, "launches": count.launches, "host_reads": sum(count.syncs.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="keys (and prefill rows)")
    p.add_argument("--patterns", nargs="+", choices=list(PATTERNS), default=list(PATTERNS))
    p.add_argument("--out", type=Path, help="JSON of the counts")
    p.add_argument("--fused-fixed", action="store_true", help="fixed on its fused-SDPA plan, not the Triton kernel")
    args = p.parse_args(argv)
    with patch("engine.kernels.triton_fixed.runs_on_triton", return_value=False) if args.fused_fixed else nullcontext():
        rows = {name: {case: count_ops(PATTERNS[name], lq or args.n, args.n, causal)
                       for case, (causal, lq) in CASES.items()} for name in args.patterns}
    print("| pattern | " + " | ".join(CASES) + " |\n|---|" + "---|" * len(CASES))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join("{all}/{launches}/{host_reads}".format(**c) for c in cells.values()) + " |")
    if args.out:
        args.out.write_text(json.dumps({"n": args.n, "counts": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
