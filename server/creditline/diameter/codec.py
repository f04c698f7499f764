"""Which Diameter codec runs: the compiled one (native/diameter_codec.pyx) or its
pure-Python twin (native/diameter_codec_py.py), chosen as the rating kernels are
(charging/kernels.py): CREDITLINE_PURE_RATING=1 forces the twin; a build without the
compiled module takes the twin only when CREDITLINE_ALLOW_PURE_RATING=1 allows it.

Both have the same functions with the same results (tests/test_diameter_codec.py holds
them to each other and to an independent decoder); the constants and CodecError are the
twin's, which the compiled module imports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from creditline.charging.kernels import select_compiled
from creditline.native import diameter_codec_py
from creditline.native.diameter_codec_py import (
    AVP_MANDATORY,
    AVP_VENDOR,
    FLAG_ERROR,
    FLAG_PROXIABLE,
    FLAG_REQUEST,
    FLAG_RETRANSMITTED,
    HEADER_BYTES,
    Avp,
    CodecError,
    Header,
)

COMPILED_MODULE = "creditline.native.diameter_codec"
COMPILED_CODEC = f"the compiled Diameter codec ({COMPILED_MODULE})"

__all__ = ["AVP_MANDATORY", "AVP_VENDOR", "FLAG_ERROR", "FLAG_PROXIABLE", "FLAG_REQUEST",
           "FLAG_RETRANSMITTED", "HEADER_BYTES", "Avp", "Codec", "CodecError", "codec",
           "compiled_codec", "pure_codec", "select_codec"]


class Codec(Protocol):
    """What both codec modules define (mypy checks each against it)."""

    def message_length(self, prefix: bytes) -> int: ...
    def decode_header(self, message: bytes) -> Header: ...
    def decode_avps(self, data: bytes, start: int = 0, end: int = -1) -> list[Avp]: ...
    def encode_avp(self, code: int, flags: int, vendor_id: int, data: bytes) -> bytes: ...
    def encode_message(self, flags: int, command_code: int, application_id: int,
                       hop_by_hop: int, end_to_end: int, avps: bytes) -> bytes: ...


def pure_codec() -> Codec:
    return diameter_codec_py


def compiled_codec() -> Codec:
    from creditline.native import diameter_codec
    return diameter_codec


def select_codec(environ: Mapping[str, str] | None = None,
                 load_compiled: Callable[[], Codec] = compiled_codec) -> Codec:
    """The compiled codec or its twin, as select_compiled chooses (environ: os.environ
    unless given; load_compiled: how, for a test of a build without it)."""
    return select_compiled(load_compiled, pure_codec(), COMPILED_CODEC, environ)


# Chosen once, at import: the module is read-only (its functions), not state.
codec: Codec = select_codec()
