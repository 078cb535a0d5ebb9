"""DNS messages (RFC 1035), sans-IO: the queries the proxy reads, the answers it writes, and the
upstream answers the agent's resolver reads.  Bytes in, values or bytes out; no sockets.

    parse_query(data) -> Query           one question; `DnsFormatError` says what is wrong with the bytes
    answer(query, ips, ttl) -> bytes     NOERROR with one A record per address (none: an empty answer)
    refusal(query, rcode) -> bytes       an answer with no records and `rcode` (NXDOMAIN, SERVFAIL, ...)
    format_error(data) -> bytes | None   FORMERR for bytes that are no query, when they have an id to
                                         answer to (fewer than two bytes: nothing to answer)
    build_query(id, name, qtype) -> bytes, parse_response(data) -> Response   (the resolver's side)

Names are compared lower-case and without the final dot.  Compression pointers are followed (never
backwards into a loop: each must point before the name that uses it, and there is a hop limit).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from nodeagent.errors import NodeAgentError

HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
MAX_NAME = 255
MAX_LABEL = 63
MAX_POINTERS = 32
QCLASS_IN = 1
FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
OPCODE_SHIFT = 11


class QType(enum.IntEnum):
    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    OPT = 41
    ANY = 255


class Rcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


def type_name(qtype: int) -> str:
    """`a`, `aaaa`, ... (lower case, as ztunnel labels its metrics), or `type<n>`."""
    try:
        return QType(qtype).name.lower()
    except ValueError:
        return f"type{qtype}"


def rcode_name(rcode: int) -> str:
    try:
        return Rcode(rcode).name
    except ValueError:
        return f"rcode {rcode}"


class DnsFormatError(NodeAgentError):
    """Bytes that are not a DNS message the proxy can answer; the message says what is wrong."""


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    name: str  # lower case, no final dot
    qtype: int
    qclass: int
    question: bytes  # the question section as received (echoed in the answer)

    @property
    def opcode(self) -> int:
        return (self.flags >> OPCODE_SHIFT) & 0xF

    @property
    def recursion_desired(self) -> bool:
        return bool(self.flags & FLAG_RD)


def read_name(data: bytes, offset: int) -> tuple[str, int]:
    """The name at `offset` and the offset just after it (after the first pointer, if any)."""
    labels: list[str] = []
    end = -1
    hops = 0
    length = 0
    pos = offset
    while True:
        if pos >= len(data):
            raise DnsFormatError(f"name at byte {offset} runs past the end of the message ({len(data)} bytes)")
        n = data[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise DnsFormatError(f"compression pointer at byte {pos} is cut short")
            target = ((n & 0x3F) << 8) | data[pos + 1]
            if target >= pos:
                raise DnsFormatError(f"compression pointer at byte {pos} points forward (to {target})")
            hops += 1
            if hops > MAX_POINTERS:
                raise DnsFormatError(f"name at byte {offset} follows more than {MAX_POINTERS} pointers")
            if end < 0:
                end = pos + 2
            pos = target
            continue
        if n & 0xC0:
            raise DnsFormatError(f"label at byte {pos} has the reserved length bits {n >> 6:#b}")
        pos += 1
        if n == 0:
            break
        if pos + n > len(data):
            raise DnsFormatError(f"label at byte {pos - 1} runs past the end of the message")
        raw = data[pos:pos + n]
        length += n + 1
        if length > MAX_NAME:
            raise DnsFormatError(f"name at byte {offset} is longer than {MAX_NAME} bytes")
        try:
            labels.append(raw.decode("ascii").lower())
        except UnicodeDecodeError:
            raise DnsFormatError(f"label at byte {pos - 1} is not ASCII") from None
        pos += n
    return ".".join(labels), (end if end >= 0 else pos)


def encode_name(name: str) -> bytes:
    out = bytearray()
    for label in name.rstrip(".").split("."):
        if not label:
            if name.strip("."):
                raise DnsFormatError(f"name {name!r} has an empty label")
            break
        raw = label.encode("ascii")
        if len(raw) > MAX_LABEL:
            raise DnsFormatError(f"label {label!r} is longer than {MAX_LABEL} bytes")
        out += bytes([len(raw)]) + raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise DnsFormatError(f"name {name!r} is longer than {MAX_NAME} bytes")
    return bytes(out)


def parse_query(data: bytes) -> Query:
    if len(data) < HEADER.size:
        raise DnsFormatError(f"{len(data)} bytes is shorter than a DNS header ({HEADER.size})")
    qid, flags, qdcount, ancount, nscount, _ = HEADER.unpack_from(data)
    if flags & FLAG_QR:
        raise DnsFormatError("the message is a response, not a query")
    if qdcount != 1:
        raise DnsFormatError(f"a query must have exactly one question, this one has {qdcount}")
    if ancount or nscount:
        raise DnsFormatError("a query must not carry answer or authority records")
    name, pos = read_name(data, HEADER.size)
    if pos + 4 > len(data):
        raise DnsFormatError("the question is cut short before its type and class")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    return Query(qid, flags, name, qtype, qclass, data[HEADER.size:pos + 4])


def _header(query: Query, rcode: int, ancount: int, authoritative: bool) -> bytes:
    flags = FLAG_QR | (query.flags & (0xF << OPCODE_SHIFT)) | (query.flags & FLAG_RD) | FLAG_RA | rcode
    if authoritative:
        flags |= FLAG_AA
    return HEADER.pack(query.id, flags, 1, ancount, 0, 0)


def answer(query: Query, ips: list[str], ttl: int = 30) -> bytes:
    """NOERROR with an A record for each IPv4 address of `ips` (for an AAAA query: none, as ztunnel
    answers for a mesh that is IPv4 only)."""
    records = b""
    count = 0
    if query.qtype == QType.A:
        for ip in ips:
            addr = ipaddress.ip_address(ip)
            if addr.version != 4:
                continue
            # the name is a pointer to the question's (offset 12)
            records += struct.pack("!HHHIH", 0xC00C, QType.A, QCLASS_IN, ttl, 4) + addr.packed
            count += 1
    return _header(query, Rcode.NOERROR, count, True) + query.question + records


def refusal(query: Query, rcode: Rcode) -> bytes:
    return _header(query, rcode, 0, False) + query.question


def format_error(data: bytes) -> bytes | None:
    """A FORMERR answer to bytes that could not be read as a query, or None when there is no id to
    answer to (or they were themselves a response: never answer one, it could loop)."""
    if len(data) < 2:
        return None
    if len(data) >= 3 and data[2] & 0x80:
        return None
    opcode = data[2] & 0x78 if len(data) >= 3 else 0
    return HEADER.pack(int.from_bytes(data[:2], "big"), FLAG_QR | (opcode << 8) | Rcode.FORMERR, 0, 0, 0, 0)


# --- the resolver's side ---------------------------------------------------------------------------


def build_query(qid: int, name: str, qtype: int = QType.A) -> bytes:
    return HEADER.pack(qid, FLAG_RD, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, QCLASS_IN)


@dataclass(frozen=True)
class Response:
    id: int
    rcode: int
    truncated: bool
    addresses: tuple[str, ...]  # A records (any owner name: CNAME chains are followed by the upstream)
    ttl: int  # the smallest TTL of those records (0 when none)


def parse_response(data: bytes) -> Response:
    if len(data) < HEADER.size:
        raise DnsFormatError(f"{len(data)} bytes is shorter than a DNS header ({HEADER.size})")
    qid, flags, qdcount, ancount, _, _ = HEADER.unpack_from(data)
    if not flags & FLAG_QR:
        raise DnsFormatError("the message is a query, not a response")
    pos = HEADER.size
    for _ in range(qdcount):
        _, pos = read_name(data, pos)
        pos += 4
    addresses: list[str] = []
    ttls: list[int] = []
    for _ in range(ancount):
        _, pos = read_name(data, pos)
        if pos + 10 > len(data):
            raise DnsFormatError("an answer record is cut short")
        rtype, _, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        if pos + rdlen > len(data):
            raise DnsFormatError("an answer record's data runs past the end of the message")
        if rtype == QType.A and rdlen == 4:
            addresses.append(str(ipaddress.IPv4Address(data[pos:pos + 4])))
            ttls.append(ttl)
        pos += rdlen
    return Response(qid, flags & 0xF, bool(flags & FLAG_TC), tuple(addresses), min(ttls) if ttls else 0)


def response_id(data: bytes) -> int | None:
    return int.from_bytes(data[:2], "big") if len(data) >= 2 else None
