"""Kernel benchmark: the engine against dense causal SDPA, masked SDPA and compiled FlexAttention.

Everything runs in one process and is reported as ratios to the dense SDPA time measured
in the same run (the machine is shared; absolute times are noisy, ratios less so). For each n,
dense SDPA, masked SDPA, FlexAttention and the engine take turns in rounds, after a warm-up
round, so that all see the same background load; a turn repeats a short call for `--turn-s`
seconds; each time is the minimum over `--repeats` rounds (a call slower than `--slow` seconds: its last round only). FlexAttention's first call
per shape (block mask + compile) is reported separately.

    python -m bench.kernels                       # bounded default run (a few minutes on 2 cores)
    python -m bench.kernels --flex-n 4096 16384 65536    # full: FlexAttention at 65536 too (much longer)
    python -m bench.kernels --n 4096 --patterns sliding_window --no-flex               # quick
    python -m bench.kernels --tiles                # band tile-size sweep (engine.kernels.band)
    python -m bench.kernels --decode               # a few query rows over long keys (decoding)
    python -m bench.kernels --decode --heads 32 --decode-kv-heads 8 --dim 128   # grouped-query decoding
    python -m bench.kernels --decode --decode-layers 8   # each call the next of 8 layers' caches (read from memory)
    python -m bench.kernels --small                # small problems: the structured plan against the masked one
    python -m bench.kernels --grouped 8 --heads 32 --dim 128 --n 4096   # grouped-query prefills against repeated heads
    python -m bench.kernels --non-causal --n 16384 --bf16-n 0 --scaling-n --memory-n 0 --first-call-n 0

Columns: efficiency = speed-up over dense / (dense pairs / attended pairs), so 1.0 means
the time shrank exactly as much as the pattern's pairs did; `vs flex` = FlexAttention time /
engine time. On CUDA in half precision each row also has the efficiency against dense SDPA on
torch's flash kernel alone (`dense_flash`), the issue's GPU baseline, where SDPA may pick cuDNN.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine import attention
from engine.attention import backend_for
from engine.kernels import KEEPS_FREED_MEMORY, band_attention, masked_attention
from engine.kernels.dense import cpu_native_half
from engine.kernels.device import kernel_device
from engine.kernels.masked import chunk_mask
from engine.memory import PeakMemory
from engine.patterns import attended_pairs, parse_pattern
from engine.planner import masked_plan, plan, simplify, structured_plan

PATTERNS = {
    "sliding_window": {"type": "sliding_window", "window": 256},
    "strided": {"type": "strided", "stride": 64},
    "fixed": {"type": "fixed", "block": 128, "summary": 8},
    "union": {"type": "union", "patterns": [{"type": "sliding_window", "window": 128},
                                            {"type": "strided", "stride": 128}]},
    "window_fixed": {"type": "union", "patterns": [{"type": "sliding_window", "window": 256},
                                                   {"type": "fixed", "block": 128, "summary": 8}]},
    "strided_fixed": {"type": "union", "patterns": [{"type": "strided", "stride": 128},
                                                    {"type": "fixed", "block": 128, "summary": 8}]},
    "window_strided_fixed": {"type": "union", "patterns": [{"type": "sliding_window", "window": 256},
                                                           {"type": "strided", "stride": 128},
                                                           {"type": "fixed", "block": 128, "summary": 8}]},
}
ISSUE_PATTERNS = ["sliding_window", "strided", "fixed", "union"]  # the default run
LABELS = {
    "sliding_window": "sliding_window(256)",
    "strided": "strided(64)",
    "fixed": "fixed(128, 8)",
    "union": "union(sliding 128, strided 128)",
    "window_fixed": "union(sliding 256, fixed(128, 8))",
    "strided_fixed": "union(strided 128, fixed(128, 8))",
    "window_strided_fixed": "union(sliding 256, strided 128, fixed(128, 8))",
}
# The decode rows add a union of two strides (the second skipping the first's multiples) and one
# of two fixed members, which has no structured kernel and runs on the masked one.
DECODE_EXTRA = {
    "union(sliding 256, strided 128, strided 96)": {"type": "union", "patterns": [
        {"type": "sliding_window", "window": 256}, {"type": "strided", "stride": 128},
        {"type": "strided", "stride": 96}]},
    "union(sliding 256, fixed(128, 2), fixed(192, 2))": {"type": "union", "patterns": [
        {"type": "sliding_window", "window": 256}, {"type": "fixed", "block": 128, "summary": 2},
        {"type": "fixed", "block": 192, "summary": 2}]},
}
# Small problems (--small): patterns scaled to n = 32 .. 256, where the paper's would be dense.
SMALL_PATTERNS = {
    "sliding_window(16)": {"type": "sliding_window", "window": 16},
    "strided(8)": {"type": "strided", "stride": 8},
    "fixed(16, 2)": {"type": "fixed", "block": 16, "summary": 2},
    "union(sliding 16, strided 16)": {"type": "union", "patterns": [
        {"type": "sliding_window", "window": 16}, {"type": "strided", "stride": 16}]},
    "union(sliding 16, fixed(16, 2))": {"type": "union", "patterns": [
        {"type": "sliding_window", "window": 16}, {"type": "fixed", "block": 16, "summary": 2}]},
    "union(strided 8, fixed(32, 4))": {"type": "union", "patterns": [
        {"type": "strided", "stride": 8}, {"type": "fixed", "block": 32, "summary": 4}]},
    "union(sliding 32, strided 32, fixed(64, 4))": {"type": "union", "patterns": [
        {"type": "sliding_window", "window": 32}, {"type": "strided", "stride": 32},
        {"type": "fixed", "block": 64, "summary": 4}]},
}
STARTED = time.perf_counter()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def once(fn, device: torch.device) -> float:
    """Seconds of one call, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def timed(fn, device: torch.device, repeats: int, slow: float) -> tuple[float, float]:
    """(first-call seconds, best seconds): one warm-up call, then the minimum of `repeats`
    (the warm-up's own time when it took over `slow` seconds)."""
    first = once(fn, device)
    if first > slow:
        return first, first
    return first, min((once(fn, device) for _ in range(repeats)), default=math.inf)


def inputs(n: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(torch.randn(1, heads, n, dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))


def mask_mod_for(pattern, causal: bool):
    """FlexAttention's mask_mod: the pattern's own rule (under causality)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return pattern.attends(q_idx, kv_idx, causal)
    return mask_mod


class Flex:
    """Compiled FlexAttention with the pattern's block mask, built and compiled once per shape."""

    def __init__(self, device: torch.device) -> None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # One compile per (pattern, shape), as a server with fixed shapes would; dynamo's default
        # recompile limit (8) would otherwise send later shapes to the unfused eager path.
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
        self.create_block_mask = create_block_mask
        self.compiled = torch.compile(flex_attention, dynamic=False)
        self.device = device

    def runner(self, pattern, n: int, causal: bool):
        mask = self.create_block_mask(mask_mod_for(pattern, causal), None, None, n, n, device=self.device,
                                      _compile=n > 16384)
        return lambda q, k, v: self.compiled(q, k, v, block_mask=mask)


def dense_flash(q, k, v, causal: bool):
    """Dense attention on torch's flash kernel alone: the issue's GPU baseline ("the dense flash
    kernel"), where SDPA itself may pick another (an H200 takes cuDNN's, 1.55x faster at 131072)."""
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def masked_sdpa(pattern, n: int, device: torch.device, causal: bool):
    """Plain SDPA with the full n x n boolean mask (what a generic server would do)."""
    mask = pattern.attends(torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None, :], causal)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def rounds(fns: dict, device: torch.device, repeats: int, slow: float, turn_s: float) -> dict:
    """{key: [seconds per round]}: every callable takes a turn per round, in turn, so that all see
    the same background load; a turn repeats the call for `turn_s` seconds and keeps its fastest
    (a single short call right after another callable's long one ran 5-25% slower on the 2-core
    VM than the same call repeated, clocks and caches still cold, which would bias every ratio
    against the short calls). Round 0 is the warm-up (FlexAttention compiles in it, one call); a
    callable whose warm-up took over `slow` seconds runs again in the last round only."""
    def turn(fn) -> float:
        best, ends = once(fn, device), time.perf_counter() + turn_s
        while time.perf_counter() < ends:
            best = min(best, once(fn, device))
        return best

    times: dict = {key: [] for key in fns}
    for rnd in range(repeats + 1):
        for key, fn in fns.items():
            if rnd == 0:
                times[key].append(once(fn, device))
            elif rnd == repeats or times[key][0] <= slow:
                times[key].append(turn(fn))
    return times


class Tiles(NamedTuple):
    """A tile size of one of the engine's Triton kernels, as the GPU scripts sweep them."""
    block_m: int
    block_n: int
    warps: int
    stages: int

    def variant(self) -> dict:
        """The kernel's compile-time arguments for it (a `variant` that replaces the default tiles)."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.warps, "num_stages": self.stages}

    def __str__(self) -> str:
        return f"triton {self.block_m}x{self.block_n} w{self.warps} s{self.stages}"


def tile_script_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The arguments of the scripts that check and sweep a Triton kernel's tiles on a GPU
    (bench/gpu_band.py, bench/gpu_fixed.py)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to rehearse the script (tiny sizes)")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536, 131072], help="n of the tile sweep")
    p.add_argument("--flex-n", type=int, nargs="*", default=[16384, 131072])
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="check and time every swept tile size (--no-sweep: the default tiles' checks, then the rest)")
    p.add_argument("--engine-n", type=int, nargs="+", default=[65536], help="n of the rows after the sweep")
    return p


def outcome(name: str, attempt) -> bool:
    """Run one check of a GPU script (`attempt` returns what is wrong, or None; an assertion it
    raises counts as wrong too), print its PASS or FAIL line, and say whether it passed; a crash is
    a failure, reported with its trace."""
    try:
        problem = attempt()
    except Exception:  # noqa: BLE001 (every failure is reported, none stops the run)
        problem = "raised\n" + traceback.format_exc()
    print(f"FAIL {name}: {problem}" if problem else f"PASS {name}", flush=True)
    return problem is None


def run_tile_script(args, name: str, shapes: list, sweep: list, check, check_long, measure) -> int:
    """A tile script's run: `check` on `shapes` in the default tiles and each of `sweep` (with
    `--sweep`), and on a GPU `check_long` at n = 131072; then `measure(device, rehearsal, sweep)`'s
    {section: rows}; all written to OUT/name.json. On the CPU (a rehearsal, in Triton's
    interpreter) two shapes and two tile sizes. Exit status 1 if a check failed."""
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    rehearsal = device.type == "cpu"
    started = time.perf_counter()
    sweep = (sweep[:2] if rehearsal else sweep) if args.sweep else []
    passed, failed = check(device, shapes[:2] if rehearsal else shapes, sweep)
    if not rehearsal:
        more = check_long(device, 131072, sweep)
        passed, failed = passed + more[0], failed + more[1]
    print(f"checks: {passed} passed, {failed} failed in {time.perf_counter() - started:.0f} s", flush=True)
    result = {"passed": passed, "failed": failed, "torch": torch.__version__, **measure(device, rehearsal, sweep)}
    result["total_s"] = time.perf_counter() - started
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"{'FAILED' if failed else 'ALL PASSED'}: {passed} passed, {failed} failed; total {result['total_s']:.0f} s")
    return 1 if failed else 0


def timed_rows(n: int, times: dict) -> list[dict]:
    """`best_times`' result at n as JSON rows, each printed as it goes."""
    rows = []
    for name, seconds in times.items():
        rows.append({"n": n, "kernel": name, "seconds": seconds})
        print(f"n={n} {name}: {seconds * 1e3:.3f} ms", flush=True)
    return rows


def best_times(fns: dict, device: torch.device, repeats: int = 3, slow: float = 30.0, turn_s: float = 0.05) -> dict:
    """{key: seconds}: each callable's best round of `rounds` after the warm-up (the warm-up's own
    time for one that ran only there)."""
    return {key: min(t[1:] or t) for key, t in rounds(fns, device, repeats, slow, turn_s).items()}


def bench_table(args, device: torch.device) -> list[dict]:
    rows = []
    flex = None if args.no_flex else Flex(device)
    causal = not args.non_causal
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for n in args.n:
            q, k, v = inputs(n, args.heads, args.dim, dtype, device)
            patterns = {name: parse_pattern(PATTERNS[name]) for name in args.patterns}
            fns = {"dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
            if device.type == "cuda" and dtype != torch.float32:  # flash takes half precision only
                fns["dense flash"] = lambda: dense_flash(q, k, v, causal)
            flex_first = {}
            for name, pattern in patterns.items():
                fns["engine", name] = lambda pattern=pattern: attention(q, k, v, pattern, causal=causal)
                if n <= args.masked_max_n and n * n <= args.masked_max_bytes:  # one boolean per pair
                    run = masked_sdpa(pattern, n, device, causal)
                    fns["masked", name] = lambda run=run: run(q, k, v)
                if flex is None or n not in args.flex_n or dtype_name not in args.flex_dtypes:
                    continue
                if time.perf_counter() - STARTED > args.flex_budget:
                    print(f"SKIP FlexAttention {LABELS[name]} n={n}: past --flex-budget {args.flex_budget:.0f} s")
                    continue
                sync(device)
                start = time.perf_counter()
                run = flex.runner(pattern, n, causal)
                run(q, k, v)  # block mask, compile and a first call, before the rounds
                sync(device)
                flex_first[name] = time.perf_counter() - start
                fns["flex", name] = lambda run=run: run(q, k, v)
            times = rounds(fns, device, args.repeats, args.slow, args.turn_s)
            best = {key: min(t[1:] or t) for key, t in times.items()}
            dense_pairs = args.heads * n * (n + 1) // 2 if causal else args.heads * n * n
            for name, pattern in patterns.items():
                row = {"pattern": LABELS[name] + ("" if causal else ", non-causal"), "n": n, "dtype": dtype_name,
                       "heads": args.heads, "dim": args.dim, "causal": causal,
                       "backend": backend_for(pattern, args.heads, n, n, causal, kernel_device(device)),
                       "dense_s": best["dense"],
                       "attended_pairs": attended_pairs(pattern, 1, args.heads, n, n, causal),
                       "dense_pairs": dense_pairs, "engine_s": best["engine", name],
                       "engine_first_call_s": times["engine", name][0]}
                if ("masked", name) in best:
                    row["masked_s"] = best["masked", name]
                if ("flex", name) in best:
                    row["flex_s"] = best["flex", name]
                    # Block mask + compile: the first call's excess over a steady call.
                    row["flex_compile_s"] = flex_first[name] - row["flex_s"]
                    row["vs_flex"] = row["flex_s"] / row["engine_s"]
                row["speedup"] = row["dense_s"] / row["engine_s"]
                row["efficiency"] = row["speedup"] / (dense_pairs / row["attended_pairs"])
                if "dense flash" in best:
                    row["dense_flash_s"] = best["dense flash"]
                    row["efficiency_flash"] = (best["dense flash"] / row["engine_s"]
                                               / (dense_pairs / row["attended_pairs"]))
                rows.append(row)
                print(format_row(row) + (f"  (against dense flash {row['dense_flash_s']:.3f} s: efficiency "
                                         f"{row['efficiency_flash']:.2f})" if "efficiency_flash" in row else ""),
                      flush=True)
            q = k = v = fns = None  # freed before the next length's inputs (the lambdas read them until here)
    return rows


def fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


HEADER = (f"{'pattern':32} {'n':>6} {'dtype':8} {'backend':12} {'dense s':>8} {'masked s':>8} {'flex s':>8} "
          f"{'compile s':>9} {'engine s':>8} {'speed-up':>8} {'effic.':>6} {'vs flex':>7}")


def format_row(r: dict) -> str:
    return (f"{r['pattern']:32} {r['n']:>6} {r['dtype']:8} {r['backend']:12} {fmt(r['dense_s']):>8} "
            f"{fmt(r.get('masked_s')):>8} {fmt(r.get('flex_s')):>8} {fmt(r.get('flex_compile_s'), '.1f'):>9} "
            f"{fmt(r['engine_s'], '.4f'):>8} {fmt(r['speedup'], '.1f'):>8} {fmt(r['efficiency'], '.2f'):>6} "
            f"{fmt(r.get('vs_flex'), '.1f'):>7}")


def markdown(result: dict) -> str:
    """The run as the README's tables."""
    lines = ["| pattern | n | dtype | dense SDPA s | masked SDPA s | FlexAttention s (compile s) | engine s "
             "| speed-up | efficiency | FlexAttention / engine |", "|" + "---|" * 10]
    for r in result["rows"]:
        flex = f"{r['flex_s']:.3f} ({r['flex_compile_s']:.1f})" if "flex_s" in r else "-"
        lines.append(f"| {r['pattern']} | {r['n']} | {r['dtype']} | {r['dense_s']:.3f} | {fmt(r.get('masked_s'))} "
                     f"| {flex} | {r['engine_s']:.4f} | {r['speedup']:.1f} | {r['efficiency']:.2f} "
                     f"| {fmt(r.get('vs_flex'), '.1f')} |")
    against_flash = [r for r in result["rows"] if "efficiency_flash" in r]
    if against_flash:
        lines.append("\nefficiency against the dense flash kernel (SDPA on torch's flash kernel alone, same run): "
                     + ", ".join(f"{r['pattern']} n = {r['n']} {r['efficiency_flash']:.2f} "
                                 f"({r['dense_flash_s']:.3f} s)" for r in against_flash))
    if "bf16_over_fp32" in result:
        ratios = dict(result["bf16_over_fp32"])
        n = ratios.pop("n")
        lines.append(f"\nbfloat16 / float32 engine time at n = {n} (the dtypes taking turns): "
                     + ", ".join(f"{label} {ratio:.2f}" for label, ratio in ratios.items()))
    if "scaling" in result:
        sc = result["scaling"]
        lines.append(f"\nsliding_window(256) scaling, n = {', '.join(sc['seconds'])}: "
                     + ", ".join(f"{s:.3f} s" for s in sc["seconds"].values())
                     + "; growth per doubling " + ", ".join(f"{g:.2f}x" for g in sc["growth_per_doubling"]))
    if "memory" in result:
        m = result["memory"]
        lines.append(f"\npeak extra memory, {m['pattern']}, n = {m['n']}, one head, float32: "
                     f"{m['peak_bytes'] / 2**20:.0f} MiB (a dense score matrix would take "
                     f"{m['dense_scores_bytes'] / 2**30:.0f} GiB)")
    if "first_call" in result:
        fc = dict(result["first_call"])
        n = fc.pop("n")
        lines.append(f"\nfirst call for a new shape (n = {n}) / steady call: "
                     + ", ".join(f"{name} {v['first_s']:.3f} s / {v['steady_s']:.3f} s" for name, v in fc.items()))
    return "\n".join(lines)


def bench_memory(args, device: torch.device) -> dict:
    """Peak extra memory of sliding_window(256) at n = 131072, one head (issue target < 2 GB)."""
    n = args.memory_n
    q, k, v = inputs(n, 1, args.dim, torch.float32, device)
    pattern = parse_pattern(PATTERNS["sliding_window"])
    start = time.perf_counter()
    with PeakMemory(device) as mem:
        attention(q, k, v, pattern)
    return {"pattern": LABELS["sliding_window"], "n": n, "heads": 1, "peak_bytes": mem.peak_bytes,
            "seconds_with_tracker": time.perf_counter() - start, "dense_scores_bytes": n * n * 4}


def bench_dtype_ratio(args, device: torch.device) -> dict:
    """bfloat16 over float32 engine time per pattern at n = --bf16-n (issue target: <= 1), the
    two dtypes taking turns in the same rounds so that drifting load moves both alike."""
    n = args.bf16_n
    fp32 = inputs(n, args.heads, args.dim, torch.float32, device)
    bf16 = tuple(x.to(torch.bfloat16) for x in fp32)
    fns = {}
    for name in args.patterns:
        pattern = parse_pattern(PATTERNS[name])
        for dtype, (q, k, v) in (("float32", fp32), ("bfloat16", bf16)):
            fns[name, dtype] = lambda q=q, k=k, v=v, pattern=pattern: attention(q, k, v, pattern)
    best = best_times(fns, device, args.repeats, args.slow, args.turn_s)
    return {"n": n, **{LABELS[name]: best[name, "bfloat16"] / best[name, "float32"] for name in args.patterns}}


def bench_scaling(args, device: torch.device) -> dict:
    """sliding_window(256) time as n doubles (issue target: at most 2.3x per doubling), the sizes
    taking turns in rounds."""
    pattern = parse_pattern(PATTERNS["sliding_window"])
    fns = {}
    for n in sorted(args.scaling_n):
        q, k, v = inputs(n, args.heads, args.dim, torch.float32, device)
        fns[n] = lambda q=q, k=k, v=v: attention(q, k, v, pattern)
    times = best_times(fns, device, args.repeats, args.slow, args.turn_s)
    ns = sorted(times)
    return {"pattern": LABELS["sliding_window"], "seconds": {str(n): times[n] for n in ns},
            "growth_per_doubling": [times[b] / times[a] for a, b in zip(ns, ns[1:])]}


def bench_first_call(args, device: torch.device) -> dict:
    """First call for a shape never seen before against the steady state: no compile anywhere."""
    n = args.first_call_n
    out = {"n": n}
    for name in args.patterns:
        q, k, v = inputs(n, args.heads, args.dim, torch.float32, device, seed=1)
        first, steady = timed(lambda: attention(q, k, v, PATTERNS[name]), device, args.repeats, args.slow)
        out[LABELS[name]] = {"first_s": first, "steady_s": steady, "ratio": first / steady}
    return out


def bench_tiles(args, device: torch.device) -> list[dict]:
    """Band tile sizes (query rows per tile) for each window: the data behind band.TILE_ROWS."""
    rows = []
    n = args.n[0]
    q, k, v = inputs(n, args.heads, args.dim, torch.float32, device)
    for window in (64, 128, 256, 512):
        for tile in (8, 16, 24, 32, 64, 128, 256):
            s = timed(lambda: band_attention(q, k, v, window=window, scale=0.125, tile=tile), device,
                      args.repeats, args.slow)[1]
            rows.append({"n": n, "window": window, "tile": tile, "seconds": s})
            print(f"window {window:4} tile {tile:4}: {s:.4f} s", flush=True)
    return rows


def in_turn(call, caches):
    """A callable of no arguments that calls call(k, v) with the next of `caches`' (k, v) each time."""
    turn = itertools.cycle(caches)
    return lambda: call(*next(turn))


def bench_decode(args, device: torch.device) -> list[dict]:
    """Lq query rows at the end of Lk keys (a decode step, a short chunk), per pattern and dtype
    (--dtypes): the engine against its own dense plan over every key (`dense_s`), torch's SDPA over
    every key (`sdpa_s`, grouped heads as they are: the call a user would make without the engine)
    and the masked kernel (the fallback of a pattern with no structured kernel) on the same rows;
    grouped-query with
    --decode-kv-heads (the masked kernel on key/value heads repeated before the clock, as a device
    without grouped heads needs). Each call makes its plan and builds the masked kernel's mask
    afresh, as a real decode step does (its key length and position are new each time), rather
    than find them kept from the last repeat. With --decode-layers N each call reads the next of N
    layers' keys and values, as a model's step reads each layer's once: caches larger than the
    CPU's last-level cache are then read from memory, not found there from the last repeat."""
    patterns = {**{LABELS[name]: PATTERNS[name] for name in args.patterns}, **DECODE_EXTRA}
    kv_heads, scale = args.decode_kv_heads or args.heads, args.dim ** -0.5
    rows = []
    for dtype_name, lk in itertools.product(args.dtypes, args.decode_lk):
        layers = [inputs(lk, kv_heads, args.dim, DTYPES[dtype_name], device, seed=layer)[1:]
                  for layer in range(args.decode_layers)]
        # the masked kernel's keys and values, over query heads (a copy only where they are grouped)
        repeated = layers if kv_heads == args.heads else [
            tuple(x.repeat_interleave(args.heads // kv_heads, dim=1) for x in kv) for kv in layers]
        for lq in args.decode_lq:
            q = inputs(lq, args.heads, args.dim, DTYPES[dtype_name], device, seed=lq)[0]
            fns = {"dense": in_turn(lambda k, v, q=q: (plan.cache_clear(), attention(q, k, v, None)), layers),
                   "sdpa": in_turn(lambda k, v, q=q: F.scaled_dot_product_attention(
                       q, k, v, scale=scale, enable_gqa=kv_heads != args.heads), layers)}
            for label, spec in patterns.items():
                pattern = parse_pattern(spec)
                single = simplify(pattern, lk)
                fns["engine", label] = in_turn(lambda k, v, q=q, p=pattern: (
                    plan.cache_clear(), chunk_mask.kept.cache_clear(), attention(q, k, v, p)), layers)
                fns["masked", label] = in_turn(lambda k, v, q=q, p=single: (
                    chunk_mask.kept.cache_clear(), masked_attention(q, k, v, p, scale=scale, causal=True)), repeated)
            times = rounds(fns, device, args.repeats, args.slow, args.turn_s)
            best = {key: min(t[1:] or t) for key, t in times.items()}
            for label, spec in patterns.items():
                row = {"pattern": label, "dtype": dtype_name, "lq": lq, "lk": lk, "heads": args.heads,
                       "kv_heads": kv_heads, "layers": args.decode_layers,
                       "backend": backend_for(parse_pattern(spec), args.heads, lq, lk, True, kernel_device(device)),
                       "dense_s": best["dense"], "sdpa_s": best["sdpa"], "engine_s": best["engine", label],
                       "masked_s": best["masked", label]}
                rows.append(row)
                print(f"{dtype_name:8} Lk {lk:6} Lq {lq:3} {label:46} {row['backend']:12} engine "
                      f"{row['engine_s'] * 1e3:7.2f} ms  masked {row['masked_s'] * 1e3:7.2f}"
                      f"  dense {row['dense_s'] * 1e3:7.2f}  SDPA {row['sdpa_s'] * 1e3:7.2f}"
                      f"  masked / engine {row['masked_s'] / row['engine_s']:5.1f}",
                      flush=True)
    return rows


def bench_grouped(args, device: torch.device) -> list[dict]:
    """Grouped-query prefills (Lq = Lk = n, causal unless --non-causal): the engine over --grouped
    key/value heads for --heads query heads against the same call over them repeated before the
    clock (equal heads, what a plan that cannot take grouped heads would cost at best), taking
    turns per pattern and dtype; and each call's peak extra memory."""
    patterns = {LABELS[name]: PATTERNS[name] for name in args.patterns}
    causal, kv_heads = not args.non_causal, args.grouped
    rows = []
    for dtype_name, n in itertools.product(args.dtypes, args.n):
        q = inputs(n, args.heads, args.dim, DTYPES[dtype_name], device)[0]
        k, v = inputs(n, kv_heads, args.dim, DTYPES[dtype_name], device, seed=1)[1:]
        kv = {"grouped": (k, v), "repeated": tuple(x.repeat_interleave(args.heads // kv_heads, dim=1) for x in (k, v))}
        fns = {(kind, label): lambda k=k, v=v, p=parse_pattern(spec): attention(q, k, v, p, causal=causal)
               for label, spec in patterns.items() for kind, (k, v) in kv.items()}
        times = rounds(fns, device, args.repeats, args.slow, args.turn_s)
        best = {key: min(t[1:] or t) for key, t in times.items()}
        for label in patterns:
            peaks = {}
            for kind in kv:
                with PeakMemory(device) as mem:
                    fns[kind, label]()
                peaks[kind] = mem.peak_bytes
            row = {"pattern": label, "dtype": dtype_name, "n": n, "causal": causal, "heads": args.heads,
                   "kv_heads": kv_heads, "dim": args.dim, "grouped_s": best["grouped", label],
                   "repeated_s": best["repeated", label], "grouped_peak_bytes": peaks["grouped"],
                   "repeated_peak_bytes": peaks["repeated"]}
            rows.append(row)
            print(f"{dtype_name:8} n {n:6} {label:46} grouped {row['grouped_s'] * 1e3:8.1f} ms  repeated "
                  f"{row['repeated_s'] * 1e3:8.1f}  grouped / repeated {row['grouped_s'] / row['repeated_s']:5.2f}  "
                  f"peak MiB {peaks['grouped'] / 2**20:7.1f} / {peaks['repeated'] / 2**20:7.1f}", flush=True)
    return rows


def bench_small(args, device: torch.device) -> list[dict]:
    """Small square problems (n in --small-n, causal and not): each pattern's structured plan
    against the masked kernel's, the two the planner chooses between (planner.SMALL_KEYS), and
    dense SDPA; `backend` is the planner's choice."""
    rows = []
    for n, causal in itertools.product(args.small_n, (True, False)):
        q, k, v = inputs(n, args.heads, args.dim, torch.float32, device)
        fns = {"dense": lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)}
        for label, spec in SMALL_PATTERNS.items():
            single = simplify(parse_pattern(spec), n)
            for kind, chosen in (("structured", structured_plan(single, n, causal, kernel_device(device))),
                                 ("masked", masked_plan(single, n, n, causal))):
                if chosen is not None:  # None: no structured kernel
                    fns[kind, label] = lambda q=q, k=k, v=v, p=chosen: p(q, k, v, args.dim ** -0.5)
        times = rounds(fns, device, args.repeats, args.slow, args.turn_s)
        best = {key: min(t[1:] or t) for key, t in times.items()}
        for label, spec in SMALL_PATTERNS.items():
            row = {"pattern": label, "n": n, "causal": causal, "heads": args.heads, "dim": args.dim,
                   "backend": plan(simplify(parse_pattern(spec), n), n, n, causal, kernel_device(device)).backend,
                   "dense_s": best["dense"], "structured_s": best.get(("structured", label)),
                   "masked_s": best["masked", label]}
            rows.append(row)
            structured = fmt(row["structured_s"] and row["structured_s"] * 1e3)
            ratio = fmt(row["structured_s"] and row["masked_s"] / row["structured_s"], ".2f")
            print(f"n {n:4} {'causal' if causal else 'non-causal':10} {label:44} {row['backend']:18} structured "
                  f"{structured:>7} ms  masked {row['masked_s'] * 1e3:7.3f}  dense {row['dense_s'] * 1e3:7.3f}"
                  f"  masked / structured {ratio:>5}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    labels = list(dict.fromkeys(r["pattern"] for r in rows))
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3.0), squeeze=False)
    for ax, label in zip(axes[0], labels):
        sel = [r for r in rows if r["pattern"] == label and r["dtype"] == "float32"] or \
              [r for r in rows if r["pattern"] == label]
        for key, name, style in (("dense_s", "dense SDPA", "k--"), ("masked_s", "masked SDPA", "c:"),
                                 ("flex_s", "FlexAttention", "r-s"), ("engine_s", "engine", "b-o")):
            pts = [(r["n"], r[key]) for r in sel if key in r]
            if pts:
                ax.loglog(*zip(*pts), style, label=name, markersize=4)
        ns = sorted({r["n"] for r in sel})
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(ns, [f"{n // 1024}k" for n in ns])
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("n", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("seconds", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def cpu_model() -> str | None:
    """The CPU's model name (Linux): the same torch version runs at other speeds, and computes half
    precision natively or not (`cpu_native_half`), on another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--patterns", nargs="+", choices=list(PATTERNS), default=ISSUE_PATTERNS)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32"])
    p.add_argument("--non-causal", action="store_true",
                   help="the table without causality (dense SDPA, the masks and the engine alike)")
    p.add_argument("--bf16-n", type=int, default=16384, help="n of the bfloat16 rows (0: none)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slow", type=float, default=4.0, help="time calls slower than this once")
    p.add_argument("--turn-s", type=float, default=0.3, help="seconds a short call repeats in its turn of a round")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--flex-n", type=int, nargs="*", default=[4096, 16384], help="n at which FlexAttention runs")
    p.add_argument("--flex-dtypes", nargs="+", default=["float32"])
    p.add_argument("--flex-budget", type=float, default=math.inf,
                   help="seconds since start after which FlexAttention runs are skipped (and said so)")
    p.add_argument("--masked-max-n", type=int, default=16384)
    p.add_argument("--masked-max-bytes", type=int, default=1 << 30)
    p.add_argument("--memory-n", type=int, default=131072, help="n of the peak-memory row (0: skip)")
    p.add_argument("--scaling-n", type=int, nargs="*", default=[16384, 32768, 65536])
    p.add_argument("--first-call-n", type=int, default=12289, help="a shape not used elsewhere (0: skip)")
    p.add_argument("--tiles", action="store_true", help="only the band tile-size sweep at the first --n")
    p.add_argument("--decode", action="store_true", help="only few query rows over long keys (--decode-lq, --decode-lk)")
    p.add_argument("--decode-lq", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--decode-lk", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--decode-kv-heads", type=int, default=None, help="key/value heads of the decode rows (default: --heads)")
    p.add_argument("--decode-layers", type=int, default=1,
                   help="layers' keys and values the decode rows' calls take in turn (default: one, kept in cache)")
    p.add_argument("--grouped", type=int, default=None, metavar="KV_HEADS",
                   help="only grouped-query prefills over this many key/value heads, against them repeated")
    p.add_argument("--small", action="store_true", help="only small problems, structured against masked (--small-n)")
    p.add_argument("--small-n", type=int, nargs="+", default=[32, 64, 128, 192, 256])
    p.add_argument("--out", type=Path, default=Path("bench/results/kernels.json"))
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "cpu": cpu_model(),
            "cpu_native_half": [str(dt) for dt in (torch.bfloat16, torch.float16) if cpu_native_half(dt)],
            "keeps_freed_memory": KEEPS_FREED_MEMORY,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "command": "python -m bench.kernels " + " ".join(argv or __import__("sys").argv[1:])}
    if args.tiles:
        args.out.write_text(json.dumps({"meta": meta, "tiles": bench_tiles(args, device)}, indent=1))
        return
    if args.decode:
        args.out.write_text(json.dumps({"meta": meta, "decode": bench_decode(args, device)}, indent=1))
        return
    if args.small:
        args.out.write_text(json.dumps({"meta": meta, "small": bench_small(args, device)}, indent=1))
        return
    if args.grouped:
        args.out.write_text(json.dumps({"meta": meta, "grouped": bench_grouped(args, device)}, indent=1))
        return
    print(HEADER)
    rows = bench_table(args, device)
    if args.bf16_n and "bfloat16" not in args.dtypes:
        bf_args = argparse.Namespace(**{**vars(args), "n": [args.bf16_n], "dtypes": ["bfloat16"]})
        rows += bench_table(bf_args, device)
    result = {"meta": meta, "rows": rows}
    if args.bf16_n:
        result["bf16_over_fp32"] = bench_dtype_ratio(args, device)
        print("bfloat16 / float32 engine time:", json.dumps(result["bf16_over_fp32"]))
    if args.scaling_n:
        result["scaling"] = bench_scaling(args, device)
        print("sliding_window(256) scaling:", json.dumps(result["scaling"]))
    if args.memory_n:
        result["memory"] = bench_memory(args, device)
        m = result["memory"]
        print(f"peak memory, {m['pattern']} n={m['n']} one head: {m['peak_bytes'] / 2**20:.1f} MiB "
              f"(a dense float32 score matrix: {m['dense_scores_bytes'] / 2**30:.0f} GiB)")
    if args.first_call_n:
        result["first_call"] = bench_first_call(args, device)
        print("first call for a new shape:", json.dumps(result["first_call"]))
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    png = args.plot or args.out.with_suffix(".png")
    plot(rows, png)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
