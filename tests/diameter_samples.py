"""Realistic Gy messages for the codec tests, written as plain trees so that each decoder
under test (ours, python-diameter, tshark) can be compared with the same values.

A tree is a list of (code, vendor id, value): an int, a str, or a list for a grouped AVP.
Which builder an int takes (Unsigned32 or Unsigned64) is our dictionary's word, so the
independent decoders check the dictionary too.
"""

from __future__ import annotations

import ipaddress

from creditline.diameter import message as dm
from creditline.diameter.codec import FLAG_PROXIABLE, FLAG_REQUEST, Avp
from creditline.diameter.dictionary import (
    CREDIT_CONTROL_APPLICATION,
    KNOWN_AVPS,
    VENDOR_3GPP,
    AvpType,
    Command,
)
from creditline.diameter.dictionary import AvpCode as A
from creditline.diameter.dictionary import AvpCode3gpp as G

Value = int | str | list["Node"]
Node = tuple[int, int, Value]

SESSION_ID = "ocs-client.example.net;1876543210;42"
ORIGIN_HOST, ORIGIN_REALM = "pgw1.example.net", "example.net"
SERVER_HOST, SERVER_REALM = "ocs.example.org", "example.org"
HOP_BY_HOP, END_TO_END = 0x1234_5678, 0x9ABC_DEF0

CCR: list[Node] = [
    (A.SESSION_ID, 0, SESSION_ID),
    (A.ORIGIN_HOST, 0, ORIGIN_HOST),
    (A.ORIGIN_REALM, 0, ORIGIN_REALM),
    (A.DESTINATION_REALM, 0, SERVER_REALM),
    (A.AUTH_APPLICATION_ID, 0, CREDIT_CONTROL_APPLICATION),
    (A.SERVICE_CONTEXT_ID, 0, "32251@3gpp.org"),
    (A.CC_REQUEST_TYPE, 0, 1),
    (A.CC_REQUEST_NUMBER, 0, 0),
    (A.SUBSCRIPTION_ID, 0, [(A.SUBSCRIPTION_ID_TYPE, 0, 0),
                            (A.SUBSCRIPTION_ID_DATA, 0, "491701234567")]),
    (A.MULTIPLE_SERVICES_CREDIT_CONTROL, 0, [
        (A.REQUESTED_SERVICE_UNIT, 0, []),
        (A.USED_SERVICE_UNIT, 0, [(A.CC_TIME, 0, 60),
                                  # past 32 bits: an Unsigned64 must keep its high word
                                  (A.CC_INPUT_OCTETS, 0, 2**40),
                                  (G.REPORTING_REASON, VENDOR_3GPP, 2)]),
        (A.RATING_GROUP, 0, 100),
    ]),
]

CCA: list[Node] = [
    (A.SESSION_ID, 0, SESSION_ID),
    (A.RESULT_CODE, 0, 2001),
    (A.ORIGIN_HOST, 0, SERVER_HOST),
    (A.ORIGIN_REALM, 0, SERVER_REALM),
    (A.AUTH_APPLICATION_ID, 0, CREDIT_CONTROL_APPLICATION),
    (A.CC_REQUEST_TYPE, 0, 1),
    (A.CC_REQUEST_NUMBER, 0, 0),
    (A.MULTIPLE_SERVICES_CREDIT_CONTROL, 0, [
        (A.GRANTED_SERVICE_UNIT, 0, [(A.CC_TIME, 0, 300)]),
        (A.RATING_GROUP, 0, 100),
        (A.VALIDITY_TIME, 0, 1800),
        (A.RESULT_CODE, 0, 2001),
        (A.FINAL_UNIT_INDICATION, 0, [
            (A.FINAL_UNIT_ACTION, 0, 1),
            (A.REDIRECT_SERVER, 0, [(A.REDIRECT_ADDRESS_TYPE, 0, 2),
                                    (A.REDIRECT_SERVER_ADDRESS, 0, "http://top.up")]),
        ]),
        (G.TIME_QUOTA_THRESHOLD, VENDOR_3GPP, 30),
    ]),
]


def build(node: Node) -> Avp:
    """One AVP of a tree, with the builders the server uses."""
    code, vendor, value = node
    if isinstance(value, list):
        return dm.group(code, [build(child) for child in value], vendor)
    if isinstance(value, str):
        return dm.text(code, value, vendor)
    if KNOWN_AVPS[(vendor, code)] is AvpType.UNSIGNED64:
        return dm.u64(code, value, vendor)
    return dm.u32(code, value, vendor)


def encode_ccr() -> bytes:
    return _encode(FLAG_REQUEST | FLAG_PROXIABLE, CCR)


def encode_cca() -> bytes:
    return _encode(FLAG_PROXIABLE, CCA)


def _encode(flags: int, tree: list[Node]) -> bytes:
    return dm.encode_message(dm.Message(flags, Command.CREDIT_CONTROL, CREDIT_CONTROL_APPLICATION,
                                        HOP_BY_HOP, END_TO_END, [build(n) for n in tree]))


def read(avps: list[Avp]) -> list[Node]:
    """Decoded AVPs back as a tree, each value read by the type our dictionary gives."""
    return [(avp[0], avp[2], _value(avp)) for avp in avps]


def _value(avp: Avp) -> Value:
    kind = KNOWN_AVPS[(avp[2], avp[0])]
    if kind is AvpType.GROUPED:
        return read(dm.grouped(avp))
    if kind in (AvpType.UTF8, AvpType.IDENTITY):
        return dm.utf8(avp)
    if kind is AvpType.UNSIGNED64:
        return dm.unsigned64(avp)
    if kind is AvpType.ADDRESS:
        # (python-diameter's own form of an Address: "family:address")
        return f"{int.from_bytes(avp[3][:2], 'big')}:{ipaddress.ip_address(avp[3][2:])}"
    return dm.unsigned32(avp)


def canonical(tree: list[Node]) -> list[Node]:
    """A tree in (code, vendor) order at every level: encoders differ in AVP order, which
    RFC 6733 leaves free (but for Session-Id first, checked apart)."""
    nodes = [(c, v, canonical(x) if isinstance(x, list) else x) for c, v, x in tree]
    return sorted(nodes, key=lambda node: (node[0], node[1]))
