"""The Prometheus names of Creditline's metrics, as its /metrics endpoint exposes them: the
one list that deploy/prometheus/alerts.yml, deploy/grafana/creditline.json and their tests
are checked against.

Where the names come from: the server's OpenTelemetry instruments (today in
server/creditline/observability/telemetry.py, `Metrics`), turned into Prometheus names by
opentelemetry-exporter-prometheus: dots become underscores, a counter gets `_total`, a
unit that is not an annotation is appended (`s` -> `_seconds`; `{request}`, `{micro}`
and the other braces add nothing), a histogram is exposed as `_bucket`, `_count` and
`_sum` series. Each name below was read off a real scrape (a server with
`--metrics-listen-address`, a session, an event, a Stream request and a subscription;
tests/test_operator_metrics.py does the same and holds this list to it), with its labels.
"""

from __future__ import annotations

from typing import NamedTuple


class Metric(NamedTuple):
    name: str                     # the Prometheus family name
    kind: str                     # counter | gauge | histogram
    labels: frozenset[str]        # the labels the server puts on it (not job/instance)
    source: str                   # the OTel instrument it comes from


def _metric(name: str, kind: str, source: str, *labels: str) -> Metric:
    return Metric(name, kind, frozenset(labels), source)


# rpc.* semantic-convention labels every per-call metric carries, and how the request came:
# unary, or over a gRPC stream (a Charging.Stream request, the streaming call itself)
_RPC = ("rpc_system", "rpc_service", "rpc_method", "creditline_transport")

# Exposed: tests/test_operator_metrics.py requires each of them on a live scrape.
EXISTING: tuple[Metric, ...] = (
    _metric("creditline_rpc_requests_total", "counter", "creditline.rpc.requests",
            *_RPC, "rpc_grpc_status_code",
            "creditline_result_code"),     # Diameter result code; 0 for Admin
    _metric("rpc_server_call_duration_seconds", "histogram", "rpc.server.call.duration",
            *_RPC, "rpc_grpc_status_code"),
    _metric("creditline_units_granted_total", "counter", "creditline.units.granted",
            "creditline_rating_group", "creditline_unit"),
    _metric("creditline_charged_total", "counter", "creditline.charged (micro-units)",
            "creditline_rating_group", "rpc_method"),
    _metric("creditline_redis_script_duration_seconds", "histogram",
            "creditline.redis.script.duration", "creditline_script"),
    _metric("creditline_accounts", "gauge", "creditline.accounts (observable gauge)"),
    _metric("creditline_notification_subscribers", "gauge",
            "creditline.notification.subscribers (up-down counter)"),
    _metric("creditline_cdr_backlog", "gauge", "creditline.cdr.backlog (observable gauge)"),
    _metric("creditline_rpc_in_flight", "gauge", "creditline.rpc.in_flight", *_RPC),
    _metric("creditline_stream_in_flight", "gauge", "creditline.stream.in_flight"),
    _metric("creditline_hub_lag", "gauge",
            "creditline.hub.lag (events read for a subscriber, not yet written to it)"),
    _metric("creditline_redis_unable_to_comply_total", "counter",
            "creditline.redis.unable_to_comply (5012 answers)", *_RPC),
    _metric("creditline_supervision_closures_total", "counter",
            "creditline.supervision.closures (observable counter)"),
    _metric("creditline_redis_up", "gauge", "creditline.redis.up (1 reachable, 0 not)"),
    _metric("creditline_events_delivered_total", "counter", "creditline.events.delivered",
            "rpc_method"),
)

# Names the rules may use before the server exposes them: none left (issue 19 landed).
COMING: tuple[Metric, ...] = ()

# Made by Prometheus itself for every target it scrapes, never by the server.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
PROMETHEUS_LABELS = frozenset({"job", "instance", "le"})

_SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("",), "gauge": ("",)}


def series_names(metrics: tuple[Metric, ...]) -> frozenset[str]:
    """The names of the series these metrics appear as on /metrics (a histogram's three)."""
    return frozenset(m.name + suffix for m in metrics for suffix in _SUFFIXES[m.kind])


REQUIRED = series_names(EXISTING)
EXPECTED_LATER = series_names(COMING)
KNOWN = REQUIRED | EXPECTED_LATER | PROMETHEUS_SERIES
KNOWN_LABELS = frozenset().union(*(m.labels for m in EXISTING)) | PROMETHEUS_LABELS
