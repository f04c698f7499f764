"""A Diameter message as Creditline handles it: its header and its AVPs (decoded one level
by the codec), with what reads typed values out of them and builds AVPs of typed values.

Every read that can fail raises AvpError with the result code and the AVP the answer
names in Failed-AVP (RFC 6733 §7.5): a value of the wrong size, a grouped AVP nested
deeper than MAX_GROUP_DEPTH, a required AVP missing.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from creditline.diameter.codec import (
    AVP_MANDATORY,
    FLAG_REQUEST,
    FLAG_RETRANSMITTED,
    HEADER_BYTES,
    Avp,
    CodecError,
    codec,
)
from creditline.diameter.dictionary import KNOWN_AVPS, READ_INSIDE, AvpType, ResultCode

# Grouped AVPs inside grouped AVPs at most this deep (a CCR needs 3: MSCC > USU > CC-Time).
MAX_GROUP_DEPTH = 8
# Seconds from the NTP epoch (1900, a Diameter Time) to the Unix epoch.
NTP_TO_UNIX_S = 2_208_988_800

_U32, _U64 = struct.Struct(">I"), struct.Struct(">Q")
_I32, _I64 = struct.Struct(">i"), struct.Struct(">q")
_ADDRESS_FAMILY = {4: 1, 6: 2}  # IANA address family numbers (RFC 6733 §4.3.1)


class AvpError(ValueError):
    """An AVP the request cannot be served with: the result code and the AVP's encoded
    bytes for Failed-AVP (for a missing AVP, an AVP of its code with no data)."""

    def __init__(self, result_code: int, message: str, failed_avp: bytes = b"") -> None:
        super().__init__(message)
        self.result_code = result_code
        self.failed_avp = failed_avp


@dataclass(slots=True)
class Message:
    flags: int
    command_code: int
    application_id: int
    hop_by_hop: int
    end_to_end: int
    avps: list[Avp]

    @property
    def is_request(self) -> bool:
        return bool(self.flags & FLAG_REQUEST)

    @property
    def retransmitted(self) -> bool:
        return bool(self.flags & FLAG_RETRANSMITTED)


def decode_message(data: bytes) -> Message:
    """A whole message (its length already framed); CodecError when it is malformed."""
    _, flags, command, application, hop, end = codec.decode_header(data)
    return Message(flags, command, application, hop, end, codec.decode_avps(data, HEADER_BYTES))


def encode_message(message: Message) -> bytes:
    return codec.encode_message(message.flags, message.command_code, message.application_id,
                                message.hop_by_hop, message.end_to_end,
                                b"".join(encode(a) for a in message.avps))


def encode(avp: Avp) -> bytes:
    return codec.encode_avp(*avp)


def find(avps: Sequence[Avp], code: int, vendor_id: int = 0) -> Avp | None:
    for avp in avps:
        if avp[0] == code and avp[2] == vendor_id:
            return avp
    return None


def find_all(avps: Sequence[Avp], code: int, vendor_id: int = 0) -> list[Avp]:
    return [avp for avp in avps if avp[0] == code and avp[2] == vendor_id]


def required(avps: Sequence[Avp], code: int, vendor_id: int = 0) -> Avp:
    avp = find(avps, code, vendor_id)
    if avp is None:
        raise AvpError(ResultCode.MISSING_AVP, f"AVP {code} missing",
                       codec.encode_avp(code, AVP_MANDATORY, vendor_id, b""))
    return avp


def _sized(avp: Avp, size: int) -> bytes:
    if len(avp[3]) != size:
        raise AvpError(ResultCode.INVALID_AVP_LENGTH,
                       f"AVP {avp[0]}: {len(avp[3])} bytes, not {size}", encode(avp))
    return avp[3]


def unsigned32(avp: Avp) -> int:
    value: int = _U32.unpack(_sized(avp, 4))[0]
    return value


def unsigned64(avp: Avp) -> int:
    value: int = _U64.unpack(_sized(avp, 8))[0]
    return value


def integer32(avp: Avp) -> int:
    value: int = _I32.unpack(_sized(avp, 4))[0]
    return value


def integer64(avp: Avp) -> int:
    value: int = _I64.unpack(_sized(avp, 8))[0]
    return value


def utf8(avp: Avp) -> str:
    try:
        return avp[3].decode()
    except UnicodeDecodeError:
        raise AvpError(ResultCode.INVALID_AVP_VALUE, f"AVP {avp[0]}: not UTF-8",
                       encode(avp)) from None


def time_unix_ms(avp: Avp) -> int:
    """A Time (seconds since 1900, RFC 6733 §4.3.1) as Unix ms."""
    return (unsigned32(avp) - NTP_TO_UNIX_S) * 1000


def grouped(avp: Avp) -> list[Avp]:
    """A grouped AVP's AVPs (one level)."""
    try:
        return codec.decode_avps(avp[3], 0, len(avp[3]))
    except CodecError as error:
        raise AvpError(error.result_code, f"in AVP {avp[0]}: {error}",
                       error.failed_avp or encode(avp)) from None


def check_mandatory(avps: Iterable[Avp], depth: int = 0) -> None:
    """Refuses (5001) an AVP with the M flag that Creditline does not know, in the
    message and inside the grouped AVPs it reads (READ_INSIDE); refuses nesting deeper
    than MAX_GROUP_DEPTH and a malformed grouped AVP it reads."""
    for avp in avps:
        key = (avp[2], avp[0])
        kind = KNOWN_AVPS.get(key)
        if kind is None:
            if avp[1] & AVP_MANDATORY:
                raise AvpError(ResultCode.AVP_UNSUPPORTED,
                               f"AVP {avp[0]} (vendor {avp[2]}) is mandatory and unknown",
                               encode(avp))
            continue
        if kind is AvpType.GROUPED and key in READ_INSIDE:
            if depth + 1 >= MAX_GROUP_DEPTH:
                raise AvpError(ResultCode.INVALID_AVP_VALUE,
                               f"AVP {avp[0]}: grouped deeper than {MAX_GROUP_DEPTH}",
                               encode(avp))
            check_mandatory(grouped(avp), depth + 1)


# Building AVPs: (code, flags, vendor id, data), M flag set unless told otherwise.

def u32(code: int, value: int, vendor_id: int = 0, mandatory: bool = True) -> Avp:
    return (code, AVP_MANDATORY if mandatory else 0, vendor_id, _U32.pack(value))


def u64(code: int, value: int, vendor_id: int = 0, mandatory: bool = True) -> Avp:
    return (code, AVP_MANDATORY if mandatory else 0, vendor_id, _U64.pack(value))


def i32(code: int, value: int) -> Avp:
    return (code, AVP_MANDATORY, 0, _I32.pack(value))


def i64(code: int, value: int) -> Avp:
    return (code, AVP_MANDATORY, 0, _I64.pack(value))


def text(code: int, value: str, vendor_id: int = 0, mandatory: bool = True) -> Avp:
    return (code, AVP_MANDATORY if mandatory else 0, vendor_id, value.encode())


def address(code: int, value: str) -> Avp:
    ip = ipaddress.ip_address(value)
    return (code, AVP_MANDATORY, 0,
            struct.pack(">H", _ADDRESS_FAMILY[ip.version]) + ip.packed)


def group(code: int, avps: Iterable[Avp], vendor_id: int = 0, mandatory: bool = True) -> Avp:
    return (code, AVP_MANDATORY if mandatory else 0, vendor_id,
            b"".join(encode(a) for a in avps))

