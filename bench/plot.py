"""The PNG of a benchmark run: throughput per scenario, latency per offered load, and the
server's memory over the soak. Also re-plots a saved run:

    python -m bench.plot bench/results/<timestamp>.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt

GOAL_P99_MS = 5.0


def _throughput(ax: Any, phases: dict[str, Any], figures: dict[str, Any]) -> None:
    names = ["baseline_saturation", "creditline_saturation"]
    names += [n for n in ("baseline_stream_saturation", "creditline_stream_saturation")
              if n in phases]
    names += sorted((n for n in phases if n.startswith(("creditline_open_", "baseline_open_"))),
                    key=lambda n: (n.startswith("baseline"), phases[n]["offered_rps"]))
    labels, achieved, offered = [], [], []
    for name in names:
        labels.append(name.replace("_stream", "\nstream").replace("_saturation", "\nsaturation")
                      .replace("_open_", "\nopen "))
        achieved.append(phases[name]["throughput_rps"])
        offered.append(phases[name]["offered_rps"])
    colors = ["#888888" if n.startswith("baseline") else "#1f77b4" for n in names]
    bars = ax.bar(range(len(names)), achieved, color=colors)
    for bar, value, rate in zip(bars, achieved, offered, strict=True):
        text = f"{value:.0f}" + (f"\n(of {rate:.0f})" if rate else "")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, value), ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), labels, fontsize=7)
    ax.set_ylabel("requests/s answered")
    rounds = ", ".join(f"{r:.2f}" for r in figures.get("ratio_to_baseline_per_round", []))
    cpu_ratio = figures.get("cpu_normalised_ratio_to_baseline")
    stream = figures.get("stream")
    ax.set_title(f"Throughput: creditline / baseline = {figures['ratio_to_baseline']:.2f} "
                 f"(rounds {rounds})" + (f"\nper server CPU second: {cpu_ratio:.2f}"
                                         if cpu_ratio else "")
                 + (f"\nstream / unary (creditline): {stream['ratio_to_creditline_unary']:.2f}"
                    if stream else ""), fontsize=10)


def _latency(ax: Any, phases: dict[str, Any]) -> None:
    open_phases = sorted((p for n, p in phases.items() if n.startswith("creditline_open_")),
                         key=lambda p: p["offered_rps"])
    rates = [p["offered_rps"] for p in open_phases]
    for key, style in (("p50_ms", "o-"), ("p90_ms", "s-"), ("p99_ms", "^-")):
        ax.plot(rates, [p["latency"]["all"][key] for p in open_phases], style,
                label=f"creditline {key[:-3]}")
    due = [(p["latency_from_due"] or {}).get("p99_ms", 0.0) for p in open_phases]
    ax.plot(rates, due, "^:", color="#d62728", label="creditline p99 from due time")
    baseline = phases.get("baseline_open_0.5")
    if baseline:
        for key, marker in (("p50_ms", "o"), ("p90_ms", "s"), ("p99_ms", "^")):
            ax.plot([baseline["offered_rps"]], [baseline["latency"]["all"][key]], marker,
                    color="#888888", label=f"baseline {key[:-3]}")
    ax.axhline(GOAL_P99_MS, color="#d62728", linewidth=0.8, linestyle="--",
               label="goal: p99 5 ms at half saturation")
    ax.set_xlabel("offered load (requests/s, open loop)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Latency per offered load")
    ax.legend(fontsize=7)


def _soak(ax: Any, soak: dict[str, Any]) -> None:
    series = soak.get("rss_mib_series") or []
    if series:
        ax.plot([t for t, _ in series], [m for _, m in series], "-")
    ax.set_xlabel("seconds into the soak window")
    ax.set_ylabel("server RSS (MiB)")
    growth = soak.get("rss_growth_percent")
    ax.set_title("Server memory over the soak" + (f" ({growth:+.1f}%)" if series else
                                                  " (no soak)"))
    ax.set_ylim(bottom=0)


def plot(results: dict[str, Any], path: Path) -> Path:
    phases, figures = results["phases"], results["figures"]
    figure, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    _throughput(axes[0], phases, figures)
    _latency(axes[1], phases)
    _soak(axes[2], results.get("soak") or {})
    figure.suptitle(f"Creditline benchmark {results.get('started_at', '')}: "
                    f"{results['arguments']['processes']} driver processes, "
                    f"{results['machine']['cpu_count']} cores (shared)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


if __name__ == "__main__":
    source = Path(sys.argv[1])
    print(plot(json.loads(source.read_text()), source.with_suffix(".png")))
