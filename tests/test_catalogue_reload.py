"""A catalogue reloaded without a restart (SIGHUP to `creditline serve`, which passes it to
every worker): served from the next request on, under load, every request priced by one
catalogue; refused, the old one kept, when the file is bad or drops a plan in use."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
from creditline.store.redis_process import free_port
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb

from tests.messages import RG_SMS, block
from tests.processes import serve, stop, wait_for_port

CATALOGUE = Path(__file__).parent / "catalogue.toml"
GOLD = '''
[[plan]]
id = "gold"

[[plan.tariff]]
rating_group = 300
unit = "service_specific"
first_increment_price_micros = 1_000
next_increment_price_micros = 1_000
'''
RELOAD_TIMEOUT_S = 20


def _plans(port: int) -> list[admin_pb.ListPlansResponse]:
    """ListPlans over several new connections (the kernel spreads them over the workers)."""
    answers = []
    for _ in range(6):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answers.append(admin_pb2_grpc.AdminStub(channel).ListPlans(
                admin_pb.ListPlansRequest()))
    return answers


def _wait_for_version(port: int, version: str) -> None:
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        if {answer.catalogue_version for answer in _plans(port)} == {version}:
            return
        time.sleep(0.2)
    raise AssertionError(f"not every worker serves version {version}")


def _sms(account_id: str, number: int) -> pb.EventRequest:
    return pb.EventRequest(session_id=f"{account_id};sms{number}", account_id=account_id,
                           action=pb.DIRECT_DEBIT, rating_groups=[block(RG_SMS, requested=1)])


def test_sighup_reloads_the_catalogue_on_every_worker_and_refuses_what_would_break(
        tmp_path: Path) -> None:
    path = tmp_path / "catalogue.toml"
    shutil.copy(CATALOGUE, path)
    port = free_port()
    process = serve("--listen-address", f"127.0.0.1:{port}", "--workers", "2",
                    "--plan-path", str(path))
    try:
        wait_for_port(port, process)
        first = _plans(port)[0].catalogue_version
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            admin_pb2_grpc.AdminStub(channel).CreateAccount(admin_pb.CreateAccountRequest(
                account_id="reload-a", initial_balance_micros=100_000_000, plan_id="cheap"))
            charging = charging_pb2_grpc.ChargingStub(channel)
            answers: list[pb.EventAnswer] = []
            stop_load = threading.Event()

            def load() -> None:  # events priced all through the reload
                number = 0
                while not stop_load.is_set():
                    answers.append(charging.Event(_sms("reload-a", number)))
                    number += 1
            loader = threading.Thread(target=load)
            loader.start()
            path.write_text(CATALOGUE.read_text() + GOLD)
            process.send_signal(signal.SIGHUP)
            try:
                _wait_for_version(port, _version_of(port, first))
            finally:
                stop_load.set()
                loader.join()
        assert answers and all(a.result_code == pb.SUCCESS for a in answers)
        assert {a.rating_groups[0].amount_micros for a in answers} == {10_000}  # cheap's
        assert [p.plan_id for p in _plans(port)[0].plans] == ["standard", "cheap", "gold"]
        second = _plans(port)[0].catalogue_version

        # a file that drops a plan in use, then one that is not TOML: both refused
        path.write_text(CATALOGUE.read_text().replace('id = "cheap"', 'id = "thrifty"')
                        .replace('plans = ["cheap"]', 'plans = ["thrifty"]') + GOLD)
        process.send_signal(signal.SIGHUP)
        time.sleep(2)
        path.write_text("[[plan\n")
        process.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert {answer.catalogue_version for answer in _plans(port)} == {second}
    finally:
        output = stop(process)
    assert output.count("catalogue reloaded: version") == 2, output  # each worker once
    assert output.count("it drops what is still in use: plan 'cheap' by 1 account(s)") == 2, output
    assert output.count("not valid TOML") == 2, output


def _version_of(port: int, old: str) -> str:
    """The version the workers move to: the first one seen that is not the old one."""
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        for answer in _plans(port):
            if answer.catalogue_version != old:
                return answer.catalogue_version
        time.sleep(0.2)
    raise AssertionError("no worker reloaded")
