"""`creditline cdr export`: drains the CDR streams into a sink, at least once, loaded once.

Each partition's CDR stream has a consumer group. A batch is read (first what an earlier
run read but did not acknowledge, then new entries), written to the sink in one
transaction, and only then acknowledged and deleted from the stream. A crash between the
commit and the acknowledgement redelivers the batch; the sink skips the ids it holds.
The stream's length is therefore the backlog.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from redis import Redis
from redis.exceptions import ResponseError

from creditline.books.cdr import Cdr, Sink, cdr_from_stream
from creditline.store.store import cdrs_key, text

log = logging.getLogger(__name__)

GROUP = "cdr-exporter"
# Entries read per partition per round: bounds one sink transaction.
BATCH_SIZE = 1000
IDLE_BLOCK_MS = 1000


@dataclass
class ExportProgress:
    exported: int = 0
    backlog: int = 0



class Exporter:
    def __init__(self, redis: Redis, partitions: int, sink: Sink, consumer: str = "exporter",
                 batch_size: int = BATCH_SIZE) -> None:
        self._redis = redis
        self._partitions = partitions
        self._sink = sink
        self._consumer = consumer
        self._batch_size = batch_size
        self.progress = ExportProgress()
        for partition in range(partitions):
            try:
                redis.xgroup_create(cdrs_key(partition), GROUP, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    def _read(self, partition: int, pending: bool) -> list[tuple[str, dict[str, str]]]:
        # "0" re-reads what this consumer was given but never acknowledged; ">" is new.
        reply: Any = self._redis.xreadgroup(
            GROUP, self._consumer, {cdrs_key(partition): "0" if pending else ">"},
            count=self._batch_size)
        entries = reply[0][1] if reply else []
        return [(text(sid), {text(k): text(v) for k, v in fields.items()})
                for sid, fields in entries if fields]

    def export_partition(self, partition: int,
                         after_commit: Callable[[], None] | None = None) -> int:
        """One batch of one partition; returns how many CDRs it exported."""
        entries = self._read(partition, pending=True) or self._read(partition, pending=False)
        if not entries:
            return 0
        cdrs: list[Cdr] = [cdr_from_stream(partition, sid, f) for sid, f in entries]
        self._sink.write(cdrs)
        if after_commit:
            after_commit()  # the tests crash here, between commit and acknowledgement
        ids = [sid for sid, _ in entries]
        pipe = self._redis.pipeline(transaction=True)
        pipe.xack(cdrs_key(partition), GROUP, *ids)
        pipe.xdel(cdrs_key(partition), *ids)
        pipe.execute()
        self.progress.exported += len(cdrs)
        return len(cdrs)

    def backlog(self) -> int:
        pipe = self._redis.pipeline(transaction=False)
        for partition in range(self._partitions):
            pipe.xlen(cdrs_key(partition))
        return sum(pipe.execute())

    def drain(self) -> int:
        """Exports until every stream is empty; returns the CDRs exported."""
        total = 0
        while True:
            round_total = sum(self.export_partition(p) for p in range(self._partitions))
            total += round_total
            if round_total == 0:
                return total

    def run(self, follow: bool, report: TextIO | None = sys.stderr,
            report_every_s: float = 1.0) -> None:
        """Drains; with `follow`, keeps going beside the server (until stopped)."""
        started = last_report = time.monotonic()
        while True:
            exported = sum(self.export_partition(p) for p in range(self._partitions))
            now = time.monotonic()
            if report and now - last_report >= report_every_s:
                self._report(report, now - started)
                last_report = now
            if exported == 0:
                if not follow:
                    break
                time.sleep(IDLE_BLOCK_MS / 1000)
        if report:
            self._report(report, time.monotonic() - started)

    def _report(self, out: TextIO, elapsed_s: float) -> None:
        self.progress.backlog = self.backlog()
        rate = self.progress.exported / elapsed_s if elapsed_s > 0 else 0.0
        print(f"exported {self.progress.exported} CDRs ({rate:.0f}/s), "
              f"backlog {self.progress.backlog}", file=out, flush=True)
