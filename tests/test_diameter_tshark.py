"""tshark (Wireshark's dissector and dictionary) as a second independent decoder of what our
codec and builders write.

The test writes a pcap file itself: the pcap global header, then one record per message,
each an Ethernet/IPv4/TCP frame (checksums right) around the Diameter bytes, on TCP port
3868 so that tshark's diameter dissector takes it. It holds a CCR and its CCA built with
tests/diameter_samples.py, runs `tshark -n -r FILE -T pdml` and checks every AVP, at every
depth, for its code, vendor, tshark's name for it and its value (and the labels of the
enumerated ones), the headers, and that tshark finds nothing malformed and no expert
information but the one warning an empty Requested-Service-Unit draws (RFC 4006 allows
it, and a CCR-I commonly sends it so).

tshark comes from Debian's package (`apt-get install tshark`), which .ci/run installs;
where it is not installed the tests skip, saying so.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from creditline.diameter.dictionary import VENDOR_3GPP

from tests import diameter_samples as samples

TSHARK = shutil.which("tshark")
DIAMETER_PORT, CLIENT_PORT = 3868, 40000
CLIENT_IP, SERVER_IP = bytes([127, 0, 0, 1]), bytes([127, 0, 0, 2])

# tshark's name of every AVP in the samples: its dictionary, not ours
NAMES = {
    (0, 258): "Auth-Application-Id", (0, 263): "Session-Id", (0, 264): "Origin-Host",
    (0, 268): "Result-Code", (0, 283): "Destination-Realm", (0, 296): "Origin-Realm",
    (0, 412): "CC-Input-Octets", (0, 415): "CC-Request-Number", (0, 416): "CC-Request-Type",
    (0, 420): "CC-Time", (0, 430): "Final-Unit-Indication", (0, 431): "Granted-Service-Unit",
    (0, 432): "Rating-Group", (0, 433): "Redirect-Address-Type", (0, 434): "Redirect-Server",
    (0, 435): "Redirect-Server-Address", (0, 437): "Requested-Service-Unit",
    (0, 443): "Subscription-Id", (0, 444): "Subscription-Id-Data",
    (0, 446): "Used-Service-Unit", (0, 448): "Validity-Time", (0, 449): "Final-Unit-Action",
    (0, 450): "Subscription-Id-Type", (0, 456): "Multiple-Services-Credit-Control",
    (0, 461): "Service-Context-Id",
    (VENDOR_3GPP, 868): "Time-Quota-Threshold", (VENDOR_3GPP, 872): "3GPP-Reporting-Reason",
}
# the enumerated values' labels in tshark's dictionary, as its AVP summary shows them
LABELS = {
    (0, 268): "DIAMETER_SUCCESS (2001)", (0, 416): "INITIAL_REQUEST (1)",
    (0, 433): "URL (2)", (0, 449): "REDIRECT (1)", (0, 450): "END_USER_E164 (0)",
    (VENDOR_3GPP, 872): "FINAL (2)",
}
EMPTY_GROUP_WARNING = ("Warning/Undecoded", "Data is empty")

# A decoded AVP as tshark shows it: (vendor, code, name, value or children, summary label)
Shown = tuple[int, int, str, "str | list[Shown]", "str | None"]


# --- the pcap file ---

def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_segment(payload: bytes, source: bytes, destination: bytes, ports: tuple[int, int],
                seq: int, ack: int) -> bytes:
    """A TCP segment (flags PSH ACK) with its checksum over the IPv4 pseudo-header."""
    header = struct.pack(">HHIIBBHHH", *ports, seq, ack, 5 << 4, 0x18, 65535, 0, 0)
    pseudo = source + destination + struct.pack(">BBH", 0, 6, len(header) + len(payload))
    total = checksum(pseudo + header + payload)
    return header[:16] + struct.pack(">H", total) + header[18:] + payload


def ipv4_packet(segment: bytes, source: bytes, destination: bytes) -> bytes:
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), 1, 0x4000, 64, 6, 0,
                         source, destination)
    return header[:10] + struct.pack(">H", checksum(header)) + header[12:] + segment


def ethernet_frame(packet: bytes) -> bytes:
    # (locally administered MAC addresses; EtherType IPv4)
    return b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + b"\x08\x00" + packet


def pcap(frames: list[bytes]) -> bytes:
    """A pcap file (microsecond timestamps, link type Ethernet), a second between frames."""
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for second, frame in enumerate(frames):
        out += struct.pack("<IIII", 1_700_000_000 + second, 0, len(frame), len(frame)) + frame
    return out


def exchange(request: bytes, answer: bytes) -> bytes:
    """A request and its answer on one TCP connection to the Diameter port."""
    out = tcp_segment(request, CLIENT_IP, SERVER_IP, (CLIENT_PORT, DIAMETER_PORT), 1, 1)
    back = tcp_segment(answer, SERVER_IP, CLIENT_IP, (DIAMETER_PORT, CLIENT_PORT), 1,
                       1 + len(request))
    return pcap([ethernet_frame(ipv4_packet(out, CLIENT_IP, SERVER_IP)),
                 ethernet_frame(ipv4_packet(back, SERVER_IP, CLIENT_IP))])


# --- tshark's view ---

def dissect(directory: Path, capture: bytes) -> list[ET.Element]:
    """tshark's PDML (every field, with its name, summary and value) of each frame."""
    if TSHARK is None:
        pytest.skip("tshark is not installed (Debian: apt-get install tshark; .ci/run does)")
    path = directory / "capture.pcap"
    path.write_bytes(capture)
    # -n: no name resolution (nothing to look up, and no lookups leave the machine)
    result = subprocess.run([TSHARK, "-n", "-r", str(path), "-T", "pdml"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return ET.fromstring(result.stdout).findall("packet")


@pytest.fixture(scope="module")
def packets(tmp_path_factory: pytest.TempPathFactory) -> list[ET.Element]:
    return dissect(tmp_path_factory.mktemp("tshark"),
                   exchange(samples.encode_ccr(), samples.encode_cca()))


def diameter(packet: ET.Element) -> ET.Element:
    proto = packet.find("proto[@name='diameter']")
    assert proto is not None, "tshark did not dissect the frame as Diameter"
    return proto


def child(element: ET.Element, name: str) -> ET.Element | None:
    return element.find(f"field[@name='{name}']")


def show(element: ET.Element, name: str) -> str:
    """The value tshark shows of a field that must be there."""
    field = child(element, name)
    assert field is not None, f"tshark shows no {name}"
    return field.get("show", "")


def shown(parent: ET.Element) -> list[Shown]:
    return [shown_avp(avp) for avp in parent.findall("field[@name='diameter.avp']")]


def shown_avp(avp: ET.Element) -> Shown:
    code_field = child(avp, "diameter.avp.code")
    assert code_field is not None
    # "AVP Code: 263 Session-Id": the name is tshark's, from its dictionary
    name = code_field.get("showname", "").split(maxsplit=3)[3]
    vendor_field = child(avp, "diameter.avp.vendorId")
    vendor = 0 if vendor_field is None else int(vendor_field.get("show", ""))
    label = re.search(r" val=(.*)$", avp.get("showname", ""))
    return (vendor, int(code_field.get("show", "")), name,
            shown_value(child(avp, f"diameter.{name}")), label.group(1) if label else None)


def shown_value(field: ET.Element | None) -> str | list[Shown]:
    # (tshark shows no value field for an AVP with no data: here only the empty grouped
    # Requested-Service-Unit)
    if field is None:
        return []
    if field.find("field[@name='diameter.avp']") is not None:
        return shown(field)
    return field.get("show", "")


def expected(tree: list[samples.Node]) -> list[Shown]:
    return [expected_avp(code, vendor, value) for code, vendor, value in tree]


def expected_avp(code: int, vendor: int, value: samples.Value) -> Shown:
    if isinstance(value, list):
        return (vendor, code, NAMES[(vendor, code)], expected(value), None)
    label = LABELS.get((vendor, code), str(value))
    if (vendor, code) == (0, 258):
        label = "Diameter Credit Control Application (4)"  # tshark names the application
    return (vendor, code, NAMES[(vendor, code)], str(value), label)


def header(proto: ET.Element) -> dict[str, str]:
    names = ("length", "flags", "cmd.code", "applicationId", "hopbyhopid", "endtoendid")
    return {name: show(proto, f"diameter.{name}") for name in names}


def experts(packet: ET.Element) -> list[tuple[str, str]]:
    """tshark's expert information on a frame: (severity/group, message)."""
    found = []
    for expert in packet.iter("field"):
        if expert.get("name") == "_ws.expert":
            kind = re.match(r"Expert Info \(([^)]*)\): (.*)", expert.get("showname", ""))
            assert kind is not None, expert.get("showname")
            found.append((kind.group(1), kind.group(2)))
    return found


# --- the tests ---

def test_tshark_reads_every_avp_of_our_ccr_by_name_and_value(packets: list[ET.Element]) -> None:
    assert shown(diameter(packets[0])) == expected(samples.CCR)


def test_tshark_reads_every_avp_of_our_cca_by_name_and_value(packets: list[ET.Element]) -> None:
    assert shown(diameter(packets[1])) == expected(samples.CCA)


def test_tshark_reads_the_headers(packets: list[ET.Element]) -> None:
    ids = {"hopbyhopid": f"{samples.HOP_BY_HOP:#x}", "endtoendid": f"{samples.END_TO_END:#x}",
           "cmd.code": "272", "applicationId": "4"}
    ccr, cca = (diameter(packet) for packet in packets)
    assert header(ccr) == {**ids, "length": str(len(samples.encode_ccr())), "flags": "0xc0"}
    assert header(cca) == {**ids, "length": str(len(samples.encode_cca())), "flags": "0x40"}


def test_tshark_finds_nothing_malformed(packets: list[ET.Element]) -> None:
    for packet in packets:
        assert packet.find(".//proto[@name='_ws.malformed']") is None
        assert packet.find(".//field[@name='_ws.malformed']") is None
    assert experts(packets[0]) == [EMPTY_GROUP_WARNING]
    assert experts(packets[1]) == []


def test_tshark_does_flag_a_broken_message(tmp_path: Path) -> None:
    # the check above has teeth: an AVP length under its header is malformed to tshark too
    broken = bytearray(samples.encode_ccr())
    broken[25:28] = (7).to_bytes(3, "big")  # the first AVP's length
    packet = dissect(tmp_path, exchange(bytes(broken), samples.encode_cca()))[0]
    assert packet.find(".//proto[@name='_ws.malformed']") is not None
    assert ("Error/Malformed", "Malformed Packet (Exception occurred)") in experts(packet)
