"""The Diameter codec's two twins, native/diameter_codec.pyx (compiled) and
creditline/native/diameter_codec_py.py (pure), held to each other and to an independent
implementation.

- Property tests (Hypothesis): random AVP trees (any code, flags with and without V, M and
  P, any vendor id, data of 0..300 bytes, grouped nesting) and whole messages encode to the
  same bytes in both twins, and either twin's bytes decode in either twin to what went in.
- Malformed input: random bytes and valid messages broken on purpose (header lengths of 0,
  not a multiple of 4 or wrong, truncated frames, flipped bits, reserved flags, an AVP
  length shorter than its header or past its end, a V flag with no room for the vendor id).
  Both twins give the same result, or the same CodecError (result code and Failed-AVP
  bytes); a plain ValueError only for a start..end outside the data; nothing else, ever.
  Examples of each break check the RFC 6733 result code itself.
- python-diameter 0.9.0 (a test dependency), an independent Diameter implementation,
  decodes a CCR we encode to the same values and the same bytes, and we decode its CCR and
  CER to its values.
- The C copies of the constants in the .pyx equal the twin's.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from creditline.diameter import codec as codec_module
from creditline.diameter.codec import Codec, CodecError, compiled_codec, pure_codec
from creditline.diameter.dictionary import VENDOR_3GPP
from creditline.native import diameter_codec_py as twin
from diameter.message import Message as PdMessage
from diameter.message.avp import Avp as PdAvp
from diameter.message.avp import AvpAddress, AvpGrouped
from diameter.message.avp.grouped import (
    MultipleServicesCreditControl,
    RequestedServiceUnit,
    SubscriptionId,
    UsedServiceUnit,
    VendorSpecificApplicationId,
)
from diameter.message.commands import CapabilitiesExchangeRequest, CreditControlRequest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import diameter_samples as samples

ROOT = Path(__file__).resolve().parent.parent
PURE, COMPILED = pure_codec(), compiled_codec()
TWINS = [pytest.param(PURE, id="pure"), pytest.param(COMPILED, id="compiled")]
V, M, P = twin.AVP_VENDOR, twin.AVP_MANDATORY, twin.AVP_PROTECTED
HEADER = twin.HEADER_BYTES
# Enough examples to reach the odd corners, few enough for the file to run in seconds.
FAST = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=1500, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# An AVP as a tree: (code, flags, vendor id, data or children).
Tree = tuple[int, int, int, "bytes | list[Tree]"]

U32 = st.integers(0, 2**32 - 1)
AVP_FLAGS = st.sampled_from([0, M, P, M | P]).flatmap(lambda f: st.sampled_from([f, f | V]))
VENDORS = st.one_of(st.just(0), st.just(VENDOR_3GPP), U32)
LEAVES = st.tuples(U32, AVP_FLAGS, VENDORS, st.binary(max_size=300))
TREES: st.SearchStrategy[Tree] = st.recursive(
    LEAVES, lambda kids: st.tuples(U32, AVP_FLAGS, VENDORS, st.lists(kids, max_size=4)),
    max_leaves=10)
# Command flags a decoder accepts: R, P, E, T, but never R with E.
COMMAND_FLAGS = st.sampled_from([f for f in range(0, 0x100, 0x10)
                                 if not (f & twin.FLAG_REQUEST and f & twin.FLAG_ERROR)])
HEADERS = st.tuples(COMMAND_FLAGS, st.integers(0, twin.MAX_LENGTH), U32, U32, U32)


def encode_tree(codec: Codec, tree: Tree) -> bytes:
    code, flags, vendor_id, body = tree
    data = body if isinstance(body, bytes) else b"".join(encode_tree(codec, t) for t in body)
    return codec.encode_avp(code, flags, vendor_id, data)


def expected(tree: Tree) -> Tree:
    """What decoding gives back: the V flag follows the vendor id (encode_avp's rule)."""
    code, flags, vendor_id, body = tree
    flags = flags | V if vendor_id else flags & ~V
    return (code, flags, vendor_id,
            body if isinstance(body, bytes) else [expected(t) for t in body])


def decode_like(codec: Codec, data: bytes, shapes: list[Tree]) -> list[Tree]:
    """data decoded as AVPs, each grouped one again where the shape has children."""
    avps = codec.decode_avps(data)
    assert len(avps) == len(shapes)
    return [(code, flags, vendor_id,
             body if isinstance(shape[3], bytes) else decode_like(codec, body, shape[3]))
            for (code, flags, vendor_id, body), shape in zip(avps, shapes, strict=True)]


def encode_msg(codec: Codec, header: tuple[int, int, int, int, int], trees: list[Tree]) -> bytes:
    return codec.encode_message(*header, b"".join(encode_tree(codec, t) for t in trees))


@FAST
@given(TREES)
def test_an_avp_tree_encodes_alike_and_round_trips_in_both_twins(tree: Tree) -> None:
    pure, compiled = encode_tree(PURE, tree), encode_tree(COMPILED, tree)
    assert pure == compiled
    assert len(pure) % 4 == 0
    for decoder in (PURE, COMPILED):
        assert decode_like(decoder, pure, [tree]) == [expected(tree)]


@FAST
@given(HEADERS, st.lists(TREES, max_size=4))
def test_a_message_encodes_alike_and_round_trips_in_both_twins(
        header: tuple[int, int, int, int, int], trees: list[Tree]) -> None:
    message = encode_msg(PURE, header, trees)
    assert encode_msg(COMPILED, header, trees) == message
    for decoder in (PURE, COMPILED):
        assert decoder.message_length(message[:4]) == len(message)
        assert decoder.decode_header(message) == (len(message), *header)
        assert decode_like(decoder, message[HEADER:], trees) == [expected(t) for t in trees]
        assert decoder.decode_avps(message, HEADER) == decoder.decode_avps(message[HEADER:])


# --- malformed input: the twins agree, and fail only as CodecError ---

Outcome = tuple[object, ...]


def outcome(call: Callable[[], object]) -> Outcome:
    """A call's result, or the CodecError it raised as the answer would carry it; a plain
    ValueError is told apart (only a start..end outside the data may raise it). Any other
    exception is let through: it fails the test."""
    try:
        return ("ok", call())
    except CodecError as error:
        return ("codec error", error.result_code, error.failed_avp)
    except ValueError:
        return ("value error",)


def read_all(codec: Codec, message: bytes) -> object:
    """What a server reads of a message: the framing, the header, the AVPs, and every AVP's
    data tried as a grouped AVP in turn (so that inner bytes meet the decoder too)."""
    length = codec.message_length(message[:4])
    return length, codec.decode_header(message), read_avps(codec, message, HEADER)


def read_avps(codec: Codec, data: bytes, start: int = 0) -> list[object]:
    return [(avp, outcome(functools.partial(read_avps, codec, avp[3])))
            for avp in codec.decode_avps(data, start)]


def assert_twins_agree(message: bytes) -> Outcome:
    pure = outcome(lambda: read_all(PURE, message))
    assert pure == outcome(lambda: read_all(COMPILED, message))
    # a whole message never raises a plain ValueError: its start (20) is always in range
    assert pure[0] != "value error"
    return pure


@MANY
@given(st.binary(max_size=400))
def test_random_bytes_get_the_same_answer_from_both_twins(data: bytes) -> None:
    assert_twins_agree(data)
    assert outcome(lambda: PURE.decode_avps(data)) == outcome(lambda: COMPILED.decode_avps(data))


@FAST
@given(st.binary(max_size=120), st.integers(-3, 130), st.integers(-3, 130))
def test_any_start_and_end_get_the_same_answer_from_both_twins(
        data: bytes, start: int, end: int) -> None:
    pure = outcome(lambda: PURE.decode_avps(data, start, end))
    assert pure == outcome(lambda: COMPILED.decode_avps(data, start, end))
    stop = len(data) if end < 0 else end
    in_range = 0 <= start <= stop <= len(data)
    assert (pure[0] == "value error") == (not in_range)


def avp_offsets(trees: list[Tree], start: int) -> list[int]:
    """Where each AVP of an encoded tree list begins, at every depth."""
    offsets = []
    for tree in trees:
        offsets.append(start)
        head = twin.AVP_HEADER_BYTES + (twin.VENDOR_ID_BYTES if tree[2] else 0)
        if isinstance(tree[3], list):
            offsets += avp_offsets(tree[3], start + head)
        start += len(encode_tree(PURE, tree))
    return offsets


def put24(message: bytearray, offset: int, value: int) -> None:
    """A 24-bit length field (the bytes after a flags or version byte)."""
    message[offset:offset + 3] = value.to_bytes(3, "big")


def lengths(message: bytearray) -> st.SearchStrategy[int]:
    """24-bit lengths: small ones (under a header), near the message's, any at all."""
    return st.one_of(st.integers(0, 16), st.integers(0, len(message) + 8),
                     st.integers(0, twin.MAX_LENGTH))


# Each break takes a draw, the message (changed in place) and where its AVPs begin.
Mutation = Callable[[st.DrawFn, bytearray, list[int]], None]
MUTATIONS: dict[str, Mutation] = {}


def mutation(function: Mutation) -> Mutation:
    MUTATIONS[function.__name__] = function
    return function


@mutation
def header_length(draw: st.DrawFn, message: bytearray, _: list[int]) -> None:
    put24(message, 1, draw(lengths(message)))


@mutation
def truncate(draw: st.DrawFn, message: bytearray, _: list[int]) -> None:
    del message[draw(st.integers(0, len(message) - 1)):]


@mutation
def extend(draw: st.DrawFn, message: bytearray, _: list[int]) -> None:
    message += draw(st.binary(min_size=1, max_size=16))


@mutation
def flip_a_bit(draw: st.DrawFn, message: bytearray, _: list[int]) -> None:
    bit = draw(st.integers(0, len(message) * 8 - 1))
    message[bit // 8] ^= 1 << (bit % 8)


@mutation
def command_flags(draw: st.DrawFn, message: bytearray, _: list[int]) -> None:
    message[4] = draw(st.integers(0, 255))


@mutation
def version(draw: st.DrawFn, message: bytearray, _: list[int]) -> None:
    message[0] = draw(st.integers(0, 255))


@mutation
def avp_flags(draw: st.DrawFn, message: bytearray, offsets: list[int]) -> None:
    message[draw(st.sampled_from(offsets)) + 4] = draw(st.integers(0, 255))


@mutation
def avp_vendor_flag(draw: st.DrawFn, message: bytearray, offsets: list[int]) -> None:
    # on an AVP of fewer than 12 bytes: no room left for the vendor id
    message[draw(st.sampled_from(offsets)) + 4] |= V


@mutation
def avp_length(draw: st.DrawFn, message: bytearray, offsets: list[int]) -> None:
    put24(message, draw(st.sampled_from(offsets)) + 5, draw(lengths(message)))


@st.composite
def broken_messages(draw: st.DrawFn) -> bytes:
    """A valid message (of one AVP at least) with one thing broken in it."""
    trees = draw(st.lists(TREES, min_size=1, max_size=3))
    message = bytearray(encode_msg(PURE, draw(HEADERS), trees))
    MUTATIONS[draw(st.sampled_from(sorted(MUTATIONS)))](
        draw, message, avp_offsets(trees, HEADER))
    return bytes(message)


@MANY
@given(broken_messages())
def test_broken_messages_get_the_same_answer_from_both_twins(message: bytes) -> None:
    assert_twins_agree(message)


def message_of(*avps: bytes, length_delta: int = 0) -> bytes:
    """A CCR header around raw AVP bytes, its length field off by length_delta."""
    body = b"".join(avps)
    head = struct.pack(">IIIII", (1 << 24) | (HEADER + len(body) + length_delta),
                       (twin.FLAG_REQUEST << 24) | 272, 4, 1, 2)
    return head + body


def raw_avp(code: int, flags: int, length: int, rest: bytes = b"") -> bytes:
    return struct.pack(">II", code, (flags << 24) | length) + rest


EMPTY_V = raw_avp(263, V, 8)
BROKEN: dict[str, tuple[bytes, int, bytes]] = {
    # name: (message, result code, Failed-AVP)
    "header length 0": (message_of(length_delta=-20), twin.INVALID_MESSAGE_LENGTH, b""),
    "header length not a multiple of 4": (message_of(length_delta=2),
                                          twin.INVALID_MESSAGE_LENGTH, b""),
    "header length past the bytes": (message_of(length_delta=4),
                                     twin.INVALID_MESSAGE_LENGTH, b""),
    "truncated frame": (message_of(raw_avp(268, M, 12, b"\0\0\7\xd1"))[:28],
                        twin.INVALID_MESSAGE_LENGTH, b""),
    "version 2": (b"\2" + message_of()[1:], twin.UNSUPPORTED_VERSION, b""),
    "reserved command flag": (message_of()[:4] + b"\x81" + message_of()[5:],
                              twin.INVALID_HEADER_BITS, b""),
    "request with E": (message_of()[:4] + b"\xa0" + message_of()[5:],
                       twin.INVALID_HEADER_BITS, b""),
    "AVP length 0": (message_of(raw_avp(268, M, 0)), twin.INVALID_AVP_LENGTH,
                     raw_avp(268, M, 0)),
    "AVP length under its header": (message_of(raw_avp(268, M, 7, b"\0\0\0\0")),
                                    twin.INVALID_AVP_LENGTH, raw_avp(268, M, 7)),
    "AVP length past the end": (message_of(raw_avp(268, M, 16, b"\0\0\7\xd1")),
                                twin.INVALID_AVP_LENGTH, raw_avp(268, M, 16, b"\0\0\7\xd1")),
    "fewer bytes than an AVP header": (message_of(b"\0\0\1\x0c"), twin.INVALID_AVP_LENGTH,
                                       b"\0\0\1\x0c"),
    "V flag with no room for the vendor id": (message_of(EMPTY_V), twin.INVALID_AVP_LENGTH,
                                              EMPTY_V),
    "reserved AVP flag": (message_of(raw_avp(268, M | 1, 12, b"\0\0\7\xd1")),
                          twin.INVALID_AVP_BITS, raw_avp(268, M | 1, 12, b"\0\0\7\xd1")),
}


@pytest.mark.parametrize("codec", TWINS)
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_break_gets_its_result_code(codec: Codec, name: str) -> None:
    message, result_code, failed_avp = BROKEN[name]
    assert outcome(lambda: read_all(codec, message)) == ("codec error", result_code, failed_avp)


@pytest.mark.parametrize("codec", TWINS)
def test_a_start_or_end_outside_the_data_is_a_value_error_not_a_codec_error(
        codec: Codec) -> None:
    for start, end in [(-1, -1), (9, 8), (0, 9), (2**70, -1), (0, 2**70)]:
        with pytest.raises(ValueError) as raised:
            codec.decode_avps(bytes(8), start, end)
        assert not isinstance(raised.value, CodecError)


@pytest.mark.parametrize("codec", TWINS)
def test_a_field_too_wide_for_its_place_is_refused_not_folded_into_another(
        codec: Codec) -> None:
    # (a command code of 25 bits would set a reserved flag; flags of 9 bits a length bit)
    calls: list[Callable[[], object]] = [
        lambda: codec.encode_message(0, 1 << 24, 4, 0, 0, b""),
        lambda: codec.encode_message(0x100, 272, 4, 0, 0, b""),
        lambda: codec.encode_message(0, 272, 1 << 32, 0, 0, b""),
        lambda: codec.encode_message(0, -1, 4, 0, 0, b""),
        lambda: codec.encode_avp(263, 0x100, 0, b""),
        lambda: codec.encode_avp(1 << 32, 0, 0, b""),
        lambda: codec.encode_avp(263, 0, -1, b""),
    ]
    for call in calls:
        with pytest.raises(OverflowError):
            call()


# --- the twins themselves ---

def test_both_twins_are_reachable_and_are_what_they_say() -> None:
    assert isinstance(COMPILED, ModuleType) and isinstance(PURE, ModuleType)
    assert COMPILED.__name__ == codec_module.COMPILED_MODULE
    assert Path(COMPILED.__file__ or "").suffix in {".so", ".pyd"}
    assert PURE is twin
    assert codec_module.select_codec({"CREDITLINE_PURE_RATING": "1"}) is PURE
    assert codec_module.select_codec({}) is COMPILED


def test_the_compiled_twins_c_constants_equal_the_pure_twins() -> None:
    source = (ROOT / "native" / "diameter_codec.pyx").read_text(encoding="utf-8")
    block = re.search(r"^cdef enum:\n((?:[ \t]+\w+ = \w+\n)+)", source, re.MULTILINE)
    assert block is not None, "no cdef enum block in native/diameter_codec.pyx"
    constants = dict(re.findall(r"(\w+) = (\w+)", block.group(1)))
    assert set(constants) == {"_HEADER_BYTES", "_AVP_HEADER_BYTES", "_VENDOR_ID_BYTES",
                              "_AVP_VENDOR"}
    for name, value in constants.items():
        assert int(value, 0) == getattr(twin, name.lstrip("_")), name


# --- python-diameter, an independent implementation, on the other side ---

def pd_tree(avps: list[PdAvp]) -> list[samples.Node]:
    """python-diameter's decoded AVPs as a tree (its own dictionary's types)."""
    return [(avp.code, avp.vendor_id, pd_value(avp)) for avp in avps]


def pd_value(avp: PdAvp) -> samples.Value:
    if isinstance(avp, AvpGrouped):
        return pd_tree(avp.value)
    if isinstance(avp, AvpAddress):
        family, text = avp.value
        return f"{family}:{text}"
    value = avp.value
    # (it reads a DiameterIdentity as bytes, a UTF8String as str: both are text here)
    return value.decode() if isinstance(value, bytes) else value


def pd_raw(avps: list[PdAvp]) -> list[Tree]:
    """python-diameter's AVPs as our codec's raw tree: code, flags, vendor id, data."""
    return [(avp.code, avp.flags, avp.vendor_id,
             pd_raw(avp.value) if isinstance(avp, AvpGrouped) else avp.payload)
            for avp in avps]


def our_raw(codec: Codec, data: bytes, start: int = 0) -> list[Tree]:
    """Our decode of AVPs as a raw tree, grouped where python-diameter says grouped."""
    return [(code, flags, vendor_id, our_raw(codec, body) if _grouped(code, vendor_id) else body)
            for code, flags, vendor_id, body in codec.decode_avps(data, start)]


def _grouped(code: int, vendor_id: int) -> bool:
    return isinstance(PdAvp.from_bytes(PURE.encode_avp(code, 0, vendor_id, b"")), AvpGrouped)


def test_python_diameter_decodes_our_ccr_to_the_same_values_and_bytes() -> None:
    ours = samples.encode_ccr()
    theirs = PdMessage.from_bytes(ours)
    assert isinstance(theirs, CreditControlRequest)
    header = theirs.header
    assert (header.length, header.command_code, header.application_id) == (len(ours), 272, 4)
    assert header.is_request and header.is_proxyable and not header.is_error
    assert (header.hop_by_hop_identifier, header.end_to_end_identifier) == (
        samples.HOP_BY_HOP, samples.END_TO_END)
    assert pd_tree(theirs.avps) == samples.CCR
    # its typed view too, not only its generic one
    assert theirs.multiple_services_credit_control[0].used_service_unit[0].cc_input_octets \
        == 2**40
    assert theirs.subscription_id[0].subscription_id_data == "491701234567"
    # its plain view keeps the AVPs as they came (the typed one rebuilds them from its own
    # attribute definitions, flags included)
    plain = PdMessage.from_bytes(ours, plain_msg=True)
    for codec in (PURE, COMPILED):
        assert our_raw(codec, ours, HEADER) == pd_raw(plain.avps)
    # re-encoded by python-diameter, the message is byte for byte ours
    assert plain.as_bytes() == ours


def pd_ccr() -> CreditControlRequest:
    ccr = CreditControlRequest()
    ccr.header.application_id = 4
    ccr.header.hop_by_hop_identifier = samples.HOP_BY_HOP
    ccr.header.end_to_end_identifier = samples.END_TO_END
    ccr.session_id = samples.SESSION_ID
    ccr.origin_host = samples.ORIGIN_HOST.encode()
    ccr.origin_realm = samples.ORIGIN_REALM.encode()
    ccr.destination_realm = samples.SERVER_REALM.encode()
    ccr.auth_application_id = 4
    ccr.service_context_id = "32251@3gpp.org"
    ccr.cc_request_type = 1
    ccr.cc_request_number = 0
    ccr.subscription_id = [SubscriptionId(subscription_id_type=0,
                                          subscription_id_data="491701234567")]
    ccr.multiple_services_credit_control = [MultipleServicesCreditControl(
        requested_service_unit=RequestedServiceUnit(),
        used_service_unit=[UsedServiceUnit(cc_time=60, cc_input_octets=2**40,
                                           reporting_reason=2)],
        rating_group=100)]
    return ccr


@pytest.mark.parametrize("codec", TWINS)
def test_we_decode_python_diameters_ccr_to_its_values(codec: Codec) -> None:
    ccr = pd_ccr()
    data = ccr.as_bytes()
    _, flags, command, application, hop, end = codec.decode_header(data)
    assert (command, application, hop, end) == (272, 4, samples.HOP_BY_HOP, samples.END_TO_END)
    assert flags & twin.FLAG_REQUEST
    avps = codec.decode_avps(data, HEADER)
    assert avps[0][0] == 263  # Session-Id first (RFC 6733 §8.8), by both
    assert samples.canonical(samples.read(avps)) == samples.canonical(samples.CCR)
    assert our_raw(codec, data, HEADER) == pd_raw(ccr.avps)


@pytest.mark.parametrize("codec", TWINS)
def test_we_decode_python_diameters_cer_to_its_values(codec: Codec) -> None:
    cer = CapabilitiesExchangeRequest()
    cer.origin_host, cer.origin_realm = b"peer.example.net", b"example.net"
    cer.host_ip_address = ["127.0.0.1", "::1"]
    cer.vendor_id, cer.product_name, cer.firmware_revision = VENDOR_3GPP, "peer", 7
    cer.auth_application_id = [4]
    cer.supported_vendor_id = [VENDOR_3GPP]
    cer.vendor_specific_application_id = [
        VendorSpecificApplicationId(vendor_id=VENDOR_3GPP, auth_application_id=4)]
    data = cer.as_bytes()
    _, flags, command, application, _, _ = codec.decode_header(data)
    assert (flags & twin.FLAG_REQUEST, command, application) == (twin.FLAG_REQUEST, 257, 0)
    avps = codec.decode_avps(data, HEADER)
    assert samples.read(avps) == pd_tree(cer.avps)
    assert our_raw(codec, data, HEADER) == pd_raw(cer.avps)
