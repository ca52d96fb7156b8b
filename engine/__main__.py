"""`python -m engine show '<pattern json>' --n 32 [--png FILE]`, `python -m engine demo` and
`python -m engine build` (the CPU span kernel, now rather than at its first use)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import attention
from .kernels import span_kernel
from .memory import PeakMemory
from .patterns import attended_pairs, parse_pattern
from .picture import mask_png, mask_text


def _show(args: argparse.Namespace) -> None:
    pattern = parse_pattern(args.pattern)
    causal = not args.no_causal
    if args.png:
        png = mask_png(pattern, args.n, causal=causal, heads=args.heads)  # drawn before the file is opened
        with open(args.png, "wb") as f:
            f.write(png)
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


def _build(args: argparse.Namespace) -> None:
    library = span_kernel.library()
    if library is None:
        print("the span kernel is not built (no C++ compiler, or its build failed: see above); "
              "strided, band and fixed attention run on torch's CPU kernel")
    else:
        print(f"the span kernel is built, kept in {span_kernel.cache_dir()}; "
              f"bfloat16's products: {span_kernel.bfloat16_products()}")


def _count(low: int, high: int):
    """An argparse type: an int in [low, high] (the mask and the demo's tensors grow with it)."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value
    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print or draw a pattern's mask")
    show.add_argument("pattern", help='pattern JSON, e.g. \'{"type": "sliding_window", "window": 4}\'')
    show.add_argument("--n", type=_count(1, 2048), default=32)
    show.add_argument("--heads", type=_count(1, 64), default=1)
    show.add_argument("--no-causal", action="store_true")
    show.add_argument("--png", metavar="FILE")
    show.set_defaults(run=_show)
    demo = sub.add_parser("demo", help="run the engine once and report time and memory")
    demo.add_argument("pattern", nargs="?", default='{"type": "sliding_window", "window": 256}')
    demo.add_argument("--n", type=_count(1, 1 << 17), default=16384)
    demo.add_argument("--heads", type=_count(1, 64), default=8)
    demo.set_defaults(run=_demo)
    build = sub.add_parser("build", help="build the CPU span kernel now (kept on disk; else at its first use)")
    build.set_defaults(run=_build)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as error:  # a bad pattern, heads it cannot serve, an unwritable --png
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
