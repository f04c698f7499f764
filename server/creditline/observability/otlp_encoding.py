"""The OTLP wire form of the server's call spans (telemetry.CallSpan), written straight
from their plain values, with no SDK span objects in between.

Why our own: the OTLP exporters encode each SDK span through opentelemetry's generic
encoder (a protobuf object per span, attribute and value, the resource hashed through
json.dumps for every span): 65 us for a call's three spans on this machine, more than
a quarter of what the call itself costs the server (`python bench/tracing_overhead.py
--encode-otlp`). Written directly, most of a span's bytes are the same for every call of
a method and are made once. The bytes are an ExportTraceServiceRequest as the SDK's
encoder makes it (a test parses both and compares them); protobuf's wire rules are in
https://protobuf.dev/programming-guides/encoding/.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from creditline.observability.telemetry import CallSpan

# The most attribute mappings whose encoding is kept (methods, scripts, rating groups: a
# few dozen in practice); past it each is written afresh.
MAX_SHARED_ATTRIBUTES = 1024
# wire types
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
# Span.flags, as the SDK's encoder sets them: whether the parent is remote is known, and
# whether it is
_FLAGS_HAS_IS_REMOTE = 0x100
_FLAGS_IS_REMOTE = 0x200
_UINT64 = (1 << 64) - 1
_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
_double = struct.Struct("<d").pack


def _varint_slow(value: int) -> bytes:
    value &= _UINT64  # a negative int64 is written as its 64-bit two's complement
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Every value below 2^14 (lengths, small ids and counts) written once, looked up after.
_SMALL_VARINTS = [_varint_slow(value) for value in range(1 << 14)]


def _varint(value: int) -> bytes:
    if 0 <= value < 1 << 14:
        return _SMALL_VARINTS[value]
    return _varint_slow(value)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


# the tag of a length-delimited field, by field number
_LENGTH_TAGS = [_tag(field, _LENGTH) for field in range(17)]


def _length_field(field: int, data: bytes) -> bytes:
    # (_varint inlined: ~40 fields a call)
    size = len(data)
    return _LENGTH_TAGS[field] + (_SMALL_VARINTS[size] if size < 1 << 14
                                  else _varint_slow(size)) + data


def _string_field(field: int, text: str) -> bytes:
    return _length_field(field, text.encode())


def _any_value(value: Any) -> bytes:
    """An AnyValue: string 1, bool 2, int 3, double 4, array 5, bytes 7."""
    if isinstance(value, str):
        return _string_field(1, value)
    if isinstance(value, bool):  # before int: a bool is an int
        return _tag(2, _VARINT) + _varint(int(value))
    if isinstance(value, int):
        return _INT_TAG + _varint(value)
    if isinstance(value, float):
        return _tag(4, _FIXED64) + _double(value)
    if isinstance(value, bytes):
        return _length_field(7, value)
    if isinstance(value, Sequence):
        return _length_field(5, b"".join(_length_field(1, _any_value(item))
                                          for item in value))
    raise TypeError(f"span attribute value {value!r}: not an OTLP value")


_INT_TAG = _tag(3, _VARINT)


def _key_value(key: str, value: Any) -> bytes:
    """A KeyValue's body: key 1, value 2."""
    return _string_field(1, key) + _length_field(2, _any_value(value))


def _attributes(field: int, attributes: Mapping[str, Any] | None) -> bytes:
    """Repeated KeyValue in `field`."""
    if not attributes:
        return b""
    return b"".join(_length_field(field, _key_value(key, value))
                    for key, value in attributes.items())


def _status(code: StatusCode, description: str | None) -> bytes:
    """Span.status (15), always written, as the SDK's encoder does: message 2, code 3."""
    body = (b"" if description is None else _string_field(2, description)) + (
        b"" if code.value == 0 else _tag(3, _VARINT) + _varint(code.value))
    return _length_field(15, body)


_UNSET_STATUS = _status(StatusCode.UNSET, None)


def _status_field(status: Status) -> bytes:
    if status.status_code is StatusCode.UNSET and status.description is None:
        return _UNSET_STATUS
    return _status(status.status_code, status.description)


# trace_id (1, 16 bytes), span_id (2, 8 bytes), parent_span_id (4, 8 bytes): tag and length
_TRACE_ID_TAG = _LENGTH_TAGS[1] + _varint(16)
_SPAN_ID_TAG = _LENGTH_TAGS[2] + _varint(8)
_PARENT_ID_TAG = _LENGTH_TAGS[4] + _varint(8)
# flags (16): the parent is a span of this process, or the caller's
_LOCAL_PARENT_FLAGS = _tag(16, _FIXED32) + _fixed32(_FLAGS_HAS_IS_REMOTE)
_REMOTE_PARENT_FLAGS = _tag(16, _FIXED32) + _fixed32(_FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE)


def _events(events: Iterable[Any]) -> bytes:
    """Span.events (11): time 1, name 2, attributes 3."""
    return b"".join(_length_field(11, _tag(1, _FIXED64) + _fixed64(event.timestamp)
                                  + _string_field(2, event.name)
                                  + _attributes(3, event.attributes))
                    for event in events)


class CallEncoder:
    """Writes call spans as one ExportTraceServiceRequest of a resource and the scope
    `scope_name`; what does not change from call to call is made once and kept."""

    def __init__(self, resource: Resource, scope_name: str,
                 request_attributes: Callable[[CallSpan], Iterable[tuple[str, Any]]],
                 random_span_id: Callable[[], int]) -> None:
        self._resource = _length_field(1, _attributes(1, resource.attributes))
        self._scope = _length_field(1, _string_field(1, scope_name))
        self._request_attributes = request_attributes
        self._random_span_id = random_span_id
        # per span name and kind: the bytes of both
        self._heads: dict[tuple[str, int], bytes] = {}
        # attribute key: its KeyValue.key field
        self._keys: dict[str, bytes] = {}
        # the attributes a method's calls share, and those of children made from shared
        # mappings (the script's, a rating group's), by the mapping's id: (the mapping,
        # kept so that its id stays its own, and its attributes field)
        self._shared: dict[int, tuple[Mapping[str, Any], bytes]] = {}

    def request(self, calls: Iterable[CallSpan]) -> bytes:
        """The request carrying every span of these calls."""
        spans = b"".join(self.spans_of(call) for call in calls)
        scope_spans = _length_field(2, self._scope + spans)
        return _length_field(1, self._resource + scope_spans)

    def spans_of(self, call: CallSpan) -> bytes:
        """The call's spans, each a ScopeSpans.spans field (2): its children's, then its
        own, as telemetry.CallSpanExporter orders them."""
        context = call.context
        trace_id = _TRACE_ID_TAG + context.trace_id.to_bytes(16, "big")
        own_id = context.span_id.to_bytes(8, "big")
        trace_state = _trace_state(context)
        child_common = trace_state + _PARENT_ID_TAG + own_id
        out = []
        for name, kind, attributes, start_ns, end_ns, status, events in call.children:
            out.append(_length_field(2, b"".join((
                trace_id, _SPAN_ID_TAG, self._random_span_id().to_bytes(8, "big"),
                child_common, self._head(name, kind), _times(start_ns, end_ns),
                self._shared_attributes(attributes), _events(events) if events else b"",
                _status_field(status), _LOCAL_PARENT_FLAGS))))
        parent = call.parent
        out.append(_length_field(2, b"".join((
            trace_id, _SPAN_ID_TAG, own_id, trace_state,
            b"" if parent is None else _PARENT_ID_TAG + parent.span_id.to_bytes(8, "big"),
            self._head(call.name, SpanKind.SERVER), _times(call.start_ns, call.end_ns),
            self._shared_attributes(call.base_attributes),
            b"".join(_length_field(9, self._key(key) + _length_field(2, _any_value(value)))
                     for key, value in self._request_attributes(call)),
            _events(call.events) if call.events else b"", _status_field(call.status),
            _LOCAL_PARENT_FLAGS if parent is None or not parent.is_remote
            else _REMOTE_PARENT_FLAGS))))
        return b"".join(out)

    def _shared_attributes(self, attributes: Mapping[str, Any]) -> bytes:
        """Span.attributes (9) of a mapping that is not written once made: written once."""
        cached = self._shared.get(id(attributes))
        if cached is not None and cached[0] is attributes:
            return cached[1]
        data = _attributes(9, attributes)
        if len(self._shared) < MAX_SHARED_ATTRIBUTES:
            self._shared[id(attributes)] = (attributes, data)
        return data

    def _key(self, key: str) -> bytes:
        data = self._keys.get(key)
        if data is None:
            data = self._keys[key] = _string_field(1, key)
        return data

    def _head(self, name: str, kind: SpanKind) -> bytes:
        """name (5) and kind (6: the SDK's kind + 1)."""
        key = (name, kind.value)
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = _string_field(5, name) + _tag(6, _VARINT) + _varint(
                kind.value + 1)
        return head


def _times(start_ns: int, end_ns: int) -> bytes:
    """start_time_unix_nano (7) and end_time_unix_nano (8), fixed64."""
    return b"\x39" + _fixed64(start_ns) + b"\x41" + _fixed64(end_ns)


def _trace_state(context: SpanContext) -> bytes:
    """trace_state (3), when the caller sent one."""
    state = context.trace_state
    return _string_field(3, state.to_header()) if state else b""
