"""The spans as OTLP: the server's exporters (HTTP and gRPC) send them to real receivers
(the collector's TraceService, and its HTTP form, from opentelemetry-proto)."""

from __future__ import annotations

import asyncio
import os
import uuid

import grpc
import pytest
from creditline.api.app import start_server, stop_server
from creditline.observability.telemetry import build_telemetry
from creditline.settings import Settings
from creditline.store.redis_process import RedisProcess
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc, notifications_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import notifications_pb2 as notifications_pb
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan

from tests.books import Books
from tests.messages import RG_VOICE, block, ccr
from tests.otlp_receiver import otlp_receiver
from tests.stream_client import charging_over

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
INITIAL = "creditline.v1.Charging/Initial"


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_the_otlp_exporters_send_the_call_spans_to_a_receiver(
        protocol: str, redis_process: RedisProcess, settings: Settings,
        checked_books: Books) -> None:
    with otlp_receiver(protocol) as receiver:
        endpoint, requests = receiver.endpoint, receiver.requests
        environ = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp",
                   "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                   "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
                   "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_SERVICE_NAME": "ocs-test"}
        running = await start_server(settings, redis_process.url,
                                     build_telemetry(settings, environ))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                account_id = f"otlp{os.getpid()}-{uuid.uuid4().hex[:12]}"
                checked_books.track(account_id)
                await admin_pb2_grpc.AdminStub(channel).CreateAccount(
                    admin_pb.CreateAccountRequest(account_id=account_id,
                                                  initial_balance_micros=5_000_000))
                answer = await charging_pb2_grpc.ChargingStub(channel).Initial(
                    ccr(f"{account_id};otlp-1", account_id, 0, block(RG_VOICE, requested=60)),
                    metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),))
                assert answer.result_code == pb.SUCCESS
                await _stream_and_subscription(channel, account_id)
        finally:
            await stop_server(running, grace_s=1.0)  # flushes the batch to the receiver
    assert requests
    service_names = {attribute.value.string_value for request in requests
                     for resource_spans in request.resource_spans
                     for attribute in resource_spans.resource.attributes
                     if attribute.key == "service.name"}
    assert service_names == {"ocs-test"}
    spans = receiver.spans()
    [initial] = [span for span in spans if span.name == INITIAL]
    assert initial.trace_id.hex() == TRACE_ID and initial.parent_span_id.hex() == PARENT_SPAN_ID
    assert initial.kind == OtlpSpan.SPAN_KIND_SERVER
    attributes = {attribute.key: attribute.value for attribute in initial.attributes}
    assert attributes["creditline.account_id"].string_value == account_id
    assert attributes["creditline.result_code"].int_value == pb.SUCCESS
    assert [value.int_value for value in
            attributes["creditline.rating_groups"].array_value.values] == [RG_VOICE]
    # (on one Redis server the session id's claim is taken inside the charging script: one
    # Redis call; the voice tariff's table is made once: no rating span, no child at all)
    assert attributes["creditline.redis.calls"].int_value == 1
    assert attributes["creditline.redis.duration_s"].double_value > 0
    assert not [span for span in spans if span.parent_span_id == initial.span_id]
    assert any(span.name == "creditline.v1.Admin/CreateAccount" for span in spans)
    [stream] = [span for span in spans if span.name == "creditline.v1.Charging/Stream"]
    [update] = [span for span in spans if span.name == "creditline.v1.Charging/Update"]
    assert [link.span_id for link in update.links] == [stream.span_id]
    assert not update.parent_span_id  # a trace of its own
    [subscription] = [span for span in spans
                      if span.name == "creditline.v1.Notifications/Subscribe"]
    assert subscription.kind == OtlpSpan.SPAN_KIND_SERVER


async def _stream_and_subscription(channel: grpc.aio.Channel, account_id: str) -> None:
    """An Update over Charging.Stream, seen by a subscription that then ends."""
    subscription = notifications_pb2_grpc.NotificationsStub(channel).Subscribe(
        notifications_pb.SubscribeRequest(account_ids=[account_id]))
    await asyncio.wait_for(subscription.initial_metadata(), 10)
    async with charging_over(channel, "stream") as stream:
        answer = await stream.Update(ccr(f"{account_id};otlp-1", account_id, 1,
                                         block(RG_VOICE, used=30, requested=60)))
        assert answer.result_code == pb.SUCCESS
    await asyncio.wait_for(subscription.read(), 10)
    subscription.cancel()
    await asyncio.sleep(0.2)  # the subscription's span ends on the server after the cancel
