"""The node agent's DNS proxy: 127.0.0.1:15053 (UDP and TCP) inside each enrolled pod, where the pod's
redirect sends its queries to port 53 (`nodeagent.redirect`: iptables rules or the eBPF connect and
sendmsg programs).

    DnsProxy(state, upstream, metrics)    the agent's one proxy: `handle(bytes, protocol, pod)` -> bytes
    PodDns.open(pod, proxy)               a pod's two sockets; `serve` (trio task), `close`

`handle` reads the query (`message.parse_query`), answers A and AAAA for the names the agent knows
(`table.NameTable`: Kubernetes services, ServiceEntry hosts; AAAA with no record, the mesh being IPv4)
and forwards anything else to the upstream resolver (`upstream.Upstream`), passing its answer back as it
is.  Bytes that are no query get one warning line and FORMERR (or nothing, when they have no id); an
upstream that does not answer gets SERVFAIL.  Every query is counted (`metrics.DnsMetrics`).
"""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass

import trio

from mesh import netns, reuseport
from mesh.defaults import DNS_PORT, LISTENER_UID
from nodeagent.dns.message import (
    QCLASS_IN,
    DnsFormatError,
    QType,
    Query,
    Rcode,
    answer,
    format_error,
    parse_query,
    refusal,
    type_name,
)
from nodeagent.dns.metrics import DnsLabels, DnsMetrics
from nodeagent.dns.table import Lookup, NameTable
from nodeagent.dns.upstream import MAX_UDP, Upstream, UpstreamError, read_framed
from nodeagent.pods.source import PodRef
from nodeagent.redirect.rules import AGENT_MARK
from nodeagent.state import SERVICE, MeshState

log = logging.getLogger("nodeagent.dns")

LISTEN_HOST = "127.0.0.1"
TCP_IDLE_SECONDS = 10.0  # a TCP client that sends nothing for this long is closed
ANSWER_TTL = 30
MAX_IN_FLIGHT = 256  # UDP queries of one pod answered at once; more are dropped until some are done


@dataclass(frozen=True)
class Decision:
    """What to do with one query: answer it from the table, or forward it."""

    found: Lookup | None

    @property
    def forward(self) -> bool:
        return self.found is None


class DnsProxy:
    def __init__(self, state: MeshState, upstream: Upstream, metrics: DnsMetrics) -> None:
        self.state = state
        self.upstream = upstream
        self.metrics = metrics
        self._table: NameTable | None = None
        state.on_change(self._changed)

    def _changed(self, kind: str) -> None:
        if kind == SERVICE:
            self._table = None  # rebuilt at the next query

    def table(self) -> NameTable:
        table = self._table
        if table is None:
            table = self._table = NameTable.of(self.state.services())
        return table

    def decide(self, query: Query, namespace: str) -> Decision:
        if query.qclass != QCLASS_IN or query.qtype not in (QType.A, QType.AAAA):
            return Decision(None)
        return Decision(self.table().lookup(query.name, namespace))

    async def handle(self, data: bytes, protocol: str, pod: PodRef, peer: str = "-") -> bytes | None:
        """The answer to `data` (a query from `pod` over `protocol`), or None when there is none to give."""
        try:
            query = parse_query(data)
        except DnsFormatError as exc:
            log.warning('{"event": "dns_bad_query", "pod": "%s", "from": "%s", "protocol": "%s", "bytes": %d, '
                        '"error": "%s"}', pod.key, peer, protocol, len(data), exc)
            return format_error(data)
        labels = DnsLabels(type_name(query.qtype), protocol, self.state.workload(pod.uid))
        self.metrics.request(labels)
        if query.opcode != 0:
            return refusal(query, Rcode.NOTIMP)
        decision = self.decide(query, pod.namespace)
        if decision.found is not None:
            return answer(query, list(decision.found.addresses), ANSWER_TTL)
        started = trio.current_time()
        try:
            reply = await self.upstream.forward(data, tcp=protocol == "tcp")
        except UpstreamError as exc:
            self.metrics.forwarded(labels, None)
            log.warning('{"event": "dns_upstream_failed", "pod": "%s", "name": "%s", "error": "%s"}',
                        pod.key, query.name, exc)
            return refusal(query, Rcode.SERVFAIL)
        self.metrics.forwarded(labels, trio.current_time() - started)
        return reply


def _socket_in(netns_path: str, kind: int) -> socket.socket:
    with netns.entered(netns_path):
        try:
            with reuseport.owned_by(LISTENER_UID):
                sock = socket.socket(socket.AF_INET, kind)
        except reuseport.ReuseportError:
            sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reuseport.share(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
        sock.bind((LISTEN_HOST, DNS_PORT))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class PodDns:
    """A pod's DNS sockets (UDP and TCP 127.0.0.1:15053 in its namespace) and the tasks serving them."""

    def __init__(self, pod: PodRef, proxy: DnsProxy, udp: socket.socket, tcp: socket.socket) -> None:
        self.pod = pod
        self.proxy = proxy
        self._udp = trio.socket.from_stdlib_socket(udp)
        self._tcp = trio.SocketListener(trio.socket.from_stdlib_socket(tcp))
        self._scope = trio.CancelScope()
        self._in_flight = 0  # UDP queries being answered

    @classmethod
    def open(cls, pod: PodRef, proxy: DnsProxy) -> PodDns:
        udp = _socket_in(pod.netns, socket.SOCK_DGRAM)
        try:
            tcp = _socket_in(pod.netns, socket.SOCK_STREAM)
        except BaseException:
            udp.close()
            raise
        return cls(pod, proxy, udp, tcp)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._serve_udp, nursery)
                    nursery.start_soon(trio.serve_listeners, self._serve_tcp, [self._tcp])
                    task_status.started()
            finally:
                self._udp.close()
                await trio.aclose_forcefully(self._tcp)

    def close(self) -> None:
        self._scope.cancel()

    async def _serve_udp(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                data, peer = await self._udp.recvfrom(MAX_UDP)
            except OSError as exc:  # e.g. ICMP errors reported on the socket: keep serving
                log.debug("dns udp receive in pod %s: %s", self.pod.key, exc)
                continue
            if self._in_flight >= MAX_IN_FLIGHT:  # a flood: dropped, as a busy server drops (the client retries)
                continue
            self._in_flight += 1
            nursery.start_soon(self._answer_udp, data, peer)

    async def _answered(self, data: bytes, protocol: str, peer: str) -> bytes | None:
        """`DnsProxy.handle`, and SERVFAIL (or nothing) should it fail in a way it did not expect: one
        query never takes the pod's DNS down."""
        try:
            return await self.proxy.handle(data, protocol, self.pod, peer)
        except Exception:
            log.exception("dns query from %s in pod %s could not be answered", peer, self.pod.key)
            try:
                return refusal(parse_query(data), Rcode.SERVFAIL)
            except DnsFormatError:
                return None

    async def _answer_udp(self, data: bytes, peer: tuple[str, int]) -> None:
        try:
            reply = await self._answered(data, "udp", f"{peer[0]}:{peer[1]}")
        finally:
            self._in_flight -= 1
        if reply is not None:
            try:
                await self._udp.sendto(reply, peer)
            except OSError as exc:
                log.debug("dns answer to %s in pod %s: %s", peer, self.pod.key, exc)

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        """Length-prefixed queries, one after the other, until the client closes or is idle too long."""
        async with stream:
            try:
                host, port = stream.socket.getpeername()[:2]
                while True:
                    data = b""
                    with trio.move_on_after(TCP_IDLE_SECONDS):
                        data = await read_framed(stream)
                    if not data:  # idle (or an empty message, which no client sends)
                        return
                    reply = await self._answered(data, "tcp", f"{host}:{port}")
                    if reply is None:
                        return
                    await stream.send_all(struct.pack("!H", len(reply)) + reply)
            except (UpstreamError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return  # closed by the client, or cut mid-message
