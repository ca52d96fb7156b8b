"""`python -m engine show '<pattern json>' --n 32 [--png FILE]` and `python -m engine demo`."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import attention
from .memory import PeakMemory
from .patterns import attended_pairs, parse_pattern
from .picture import mask_png, mask_text


def _show(args: argparse.Namespace) -> None:
    pattern = parse_pattern(args.pattern)
    causal = not args.no_causal
    if args.png:
        with open(args.png, "wb") as f:
            f.write(mask_png(pattern, args.n, causal=causal, heads=args.heads))
        print(f"wrote {args.png}")
        return
    for head in range(args.heads):
        if args.heads > 1:
            print(f"head {head}:")
        print(mask_text(pattern, args.n, causal=causal, head=head, heads=args.heads))
    pairs = attended_pairs(pattern, 1, args.heads, args.n, args.n, causal)
    print(f"attended pairs: {pairs} of {args.heads * args.n * args.n}")


def _demo(args: argparse.Namespace) -> None:
    pattern = parse_pattern(args.pattern)
    q, k, v = (torch.randn(1, args.heads, args.n, 64) for _ in range(3))
    start = time.perf_counter()
    out = attention(q, k, v, pattern)
    elapsed = time.perf_counter() - start
    with PeakMemory("cpu") as mem:  # a second call: the tracker's first use in a process costs ~1 s
        attention(q, k, v, pattern)
    pairs = attended_pairs(pattern, 1, args.heads, args.n, args.n)
    print(f"{pattern.describe()} n={args.n} H={args.heads}: output {list(out.shape)} in {elapsed * 1e3:.1f} ms, "
          f"peak {mem.peak_bytes / 2**20:.1f} MiB, {pairs} attended pairs")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print or draw a pattern's mask")
    show.add_argument("pattern", help='pattern JSON, e.g. \'{"type": "sliding_window", "window": 4}\'')
    show.add_argument("--n", type=int, default=32)
    show.add_argument("--heads", type=int, default=1)
    show.add_argument("--no-causal", action="store_true")
    show.add_argument("--png", metavar="FILE")
    show.set_defaults(run=_show)
    demo = sub.add_parser("demo", help="run the engine once and report time and memory")
    demo.add_argument("pattern", nargs="?", default='{"type": "sliding_window", "window": 256}')
    demo.add_argument("--n", type=int, default=16384)
    demo.add_argument("--heads", type=int, default=8)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
