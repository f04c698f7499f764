"""Rating kernels: ratings per second, compiled vs pure, and the cost of one call.

    python bench/rating_bench.py [--count 1000000] [--pure-count 1000000] [--seed 1]

The ratings are mixed: schedules built by the BandedRater from a plan with peak /
off-peak bands (time, 60/60, 30/6 and 1/1 increments, calls starting at many times of
the week) and tiers by usage (volume, 1 KiB and 1 MiB steps), with usages drawn so
that most cross a band or a tier boundary. The same ratings go through
`cost_batch` of both implementations, whose results must be identical. With
--pure-count below --count, the pure figure comes from the first --pure-count ratings
(rate per second, not scaled further) and the output says so.

Goals (issue 3): compiled at least 30x the pure path on the batch; one call from Python
at most 1 us. Also the server's own rating work per request (`script_blocks`: tariffs,
rate tables, the charging script's arguments) for an Update with a voice and a data
rating group, on the shipped plans. Prints the figures and writes
bench/results/rating.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
import timeit
import tomllib
from array import array
from pathlib import Path

from creditline.api.messages import block_plan
from creditline.charging.kernels import Kernels, KernelSchedule, compiled_kernels, pure_kernels
from creditline.charging.rating import BandedRater, PriceSchedule, Tariff, load_plan, parse_plan
from creditline.settings import DEFAULT_PLAN_PATH
from creditline.v1 import charging_pb2 as pb

RESULTS = Path(__file__).resolve().parent / "results" / "rating.json"
SHIPPED_PLANS = DEFAULT_PLAN_PATH.parent
KIB, MIB = 1024, 1024 * 1024
# Monday 2026-11-30 00:00 in Paris; event times spread over that week
WEEK_START_UNIX_MS = 1_764_457_200_000
WEEK_MS = 7 * 24 * 3600 * 1000

PLAN = """
[plan]
time_zone = "Europe/Paris"

[[tariff]]
rating_group = 100
unit = "time"
connect_fee_micros = 100_000
first_increment_units = 60
first_increment_price_micros = 600_000
next_increment_units = 60
next_increment_price_micros = 300_000
[[tariff.band]]
name = "peak"
days = ["mon", "tue", "wed", "thu", "fri"]
start = "08:00"
end = "20:00"
first_increment_price_micros = 900_000
next_increment_price_micros = 450_000
[[tariff.band]]
name = "evening"
days = ["mon", "tue", "wed", "thu", "fri"]
start = "20:00"
end = "23:00"
next_increment_price_micros = 350_000

[[tariff]]
rating_group = 101
unit = "time"
first_increment_units = 30
first_increment_price_micros = 50_000
next_increment_units = 6
next_increment_price_micros = 10_000
[[tariff.band]]
name = "peak"
start = "07:00"
end = "19:00"
next_increment_price_micros = 15_000
[[tariff.tier]]
from_units = 3_630
next_increment_price_micros = 5_000
band_prices_micros = { peak = 8_000 }

[[tariff]]
rating_group = 102
unit = "time"
first_increment_units = 1
first_increment_price_micros = 2_000
next_increment_units = 1
next_increment_price_micros = 1_000
[[tariff.band]]
name = "day"
start = "06:00"
end = "22:00"
next_increment_price_micros = 1_500

[[tariff]]
rating_group = 10
unit = "volume"
first_increment_units = 1024
first_increment_price_micros = 1_000
next_increment_units = 1024
next_increment_price_micros = 1_000
[[tariff.tier]]
from_units = 1_073_741_824
next_increment_price_micros = 500
[[tariff.tier]]
from_units = 5_368_709_120
next_increment_price_micros = 100

[[tariff]]
rating_group = 20
unit = "volume"
first_increment_units = 1_048_576
first_increment_price_micros = 2_000_000
next_increment_units = 1_048_576
next_increment_price_micros = 2_000_000
[[tariff.tier]]
from_units = 104_857_600
next_increment_price_micros = 1_000_000
"""


def build_schedules(rng: random.Random, per_tariff: int) -> list[PriceSchedule]:
    plan = parse_plan(tomllib.loads(PLAN), "bench plan")
    rater = BandedRater()
    schedules: list[PriceSchedule] = []
    for tariff in plan.tariffs.values():
        for _ in range(per_tariff):
            event_ms = WEEK_START_UNIX_MS + rng.randrange(WEEK_MS)
            schedules.append(rater.schedule(tariff, event_ms, _period_used(rng, tariff)))
    return schedules


def _period_used(rng: random.Random, tariff: Tariff) -> int:
    if not tariff.tiers:
        return 0
    # near a tier boundary, so that usages cross it
    boundary = rng.choice(tariff.tiers).from_units
    return max(0, boundary - rng.randrange(1, 64) * tariff.next_increment_units)


def _segment_ends(schedule: PriceSchedule) -> list[int]:
    return [s.end_units for s in schedule.segments if s.end_units is not None]


def build_ratings(rng: random.Random, schedules: list[PriceSchedule],
                  count: int) -> tuple[array[int], array[int], array[int]]:
    """Usage i on schedule index[i], from from_units[i]: mostly straddling a segment end
    (a band or tier change), some from zero."""
    ends = [_segment_ends(s) or [60] for s in schedules]
    index, start, units = array("q"), array("q"), array("q")
    for _ in range(count):
        which = rng.randrange(len(schedules))
        boundary = rng.choice(ends[which])
        before = rng.randrange(0, 1 + min(boundary, 4 * MIB))
        first = 0 if rng.random() < 0.2 else boundary - before
        index.append(which)
        start.append(first)
        units.append(before + rng.randrange(0, 1 + min(boundary, 4 * MIB)))
    return index, start, units


def batch_rate(kernels: Kernels, schedules: list[PriceSchedule], index: array[int],
               start: array[int], units: array[int], repeat: int) -> tuple[float, array[int]]:
    table: list[KernelSchedule] = [kernels.schedule(s) for s in schedules]
    best_s, result = float("inf"), array("q")
    for _ in range(repeat):
        began = time.perf_counter()
        result = kernels.module.cost_batch(table, index, start, units)
        best_s = min(best_s, time.perf_counter() - began)
    return len(index) / best_s, result


def single_call_ns(kernels: Kernels, schedule: PriceSchedule, start: int,
                   units: int) -> dict[str, float]:
    kernel = kernels.schedule(schedule)
    figures = {}
    for name, statement in (("cost", lambda: kernel.cost(start, units)),
                            ("affordable", lambda: kernel.affordable(start, 10**7, 10**9))):
        timer = timeit.Timer(statement)
        loops, _ = timer.autorange()
        best = min(timer.repeat(repeat=5, number=loops)) / loops
        figures[name] = best * 1e9
    return figures


def request_rating_us(plan_name: str, rng: random.Random, kernels: Kernels) -> float:
    """Server-side rating work of one Update (voice RG 100: 60 s used, 300 s asked; data
    RG 10: 512 KiB used, 1 MiB asked) at event times spread over a week, in us."""
    blocks_of = block_plan(kernels, load_plan(SHIPPED_PLANS / plan_name), BandedRater())
    blocks = [
        pb.RatingGroupRequest(rating_group=100, requested=pb.Units(time_s=300),
                              used=pb.Units(time_s=60)),
        pb.RatingGroupRequest(rating_group=10, requested=pb.Units(total_octets=MIB),
                              used=pb.Units(total_octets=512 * KIB)),
    ]
    times = [WEEK_START_UNIX_MS + rng.randrange(WEEK_MS) for _ in range(10_000)]
    best_s = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        for event_ms in times:
            blocks_of.script_blocks(blocks, event_ms, default_grant=True)
        best_s = min(best_s, time.perf_counter() - began)
    return best_s / len(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--pure-count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    schedules = build_schedules(rng, per_tariff=64)
    index, start, units = build_ratings(rng, schedules, args.count)
    compiled, pure = compiled_kernels(), pure_kernels()

    compiled_rate, compiled_costs = batch_rate(compiled, schedules, index, start, units, 5)
    pure_count = min(args.pure_count, args.count)
    pure_rate, pure_costs = batch_rate(pure, schedules, index[:pure_count],
                                       start[:pure_count], units[:pure_count], 1)
    if compiled_costs[:pure_count] != pure_costs:
        raise SystemExit("compiled and pure cost_batch disagree: the bench is void")

    # a call from Python: a banded schedule with many segments, a usage crossing several
    longest = max(schedules, key=lambda s: len(s.segments))
    ends = _segment_ends(longest)
    single = {name: single_call_ns(kernels, longest, ends[0] - 30, ends[2] - ends[0] + 60)
              for name, kernels in (("compiled", compiled), ("pure", pure))}

    per_request_us = {f"{name} {kernels.implementation}": round(
        request_rating_us(name, rng, kernels), 2)
        for name in ("default.toml", "bands-and-tiers.toml") for kernels in (compiled, pure)}

    segments = [len(s.segments) for s in schedules]
    report = {
        "ratings": args.count,
        "pure_ratings": pure_count,
        "schedules": len(schedules),
        "segments_per_schedule_mean": sum(segments) / len(segments),
        "segments_per_schedule_max": max(segments),
        "compiled_ratings_per_s": round(compiled_rate),
        "pure_ratings_per_s": round(pure_rate),
        "speedup": round(compiled_rate / pure_rate, 1),
        "single_call_ns": {k: {n: round(v, 1) for n, v in f.items()} for k, f in single.items()},
        "single_call_segments": len(longest.segments),
        "server_rating_us_per_request": per_request_us,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(f"ratings: {args.count:,} mixed over {len(schedules)} schedules "
          f"({report['segments_per_schedule_mean']:.1f} segments mean, "
          f"{report['segments_per_schedule_max']} max)")
    print(f"compiled cost_batch: {compiled_rate:,.0f} ratings/s (best of 5)")
    scaled = "" if pure_count == args.count else f" (measured on the first {pure_count:,})"
    print(f"pure     cost_batch: {pure_rate:,.0f} ratings/s{scaled}")
    print(f"speedup: {report['speedup']}x (goal: at least 30x)")
    for name, figures in single.items():
        print(f"one call from Python, {name}: cost {figures['cost']:.0f} ns, "
              f"affordable {figures['affordable']:.0f} ns "
              f"({len(longest.segments)} segments; goal for compiled: at most 1000 ns)")
    for name, us in per_request_us.items():
        print(f"server rating work per two-rating-group Update, {name}: {us:.1f} us")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
