"""The `creditline` command: `serve`, and client commands that call a running server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from creditline import settings as settings_module
from creditline.errors import PlanError
from creditline.observability.logging_setup import configure_logging
from creditline.store.contract import IdentityKind
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb

_UNIT_FLAGS = ("time_s", "total_octets", "service_specific_units")
DEFAULT_SINK = "sqlite:///cdrs.sqlite"
PASSWORD_ENV = "CREDITLINE_REDIS_PASSWORD"
# The exit code shells give a command killed by SIGPIPE (128 + 13)
EXIT_BROKEN_PIPE = 141


def _print(message: Message) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True))


def _units(args: argparse.Namespace, prefix: str) -> pb.Units:
    units = pb.Units()
    for name in _UNIT_FLAGS:
        value = getattr(args, f"{prefix}_{name}")
        if value is not None:
            setattr(units, name, value)
    return units


def _add_unit_flags(parser: argparse.ArgumentParser, prefix: str) -> None:
    for name in _UNIT_FLAGS:
        parser.add_argument(f"--{prefix}-{name.replace('_', '-')}", type=int,
                            dest=f"{prefix}_{name}")


def _books_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cdr = commands.add_parser("cdr", help="charging data records")
    cdr_commands = cdr.add_subparsers(dest="cdr_command", required=True)
    export = cdr_commands.add_parser(
        "export", help="drain CDRs from Redis into a sink (at least once, loaded once)")
    reconcile = commands.add_parser(
        "reconcile", help="check balances, reservations and CDRs agree; exit 1 if not")
    for parser in (export, reconcile):
        parser.add_argument("--redis-url", default=os.environ.get("CREDITLINE_REDIS_URL", ""),
                            help="(env CREDITLINE_REDIS_URL) no password in it (a flag shows "
                                 f"in ps): give it in the environment, {PASSWORD_ENV}")
        parser.add_argument("--sink", default=os.environ.get("CREDITLINE_CDR_SINK",
                                                             DEFAULT_SINK),
                            help="sqlite:///file, postgresql://..., jsonl:///dir "
                                 f"(env CREDITLINE_CDR_SINK; default {DEFAULT_SINK})")
    export.add_argument("--follow", action="store_true",
                        help="keep exporting beside the server until interrupted")
    export.add_argument("--quiet", action="store_true", help="no progress lines")


def _books_command(args: argparse.Namespace) -> int:
    from redis import Redis

    from creditline.books.cdr import open_sink
    from creditline.books.exporter import Exporter
    from creditline.books.reconcile import reconcile
    from creditline.store.store import recorded_partitions

    if not args.redis_url:
        print("creditline: --redis-url (or CREDITLINE_REDIS_URL) is required", file=sys.stderr)
        return 2
    # the password as serve takes it, from the environment; one in the URL still wins
    redis = Redis.from_url(args.redis_url, password=os.environ.get(PASSWORD_ENV) or None)
    try:
        partitions = recorded_partitions(redis)
    except ValueError as error:  # no Creditline data, or keys named by another version
        redis.close()
        print(f"creditline: {error}", file=sys.stderr)
        return 2
    sink = open_sink(args.sink)
    try:
        if args.command == "cdr":
            exporter = Exporter(redis, partitions, sink)
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a --follow run
                exporter.run(follow=args.follow, report=None if args.quiet else sys.stderr)
            return 0
        checked, problems = reconcile(redis, partitions, sink)
        for problem in problems:
            print(problem)
        print(f"reconciled {checked} accounts: {len(problems)} discrepancies",
              file=sys.stderr)
        return 1 if problems else 0
    finally:
        sink.close()
        redis.close()
def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--tls-ca-file", default="",
                        help="CA to verify the server with: TLS on (default: insecure)")
    parser.add_argument("--tls-cert-file", default="",
                        help="client certificate (mutual TLS); its roles decide what it may do")
    parser.add_argument("--tls-key-file", default="", help="the client certificate's key")


def _channel(args: argparse.Namespace) -> grpc.aio.Channel:
    if not args.tls_ca_file:
        return grpc.aio.insecure_channel(args.server)
    with open(args.tls_ca_file, "rb") as file:
        root = file.read()
    key = chain = None
    if args.tls_cert_file:
        with open(args.tls_cert_file, "rb") as file:
            chain = file.read()
        with open(args.tls_key_file, "rb") as file:
            key = file.read()
    credentials = grpc.ssl_channel_credentials(root, key, chain)
    return grpc.aio.secure_channel(args.server, credentials)


def _client_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    account = commands.add_parser("account",
                                  help="create, top up, adjust, bar and show accounts")
    _add_connection_flags(account)
    account_commands = account.add_subparsers(dest="account_command", required=True)
    create = account_commands.add_parser(
        "create", help="an account; \"<group id>/<member>\": a member of the group's "
        "shared balance (made before), with no money of its own")
    create.add_argument("account_id")
    create.add_argument("--balance-micros", type=int, default=0)
    create.add_argument("--credit-limit-micros", type=int, default=0)
    create.add_argument("--plan", default="", help="a plan of the server's catalogue "
                        "(`creditline plans`; default: the catalogue's default plan)")
    create.add_argument("--member-limit-micros", type=int, default=None,
                        help="a member's limit on what it spends per billing period")
    limit = account_commands.add_parser(
        "limit", help="set a group member's limit per billing period (--none: no limit)")
    limit.add_argument("account_id")
    limit_value = limit.add_mutually_exclusive_group(required=True)
    limit_value.add_argument("--micros", type=int)
    limit_value.add_argument("--none", action="store_true")
    change_plan = account_commands.add_parser(
        "change-plan", help="put the account on another plan from now (its open sessions "
        "are asked to re-authorise)")
    change_plan.add_argument("account_id")
    change_plan.add_argument("plan")
    change_plan.add_argument("--from-next-period", action="store_true",
                             help="from the start of the account's next billing period")
    buy = account_commands.add_parser(
        "buy", help="buy an add-on of the catalogue: its price debited, its units granted")
    buy.add_argument("account_id")
    buy.add_argument("offer")
    buy.add_argument("--purchase-id", default="", help="idempotency key (default: random)")
    subscribe = account_commands.add_parser(
        "subscribe", help="subscribe to a recurring offer of the catalogue: its first fee "
        "taken, its allowances granted; renewed at every period end")
    subscribe.add_argument("account_id")
    subscribe.add_argument("offer")
    cancel = account_commands.add_parser(
        "cancel", help="cancel a subscription: at the end of its period, or --now")
    cancel.add_argument("account_id")
    cancel.add_argument("offer")
    cancel.add_argument("--now", action="store_true",
                        help="immediately: its allowances gone, nothing refunded")
    top_up = account_commands.add_parser("top-up")
    top_up.add_argument("account_id")
    top_up.add_argument("amount_micros", type=int)
    top_up.add_argument("--top-up-id", default="", help="idempotency key (default: random)")
    adjust = account_commands.add_parser(
        "adjust", help="credit (or, negative, debit) the balance: reverses no charge")
    adjust.add_argument("account_id")
    adjust.add_argument("amount_micros", type=int)
    adjust.add_argument("--reason", required=True, help="why: kept in the notification and CDR")
    adjust.add_argument("--adjustment-id", default="",
                        help="idempotency key (default: random)")
    for name in ("show", "bar", "unbar"):
        account_commands.add_parser(name).add_argument("account_id")

    _identity_parsers(commands)
    plans = commands.add_parser("plans", help="the server's catalogue: its price plans "
                                "and offers")
    _add_connection_flags(plans)

    health = commands.add_parser(
        "health", help="ask a running server's gRPC health service; exit 0 when SERVING")
    _add_connection_flags(health)
    health.add_argument("--service", default="", help="a service name (default: the server)")
    health.add_argument("--timeout-s", type=float, default=5.0)

    for name in ("initial", "update", "terminate"):
        cc = commands.add_parser(name, help=f"send one {name} credit-control request")
        _add_connection_flags(cc)
        cc.add_argument("session_id")
        cc.add_argument("account_id")
        cc.add_argument("--request-number", type=int, default=0)
        cc.add_argument("--rating-group", type=int, required=True)
        _add_unit_flags(cc, "requested")
        _add_unit_flags(cc, "used")


def _identity_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    identity = commands.add_parser(
        "identity", help="the subscriber identity table: which account a network identity "
        "(Diameter Subscription-Id: its type and data) names")
    _add_connection_flags(identity)
    identity_commands = identity.add_subparsers(dest="identity_command", required=True)
    bind = identity_commands.add_parser("set", help="bind an identity to an account")
    remove = identity_commands.add_parser("remove", help="unbind an identity")
    show = identity_commands.add_parser("show", help="the account an identity is bound to")
    for parser in (bind, remove, show):
        parser.add_argument("kind", choices=[kind.value for kind in IdentityKind])
        parser.add_argument("data", help="e.g. an MSISDN 491701234567, an IMSI")
    bind.add_argument("account_id")
    bind.add_argument("--replace", action="store_true",
                      help="rebind an identity bound to another account")


async def _identity_command(args: argparse.Namespace) -> admin_pb.SubscriberIdentity:
    # (the Admin API's names: END_USER_ and the kind's; tests/test_identities.py holds them)
    identity_type = admin_pb.IdentityType.Value(f"END_USER_{IdentityKind(args.kind).name}")
    async with _channel(args) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        if args.identity_command == "set":
            return await admin.SetSubscriberIdentity(admin_pb.SetSubscriberIdentityRequest(
                type=identity_type, data=args.data, account_id=args.account_id,
                replace=args.replace))
        request = admin_pb.SubscriberIdentityRequest(type=identity_type, data=args.data)
        if args.identity_command == "remove":
            return await admin.RemoveSubscriberIdentity(request)
        return await admin.GetSubscriberIdentity(request)


async def _account_command(args: argparse.Namespace) -> admin_pb.Account:
    async with _channel(args) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        command = args.account_command
        if command == "create":
            member_limit = args.member_limit_micros
            return await admin.CreateAccount(admin_pb.CreateAccountRequest(
                account_id=args.account_id, initial_balance_micros=args.balance_micros,
                credit_limit_micros=args.credit_limit_micros, plan_id=args.plan,
                has_member_limit=member_limit is not None,
                member_limit_micros=member_limit or 0))
        if command == "limit":
            return await admin.SetMemberLimit(admin_pb.SetMemberLimitRequest(
                account_id=args.account_id, has_limit=not args.none,
                limit_micros=args.micros or 0))
        if command == "buy":
            return await admin.BuyAddOn(admin_pb.BuyAddOnRequest(
                account_id=args.account_id, offer_id=args.offer,
                purchase_id=args.purchase_id or uuid.uuid4().hex))
        if command == "subscribe":
            return await admin.SubscribeToOffer(admin_pb.SubscribeToOfferRequest(
                account_id=args.account_id, offer_id=args.offer))
        if command == "cancel":
            return await admin.CancelSubscription(admin_pb.CancelSubscriptionRequest(
                account_id=args.account_id, offer_id=args.offer, immediately=args.now))
        if command == "change-plan":
            return await admin.ChangePlan(admin_pb.ChangePlanRequest(
                account_id=args.account_id, plan_id=args.plan,
                from_next_period=args.from_next_period))
        if command == "top-up":
            return await admin.TopUp(admin_pb.TopUpRequest(
                account_id=args.account_id, amount_micros=args.amount_micros,
                top_up_id=args.top_up_id or uuid.uuid4().hex))
        if command == "adjust":
            return await admin.AdjustBalance(admin_pb.AdjustBalanceRequest(
                account_id=args.account_id, amount_micros=args.amount_micros,
                reason=args.reason, adjustment_id=args.adjustment_id or uuid.uuid4().hex))
        if command in ("bar", "unbar"):
            state = admin_pb.BARRED if command == "bar" else admin_pb.ACTIVE
            return await admin.SetAccountState(admin_pb.SetAccountStateRequest(
                account_id=args.account_id, state=state))
        return await admin.GetAccount(admin_pb.GetAccountRequest(account_id=args.account_id))


async def _credit_control_command(args: argparse.Namespace) -> pb.CreditControlAnswer:
    block = pb.RatingGroupRequest(rating_group=args.rating_group)
    requested, used = _units(args, "requested"), _units(args, "used")
    if requested.ListFields():
        block.requested.CopyFrom(requested)
    if used.ListFields():
        block.used.CopyFrom(used)
    request = pb.CreditControlRequest(
        session_id=args.session_id, account_id=args.account_id,
        request_number=args.request_number, rating_groups=[block])
    async with _channel(args) as channel:
        stub = charging_pb2_grpc.ChargingStub(channel)
        method = {"initial": stub.Initial, "update": stub.Update,
                  "terminate": stub.Terminate}[args.command]
        return await method(request)


async def _plans_command(args: argparse.Namespace) -> admin_pb.ListPlansResponse:
    async with _channel(args) as channel:
        plans: admin_pb.ListPlansResponse = await admin_pb2_grpc.AdminStub(channel).ListPlans(
            admin_pb.ListPlansRequest())
        return plans


async def _health_command(args: argparse.Namespace) -> health_pb2.HealthCheckResponse:
    async with _channel(args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer: health_pb2.HealthCheckResponse = await stub.Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s)
        return answer


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader gone shows here, not in a traceback at exit
        return code
    except BrokenPipeError:
        # Whoever read our output has gone (`creditline reconcile ... | head`): stop quietly,
        # as other command-line tools do, with the shell's code for a broken pipe. Python
        # would print a traceback, and another one when it flushes stdout at exit: stdout
        # goes to /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="creditline", description="online charging server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the charging server", allow_abbrev=False)
    settings_module.add_arguments(serve)
    _client_parsers(commands)
    _books_parsers(commands)
    args = parser.parse_args(argv)
    if args.command in ("cdr", "reconcile"):
        return _books_command(args)

    if args.command == "serve":
        try:
            settings = settings_module.from_arguments(args)
            from creditline.charging.catalogue import load_catalogue
            from creditline.settings import check_files
            from creditline.workers import serve as serve_processes

            configure_logging(settings.log_format, settings.log_level)
            # bad files are refused before anything starts
            check_files(settings)
            load_catalogue(Path(settings.plan_path))
            return serve_processes(settings)
        except (ValueError, PlanError) as error:
            print(f"creditline: {error}", file=sys.stderr)
            return 2
    try:
        if args.command == "health":
            answer = asyncio.run(_health_command(args))
            _print(answer)
            return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1
        if args.command == "account":
            _print(asyncio.run(_account_command(args)))
        elif args.command == "identity":
            _print(asyncio.run(_identity_command(args)))
        elif args.command == "plans":
            _print(asyncio.run(_plans_command(args)))
        else:
            _print(asyncio.run(_credit_control_command(args)))
    except grpc.aio.AioRpcError as error:
        print(f"creditline: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
