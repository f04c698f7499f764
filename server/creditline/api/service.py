"""The gRPC servicers: decode, call the charging path, encode. No charging logic here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from redis.exceptions import RedisError

from creditline.api import messages
from creditline.charging.catalogue import Catalogue, Offer, PlansSeen
from creditline.charging.kernels import Kernels, require_kernels
from creditline.charging.rating import Plan, Rater, UnitKind
from creditline.charging.subscriptions import allowance_args, first_period
from creditline.errors import StoreUnavailableError
from creditline.settings import Settings
from creditline.store.contract import (
    ADMIN_IDENTITY_TYPE_OFFSET,
    GROUP_SEPARATOR,
    MAX_SAFE_INTEGER,
    NEXT_PLAN_FIELD,
    NEXT_PLAN_FROM_FIELD,
    PLAN_FIELD,
    SUBSCRIPTION_ID_TYPES,
    EventAction,
    IdentityKind,
    RequestKind,
    group_of,
    identity_data_problem,
    parse_subscription,
    plan_in_force,
    plan_to_retry,
)
from creditline.store.store import (
    MAX_BUCKETS_PER_ACCOUNT,
    AccountSnapshot,
    IdentityOutcome,
    Store,
    parse_bucket,
)
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc
from creditline.v1 import charging_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]
# Answers one Stream request, given what answers it: the call wrapper's span and metrics.
StreamRequestHook = Callable[
    [pb.StreamRequest, Callable[[pb.StreamRequest], Awaitable[bytes]]], Awaitable[bytes]]
# A StreamRequest's session request field -> the charging script's request kind.
_STREAM_KINDS = {"initial": RequestKind.INITIAL, "update": RequestKind.UPDATE,
                 "terminate": RequestKind.TERMINATE}


async def _call_store(call: Awaitable[T], timeout_s: float | None) -> T:
    """The call's result; timeout_s None: the call bounds itself (the lean EVALSHA path
    fails a request past its deadline), so no timer per request."""
    try:
        if timeout_s is None:
            return await call
        # asyncio.timeout, not wait_for: wait_for runs the call as a task of its own (a
        # Task, a waiter future and an extra event-loop turn per request on Python 3.11)
        async with asyncio.timeout(timeout_s):
            return await call
    except (TimeoutError, RedisError, OSError) as error:
        # the class and the text: redis-py 8's repr() of its errors gives the class alone
        # (its errors name no secret: the lean path's AUTH refusal leaves the password out)
        log.warning("redis call failed: %s: %s", type(error).__name__, error)
        raise StoreUnavailableError(repr(error)) from error


@dataclass(frozen=True, slots=True)
class _Pricing:
    """What a catalogue gives the Charging service: a request path per plan, each plan's
    supervision time, the default plan."""

    paths: Mapping[str, messages.RequestPath]
    supervision_ms: Mapping[str, int]
    default_plan_id: str
    default_path: messages.RequestPath
    plans: Mapping[str, Plan]

    @classmethod
    def of(cls, catalogue: Catalogue, kernels: Kernels, rater: Rater, settings: Settings
           ) -> _Pricing:
        paths = {plan_id: messages.RequestPath(kernels, plan, rater, settings)
                 for plan_id, plan in catalogue.plans.items()}
        supervision_ms = {
            plan_id: int(plan.validity_time_s * 1000 * settings.supervision_factor)
            for plan_id, plan in catalogue.plans.items()}
        default = catalogue.default_plan_id
        return cls(paths=paths, supervision_ms=supervision_ms, default_plan_id=default,
                   default_path=paths[default], plans=catalogue.plans)

    def member_period(self, account_id: str, plan_id: str, now_ms: int) -> str:
        """A group member's billing period by its plan (its limit counts spending in it);
        "" for an account of its own."""
        if GROUP_SEPARATOR not in account_id:
            return ""
        return self.plans[plan_id].billing_period(now_ms)


# A request is priced at most this many times: by the plan last seen, then by the
# account's (another try only when the plan changed again in between: a refusal then).
_PLAN_TRIES = 2
_UNABLE = messages.UNABLE_TO_COMPLY
# (script answers' form, "<code>;!<reason>": the kernels write them as refusals)
_PLAN_UNKNOWN = (f"{_UNABLE};!the account's plan {{plan_id!r}} is not in this server's "
                 "catalogue: retry (a catalogue being reloaded), or ChangePlan")
_PLAN_CHANGING = f"{_UNABLE};!the account's plan changed during the request: retry"

# The StreamAnswer field an answer goes in: credit_control (2) or event (3).
_CREDIT_CONTROL_FIELD, _EVENT_FIELD = 2, 3
_STORE_UNAVAILABLE = (messages.UNABLE_TO_COMPLY, "charging store unavailable: retry, then "
                      "apply failure handling")
_EVENT_STORE_UNAVAILABLE = (messages.UNABLE_TO_COMPLY, "charging store unavailable: retry")


class ChargingService:
    """The Charging service (methods found by name: handlers.add_service). Its answers are
    wire bytes written by the rating kernels (messages.RequestPath); the handlers send them
    as they are."""

    def __init__(self, store: Store, catalogue: Catalogue, rater: Rater, settings: Settings,
                 *, charge_calls_bounded: bool = False, kernels: Kernels | None = None,
                 plans_seen: PlansSeen | None = None,
                 stream_request: StreamRequestHook | None = None) -> None:
        self._store = store
        self._settings = settings
        # the compiled kernels, or the pure twin when CREDITLINE_PURE_RATING says so
        self._kernels = kernels or require_kernels()
        self._rater = rater
        self._pricing = _Pricing.of(catalogue, self._kernels, rater, settings)
        # (shared with the Admin service of the process: the plans it sets are known here)
        self._plans_seen = plans_seen or PlansSeen(settings.max_remembered_account_plans)
        # the store's charge calls fail by themselves after redis_call_timeout_s (the lean
        # path): no timer of ours per request
        self._charge_timeout_s = None if charge_calls_bounded else settings.redis_call_timeout_s
        # what answers each Stream request with its span and metrics (the call wrapper's),
        # given _stream_answer; None: nothing observes them
        self._stream_request = stream_request

    @property
    def path(self) -> messages.RequestPath:
        """The default plan's path: what no plan changes (the checks, the refusals)."""
        return self._pricing.default_path

    def use_catalogue(self, catalogue: Catalogue) -> None:
        """Prices the requests that start from now on by this catalogue (a reload): one
        swap, so every request is priced by one catalogue, the old or the new."""
        self._pricing = _Pricing.of(catalogue, self._kernels, self._rater, self._settings)

    async def Initial(self, request: pb.CreditControlRequest, context: Context) -> bytes:
        return await self.credit_control(request, RequestKind.INITIAL)

    async def Update(self, request: pb.CreditControlRequest, context: Context) -> bytes:
        return await self.credit_control(request, RequestKind.UPDATE)

    async def Terminate(self, request: pb.CreditControlRequest, context: Context) -> bytes:
        return await self.credit_control(request, RequestKind.TERMINATE)

    async def credit_control(self, request: pb.CreditControlRequest, kind: RequestKind
                             ) -> bytes:
        """The CreditControlAnswer's wire bytes (the unary calls', the Stream's and the
        Diameter front end's one path)."""
        now_ms = self._store.clock.now_ms()
        refused = self.path.check_credit_control(request, kind, now_ms)
        if refused:
            return self.path.refusal(request, refused)
        answer, path = await self._charge(kind, request, now_ms, EventAction.NONE,
                                          default_grant=True)
        if answer is None:
            return self.path.refusal(request, _STORE_UNAVAILABLE)
        return path.credit_control_answer(answer, request, request.event_time_unix_ms or now_ms)

    async def Stream(self, requests: AsyncIterator[pb.StreamRequest], context: Context
                     ) -> AsyncIterator[bytes | pb.StreamAnswer]:
        """Answers each request as soon as it is done; at most max_in_flight_per_stream
        at once. One writer: answers go through a queue to this generator."""
        answers: asyncio.Queue[bytes | pb.StreamAnswer | None] = asyncio.Queue()
        in_flight = asyncio.Semaphore(self._settings.max_in_flight_per_stream)
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: pb.StreamRequest) -> None:
            # put_nowait: the queue is unbounded (in_flight bounds it), so no coroutine
            try:
                hook = self._stream_request
                answers.put_nowait(await (self._stream_answer(request) if hook is None
                                          else hook(request, self._stream_answer)))
            except Exception:
                # every request gets an answer, or its client waits for ever
                log.exception("stream request %d failed", request.correlation_id)
                answers.put_nowait(_failed_stream_answer(request))
            finally:
                in_flight.release()

        async def read_all() -> None:
            try:
                async for request in requests:
                    await in_flight.acquire()
                    task = asyncio.create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.wait(set(tasks))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read_all())
        try:
            while (item := await answers.get()) is not None:
                yield item
            await reader  # re-raises what ended the reading
        finally:
            reader.cancel()
            for task in tasks:
                task.cancel()

    async def _stream_answer(self, request: pb.StreamRequest) -> bytes:
        which = request.WhichOneof("request")
        if which == "event":
            answer, field = await self.event(request.event), _EVENT_FIELD
        elif which is not None and (kind := _STREAM_KINDS.get(which)) is not None:
            answer = await self.credit_control(getattr(request, which), kind)
            field = _CREDIT_CONTROL_FIELD
        else:
            answer = self.path.refusal(pb.CreditControlRequest(), (
                messages.MISSING, "request: missing (initial, update, terminate or event)"))
            field = _CREDIT_CONTROL_FIELD
        return self.path.stream_answer(request.correlation_id, field, answer)

    async def _charge(self, kind: RequestKind,
                      request: pb.CreditControlRequest | pb.EventRequest,
                      now_ms: int, event_action: EventAction, default_grant: bool,
                      refund_of: str = "") -> tuple[str | None, messages.RequestPath]:
        """Rates the blocks by the plan the account was last seen on and runs the charging
        script; again by the account's plan when the script says it is on another (once:
        the plan seen is remembered, so the next request takes one round trip). The
        answer, None when Redis failed (nothing was applied: the script is atomic), and
        the path of the plan that priced it."""
        account_id = request.account_id
        pricing = self._pricing  # (one catalogue for the whole request)
        plan_id = self._plans_seen.plan_of(account_id, pricing.default_plan_id)
        if plan_id not in pricing.paths:  # (remembered from before a reload)
            plan_id = pricing.default_plan_id
        for _ in range(_PLAN_TRIES):
            path = pricing.paths[plan_id]
            answer = await self._charge_by(pricing, plan_id, kind, request, now_ms,
                                           event_action, default_grant, refund_of)
            account_plan = None if answer is None else plan_to_retry(answer)
            if account_plan is None:
                return answer, path
            self._plans_seen.remember(account_id, account_plan, pricing.default_plan_id)
            if account_plan not in pricing.paths:
                return _PLAN_UNKNOWN.format(plan_id=account_plan), path
            plan_id = account_plan
        return _PLAN_CHANGING, path

    async def _charge_by(self, pricing: _Pricing, plan_id: str, kind: RequestKind,
                         request: pb.CreditControlRequest | pb.EventRequest, now_ms: int,
                         event_action: EventAction, default_grant: bool, refund_of: str
                         ) -> str | None:
        """One charging script call, the blocks priced by `plan_id`, a plan of `pricing`."""
        event_time_ms = request.event_time_unix_ms or now_ms
        blocks = pricing.paths[plan_id].script_blocks(request.rating_groups, event_time_ms,
                                                      default_grant)
        supervision_ms = 0 if kind is RequestKind.EVENT else pricing.supervision_ms[plan_id]
        try:
            return await _call_store(self._store.charge(
                kind, request.account_id, request.session_id, request.request_number,
                now_ms, event_time_ms, event_action, blocks, supervision_ms, refund_of,
                assumed_plan=plan_id, default_plan=pricing.default_plan_id,
                member_period=pricing.member_period(request.account_id, plan_id, now_ms)),
                self._charge_timeout_s)
        except StoreUnavailableError:
            return None

    async def Event(self, request: pb.EventRequest, context: Context) -> bytes:
        return await self.event(request)

    async def event(self, request: pb.EventRequest) -> bytes:
        """The EventAnswer's wire bytes (as credit_control: every transport's path)."""
        now_ms = self._store.clock.now_ms()
        refused = self.path.check_event(request, now_ms)
        if refused:
            return self.path.event_refusal(request, refused)
        answer, path = await self._charge(
            RequestKind.EVENT, request, now_ms, messages.EVENT_ACTIONS[request.action],
            default_grant=False,
            refund_of=request.refund_of_session_id)
        if answer is None:
            return self.path.event_refusal(request, _EVENT_STORE_UNAVAILABLE)
        return path.event_answer(answer, request)


def _failed_stream_answer(request: pb.StreamRequest) -> pb.StreamAnswer:
    """5012 for a request whose answer could not be made, in the field of its kind."""
    failed = pb.StreamAnswer(correlation_id=request.correlation_id)
    answer = failed.event if request.WhichOneof("request") == "event" else \
        failed.credit_control
    answer.result_code = pb.UNABLE_TO_COMPLY
    answer.error_message = "the answer could not be made: retry"
    return failed


_UNIT_KIND_NAMES = {
    admin_pb.TIME: UnitKind.TIME.value, admin_pb.VOLUME: UnitKind.VOLUME.value,
    admin_pb.SERVICE_SPECIFIC: UnitKind.SERVICE_SPECIFIC.value,
}
_UNIT_KIND_ENUMS = {name: value for value, name in _UNIT_KIND_NAMES.items()}


class AdminService(admin_pb2_grpc.AdminServicer):
    """Accounts, top-ups, buckets and balances. Bad input: INVALID_ARGUMENT naming the field."""

    def __init__(self, store: Store, settings: Settings, catalogue: Catalogue,
                 kernels: Kernels | None = None, plans_seen: PlansSeen | None = None
                 ) -> None:
        self._store = store
        self._settings = settings
        self._catalogue = catalogue
        # the plans this process's accounts are put on, for its Charging service to price
        # their next requests by
        self._plans_seen = plans_seen
        self._kernels = (kernels or require_kernels()).module

    async def _run(self, context: Context, call: Callable[[], Awaitable[T]]
                   ) -> T:
        try:
            return await _call_store(call(), self._settings.redis_call_timeout_s)
        except StoreUnavailableError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "charging store unavailable")
            raise

    async def _check_account_id(self, account_id: str, context: Context
                                ) -> None:
        refused = self._kernels.check_ids("-", account_id, self._settings.max_session_id_bytes,
                                          self._settings.max_account_id_bytes)
        if refused:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused[1])

    async def _operate(self, context: Context, account_id: str, operation: str,
                       *args: int | str, facts: Mapping[str, object] | None = None,
                       now_ms: int | None = None) -> admin_pb.Account:
        """Runs the operation; the account it left, or the call aborted with the status
        that names the refusal, its message filled in with `facts` (the request's)."""
        result = await self._run(context, lambda: self._store.admin(
            account_id, operation, *args, now_ms=now_ms))
        if result.account is None:
            status, _, detail = result.status.partition("|")  # "CONFLICT|<amount>" ...
            refusals = _OPERATION_REFUSALS.get(operation, _ADMIN_REFUSALS)
            code, message = refusals.get(status, _ADMIN_REFUSALS.get(
                status, (grpc.StatusCode.INTERNAL, f"admin: {result.status}")))
            await context.abort(code, message.format_map(
                {**(facts or {}), "account_id": account_id, "detail": detail}))
            raise AssertionError("abort raises")
        return account_message(account_id, result.account, self._catalogue,
                               self._store.clock.now_ms())

    async def _check_plan_id(self, plan_id: str, context: Context) -> None:
        if plan_id not in self._catalogue.plans:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"plan_id: {plan_id!r} is "
                                "not a plan of the catalogue (Admin.ListPlans)")

    async def CreateAccount(self, request: admin_pb.CreateAccountRequest,
                            context: Context) -> admin_pb.Account:
        await self._check_account_id(request.account_id, context)
        for name in ("initial_balance_micros", "credit_limit_micros"):
            value = getattr(request, name)
            if abs(value) > MAX_SAFE_INTEGER:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: out of range")
        if request.credit_limit_micros < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "credit_limit_micros: must be 0 or more")
        if len(request.buckets) > MAX_BUCKETS_PER_ACCOUNT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"buckets: at most {MAX_BUCKETS_PER_ACCOUNT}")
        bucket_args: list[int | str] = []
        for index, bucket in enumerate(request.buckets):
            bucket_args += await self._bucket_args(bucket, f"buckets[{index}]", context)
        thresholds = request.low_balance_thresholds_micros
        if any(abs(t) > MAX_SAFE_INTEGER for t in thresholds):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "low_balance_thresholds_micros: out of range")
        plan_id = request.plan_id or self._catalogue.default_plan_id
        await self._check_plan_id(plan_id, context)
        member_limit = await self._member_limit(request, context)
        account = await self._operate(
            context, request.account_id, "CREATE", request.initial_balance_micros,
            request.credit_limit_micros, MAX_BUCKETS_PER_ACCOUNT,
            ",".join(str(t) for t in sorted(set(thresholds))), plan_id, member_limit,
            *bucket_args)
        self._saw_plan(account)
        return account

    @property
    def catalogue(self) -> Catalogue:
        return self._catalogue

    def use_catalogue(self, catalogue: Catalogue) -> None:
        """Serves this catalogue from the next call on (a reload)."""
        self._catalogue = catalogue

    def _saw_plan(self, account: admin_pb.Account) -> None:
        if self._plans_seen is not None:
            self._plans_seen.remember(account.account_id, account.plan_id,
                                      self._catalogue.default_plan_id)

    async def _member_limit(self, request: admin_pb.CreateAccountRequest, context: Context
                            ) -> str:
        """A new member's limit as admin.lua takes it ("": none); refuses what a member
        cannot have (money of its own) and a limit on an account of its own."""
        group = group_of(request.account_id)
        if group is None:
            if request.has_member_limit:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, (
                    "has_member_limit: only a group's member (account_id \"<group id>/"
                    "<member>\") has a limit"))
            return ""
        own_money = [
            name for name, value in (
                ("initial_balance_micros", request.initial_balance_micros),
                ("credit_limit_micros", request.credit_limit_micros),
                ("buckets", len(request.buckets)),
                ("low_balance_thresholds_micros", len(request.low_balance_thresholds_micros)))
            if value]
        if own_money:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, (
                f"{own_money[0]}: a member of group {group!r} has no money or buckets of "
                "its own (they are the group's: top up, adjust and add buckets to the "
                "group)"))
        return await self._limit_text(request.has_member_limit, request.member_limit_micros,
                                      "member_limit_micros", context)

    async def _limit_text(self, has_limit: bool, limit_micros: int, field: str,
                          context: Context) -> str:
        if not has_limit:
            return ""
        if not 0 <= limit_micros <= MAX_SAFE_INTEGER:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{field}: 0 to {MAX_SAFE_INTEGER}")
        return str(limit_micros)

    async def SetMemberLimit(self, request: admin_pb.SetMemberLimitRequest,
                             context: Context) -> admin_pb.Account:
        await self._check_account_id(request.account_id, context)
        limit = await self._limit_text(request.has_limit, request.limit_micros,
                                       "limit_micros", context)
        return await self._operate(context, request.account_id, "LIMIT", limit)

    async def _bucket_args(self, bucket: admin_pb.Bucket, where: str,
                           context: Context) -> list[int | str]:
        problems = []
        if not bucket.bucket_id or not messages.ACCOUNT_ID_PATTERN.fullmatch(bucket.bucket_id):
            problems.append(f"{where}.bucket_id: missing or not made of letters, digits, ._:@+-")
        if bucket.unit_kind not in _UNIT_KIND_NAMES:
            problems.append(f"{where}.unit_kind: missing or unknown")
        if not 0 < bucket.initial_units <= MAX_SAFE_INTEGER:
            problems.append(f"{where}.initial_units: must be 1..{MAX_SAFE_INTEGER}")
        if bucket.expires_at_unix_s < 0:
            problems.append(f"{where}.expires_at_unix_s: must be 0 (never) or a unix time")
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        return [bucket.bucket_id, bucket.rating_group, bucket.initial_units,
                bucket.expires_at_unix_s, bucket.priority, _UNIT_KIND_NAMES[bucket.unit_kind]]

    async def TopUp(self, request: admin_pb.TopUpRequest, context: Context
                    ) -> admin_pb.Account:
        await self._check_account_id(request.account_id, context)
        if not 0 < request.amount_micros <= MAX_SAFE_INTEGER:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"amount_micros: must be 1..{MAX_SAFE_INTEGER}")
        await _check_idempotency_id(request.top_up_id, "top_up_id", "top-ups", context)
        # a top-up id seen before changes nothing and answers the account as it is
        return await self._operate(context, request.account_id, "TOPUP",
                                   request.amount_micros, request.top_up_id, facts={
                                       "id_field": "top_up_id", "id": request.top_up_id,
                                       "amount": request.amount_micros})

    async def AddBucket(self, request: admin_pb.AddBucketRequest,
                        context: Context) -> admin_pb.Account:
        await self._check_account_id(request.account_id, context)
        args = await self._bucket_args(request.bucket, "bucket", context)
        return await self._operate(context, request.account_id, "BUCKET",
                                   MAX_BUCKETS_PER_ACCOUNT, *args)

    async def AdjustBalance(self, request: admin_pb.AdjustBalanceRequest,
                            context: Context) -> admin_pb.Account:
        await self._check_account_id(request.account_id, context)
        if not 0 < abs(request.amount_micros) <= MAX_SAFE_INTEGER:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "amount_micros: must be a "
                                f"credit or a debit of 1..{MAX_SAFE_INTEGER}, not 0")
        await _check_idempotency_id(request.adjustment_id, "adjustment_id", "adjustments",
                                    context)
        if not request.reason.strip() or len(request.reason) > MAX_REASON_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "reason: required "
                                f"(1..{MAX_REASON_CHARS} characters): why the balance changes")
        return await self._operate(context, request.account_id, "ADJUST",
                                   request.amount_micros, request.adjustment_id, request.reason,
                                   facts={"id_field": "adjustment_id",
                                          "id": request.adjustment_id,
                                          "amount": request.amount_micros})

    async def SetAccountState(self, request: admin_pb.SetAccountStateRequest,
                              context: Context) -> admin_pb.Account:
        await self._check_account_id(request.account_id, context)
        states = {admin_pb.ACTIVE: "active", admin_pb.BARRED: "barred"}
        if request.state not in states:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "state: ACTIVE or BARRED")
        return await self._operate(context, request.account_id, "STATE",
                                   states[request.state])

    async def GetAccount(self, request: admin_pb.GetAccountRequest,
                         context: Context) -> admin_pb.Account:
        await self._check_account_id(request.account_id, context)
        return await self._operate(context, request.account_id, "GET")

    async def ChangePlan(self, request: admin_pb.ChangePlanRequest,
                         context: Context) -> admin_pb.Account:
        await self._check_account_id(request.account_id, context)
        await self._check_plan_id(request.plan_id, context)
        if not request.from_next_period:
            account = await self._operate(context, request.account_id, "PLAN",
                                          request.plan_id, self._catalogue.default_plan_id,
                                          "0", "")
            self._saw_plan(account)
            return account
        # (the boundary is the current plan's: read it first; the script refuses the
        # change if the plan changed in between)
        current = await self._operate(context, request.account_id, "GET")
        plan = self._catalogue.plans.get(current.plan_id)
        if plan is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"the account's plan "
                                f"{current.plan_id!r} is not in this server's catalogue")
            raise AssertionError("abort raises")
        from_ms = plan.next_period_start_ms(self._store.clock.now_ms())
        return await self._operate(context, request.account_id, "PLAN", request.plan_id,
                                   self._catalogue.default_plan_id, from_ms, current.plan_id)

    async def BuyAddOn(self, request: admin_pb.BuyAddOnRequest, context: Context
                       ) -> admin_pb.Account:
        await self._check_account_id(request.account_id, context)
        offer = self._catalogue.offers.get(request.offer_id)
        if offer is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"offer_id: "
                                f"{request.offer_id!r} is not an offer of the catalogue "
                                "(Admin.ListPlans)")
            raise AssertionError("abort raises")
        await _check_idempotency_id(request.purchase_id, "purchase_id", "purchases", context)
        if not messages.ACCOUNT_ID_PATTERN.fullmatch(request.purchase_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "purchase_id: letters, "
                                "digits and ._:@+- only (it names the add-on's buckets)")
        expires_at_s = self._store.clock.now_ms() // 1000 + offer.validity_s
        allowances: list[int | str] = []
        for allowance in offer.allowances:
            allowances += [allowance.rating_group, allowance.units, expires_at_s,
                           allowance.priority, allowance.unit_kind.value]
        return await self._operate(
            context, request.account_id, "PURCHASE", request.purchase_id, offer.offer_id,
            offer.price_micros, ",".join(sorted(offer.plans)),
            self._catalogue.default_plan_id, MAX_BUCKETS_PER_ACCOUNT, *allowances,
            facts={"purchase_id": request.purchase_id, "offer_id": offer.offer_id,
                   "price": offer.price_micros})

    async def _recurring_offer(self, offer_id: str, context: Context) -> Offer:
        offer = self._catalogue.offers.get(offer_id)
        if offer is None or not offer.recurring:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"offer_id: {offer_id!r} "
                                "is not a recurring offer of the catalogue (Admin.ListPlans)")
            raise AssertionError("abort raises")
        return offer

    async def SubscribeToOffer(self, request: admin_pb.SubscribeToOfferRequest,
                               context: Context) -> admin_pb.Account:
        await self._check_account_id(request.account_id, context)
        offer = await self._recurring_offer(request.offer_id, context)
        # (a monthly offer's first period ends on the billing day of the account's plan)
        current = await self._operate(context, request.account_id, "GET")
        plan = self._catalogue.plans.get(current.plan_id, self._catalogue.default_plan)
        # (one instant for the period's end and for its start, which the script takes)
        now_ms = self._store.clock.now_ms()
        first = first_period(offer, plan, now_ms)
        return await self._operate(
            context, request.account_id, "SUBSCRIBE", offer.offer_id, first.end_ms,
            first.fee_micros, offer.on_short_balance.value, ",".join(sorted(offer.plans)),
            self._catalogue.default_plan_id, MAX_BUCKETS_PER_ACCOUNT,
            *allowance_args(offer, first.end_ms, first),
            facts={"offer_id": offer.offer_id, "price": first.fee_micros}, now_ms=now_ms)

    async def CancelSubscription(self, request: admin_pb.CancelSubscriptionRequest,
                                 context: Context) -> admin_pb.Account:
        await self._check_account_id(request.account_id, context)
        if not request.offer_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "offer_id: required")
        return await self._operate(context, request.account_id, "CANCEL", request.offer_id,
                                   "1" if request.immediately else "0",
                                   facts={"offer_id": request.offer_id})

    async def _identity_kind(self, type_number: int, data: str, context: Context
                             ) -> IdentityKind:
        """The table's kind of the request's identity type; refuses data it cannot hold."""
        kind = _IDENTITY_KINDS.get(type_number)
        if kind is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "type: missing or unknown "
                                "(END_USER_E164, _IMSI, _SIP_URI, _NAI or _PRIVATE)")
            raise AssertionError("abort raises")
        problem = identity_data_problem(kind, data)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"data: {problem}")
        return kind

    async def SetSubscriberIdentity(self, request: admin_pb.SetSubscriberIdentityRequest,
                                    context: Context) -> admin_pb.SubscriberIdentity:
        kind = await self._identity_kind(request.type, request.data, context)
        await self._check_account_id(request.account_id, context)
        binding = await self._run(context, lambda: self._store.set_identity(
            kind, request.data, request.account_id, replace=request.replace))
        if binding.outcome is IdentityOutcome.UNKNOWN_ACCOUNT:
            code, message = _ADMIN_REFUSALS["UNKNOWN"]
            await context.abort(code, message.format(account_id=request.account_id))
        if binding.outcome is IdentityOutcome.TAKEN:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, (
                f"data: {_identity_name(request)} is bound to account {binding.previous!r}; "
                "nothing changed (replace rebinds it)"))
        return admin_pb.SubscriberIdentity(type=request.type, data=request.data,
                                           account_id=request.account_id)

    async def RemoveSubscriberIdentity(self, request: admin_pb.SubscriberIdentityRequest,
                                       context: Context) -> admin_pb.SubscriberIdentity:
        return await self._bound_identity(request, self._store.remove_identity, context)

    async def GetSubscriberIdentity(self, request: admin_pb.SubscriberIdentityRequest,
                                    context: Context) -> admin_pb.SubscriberIdentity:
        return await self._bound_identity(request, self._store.identity_account, context)

    async def _bound_identity(
            self, request: admin_pb.SubscriberIdentityRequest,
            account_of: Callable[[IdentityKind, str], Awaitable[str | None]],
            context: Context) -> admin_pb.SubscriberIdentity:
        """The identity's binding as account_of (a read, or the removal) answers it;
        NOT_FOUND when it had none."""
        kind = await self._identity_kind(request.type, request.data, context)
        account_id = await self._run(context, lambda: account_of(kind, request.data))
        if account_id is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"data: {_identity_name(request)} is bound to no account")
            raise AssertionError("abort raises")
        return admin_pb.SubscriberIdentity(type=request.type, data=request.data,
                                           account_id=account_id)

    async def ListPlans(self, request: admin_pb.ListPlansRequest,
                        context: Context) -> admin_pb.ListPlansResponse:
        catalogue = self._catalogue
        return admin_pb.ListPlansResponse(
            plans=[admin_pb.Plan(plan_id=plan_id,
                                 rating_groups=sorted({rg for rg, _ in plan.tariffs}),
                                 billing_day=plan.billing_day, time_zone=plan.time_zone)
                   for plan_id, plan in catalogue.plans.items()],
            default_plan_id=catalogue.default_plan_id,
            catalogue_version=catalogue.version,
            offers=[_offer_message(offer) for offer in catalogue.offers.values()])


# The Admin API's IdentityType numbers -> the identity table's kinds (RFC 4006's
# Subscription-Id-Type numbers shifted by the offset: protobuf keeps 0 unspecified).
_IDENTITY_KINDS = {number + ADMIN_IDENTITY_TYPE_OFFSET: kind
                   for number, kind in SUBSCRIPTION_ID_TYPES.items()}


def _identity_name(request: admin_pb.SubscriberIdentityRequest
                   | admin_pb.SetSubscriberIdentityRequest) -> str:
    """The identity as a refusal names it: "END_USER_E164 '491701234567'"."""
    return f"{admin_pb.IdentityType.Name(request.type)} {request.data!r}"


# The longest reason an adjustment may give (it is kept in the CDR and the notification).
MAX_REASON_CHARS = 256
# The longest top-up or adjustment id.
MAX_IDEMPOTENCY_ID_CHARS = 128


async def _check_idempotency_id(value: str, field: str, what: str, context: Context) -> None:
    if not value or len(value) > MAX_IDEMPOTENCY_ID_CHARS:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{field}: required (1..{MAX_IDEMPOTENCY_ID_CHARS} characters), "
                            f"makes {what} idempotent")


def _offer_message(offer: Offer) -> admin_pb.Offer:
    return admin_pb.Offer(
        offer_id=offer.offer_id, kind=offer.kind, price_micros=offer.price_micros,
        validity_s=offer.validity_s, plan_ids=sorted(offer.plans),
        allowances=[admin_pb.Allowance(
            rating_group=a.rating_group, unit_kind=_UNIT_KIND_ENUMS[a.unit_kind.value],
            units=a.units, priority=a.priority, rollover_cap_units=a.rollover_cap_units)
            for a in offer.allowances],
        period=offer.period, period_days=offer.period_days,
        on_short_balance=offer.on_short_balance.value if offer.recurring else "")


# BuyAddOn's refusals (nothing changed): {purchase_id}, {offer_id}, {price}, {detail}
_PURCHASE_REFUSALS = {
    "CONFLICT": (grpc.StatusCode.ALREADY_EXISTS,
                 "purchase_id: {purchase_id!r} bought offer {detail!r}, not {offer_id!r}; "
                 "nothing changed (a new purchase needs a new id)"),
    "UNAFFORDABLE": (grpc.StatusCode.FAILED_PRECONDITION,
                     "offer_id: {offer_id!r} costs {price} micros, more than the {detail} "
                     "available (balance + credit limit - reserved); nothing changed"),
    "NOT_SOLD": (grpc.StatusCode.FAILED_PRECONDITION,
                 "offer_id: {offer_id!r} is not sold with the account's plan {detail!r}; "
                 "nothing changed"),
    "BUCKET_EXISTS": (grpc.StatusCode.ALREADY_EXISTS,
                      "purchase_id: the account has a bucket named by {purchase_id!r} "
                      "already (its add-on buckets are \"<purchase id>.<n>\"); nothing changed"),
}

# SubscribeToOffer's and CancelSubscription's: {offer_id} (the first argument), {detail}
_SUBSCRIPTION_REFUSALS = {
    "UNAFFORDABLE": (grpc.StatusCode.FAILED_PRECONDITION,
                     "offer_id: {offer_id!r}'s first fee is {price} micros, more than the "
                     "{detail} available (balance - reserved, with the credit limit only when "
                     "the offer's on_short_balance is credit_limit); nothing changed"),
    "NOT_SOLD": _PURCHASE_REFUSALS["NOT_SOLD"],
    "NOT_SUBSCRIBED": (grpc.StatusCode.NOT_FOUND, "offer_id: the account does not subscribe "
                       "to {offer_id!r}"),
}

# ChangePlan's from the next period: the plan the boundary was computed by is gone
_PLAN_REFUSALS = {
    "CONFLICT": (grpc.StatusCode.ABORTED, "the account's plan changed meanwhile (to "
                 "{detail!r}); nothing changed: retry"),
}

# admin.lua refusals -> (gRPC status, message; {account_id}, {detail} (what the script
# said after "|") and the request's facts ({id_field}, {id} and {amount} of a top-up or
# an adjustment) are filled in)
_ADMIN_REFUSALS = {
    "CONFLICT": (grpc.StatusCode.ALREADY_EXISTS,
                 "{id_field}: {id!r} was applied with amount_micros {detail}, not "
                 "{amount}; nothing changed (a new top-up or adjustment needs a new id)"),
    "UNAFFORDABLE": (grpc.StatusCode.FAILED_PRECONDITION,
                     "amount_micros: a debit of {amount} is more than the {detail} available "
                     "(balance + credit limit - reserved); nothing changed"),
    "UNKNOWN": (grpc.StatusCode.NOT_FOUND, "account_id: {account_id} unknown"),
    "EXISTS": (grpc.StatusCode.ALREADY_EXISTS, "account_id: {account_id} exists"),
    "BUCKET_EXISTS": (grpc.StatusCode.ALREADY_EXISTS, "bucket.bucket_id: exists"),
    "TOO_MANY_BUCKETS": (grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"buckets: the account would hold more than {MAX_BUCKETS_PER_ACCOUNT}"),
    "NO_GROUP": (grpc.StatusCode.FAILED_PRECONDITION,
                 "account_id: {account_id}'s group does not exist (create the group's "
                 "account first)"),
    "MEMBER": (grpc.StatusCode.FAILED_PRECONDITION,
               "account_id: {account_id} is a member of group {detail!r}, whose money and "
               "allowances it draws on: top up, adjust, add buckets, buy and subscribe for "
               "the group; nothing changed"),
    "NOT_MEMBER": (grpc.StatusCode.FAILED_PRECONDITION,
                   "account_id: {account_id} is no group's member (\"<group id>/<member>\")"),
}


def _plans_of(fields: Mapping[str, str], default_plan_id: str, now_ms: int
              ) -> dict[str, Any]:
    """The account's plan now and the one scheduled, by contract.plan_in_force."""
    plan_id = fields.get(PLAN_FIELD, default_plan_id)
    next_plan_id, next_from_ms = fields.get(NEXT_PLAN_FIELD), fields.get(NEXT_PLAN_FROM_FIELD)
    in_force = plan_in_force(plan_id, next_plan_id, next_from_ms, default_plan_id, now_ms)
    if in_force != plan_id or not next_plan_id:
        return {"plan_id": in_force}
    return {"plan_id": plan_id, "next_plan_id": next_plan_id,
            "next_plan_from_unix_ms": int(next_from_ms or 0)}


def _member_fields(account: admin_pb.Account, fields: Mapping[str, str],
                   catalogue: Catalogue, now_ms: int) -> None:
    """A member's group, limit and spending in its plan's billing period (charge.lua
    starts a new period's count from 0 at the period's first charge); what it may still
    spend within its limit bounds its available."""
    account.group_id = fields["group"]
    plan = catalogue.plans.get(account.plan_id, catalogue.default_plan)
    account.member_billing_period = plan.billing_period(now_ms)
    spent = int(fields.get("spent", 0))
    if fields.get("spent_period") != account.member_billing_period:
        spent = 0
    account.member_spent_micros = spent
    if "limit" in fields:
        account.has_member_limit = True
        account.member_limit_micros = int(fields["limit"])
        account.available_micros = min(account.available_micros,
                                       account.member_limit_micros - max(0, spent)
                                       - account.reserved_micros)


# (after _ADMIN_REFUSALS: an operation's own refusals first, then the common ones)
_OPERATION_REFUSALS = {"PURCHASE": _PURCHASE_REFUSALS, "PLAN": _PLAN_REFUSALS,
                       "SUBSCRIBE": _SUBSCRIPTION_REFUSALS, "CANCEL": _SUBSCRIPTION_REFUSALS}


def account_message(account_id: str, snapshot: AccountSnapshot, catalogue: Catalogue,
                    now_ms: int) -> admin_pb.Account:
    """The Account message; an account with no plan of its own (made before plans) is on
    the catalogue's default plan. A group's member shows its group's money."""
    fields = snapshot.account
    money = snapshot.group or fields  # (a member: its group's)
    balance, credit_limit = int(money["balance"]), int(money["credit_limit"])
    reserved = int(fields["reserved"])
    barred = "barred" in (fields["state"], money["state"])
    account = admin_pb.Account(
        account_id=account_id, state=admin_pb.BARRED if barred else admin_pb.ACTIVE,
        balance_micros=balance, credit_limit_micros=credit_limit, reserved_micros=reserved,
        available_micros=balance + credit_limit - int(money["reserved"]),
        initial_balance_micros=int(fields.get("initial", 0)),
        topped_up_micros=int(fields.get("topped_up", 0)), charged_micros=int(fields["charged"]),
        refunded_micros=int(fields["refunded"]), open_sessions=snapshot.open_sessions,
        purchased_micros=int(fields.get("purchased", 0)),
        adjusted_micros=int(fields.get("adjusted", 0)), fees_micros=int(fields.get("fees", 0)),
        member_ids=sorted(snapshot.members),
        **_plans_of(fields, catalogue.default_plan_id, now_ms),
    )
    if snapshot.group:
        _member_fields(account, fields, catalogue, now_ms)
    for offer_id, value in sorted(snapshot.subscriptions.items()):
        subscription = parse_subscription(value)
        account.subscriptions.add(
            offer_id=offer_id, state=subscription.state,
            period_start_unix_ms=subscription.period_start_ms,
            period_end_unix_ms=subscription.period_end_ms, periods=subscription.periods)
    for bucket_id, value in sorted(snapshot.buckets.items()):
        bucket = parse_bucket(value)
        account.buckets.add(
            bucket_id=bucket_id, rating_group=bucket.rating_group,
            remaining_units=bucket.remaining, initial_units=bucket.initial,
            expires_at_unix_s=bucket.expires_at_s, priority=bucket.priority,
            unit_kind=_UNIT_KIND_ENUMS.get(bucket.unit_kind, admin_pb.UNIT_KIND_UNSPECIFIED),
            reserved_units=bucket.reserved,
        )
    usage: dict[str, dict[str, int]] = {}
    periods: dict[str, str] = {}
    for field, value in snapshot.usage.items():
        rg, name = field.rsplit(":", 1)
        if name == "period":
            periods[rg] = value
        else:
            usage.setdefault(rg, {})[name] = int(value)
    for rg, values in sorted(usage.items(), key=lambda item: item[0]):
        account.usage.add(
            rating_group=int(rg.split(".")[0]), used_units=values.get("used", 0),
            charged_micros=values.get("charged", 0),
            units_from_buckets=values.get("from_buckets", 0),
            uncharged_micros=values.get("uncharged", 0),
            billing_period=periods.get(rg, ""), period_units=values.get("period_units", 0),
        )
    return account
