"""A sweep every process runs over every partition, every interval, until stopped: the
supervision of stale sessions, the renewals. A pass that fails (Redis away) is logged and
the next one runs; what a pass does is one atomic script per item, so a pass cut short
loses nothing."""

from __future__ import annotations

import abc
import asyncio
import logging

from redis.exceptions import RedisError

log = logging.getLogger(__name__)
# How long stopping waits for a pass under way.
STOP_TIMEOUT_S = 10.0


class PeriodicSweep(abc.ABC):
    name = "sweep"  # the task's, and the log's

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @abc.abstractmethod
    async def sweep_once(self) -> int:
        """One pass over every partition; returns how many items it did."""

    async def sweep_logged(self) -> int:
        """One pass, said in the log when it did something."""
        done = await self.sweep_once()
        if done:
            log.info("%s: %d done", self.name, done)
        return done

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        # the flag too: a cancel can surface as a Redis error, which the loop survives
        self._stopping = True
        if self._task:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=STOP_TIMEOUT_S)

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._interval_s)
            try:
                await self.sweep_logged()
            except (RedisError, OSError) as error:
                log.warning("%s failed: %r", self.name, error)
