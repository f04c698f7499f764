"""Pure-Python twin of native/diameter_codec.pyx: the Diameter wire format (RFC 6733 §3,
§4), the same functions with the same results.

A message is a 20-byte header (version 1, a 24-bit length, the command flags, a 24-bit
command code, the application id, the hop-by-hop and end-to-end ids) and its AVPs; an AVP
is an 8-byte header (code, flags, a 24-bit length), a vendor id when its V flag is set, its
data, and padding to a multiple of 4 bytes. Decoding never trusts a length: every one is
checked against what holds it, and a bad one raises CodecError with the RFC 6733 result
code the answer carries and, for an AVP, the AVP's bytes for its Failed-AVP.

An AVP is decoded as the tuple (code, flags, vendor id (0: none), data): a grouped AVP's
data is decoded again by the caller (decode_avps on it), which bounds the nesting.

Encoding refuses (OverflowError, as the compiled twin's C arguments do) a field that does
not fit its place: flags of more than 8 bits, a command code of more than 24, any other
id or code of more than 32; packed as they come, they would run into the next field.
"""

from __future__ import annotations

import struct

HEADER_BYTES = 20
AVP_HEADER_BYTES = 8
VENDOR_ID_BYTES = 4
VERSION = 1
# Command flags (RFC 6733 §3)
FLAG_REQUEST, FLAG_PROXIABLE, FLAG_ERROR, FLAG_RETRANSMITTED = 0x80, 0x40, 0x20, 0x10
COMMAND_FLAGS_RESERVED = 0x0F
# AVP flags (RFC 6733 §4.1)
AVP_VENDOR, AVP_MANDATORY, AVP_PROTECTED = 0x80, 0x40, 0x20
AVP_FLAGS_RESERVED = 0x1F
MAX_LENGTH = 0xFFFFFF  # the 24-bit length fields

# The result codes of a malformed message (RFC 6733 §7.1)
INVALID_HEADER_BITS = 3009
INVALID_AVP_BITS = 3008
UNSUPPORTED_VERSION = 5011
INVALID_AVP_LENGTH = 5014
INVALID_MESSAGE_LENGTH = 5015

_HEADER = struct.Struct(">I I I I I")
_AVP = struct.Struct(">I I")
_AVP_VENDOR = struct.Struct(">I I I")
_U32 = struct.Struct(">I")

Avp = tuple[int, int, int, bytes]  # (code, flags, vendor id, data)
Header = tuple[int, int, int, int, int, int]  # (length, flags, command, app, hop, end)


class CodecError(ValueError):
    """A message or AVP that cannot be decoded: the result code its answer carries, and
    the offending AVP's bytes (b"": none) for the answer's Failed-AVP."""

    def __init__(self, result_code: int, message: str, failed_avp: bytes = b"") -> None:
        super().__init__(message)
        self.result_code = result_code
        self.failed_avp = failed_avp


def _fits(value: int, bits: int, name: str) -> None:
    if not 0 <= value < 1 << bits:
        raise OverflowError(f"{name} {value} does not fit in {bits} bits")


def message_length(prefix: bytes) -> int:
    """The length of the message whose first 4 bytes these are (the framing); refuses
    another version (the rest cannot be read) and a length that cannot be a message."""
    if len(prefix) < 4:
        raise CodecError(INVALID_MESSAGE_LENGTH, "fewer than 4 bytes of a header")
    word: int = _U32.unpack_from(prefix)[0]
    if word >> 24 != VERSION:
        raise CodecError(UNSUPPORTED_VERSION, f"version {word >> 24}, not {VERSION}")
    length = word & MAX_LENGTH
    if length < HEADER_BYTES or length % 4:
        raise CodecError(INVALID_MESSAGE_LENGTH,
                         f"message length {length}: at least {HEADER_BYTES}, a multiple of 4")
    return length


def decode_header(message: bytes) -> Header:
    """The header of a whole message (its length checked against the bytes)."""
    length = message_length(message)
    if len(message) != length:
        raise CodecError(INVALID_MESSAGE_LENGTH,
                         f"message length {length}, but {len(message)} bytes")
    _, word1, application_id, hop_by_hop, end_to_end = _HEADER.unpack_from(message)
    flags, command_code = word1 >> 24, word1 & MAX_LENGTH
    if flags & COMMAND_FLAGS_RESERVED:
        raise CodecError(INVALID_HEADER_BITS, f"reserved command flags set: {flags:#04x}")
    if flags & FLAG_REQUEST and flags & FLAG_ERROR:
        raise CodecError(INVALID_HEADER_BITS, "a request with the E flag")
    return length, flags, command_code, application_id, hop_by_hop, end_to_end


def decode_avps(data: bytes, start: int = 0, end: int = -1) -> list[Avp]:
    """The AVPs of data[start:end] (end -1: to the end), one level: grouped AVPs' data as
    bytes."""
    end = len(data) if end < 0 else end
    if start < 0 or start > end or end > len(data):
        raise ValueError(f"decode_avps: {start}..{end} is not within {len(data)} bytes")
    avps: list[Avp] = []
    offset = start
    while offset < end:
        if end - offset < AVP_HEADER_BYTES:
            raise CodecError(INVALID_AVP_LENGTH, f"{end - offset} bytes left: no AVP header",
                             bytes(data[offset:end]))
        code, word = _AVP.unpack_from(data, offset)
        flags, length = word >> 24, word & MAX_LENGTH
        header_bytes = AVP_HEADER_BYTES + (VENDOR_ID_BYTES if flags & AVP_VENDOR else 0)
        if length < header_bytes or offset + length > end:
            raise CodecError(INVALID_AVP_LENGTH,
                             f"AVP {code}: length {length} does not fit its place",
                             bytes(data[offset:min(end, offset + max(length, header_bytes))]))
        if flags & AVP_FLAGS_RESERVED:
            raise CodecError(INVALID_AVP_BITS, f"AVP {code}: reserved flags set {flags:#04x}",
                             bytes(data[offset:offset + length]))
        vendor_id = _U32.unpack_from(data, offset + 8)[0] if flags & AVP_VENDOR else 0
        avps.append((code, flags, vendor_id, bytes(data[offset + header_bytes:offset + length])))
        # (the last AVP of a grouped AVP may come without its padding: taken as it is)
        offset += (length + 3) & ~3
    return avps


def encode_avp(code: int, flags: int, vendor_id: int, data: bytes) -> bytes:
    """One AVP with its padding (the V flag set when vendor_id is not 0)."""
    _fits(code, 32, "AVP code")
    _fits(flags, 8, "AVP flags")
    _fits(vendor_id, 32, "vendor id")
    if vendor_id:
        flags |= AVP_VENDOR
        length = AVP_HEADER_BYTES + VENDOR_ID_BYTES + len(data)
        head = _AVP_VENDOR.pack(code, (flags << 24) | length, vendor_id)
    else:
        flags &= ~AVP_VENDOR
        length = AVP_HEADER_BYTES + len(data)
        head = _AVP.pack(code, (flags << 24) | length)
    if length > MAX_LENGTH:
        raise CodecError(INVALID_AVP_LENGTH,
                         f"AVP {code}: {length} bytes, more than a length holds")
    return head + data + b"\0" * (-length % 4)


def encode_message(flags: int, command_code: int, application_id: int, hop_by_hop: int,
                   end_to_end: int, avps: bytes) -> bytes:
    """A message of these AVPs (encoded, padded)."""
    _fits(flags, 8, "command flags")
    _fits(command_code, 24, "command code")
    for name, value in (("application id", application_id), ("hop-by-hop id", hop_by_hop),
                        ("end-to-end id", end_to_end)):
        _fits(value, 32, name)
    length = HEADER_BYTES + len(avps)
    if length > MAX_LENGTH:
        raise CodecError(INVALID_MESSAGE_LENGTH, f"{length} bytes, more than a length holds")
    return _HEADER.pack((VERSION << 24) | length, (flags << 24) | command_code,
                        application_id, hop_by_hop, end_to_end) + avps
