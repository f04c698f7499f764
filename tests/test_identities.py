"""The subscriber identity table (Subscription-Id type and data -> account) through the real
server, on one Redis and on a Redis Cluster: a binding set, read and removed, another
account's binding refused unless replaced, unknown accounts and bad data refused naming the
field, a lookup one GET; the key scheme injective with identities in it; the README's CLI
example run as written."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import count
from pathlib import Path
from typing import Any

import grpc
import pytest
from creditline.store.contract import (
    ADMIN_IDENTITY_TYPE_OFFSET,
    MAX_IDENTITY_DATA_BYTES,
    SUBSCRIPTION_ID_TYPES,
    IdentityKind,
)
from creditline.store.store import account_keys, identity_key, partition_of, partition_tag
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc
from redis.crc import key_slot

from tests.books import Books
from tests.conftest import Backend
from tests.test_hostile_ids import KEY_NAMES_ACCOUNT_IDS, key_names
from tests.test_readme_example import ROOT, cli_server, readme_example, run_cli
from tests.test_subscriptions import admin_of, serving

E164, IMSI = admin_pb.END_USER_E164, admin_pb.END_USER_IMSI
README_MARKER = "### Subscriber identities"
_numbers = count()


def _msisdn() -> str:
    """An E.164 number of this test run's own (the test Redis is never flushed)."""
    return f"49{os.getpid() % 100_000:05d}{next(_numbers):06d}"


async def _account(admin: admin_pb2_grpc.AdminStub, books: Books) -> str:
    account_id = f"idn{os.getpid()}-{next(_numbers)}"
    await admin.CreateAccount(admin_pb.CreateAccountRequest(account_id=account_id))
    books.track(account_id)
    return account_id


def _set(identity_type: int, data: str, account_id: str, replace: bool = False
         ) -> admin_pb.SetSubscriberIdentityRequest:
    return admin_pb.SetSubscriberIdentityRequest(type=identity_type, data=data,
                                                 account_id=account_id, replace=replace)


def _of(identity_type: int, data: str) -> admin_pb.SubscriberIdentityRequest:
    return admin_pb.SubscriberIdentityRequest(type=identity_type, data=data)


async def _refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value


async def _bound_to(admin: admin_pb2_grpc.AdminStub, identity_type: int, data: str) -> str:
    found = await admin.GetSubscriberIdentity(_of(identity_type, data))
    assert (found.type, found.data) == (identity_type, data)
    return found.account_id


async def test_an_identity_of_each_kind_is_bound_read_and_removed(
        backend: Backend, backend_books: Books, backend_redis: Any) -> None:
    identities = [(E164, _msisdn()), (IMSI, f"26201{_msisdn()[:10]}"),
                  (admin_pb.END_USER_SIP_URI, f"sip:{_msisdn()}@ims.example.net;user=phone"),
                  (admin_pb.END_USER_NAI, f"{_msisdn()}@nai.example.net"),
                  (admin_pb.END_USER_PRIVATE, f"opaque:{{0}}é-{_msisdn()}")]
    async with serving(backend) as (running,), admin_of(running) as admin:
        account_id = await _account(admin, backend_books)
        for identity_type, data in identities:
            bound = await admin.SetSubscriberIdentity(_set(identity_type, data, account_id))
            assert (bound.type, bound.data, bound.account_id) == (identity_type, data,
                                                                  account_id)
            # again, to the same account: nothing changes, nothing refused
            await admin.SetSubscriberIdentity(_set(identity_type, data, account_id))
            assert await _bound_to(admin, identity_type, data) == account_id
            kind = SUBSCRIPTION_ID_TYPES[identity_type - ADMIN_IDENTITY_TYPE_OFFSET]
            key = identity_key(kind, data, running.store.config.partitions)
            assert await backend_redis.get(key) == account_id
        for identity_type, data in identities:
            removed = await admin.RemoveSubscriberIdentity(_of(identity_type, data))
            assert removed.account_id == account_id
            for call in (admin.GetSubscriberIdentity, admin.RemoveSubscriberIdentity):
                refused = await _refusal(call(_of(identity_type, data)))
                assert refused.code() == grpc.StatusCode.NOT_FOUND
                assert refused.details().startswith("data: "), refused.details()
    await backend_books.assert_balanced()


async def test_a_binding_to_another_account_stands_unless_replaced(
        backend: Backend, backend_books: Books) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin:
        first, second = await _account(admin, backend_books), await _account(admin, backend_books)
        msisdn = _msisdn()
        await admin.SetSubscriberIdentity(_set(E164, msisdn, first))
        refused = await _refusal(admin.SetSubscriberIdentity(_set(E164, msisdn, second)))
        assert refused.code() == grpc.StatusCode.ALREADY_EXISTS
        assert refused.details().startswith("data: ") and repr(first) in refused.details()
        assert await _bound_to(admin, E164, msisdn) == first
        replaced = await admin.SetSubscriberIdentity(_set(E164, msisdn, second, replace=True))
        assert replaced.account_id == second
        assert await _bound_to(admin, E164, msisdn) == second


async def test_an_unknown_or_malformed_account_is_refused_and_binds_nothing(
        backend: Backend) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin:
        msisdn = _msisdn()
        for account_id, code in ((f"nobody{os.getpid()}", grpc.StatusCode.NOT_FOUND),
                                 ("a{0}", grpc.StatusCode.INVALID_ARGUMENT),
                                 ("", grpc.StatusCode.INVALID_ARGUMENT)):
            refused = await _refusal(admin.SetSubscriberIdentity(_set(E164, msisdn, account_id)))
            assert refused.code() == code, (account_id, refused.details())
            assert refused.details().startswith("account_id: "), refused.details()
        refused = await _refusal(admin.GetSubscriberIdentity(_of(E164, msisdn)))
        assert refused.code() == grpc.StatusCode.NOT_FOUND


TOO_LONG = "x" * (MAX_IDENTITY_DATA_BYTES + 1)
# (type, data) no identity may hold, and the field each refusal must name
BAD_IDENTITIES = [
    (E164, "", "data"), (E164, "49170abc", "data"), (E164, "+491701234567", "data"),
    (E164, "1" * 16, "data"), (E164, "٤٩١٧٠", "data"),  # (Arabic-Indic digits)
    (IMSI, "12345", "data"), (IMSI, "2" * 16, "data"), (IMSI, "26201123456789x", "data"),
    (admin_pb.END_USER_SIP_URI, "sip:a b@example.net", "data"),
    (admin_pb.END_USER_NAI, "a\tb@example.net", "data"),
    (admin_pb.END_USER_NAI, "a@example.net\n", "data"),
    (admin_pb.END_USER_PRIVATE, TOO_LONG, "data"),
    (admin_pb.END_USER_PRIVATE, "é" * (MAX_IDENTITY_DATA_BYTES // 2 + 1), "data"),  # bytes
    (admin_pb.END_USER_PRIVATE, "a\x00b", "data"),
    (admin_pb.END_USER_PRIVATE, "", "data"),
    (admin_pb.IDENTITY_TYPE_UNSPECIFIED, "491701234567", "type"),
    (99, "491701234567", "type"),
]


async def test_bad_identities_are_refused_naming_the_field(
        backend: Backend, backend_books: Books) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin:
        account_id = await _account(admin, backend_books)
        for identity_type, data, field in BAD_IDENTITIES:
            for call in (admin.SetSubscriberIdentity(_set(identity_type, data, account_id)),
                         admin.GetSubscriberIdentity(_of(identity_type, data)),
                         admin.RemoveSubscriberIdentity(_of(identity_type, data))):
                refused = await _refusal(call)
                assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, (data, refused)
                assert refused.details().startswith(f"{field}: "), (data, refused.details())
        # the longest data taken, and the digits' bounds
        for identity_type, data in ((admin_pb.END_USER_PRIVATE, TOO_LONG[1:]),
                                    (E164, "1"), (E164, "4" * 15), (IMSI, "262011"),
                                    (IMSI, "2" * 15)):
            await admin.SetSubscriberIdentity(_set(identity_type, data, account_id, True))


async def test_the_stores_lookup_is_one_get_and_malformed_data_is_bound_to_none(
        backend: Backend, backend_books: Books, backend_redis: Any) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin:
        account_id = await _account(admin, backend_books)
        msisdn = _msisdn()
        await admin.SetSubscriberIdentity(_set(E164, msisdn, account_id))
        store = running.store
        counted = not backend.cluster  # (a cluster's counts are per node)
        before = await backend_redis.info("commandstats") if counted else {}
        assert await store.identity_account(IdentityKind.E164, msisdn) == account_id
        # what a gateway may send that no identity can be: none, without asking Redis
        assert await store.identity_account(IdentityKind.E164, "49 170") is None
        assert await store.remove_identity(IdentityKind.IMSI, "1") is None
        after = await backend_redis.info("commandstats") if counted else {}
        with pytest.raises(ValueError, match="digits"):
            await store.set_identity(IdentityKind.IMSI, "26201x", account_id)
    if counted:
        # (other servers of the test session may sweep meanwhile: only the reads count)
        calls = {name: stats["calls"] - before.get(name, {"calls": 0})["calls"]
                 for name, stats in after.items()}
        assert (calls.get("cmdstat_get", 0), calls.get("cmdstat_getdel", 0),
                calls.get("cmdstat_evalsha", 0)) == (1, 0, 0)


def test_identity_types_are_rfc_4006s_shifted_by_one() -> None:
    assert [kind.name for kind in SUBSCRIPTION_ID_TYPES.values()] == [
        kind.name for kind in IdentityKind]
    for number, kind in SUBSCRIPTION_ID_TYPES.items():
        admin_number = admin_pb.IdentityType.Value(f"END_USER_{kind.name}")
        assert admin_number == number + ADMIN_IDENTITY_TYPE_OFFSET
    assert len(admin_pb.IdentityType.keys()) == len(IdentityKind) + 1  # and UNSPECIFIED


# data that looks like other kinds' keys, other identities and account keys' parts
HOSTILE_DATA = ["1", "e164:1", "imsi:1", "1:e164", ":", "::", "a:1:x:acct", "{0}", "}", "{",
                "ident:e164:1", "a:1:a:acct", "sid:x", "x:acct", "*", "\\", "é{}"]


def test_identity_keys_are_injective_and_never_an_account_key() -> None:
    partitions = 1  # every id in one partition: where collisions would show
    names = key_names(partitions)  # (the other kinds' keys, injective among themselves)
    account_prefixes = [account_keys(account_id, partitions).prefix
                        for account_id in KEY_NAMES_ACCOUNT_IDS]
    for kind in IdentityKind:
        for data in HOSTILE_DATA:
            key = identity_key(kind, data, partitions)
            assert names.setdefault(key, ("identity", kind, data)) == (
                "identity", kind, data), (key, names[key])
            assert not any(key.startswith(prefix) for prefix in account_prefixes), key
            # braces in the data do not move the key off its partition's slot
            assert key_slot(key.encode()) == key_slot(partition_tag(0).encode())


def test_an_identity_lives_in_the_partition_of_its_kind_and_data() -> None:
    partitions = 64
    for kind in IdentityKind:
        for data in ("491701234567", "262011234567890"):
            partition = partition_of(f"{kind.value}:{data}", partitions)
            assert identity_key(kind, data, partitions) == (
                f"{partition_tag(partition)}:ident:{kind.value}:{data}")


def _cli(words: list[str], port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "creditline", words[0], "--server", f"127.0.0.1:{port}",
         *words[1:]], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


def test_the_readme_identity_example_does_what_the_readme_says(tmp_path: Path) -> None:
    with cli_server(tmp_path / "trial") as port:
        answers = [(words, run_cli(words, port)) for words in readme_example(README_MARKER)]
        # the number is dave's now: carol's claim to it is refused, and it stays dave's
        taken = _cli(["identity", "set", "e164", "491701234567", "carol"], port)
        unbound = _cli(["identity", "show", "imsi", "262011234567890"], port)
        shown = _cli(["identity", "show", "e164", "491701234567"], port)
    shows = [answer for words, answer in answers if words[1:3] == ["identity", "show"]]
    assert shows == [{"type": "END_USER_E164", "data": "491701234567", "account_id": "carol"}]
    removed = answers[-1][1]
    assert removed == {"type": "END_USER_IMSI", "data": "262011234567890",
                       "account_id": "carol"}
    assert taken.returncode == 1 and "ALREADY_EXISTS" in taken.stderr, taken.stderr
    assert "'dave'" in taken.stderr
    assert unbound.returncode == 1 and "NOT_FOUND" in unbound.stderr, unbound.stderr
    assert shown.returncode == 0 and '"account_id": "dave"' in shown.stdout
