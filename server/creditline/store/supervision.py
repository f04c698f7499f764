"""Closes stale sessions: no request within their supervision time (Diameter Tcc).

Every process sweeps every partition; the charging script closes a session only if it is
still open and past its deadline, so two processes never close one twice. Deadlines live
in Redis, so a restart loses none. Each pass closes at most `batch` sessions per
partition, so one pass is bounded whatever the backlog.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from redis.exceptions import RedisError

from creditline.store.store import Store

log = logging.getLogger(__name__)
# How long stopping waits for a sweep under way.
STOP_TIMEOUT_S = 10.0


class Supervisor:
    def __init__(self, store: Store, interval_s: float, batch: int) -> None:
        self._store = store
        self._interval_s = interval_s
        self._batch = batch
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.closed = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="supervision")

    async def stop(self) -> None:
        # the flag too: a cancel can surface as a Redis error, which the loop survives
        self._stopping = True
        if self._task:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=STOP_TIMEOUT_S)

    async def sweep_once(self) -> int:
        """One pass over every partition; returns the sessions this pass closed."""
        partitions = list(range(self._store.config.partitions))
        random.shuffle(partitions)  # processes sweeping together start in different places
        closed = 0
        for partition in partitions:
            now_ms = int(time.time() * 1000)
            for account_id, session_id in await self._store.due_sessions(
                    partition, now_ms, self._batch):
                if await self._store.close_if_stale(account_id, session_id, now_ms):
                    closed += 1
        self.closed += closed
        return closed

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._interval_s)
            try:
                closed = await self.sweep_once()
            except (RedisError, OSError) as error:
                log.warning("supervision sweep failed: %r", error)
                continue
            if closed:
                log.info("supervision closed %d stale sessions", closed)
