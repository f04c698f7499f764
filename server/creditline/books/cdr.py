"""Charging data records: what the charging script writes, and the sinks that load them.

A CDR is written by the same script that makes the final charge of a session (or an
event charge or refund), in the same atomic step, to its partition's CDR stream. Its id
is "<partition>-<stream id>": unique, and never reused. Every sink loads idempotently by
that id, so a CDR delivered twice (a crash between the sink's commit and the stream's
acknowledgement) is stored once.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse


@dataclass(frozen=True, slots=True)
class CdrItem:
    rating_group: str
    tariff: str
    used_units: int
    charged_micros: int          # negative for a refund
    units_from_buckets: int
    uncharged_micros: int        # usage above the grant the credit limit could not pay


@dataclass(frozen=True, slots=True)
class Cdr:
    cdr_id: str
    kind: str                    # session | event | refund | adjustment | purchase
    account_id: str
    session_id: str
    started_ms: int
    ended_ms: int
    cause: str                   # terminate | event | supervision
    result_code: int
    charged_micros: int
    balance_after_micros: int
    items: tuple[CdrItem, ...]
    # refund: the session id of the charge it reverses; adjustment: its reason; purchase:
    # the offer bought
    reference: str = ""


def cdr_from_stream(partition: int, stream_id: str, fields: Mapping[str, str]) -> Cdr:
    items = []
    for raw in filter(None, fields.get("items", "").split(";")):
        rg, tariff, used, charged, from_buckets, uncharged = raw.split("|")
        items.append(CdrItem(rg, tariff, int(used), int(charged), int(from_buckets),
                             int(uncharged)))
    return Cdr(
        cdr_id=f"{partition}-{stream_id}", kind=fields["kind"], account_id=fields["account"],
        session_id=fields["session"], started_ms=int(fields.get("started_ms", 0)),
        ended_ms=int(fields["ended_ms"]), cause=fields["cause"],
        result_code=int(fields.get("result") or 0), charged_micros=int(fields["charged"]),
        balance_after_micros=int(fields["balance_after"]), items=tuple(items),
        reference=fields.get("refunds") or fields.get("reason") or fields.get("offer", ""),
    )


class Sink(Protocol):
    def write(self, cdrs: Sequence[Cdr]) -> None:
        """Stores the CDRs durably (committed when it returns); ids already stored are
        skipped."""

    def charged_by_account(self, excluding_ids: Iterable[str] = ()) -> dict[str, int]:
        """Sum of charged_micros per account over the stored CDRs."""

    def count(self) -> int: ...

    def close(self) -> None: ...


_COLUMNS = ("cdr_id", "kind", "account_id", "session_id", "started_ms", "ended_ms", "cause",
            "result_code", "charged_micros", "balance_after_micros", "items", "reference")
# Added after the first release: tables made before get it at start.
_ADDED_COLUMN = "reference"



def _row(cdr: Cdr) -> tuple[Any, ...]:
    values = asdict(cdr)
    values["items"] = json.dumps(values["items"])
    return tuple(values[c] for c in _COLUMNS)


class SqliteSink:
    """The embedded default: one SQLite file."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS cdr (cdr_id TEXT PRIMARY KEY, kind TEXT NOT NULL, "
            "account_id TEXT NOT NULL, session_id TEXT NOT NULL, started_ms INTEGER, "
            "ended_ms INTEGER, cause TEXT, result_code INTEGER, "
            "charged_micros INTEGER NOT NULL, balance_after_micros INTEGER, items TEXT, "
            "reference TEXT)")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(cdr)")}
        if _ADDED_COLUMN not in columns:
            self._db.execute(f"ALTER TABLE cdr ADD COLUMN {_ADDED_COLUMN} TEXT")
        self._db.commit()

    def write(self, cdrs: Sequence[Cdr]) -> None:
        with self._db:  # one transaction, committed on exit
            self._db.executemany(
                f"INSERT OR IGNORE INTO cdr ({', '.join(_COLUMNS)}) VALUES "
                f"({', '.join('?' * len(_COLUMNS))})", [_row(c) for c in cdrs])

    def charged_by_account(self, excluding_ids: Iterable[str] = ()) -> dict[str, int]:
        totals = dict(self._db.execute(
            "SELECT account_id, SUM(charged_micros) FROM cdr GROUP BY account_id"))
        for cdr_id in excluding_ids:
            row = self._db.execute("SELECT account_id, charged_micros FROM cdr WHERE cdr_id=?",
                                   (cdr_id,)).fetchone()
            if row:
                totals[row[0]] -= row[1]
        return totals

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM cdr").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class PostgresSink:
    """The production billing database. `?schema=name` puts the table in that schema."""

    def __init__(self, url: str) -> None:
        import psycopg

        parsed = urlparse(url)
        schema = parse_qs(parsed.query).get("schema", ["public"])[0]
        if not schema.isidentifier():
            raise ValueError(f"sink: schema {schema!r} is not an identifier")
        self._table = f'"{schema}".cdr'
        self._db = psycopg.connect(parsed._replace(query="").geturl())
        with self._db.transaction():
            self._db.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {self._table} (cdr_id TEXT PRIMARY KEY, "
                "kind TEXT NOT NULL, account_id TEXT NOT NULL, session_id TEXT NOT NULL, "
                "started_ms BIGINT, ended_ms BIGINT, cause TEXT, result_code INTEGER, "
                "charged_micros BIGINT NOT NULL, balance_after_micros BIGINT, items JSONB, "
                "reference TEXT)")
            self._db.execute(
                f"ALTER TABLE {self._table} ADD COLUMN IF NOT EXISTS {_ADDED_COLUMN} TEXT")

    def write(self, cdrs: Sequence[Cdr]) -> None:
        with self._db.transaction(), self._db.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO {self._table} ({', '.join(_COLUMNS)}) VALUES "
                f"({', '.join(['%s'] * len(_COLUMNS))}) ON CONFLICT (cdr_id) DO NOTHING",
                [_row(c) for c in cdrs])

    def charged_by_account(self, excluding_ids: Iterable[str] = ()) -> dict[str, int]:
        excluded = list(excluding_ids)
        rows = self._db.execute(
            f"SELECT account_id, SUM(charged_micros) FROM {self._table} "
            "WHERE NOT (cdr_id = ANY(%s)) GROUP BY account_id", (excluded,)).fetchall()
        self._db.commit()
        return {account: int(total) for account, total in rows}

    def count(self) -> int:
        row = self._db.execute(f"SELECT COUNT(*) FROM {self._table}").fetchone()
        self._db.commit()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self._db.close()


class JsonLinesSink:
    """JSON lines files, rotated by size: cdrs-000001.jsonl, cdrs-000002.jsonl, ...

    Idempotent without a database: stream ids grow within a partition and the exporter
    writes each partition in order, so the highest id written per partition (recovered
    from the files at start) tells which CDRs a redelivery may skip."""

    def __init__(self, directory: str, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._max_bytes = max_bytes
        self._written: dict[int, tuple[int, int]] = {}  # partition -> last stream id
        self._totals: dict[str, int] = {}
        self._count = 0
        for path in self._files():
            for line in path.read_text().splitlines():
                if line.strip():
                    self._remember(json.loads(line))
        files = self._files()
        self._current = files[-1] if files else self._dir / "cdrs-000001.jsonl"

    def _files(self) -> list[Path]:
        return sorted(self._dir.glob("cdrs-*.jsonl"))

    def _remember(self, record: Mapping[str, Any]) -> None:
        partition, stream_id = _split_id(record["cdr_id"])
        self._written[partition] = max(self._written.get(partition, (0, 0)), stream_id)
        account = record["account_id"]
        self._totals[account] = self._totals.get(account, 0) + record["charged_micros"]
        self._count += 1

    def write(self, cdrs: Sequence[Cdr]) -> None:
        new = [c for c in cdrs if _split_id(c.cdr_id)[1] > self._written.get(
            _split_id(c.cdr_id)[0], (0, 0))]
        if not new:
            return
        if self._current.exists() and self._current.stat().st_size >= self._max_bytes:
            number = int(self._current.stem.split("-")[1]) + 1
            self._current = self._dir / f"cdrs-{number:06d}.jsonl"
        with self._current.open("a", encoding="utf-8") as out:
            for cdr in new:
                out.write(json.dumps(asdict(cdr), separators=(",", ":")) + "\n")
            out.flush()
            os.fsync(out.fileno())
        for cdr in new:
            self._remember(asdict(cdr))

    def charged_by_account(self, excluding_ids: Iterable[str] = ()) -> dict[str, int]:
        totals = dict(self._totals)
        excluded = set(excluding_ids)
        if excluded:
            for path in self._files():
                for line in path.read_text().splitlines():
                    record = json.loads(line) if line.strip() else None
                    if record and record["cdr_id"] in excluded:
                        totals[record["account_id"]] -= record["charged_micros"]
        return totals

    def count(self) -> int:
        return self._count

    def close(self) -> None:
        pass


def _split_id(cdr_id: str) -> tuple[int, tuple[int, int]]:
    partition, ms, seq = cdr_id.split("-")
    return int(partition), (int(ms), int(seq))


def open_sink(url: str) -> Sink:
    """sqlite:///path/file.db, postgresql://user@host/db[?schema=s],
    jsonl:///directory[?max_bytes=N]."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        return SqliteSink(parsed.path or "cdrs.sqlite")
    if parsed.scheme in ("postgresql", "postgres"):
        return PostgresSink(url)
    if parsed.scheme == "jsonl":
        max_bytes = int(parse_qs(parsed.query).get("max_bytes", [64 * 1024 * 1024])[0])
        return JsonLinesSink(parsed.path, max_bytes)
    raise ValueError(f"sink: {url!r}: use sqlite:///file, postgresql://... or jsonl:///dir")
