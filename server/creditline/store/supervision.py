"""Closes stale sessions: no request within their supervision time (Diameter Tcc).

Every process sweeps every partition; the charging script closes a session only if it is
still open and past its deadline, so two processes never close one twice. Deadlines live
in Redis, so a restart loses none. Each pass closes at most `batch` sessions per
partition, so one pass is bounded whatever the backlog.
"""

from __future__ import annotations

import random

from creditline.store.store import Store
from creditline.store.sweep import PeriodicSweep


class Supervisor(PeriodicSweep):
    name = "supervision"

    def __init__(self, store: Store, interval_s: float, batch: int) -> None:
        super().__init__(interval_s)
        self._store = store
        self._batch = batch
        self.closed = 0

    async def sweep_once(self) -> int:
        """One pass over every partition; returns the sessions this pass closed."""
        partitions = list(range(self._store.config.partitions))
        random.shuffle(partitions)  # processes sweeping together start in different places
        closed = 0
        for partition in partitions:
            now_ms = self._store.clock.now_ms()
            for account_id, session_id in await self._store.due_sessions(
                    partition, now_ms, self._batch):
                if await self._store.close_if_stale(account_id, session_id, now_ms):
                    closed += 1
                    # counted as it happens, not at the pass's end: a pass over many
                    # partitions takes a while, and the metric reads this count
                    self.closed += 1
        return closed
