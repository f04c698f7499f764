"""`creditline reconcile`: proves that balances, reservations and CDRs agree.

For every account:
    initial + top-ups - charges in CDRs (refunds negative) - charges of open sessions
        = balance
    reserved = the money held by the open sessions
CDRs are counted from the sink and from the streams not yet exported, each id once.
Accounts are found through each partition's index of account ids, never by a pattern over
key names (which ids could match).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from redis import Redis

from creditline.books.cdr import Sink, cdr_from_stream
from creditline.store.contract import session_rating_groups
from creditline.store.store import AccountKeys, account_keys, accounts_key, cdrs_key, text

SCAN_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Discrepancy:
    account_id: str
    what: str
    expected_micros: int
    actual_micros: int

    def __str__(self) -> str:
        return (f"{self.account_id}: {self.what} is {self.actual_micros}, the books say "
                f"{self.expected_micros} (difference {self.actual_micros - self.expected_micros})")


def _accounts(redis: Redis, partitions: int) -> Iterator[tuple[str, AccountKeys]]:
    """(account id, its keys) of every account, partition by partition."""
    for partition in range(partitions):
        for member in redis.sscan_iter(accounts_key(partition), count=SCAN_BATCH):
            account_id = text(member)
            yield account_id, account_keys(account_id, partitions)


def _unexported_charges(redis: Redis, partitions: int) -> tuple[dict[str, int], list[str]]:
    totals: dict[str, int] = defaultdict(int)
    ids: list[str] = []
    for partition in range(partitions):
        last = "-"
        while True:
            entries: Any = redis.xrange(cdrs_key(partition), min=last, count=SCAN_BATCH)
            entries = [e for e in entries if text(e[0]) != last]
            if not entries:
                break
            for stream_id, raw in entries:
                fields = {text(k): text(v) for k, v in raw.items()}
                cdr = cdr_from_stream(partition, text(stream_id), fields)
                totals[cdr.account_id] += cdr.charged_micros
                ids.append(cdr.cdr_id)
            last = text(entries[-1][0])
    return totals, ids


def _open_sessions(redis: Redis, keys: AccountKeys) -> tuple[int, int]:
    """(money charged so far, money reserved) of the account's open sessions."""
    charged = reserved = 0
    for session_key in redis.smembers(keys.open_sessions):
        # (a client giving bytes: see reconcile)
        session = cast(dict[bytes, bytes], redis.hgetall(text(session_key)))
        for state in session_rating_groups(session).values():
            charged += state.charged
            reserved += state.reserved
        for field, value in session.items():  # (rating groups an older version wrote)
            if field.startswith(b"c:"):
                charged += int(value)
            elif field.startswith(b"m:"):
                reserved += int(value)
    return charged, reserved


def reconcile(redis: Redis, partitions: int, sink: Sink) -> tuple[int, list[Discrepancy]]:
    """Checks every account; returns how many were checked and what disagrees. `redis`
    gives bytes (decode_responses off): the sessions' rating-group states are binary."""
    unexported, unexported_ids = _unexported_charges(redis, partitions)
    exported = sink.charged_by_account(excluding_ids=unexported_ids)
    problems: list[Discrepancy] = []
    checked = 0
    for account_id, keys in _accounts(redis, partitions):
        account = {text(k): text(v) for k, v in redis.hgetall(keys.account).items()}
        open_charged, open_reserved = _open_sessions(redis, keys)
        recorded = exported.get(account_id, 0) + unexported.get(account_id, 0)
        expected = (int(account["initial"]) + int(account["topped_up"]) - recorded
                    - open_charged)
        if expected != int(account["balance"]):
            problems.append(Discrepancy(account_id, "balance", expected, int(account["balance"])))
        if open_reserved != int(account["reserved"]):
            problems.append(Discrepancy(account_id, "reserved", open_reserved,
                                        int(account["reserved"])))
        checked += 1
    return checked, problems
