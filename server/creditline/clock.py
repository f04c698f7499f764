"""The server's clock: the machine's, moved by the setting clock_offset_s.

Every instant the server decides by (event times, deadlines, bucket expiries, billing
periods, renewals) comes from one Clock, so that a trial can move the server through a
period boundary by its settings alone, without waiting and without patching code. In
production the offset is 0 (the server warns at start otherwise).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Clock:
    offset_ms: int = 0

    def now_ms(self) -> int:
        """Now, unix ms."""
        return time.time_ns() // 1_000_000 + self.offset_ms
