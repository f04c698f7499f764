"""Markdown tables of a saved run, for a README or a pull request:

    python -m bench.report bench/results/<timestamp>.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _phase_rows(phases: dict[str, Any]) -> list[str]:
    rows = ["| phase | offered req/s | answered req/s | p50 ms | p90 ms | p99 ms | errors | "
            "server CPU % | Redis CPU % | driver CPU % | others CPU % |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, phase in phases.items():
        latency, cpu = phase["latency"]["all"], phase["cpu"]
        offered = f"{phase['offered_rps']:.0f}" if phase["offered_rps"] else "closed loop"
        rows.append(
            f"| {name} | {offered} | {phase['throughput_rps']:.0f} | {latency['p50_ms']:.2f} | "
            f"{latency['p90_ms']:.2f} | {latency['p99_ms']:.2f} | {phase['errors']} | "
            f"{cpu['server_cpu_percent']:.0f} | {cpu['redis_cpu_percent']:.0f} | "
            f"{cpu['driver_cpu_percent']:.0f} | {cpu['others_cpu_percent']:.0f} |")
    return rows


def _figure_rows(results: dict[str, Any]) -> list[str]:
    figures, memory, soak = results["figures"], results["memory"], results.get("soak") or {}
    half = figures["half_saturation"]
    cpu_ms = figures["server_cpu_ms_per_request"]
    rows = [
        "| figure | value |", "|---|---|",
        f"| baseline saturation | {figures['baseline_rps']:.0f} req/s |",
        f"| creditline saturation | {figures['creditline_rps']:.0f} req/s |",
        f"| ratio creditline / baseline | {figures['ratio_to_baseline']:.2f} (rounds: "
        f"{', '.join(f'{r:.2f}' for r in figures['ratio_to_baseline_per_round'])}) |",
        f"| server CPU per request | baseline {cpu_ms['baseline']:.3f} ms, creditline "
        f"{cpu_ms['creditline']:.3f} ms (+ Redis {figures['redis_cpu_ms_per_request']:.3f} ms)"
        f" |",
        f"| ratio per server CPU second | {figures['cpu_normalised_ratio_to_baseline']}"
        + (" (**disagrees with the req/s ratio: others took CPU unevenly**)"
           if figures.get("ratios_disagree") else "") + " |",
        f"| half saturation: offered / answered | {half['offered_rps']:.0f} / "
        f"{half['achieved_rps']:.0f} req/s |",
        f"| half saturation: p50 / p90 / p99 | {half['p50_ms']:.2f} / {half['p90_ms']:.2f} / "
        f"{half['p99_ms']:.2f} ms (p99 from due time {half['p99_from_due_ms']:.2f} ms) |",
        f"| Redis round trips per request | {figures['round_trips_per_request']:.4f} |",
        f"| Redis memory per open session | {memory['bytes_per_open_session']:.0f} bytes "
        f"({memory['keys_per_open_session']:.2f} keys); a closed one retained: "
        f"{memory['bytes_per_closed_session_retained']:.0f} bytes |",
    ]
    floor = figures.get("round_trip_floor")
    if floor:
        rows += [
            f"| round-trip floor (baseline + one do-nothing EVALSHA) | {floor['rps']:.0f} req/s, "
            f"{floor['ratio_to_baseline']:.2f} of the baseline (rounds: "
            f"{', '.join(f'{r:.2f}' for r in floor['ratio_to_baseline_per_round'])}); server CPU "
            f"{floor['server_cpu_ms_per_request']:.3f} ms + Redis "
            f"{floor['redis_cpu_ms_per_request']:.3f} ms per request |",
            f"| creditline / round-trip floor | {floor['creditline_ratio_to_floor']:.2f} |",
        ]
    stream = figures.get("stream")
    if stream:
        stream_cpu = stream["server_cpu_ms_per_request"]
        stream_rounds = ", ".join(f"{r:.2f}" for r in stream[
            "ratio_to_creditline_unary_per_round"])
        rows += [
            f"| stream saturation: creditline / baseline | {stream['creditline_rps']:.0f} / "
            f"{stream['baseline_rps']:.0f} req/s (ratio {stream['ratio_to_baseline_stream']:.2f})"
            f" |",
            f"| stream / unary, creditline | {stream['ratio_to_creditline_unary']:.2f} "
            f"(rounds: {stream_rounds}); per server CPU second "
            f"{stream['cpu_normalised_ratio_to_creditline_unary']} |",
            f"| server CPU per request, stream | baseline {stream_cpu['baseline']:.3f} ms, "
            f"creditline {stream_cpu['creditline']:.3f} ms |",
        ]
    if soak.get("samples"):
        rows.append(
            f"| server RSS over a {soak['duration_s']:.0f} s soak | floor "
            f"{soak['rss_first_quarter_floor_mib']:.1f} -> "
            f"{soak['rss_last_quarter_floor_mib']:.1f} MiB ({soak['rss_growth_percent']:+.1f} "
            f"%), median {soak['rss_median_growth_percent']:+.1f} %, max "
            f"{soak['rss_max_mib']:.1f} MiB, slope {soak['rss_slope_mib_per_min']:+.2f} "
            f"MiB/min |")
    return rows


def report(results: dict[str, Any]) -> str:
    goals = results["figures"]["goals"]
    lines = [f"Run {results['started_at']}: `{results['command']}`, "
             f"{results['machine']['cpu_count']} cores, load average at start "
             f"{results['machine']['load_average_at_start']}.", ""]
    lines += _figure_rows(results)
    lines += ["", "| goal | met |", "|---|---|"]
    # None: not measured in this run (e.g. no soak with --soak-s 0)
    lines += [f"| {goal} | {'not measured' if met is None else 'yes' if met else 'no'} |"
              for goal, met in goals.items()]
    lines += ["", *_phase_rows(results["phases"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(report(json.loads(Path(sys.argv[1]).read_text())), end="")
