# cython: language_level=3, boundscheck=False, wraparound=False
"""The Diameter wire format, compiled: the twin of
server/creditline/native/diameter_codec_py.py (its docstring says what each function does;
tests/test_diameter_codec.py holds the two equal). The constants and CodecError are the
twin's.

Its C arguments refuse (OverflowError) what does not fit 32 bits; the checks below refuse
flags of more than 8 bits and a command code of more than 24, as the twin does."""

from creditline.native.diameter_codec_py import (
    AVP_FLAGS_RESERVED, AVP_HEADER_BYTES, AVP_MANDATORY, AVP_PROTECTED, AVP_VENDOR,
    COMMAND_FLAGS_RESERVED, FLAG_ERROR, FLAG_PROXIABLE, FLAG_REQUEST, FLAG_RETRANSMITTED,
    HEADER_BYTES, INVALID_AVP_BITS, INVALID_AVP_LENGTH, INVALID_HEADER_BITS,
    INVALID_MESSAGE_LENGTH, MAX_LENGTH, UNSUPPORTED_VERSION, VENDOR_ID_BYTES, VERSION,
    CodecError,
)

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy, memset


# (C copies of the twin's constants, for pointer arithmetic; tests hold them equal)
cdef enum:
    _HEADER_BYTES = 20
    _AVP_HEADER_BYTES = 8
    _VENDOR_ID_BYTES = 4
    _AVP_VENDOR = 0x80


cdef inline unsigned int _u32(const unsigned char* p) noexcept:
    return (<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16) | (<unsigned int>p[2] << 8) | p[3]


cdef inline void _put32(unsigned char* p, unsigned int v) noexcept:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


def message_length(bytes prefix):
    if len(prefix) < 4:
        raise CodecError(INVALID_MESSAGE_LENGTH, "fewer than 4 bytes of a header")
    cdef unsigned int word = _u32(<const unsigned char*>PyBytes_AS_STRING(prefix))
    if word >> 24 != VERSION:
        raise CodecError(UNSUPPORTED_VERSION, f"version {word >> 24}, not {VERSION}")
    cdef unsigned int length = word & 0xFFFFFF
    if length < HEADER_BYTES or length % 4:
        raise CodecError(INVALID_MESSAGE_LENGTH,
                         f"message length {length}: at least {HEADER_BYTES}, a multiple of 4")
    return length


def decode_header(bytes message):
    cdef unsigned int length = message_length(message)
    if <Py_ssize_t>len(message) != length:
        raise CodecError(INVALID_MESSAGE_LENGTH,
                         f"message length {length}, but {len(message)} bytes")
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(message)
    cdef unsigned int word1 = _u32(p + 4)
    cdef unsigned int flags = word1 >> 24
    if flags & COMMAND_FLAGS_RESERVED:
        raise CodecError(INVALID_HEADER_BITS, f"reserved command flags set: {flags:#04x}")
    if flags & FLAG_REQUEST and flags & FLAG_ERROR:
        raise CodecError(INVALID_HEADER_BITS, "a request with the E flag")
    return (length, flags, word1 & 0xFFFFFF, _u32(p + 8), _u32(p + 12), _u32(p + 16))


def decode_avps(bytes data, start=0, end=-1):
    # (start and end checked as Python ints: one too large for a C ssize_t is out of range
    # as any other, a ValueError as in the twin, not an OverflowError)
    cdef Py_ssize_t size = len(data)
    if end < 0:
        end = size
    if start < 0 or start > end or end > size:
        raise ValueError(f"decode_avps: {start}..{end} is not within {size} bytes")
    return _decode_avps(data, start, end)


cdef list _decode_avps(bytes data, Py_ssize_t start, Py_ssize_t end):
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef list avps = []
    cdef Py_ssize_t offset = start, header_bytes, length
    cdef unsigned int code, word, flags, vendor_id
    while offset < end:
        if end - offset < _AVP_HEADER_BYTES:
            raise CodecError(INVALID_AVP_LENGTH, f"{end - offset} bytes left: no AVP header",
                             data[offset:end])
        code = _u32(p + offset)
        word = _u32(p + offset + 4)
        flags = word >> 24
        length = word & 0xFFFFFF
        header_bytes = _AVP_HEADER_BYTES + (_VENDOR_ID_BYTES if flags & _AVP_VENDOR else 0)
        if length < header_bytes or offset + length > end:
            raise CodecError(INVALID_AVP_LENGTH,
                             f"AVP {code}: length {length} does not fit its place",
                             data[offset:min(end, offset + max(length, header_bytes))])
        if flags & AVP_FLAGS_RESERVED:
            raise CodecError(INVALID_AVP_BITS, f"AVP {code}: reserved flags set {flags:#04x}",
                             data[offset:offset + length])
        vendor_id = _u32(p + offset + 8) if flags & _AVP_VENDOR else 0
        avps.append((code, flags, vendor_id, data[offset + header_bytes:offset + length]))
        offset += (length + 3) & ~3
    return avps


def encode_avp(unsigned int code, unsigned int flags, unsigned int vendor_id, bytes data):
    if flags > 0xFF:
        raise OverflowError(f"AVP flags {flags} does not fit in 8 bits")
    cdef Py_ssize_t size = len(data)
    cdef Py_ssize_t head = _AVP_HEADER_BYTES + (_VENDOR_ID_BYTES if vendor_id else 0)
    cdef Py_ssize_t length = head + size
    if length > MAX_LENGTH:
        raise CodecError(INVALID_AVP_LENGTH, f"AVP {code}: {length} bytes, more than a length holds")
    if vendor_id:
        flags |= _AVP_VENDOR
    else:
        flags &= ~_AVP_VENDOR
    cdef Py_ssize_t padded = (length + 3) & ~3
    cdef bytes out = PyBytes_FromStringAndSize(NULL, padded)
    cdef unsigned char* q = <unsigned char*>PyBytes_AS_STRING(out)
    _put32(q, code)
    _put32(q + 4, (flags << 24) | <unsigned int>length)
    if vendor_id:
        _put32(q + 8, vendor_id)
    memcpy(q + head, PyBytes_AS_STRING(data), size)
    memset(q + length, 0, padded - length)
    return out


def encode_message(unsigned int flags, unsigned int command_code, unsigned int application_id,
                   unsigned int hop_by_hop, unsigned int end_to_end, bytes avps):
    if flags > 0xFF:
        raise OverflowError(f"command flags {flags} does not fit in 8 bits")
    if command_code > MAX_LENGTH:
        raise OverflowError(f"command code {command_code} does not fit in 24 bits")
    cdef Py_ssize_t length = _HEADER_BYTES + len(avps)
    if length > MAX_LENGTH:
        raise CodecError(INVALID_MESSAGE_LENGTH, f"{length} bytes, more than a length holds")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, length)
    cdef unsigned char* q = <unsigned char*>PyBytes_AS_STRING(out)
    _put32(q, (VERSION << 24) | <unsigned int>length)
    _put32(q + 4, (flags << 24) | command_code)
    _put32(q + 8, application_id)
    _put32(q + 12, hop_by_hop)
    _put32(q + 16, end_to_end)
    memcpy(q + _HEADER_BYTES, PyBytes_AS_STRING(avps), length - _HEADER_BYTES)
    return out
