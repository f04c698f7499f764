"""A latency histogram in the spirit of HdrHistogram: log-spaced buckets 1% wide from 1 us
to 100 s. Memory is fixed (BUCKET_COUNT integers) whatever the run length, histograms of
several driver processes merge by adding counts, and a percentile is exact to 1%."""

from __future__ import annotations

import math
from typing import Any

MIN_LATENCY_US = 1.0
MAX_LATENCY_US = 100_000_000.0  # 100 s: above any call deadline the driver sets
GROWTH = 1.01
_LOG_GROWTH = math.log(GROWTH)
BUCKET_COUNT = int(math.log(MAX_LATENCY_US / MIN_LATENCY_US) / _LOG_GROWTH) + 2


class LatencyHistogram:
    __slots__ = ("count", "counts", "max_us", "min_us", "total_us")

    def __init__(self) -> None:
        self.counts = [0] * BUCKET_COUNT
        self.count = 0
        self.total_us = 0.0
        self.max_us = 0.0
        self.min_us = math.inf

    def record_s(self, latency_s: float) -> None:
        latency_us = latency_s * 1e6
        if latency_us <= MIN_LATENCY_US:
            index = 0
        else:
            index = min(int(math.log(latency_us) / _LOG_GROWTH) + 1, BUCKET_COUNT - 1)
        self.counts[index] += 1
        self.count += 1
        self.total_us += latency_us
        self.max_us = max(self.max_us, latency_us)
        self.min_us = min(self.min_us, latency_us)

    def merge(self, other: LatencyHistogram) -> None:
        for index, count in enumerate(other.counts):
            if count:
                self.counts[index] += count
        self.count += other.count
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)
        self.min_us = min(self.min_us, other.min_us)

    def percentile_ms(self, percent: float) -> float:
        """The upper edge of the bucket holding the percentile (never below the truth by
        more than 1%), capped at the largest latency seen. 0 when nothing was recorded."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(self.count * percent / 100.0))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                upper_us = MIN_LATENCY_US * GROWTH ** index
                return min(upper_us, self.max_us) / 1000.0
        return self.max_us / 1000.0

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean_ms": round(self.total_us / self.count / 1000.0, 4) if self.count else 0.0,
            "p50_ms": round(self.percentile_ms(50), 4),
            "p90_ms": round(self.percentile_ms(90), 4),
            "p99_ms": round(self.percentile_ms(99), 4),
            "p999_ms": round(self.percentile_ms(99.9), 4),
            "max_ms": round(self.max_us / 1000.0, 4),
        }
