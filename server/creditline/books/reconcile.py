"""`creditline reconcile`: proves that balances, reservations and CDRs agree.

For every account:
    initial + top-ups - charges in CDRs (refunds negative) - charges of open sessions
        = balance
    reserved = the money held by the open sessions
A shared group's account counts its members' CDRs and open sessions with its own (its
money pays for them); each member's own charged - refunded equals its CDRs and open
sessions' charges, and its reserved what its sessions hold.
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
from creditline.store.contract import group_of, session_rating_groups
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


def _partition_accounts(redis: Redis, partition: int) -> Iterator[str]:
    """The ids of the partition's accounts (a group's members are in its partition)."""
    for member in redis.sscan_iter(accounts_key(partition), count=SCAN_BATCH):
        yield text(member)


@dataclass(slots=True)
class _Totals:
    """What an account's CDRs and open sessions say it was charged and holds."""

    recorded: int = 0
    open_charged: int = 0
    open_reserved: int = 0


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
    for partition in range(partitions):
        totals: dict[str, _Totals] = {}
        for account_id in _partition_accounts(redis, partition):
            keys = account_keys(account_id, partitions)
            open_charged, open_reserved = _open_sessions(redis, keys)
            totals[account_id] = _Totals(
                exported.get(account_id, 0) + unexported.get(account_id, 0), open_charged,
                open_reserved)
        for account_id, own in totals.items():
            group = group_of(account_id)
            if group in totals:  # (the group pays: its totals count the member's)
                totals[group].recorded += own.recorded
                totals[group].open_charged += own.open_charged
                totals[group].open_reserved += own.open_reserved
        for account_id, total in totals.items():
            account = {text(k): text(v) for k, v in
                       redis.hgetall(account_keys(account_id, partitions).account).items()}
            problems += _discrepancies(account_id, account, total)
            checked += 1
    return checked, problems


def _discrepancies(account_id: str, account: dict[str, str], total: _Totals
                   ) -> list[Discrepancy]:
    problems = []
    if group_of(account_id) is None:
        expected = (int(account["initial"]) + int(account["topped_up"]) - total.recorded
                    - total.open_charged)
        if expected != int(account["balance"]):
            problems.append(Discrepancy(account_id, "balance", expected, int(account["balance"])))
    else:  # a member: its own charges (its group's balance pays them)
        net = int(account["charged"]) - int(account["refunded"])
        if total.recorded + total.open_charged != net:
            problems.append(Discrepancy(account_id, "charged - refunded",
                                        total.recorded + total.open_charged, net))
    if total.open_reserved != int(account["reserved"]):
        problems.append(Discrepancy(account_id, "reserved", total.open_reserved,
                                    int(account["reserved"])))
    return problems
