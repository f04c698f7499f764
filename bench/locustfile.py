"""A Locust gRPC user running the benchmark's session flows (bench/workload.py): Initial
(web + voice), Updates, Terminate, mixed with Event DIRECT_DEBIT, on many accounts and a
few hot ones. For people who already load-test with Locust; bench/run.py is the figure of
record (Locust's own per-request cost caps it well below the server on one core).

Every call fires a request event: name = the RPC, response time in ms, and an exception
when the call failed or the answer's result code is not SUCCESS (2001).

    locust -f bench/locustfile.py --headless --host 127.0.0.1:50051 \\
        --users 64 --spawn-rate 64 --run-time 30s --create-accounts

grpc runs on gevent (grpc.experimental.gevent.init_gevent) so that one Locust process
can keep many users' calls in flight.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from grpc.experimental import gevent as grpc_gevent
from locust import User, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

# Locust loads this file by path: the repository root makes `bench` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import INITIAL, Workload, event_request, session_id, session_requests

# Before any channel exists: grpc's I/O must yield to gevent, not block the process.
grpc_gevent.init_gevent()

CALL_TIMEOUT_S = 5.0
# Admin calls in flight while --create-accounts creates the accounts.
ACCOUNT_CREATION_BATCH = 64
_user_numbers = itertools.count()


class ResultCodeError(Exception):
    """An answer whose result code is not SUCCESS: counted by Locust as a failure."""


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--hot-accounts", type=int, default=5)
    parser.add_argument("--hot-share", type=float, default=0.10)
    parser.add_argument("--event-share", type=float, default=0.20,
                        help="share of requests that are Event DIRECT_DEBIT")
    parser.add_argument("--create-accounts", action="store_true", default=False,
                        help="create the accounts through the Admin API before the run")


def _workload(environment: Environment) -> Workload:
    options = environment.parsed_options
    if options is None:  # a Locust run from a library, without the command line
        return Workload()
    return Workload(account_count=options.accounts, hot_account_count=options.hot_accounts,
                    hot_share=options.hot_share, event_request_share=options.event_share)


@events.test_start.add_listener
def _create_accounts(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or not environment.parsed_options:
        return  # the master (or the only process) creates them once
    if not environment.parsed_options.create_accounts:
        return
    accounts = _workload(environment).all_accounts()
    with grpc.insecure_channel(environment.host or ChargingUser.host) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for start in range(0, len(accounts), ACCOUNT_CREATION_BATCH):
            futures = [admin.CreateAccount.future(admin_pb.CreateAccountRequest(
                account_id=account_id, initial_balance_micros=balance_micros),
                timeout=CALL_TIMEOUT_S)
                for account_id, balance_micros in accounts[start:start + ACCOUNT_CREATION_BATCH]]
            for future in futures:
                try:
                    future.result()
                except grpc.RpcError as error:
                    # an account of an earlier run: reused as it is
                    if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                        raise


class ChargingClient:
    """The Charging stub, firing one Locust request event per call."""

    def __init__(self, target: str, environment: Environment) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = charging_pb2_grpc.ChargingStub(self._channel)
        self._environment = environment

    def call(self, method: str, request: Any) -> Any | None:
        started = time.perf_counter()
        answer: Any | None = None
        exception: Exception | None = None
        length = 0
        try:
            answer = getattr(self._stub, method)(request, timeout=CALL_TIMEOUT_S)
            length = answer.ByteSize()
            if answer.result_code != pb.SUCCESS:
                exception = ResultCodeError(f"result code {answer.result_code}")
        except grpc.RpcError as error:
            exception = error
        self._environment.events.request.fire(
            request_type="grpc", name=method,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length, exception=exception, context={})
        return answer

    def close(self) -> None:
        self._channel.close()


class ChargingUser(User):
    """One network function's stream of flows, back to back (a closed loop, like the
    asyncio driver): --users is the number of flows in flight."""

    host = "127.0.0.1:50051"

    def on_start(self) -> None:
        self.client = ChargingClient(self.host, self.environment)
        self.workload = _workload(self.environment)
        self.number = next(_user_numbers)
        self.rng = random.Random(os.getpid() * 100_003 + self.number)
        self.run_tag = f"locust{os.getpid()}u{self.number}t{int(time.time())}"
        self.flows = itertools.count()

    def on_stop(self) -> None:
        self.client.close()

    @task
    def flow(self) -> None:
        sid = session_id("locust", self.run_tag, next(self.flows))
        account_id = self.workload.pick_account(self.rng)
        if self.rng.random() < self.workload.event_flow_share:
            self.client.call("Event", event_request(sid, account_id))
            return
        for method, request in session_requests(sid, account_id,
                                                self.workload.updates_per_session):
            answer = self.client.call(method, request)
            if answer is None or (method == INITIAL and answer.result_code != pb.SUCCESS):
                return  # no session to go on with; the failure was reported
