"""Load curves of the service over real HTTP on this machine, with `service.loadtest`.

    .venv/bin/python -m bench.load_curve [--seconds 8] [--out bench/results/load_curve]

Two services run side by side on loopback ports: one with the default batching, one with
ATTN_MAX_BATCH_SIZE=1; the load runs against one at a time, taking turns.

1. Batching on vs off: tiny requests (B=1, H=4, n=64, D=32, float32, b64, dense), closed loop
   at concurrency 32, `--rounds` runs each; reports the median runs and their throughput ratio.
2. Latency against offered load: open-loop Poisson arrivals of the same requests at rates set
   as fractions of the batching-on capacity measured in 1, against both services, showing
   where queueing starts (the p50/p99 knee) and where throughput stops following the offer.

Writes OUT/<run>/report.{json,md} and latency.png for every run, OUT/summary.json, and
bench/load_curve.png (the figure the README shows). Load generator and service share the
machine's cores, so the figures are this machine's, client included; the summary records the
load average before and after, since anything else running on the machine moves them.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import ExitStack
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from service.loadtest import LoadConfig, RequestShape, Scenario, local_service, run, write

TINY = Scenario(requests=[RequestShape(heads=4, q_len=64, head_dim=32)])
LOAD_FRACTIONS = (0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0, 1.2)
SERVICES = {"batching on": {}, "batching off": {"max_batch_size": 1}}
CLOSED_KEYS = ("throughput_rps", "latency_ms", "server_ms", "batch_sizes", "by_status")
OPEN_KEYS = ("rate", "offered_rps", "throughput_rps", "latency_ms", "send_lag_ms", "by_status", "batch_sizes")


def pick(report: dict, keys: tuple[str, ...]) -> dict:
    return {key: report[key] for key in keys}


def slug(name: str) -> str:
    return name.replace(" ", "_")


def measure(url: str, out: Path, **load) -> dict:
    cfg = LoadConfig(url=url, scenario=TINY, check_fraction=0.1, progress=False, **load)
    report = write(run(cfg), out)
    assert report["mismatches"] == 0, f"{out}: {report['mismatches']} answers differ from the local engine"
    print(
        f"{out.name:>24}: offered {report['offered_rps']:8.1f}/s  200s {report['throughput_rps']:8.1f}/s  "
        f"p50 {report['latency_ms']['p50']} ms  p99 {report['latency_ms']['p99']} ms  {report['by_status']}",
        flush=True,
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load_curve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=3, help="closed-loop runs per service, taken in turns")
    parser.add_argument("--out", type=Path, default=Path("bench/results/load_curve"))
    parser.add_argument("--png", type=Path, default=Path("bench/load_curve.png"))
    args = parser.parse_args()

    summary: dict = {"machine": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}, "closed_c32": {}}
    with ExitStack() as services:
        urls = {
            name: services.enter_context(local_service(log_level="warning", **settings))
            for name, settings in SERVICES.items()
        }
        # The services take turns, run by run, so that a change in the machine's load while the
        # benchmark runs falls on both alike; the closed loop reports each one's median round.
        closed: dict[str, list[dict]] = {name: [] for name in urls}
        for round_ in range(args.rounds):
            for name, url in urls.items():
                out = args.out / f"{slug(name)}_c32_round{round_}"
                closed[name].append(measure(url, out, concurrency=32, duration_s=args.seconds))
        for name, reports in closed.items():
            median = sorted(reports, key=lambda r: r["throughput_rps"])[len(reports) // 2]
            summary["closed_c32"][name] = pick(median, CLOSED_KEYS) | {
                "throughput_rps_rounds": [r["throughput_rps"] for r in reports]
            }
        capacity = summary["closed_c32"]["batching on"]["throughput_rps"]
        summary["open"] = {name: [] for name in urls}
        for rate in (round(capacity * fraction, 1) for fraction in LOAD_FRACTIONS):
            for name, url in urls.items():
                report = measure(url, args.out / f"{slug(name)}_rate{rate:g}", rate=rate, duration_s=args.seconds)
                summary["open"][name].append(pick(report, OPEN_KEYS))
    on, off = (summary["closed_c32"][name]["throughput_rps"] for name in SERVICES)
    summary["batching_speedup"] = round(on / off, 2)
    summary["machine"]["loadavg_after"] = os.getloadavg()
    print(f"batching on / off throughput at concurrency 32: {on:.1f} / {off:.1f} = {on / off:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    machine = summary["machine"]
    title = (
        f"Tiny requests (B=1, H=4, n=64, D=32) over HTTP: {machine['cpus']} CPU cores, "
        f"ATTN_DEVICE={os.environ.get('ATTN_DEVICE', 'auto')}, load average {machine['loadavg_before'][0]:.1f} at start"
    )
    plot(summary, args.png, title)


def plot(summary: dict, path: Path, title: str) -> None:
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, points), color in zip(summary["open"].items(), ("tab:blue", "tab:orange")):
        offered = [p["offered_rps"] for p in points]
        ax_lat.plot(offered, [p["latency_ms"]["p50"] for p in points], "o-", color=color, label=f"{name} p50")
        ax_lat.plot(offered, [p["latency_ms"]["p99"] for p in points], "s--", color=color, label=f"{name} p99")
        ax_thr.plot(offered, [p["throughput_rps"] for p in points], "o-", color=color, label=name)
    top = max(p["offered_rps"] for points in summary["open"].values() for p in points)
    ax_thr.plot([0, top], [0, top], "k:", label="offered")
    ax_lat.set(xlabel="offered load (req/s, Poisson)", ylabel="latency (ms, log)", yscale="log")
    ax_lat.set_title("Latency against offered load")
    ax_thr.set(xlabel="offered load (req/s, Poisson)", ylabel="answered 200s (req/s)", title="Throughput")
    for ax in (ax_lat, ax_thr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
