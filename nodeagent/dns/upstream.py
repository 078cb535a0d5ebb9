"""The upstream resolver: where the DNS proxy forwards what it does not answer itself, and how the agent
resolves the names of DNS ServiceEntry endpoints.

The upstream is the agent's own (ztunnel's way): `--dns-upstream HOST[:PORT],...`, else the nameservers
of the agent's /etc/resolv.conf.  The agent asks from its own network namespace, so its queries never
meet a pod's capture.  A query that came over UDP is forwarded over UDP (a truncated answer is passed
on as it is: the client then asks again over TCP), one that came over TCP over TCP.  Each upstream is
tried in turn until one answers within the timeout.

    Upstream(servers, timeout).forward(query_bytes, tcp=False) -> answer bytes   (UpstreamError if none)
    Resolver(upstream).resolve(name) -> [IPv4 ...]     A records, cached for their TTL (at most MAX_TTL s)
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from mesh.errors import MeshError
from mesh.process import split_hostport
from nodeagent.dns.message import (
    DnsFormatError,
    QType,
    Rcode,
    build_query,
    parse_response,
    rcode_name,
    response_id,
)
from nodeagent.errors import NodeAgentError

RESOLV_CONF = Path("/etc/resolv.conf")
DNS_PORT = 53
DEFAULT_TIMEOUT = 2.0
MAX_UDP = 65535
MAX_TTL = 30.0
MAX_CACHED = 1024  # names the resolver keeps answers for; expired ones go first, then the oldest


class UpstreamError(NodeAgentError):
    """No upstream resolver answered."""


def parse_upstreams(text: str) -> tuple[tuple[str, int], ...]:
    """`HOST[:PORT],...` -> addresses; a bad one raises `MeshError` naming it."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        host, port = split_hostport(item) if ":" in item else (item, DNS_PORT)
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise MeshError(f"{item!r}: the upstream must be an IPv4 address (a name would need a resolver)") from None
        if not 0 < port < 65536:
            raise MeshError(f"{item!r}: port {port} is not between 1 and 65535")
        out.append((host, port))
    return tuple(out)


def system_upstreams(path: Path = RESOLV_CONF) -> tuple[tuple[str, int], ...]:
    """The nameservers of a resolv.conf (none when it cannot be read)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return ()
    return tuple((words[1], DNS_PORT) for words in (line.split() for line in lines)
                 if len(words) >= 2 and words[0] == "nameserver")


class Upstream:
    def __init__(self, servers: Sequence[tuple[str, int]], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.servers = tuple(servers)
        self.timeout = timeout

    def describe(self) -> str:
        return ", ".join(f"{h}:{p}" for h, p in self.servers) or "none"

    async def forward(self, query: bytes, *, tcp: bool = False) -> bytes:
        if not self.servers:
            raise UpstreamError("no upstream resolver is configured (--dns-upstream, or a nameserver in "
                                f"{RESOLV_CONF})")
        problems = []
        for server in self.servers:
            try:
                with trio.fail_after(self.timeout):
                    return await (self._tcp(server, query) if tcp else self._udp(server, query))
            except trio.TooSlowError:
                problems.append(f"{server[0]}:{server[1]} did not answer within {self.timeout:g}s")
            except (OSError, UpstreamError) as exc:
                problems.append(f"{server[0]}:{server[1]}: {exc}")
        raise UpstreamError("; ".join(problems))

    @staticmethod
    async def _udp(server: tuple[str, int], query: bytes) -> bytes:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            await sock.connect(server)
            await sock.send(query)
            want = response_id(query)
            while True:
                data = await sock.recv(MAX_UDP)
                if response_id(data) == want:  # anything else is stale or spoofed: keep waiting
                    return data

    @staticmethod
    async def _tcp(server: tuple[str, int], query: bytes) -> bytes:
        stream = await trio.open_tcp_stream(*server)
        async with stream:
            await stream.send_all(struct.pack("!H", len(query)) + query)
            return await read_framed(stream)


async def read_framed(stream: trio.abc.ReceiveStream) -> bytes:
    """One length-prefixed DNS message of a TCP stream (RFC 1035 4.2.2)."""
    head = await _read_exactly(stream, 2)
    return await _read_exactly(stream, struct.unpack("!H", head)[0])


async def _read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise UpstreamError(f"the connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class Resolver:
    """A records of names, asked of the upstream, kept for their TTL (capped)."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self._cache: dict[str, tuple[float, tuple[str, ...]]] = {}

    async def resolve(self, name: str) -> tuple[str, ...]:
        name = name.lower().rstrip(".")
        hit = self._cache.get(name)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        qid = random.randrange(1 << 16)
        try:
            answer = parse_response(await self.upstream.forward(build_query(qid, name, QType.A)))
        except DnsFormatError as exc:
            raise UpstreamError(f"the upstream's answer for {name} cannot be read: {exc}") from None
        if answer.rcode != Rcode.NOERROR or not answer.addresses:
            raise UpstreamError(f"{name} does not resolve (upstream {self.upstream.describe()} answered "
                                f"{rcode_name(answer.rcode)}{'' if answer.addresses else ' with no address'})")
        if len(self._cache) >= MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            while len(self._cache) >= MAX_CACHED:
                del self._cache[next(iter(self._cache))]
        self._cache[name] = (now + min(float(answer.ttl), MAX_TTL), answer.addresses)
        return answer.addresses
