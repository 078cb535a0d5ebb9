"""Admin, metrics and readiness endpoints: pure routing, then real sockets on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
from prometheus_client import CollectorRegistry, Counter

from mesh.proto import discovery_pb2 as pb
from mesh.serve import client
from mesh.serve.endpoints import Readiness, metrics_handler, readiness_handler, serve_metrics, serve_readiness
from mesh.serve.routes import Request, Response
from mesh.serve.server import serve_http
from nodeagent.admin import AdminView
from nodeagent.state import AUTHORIZATION, SERVICE, WORKLOAD, MeshState


@dataclasses.dataclass(frozen=True)
class FakeCert:
    identity: str
    state: str
    serial: str
    not_before: str
    not_after: str


CERTS = [FakeCert("spiffe://cluster.local/ns/default/sa/sleep", "valid", "0a1b", "2024-05-01T00:00:00+00:00",
                  "2024-05-02T00:00:00+00:00")]


def make_state() -> MeshState:
    s = MeshState()
    sleep = pb.Workload(uid="default/sleep-1", name="sleep-1", namespace="default", addresses=["10.244.1.2"],
                        node="node-1", service_account="sleep", tunnel_protocol=pb.HBONE, labels={"app": "sleep"})
    web = pb.Workload(uid="prod/web-1", name="web-1", namespace="prod", addresses=["10.244.2.2"], node="node-2",
                      service_account="web", tunnel_protocol=pb.HBONE)
    s.apply(WORKLOAD, {w.uid: w for w in (sleep, web)}, [], version="7")
    svc = pb.Service(name="web", namespace="prod", hostname="web.prod.svc.cluster.local", vips=["10.96.0.10"])
    s.apply(SERVICE, {"prod/web.prod.svc.cluster.local": svc}, [], version="3")
    deny = pb.Authorization(name="deny-plain", namespace="default", scope=pb.NAMESPACE, action=pb.DENY,
                            rules=[pb.Rule(clauses=[pb.Clause(matches=[pb.Match(
                                not_principals=[pb.StringMatch(presence=True)])])])])
    web_only = pb.Authorization(name="web-only", namespace="prod", scope=pb.NAMESPACE, action=pb.ALLOW)
    s.apply(AUTHORIZATION, {"default/deny-plain": deny, "prod/web-only": web_only}, [], version="5")
    return s


def view() -> AdminView:
    return AdminView(make_state(), lambda: CERTS, node="node-1", enrollment=lambda: {"default/sleep-1": "enrolled"})


def body(resp: Response) -> object:
    return json.loads(resp.body)


# --- pure routing ---------------------------------------------------------------------------------------


def test_request_parse() -> None:
    r = Request.parse("get", "/workloads?all=1&x")
    assert r == Request("GET", "/workloads", {"all": "1", "x": ""})
    assert Request.parse("GET", "").path == "/"


def test_workloads_mark_local_and_enrollment() -> None:
    resp = view().handle(Request("GET", "/workloads"))
    assert resp.status == 200 and resp.content_type == "application/json"
    data = body(resp)
    assert isinstance(data, dict)
    assert data["node"] == "node-1"
    by_uid = {w["uid"]: w for w in data["workloads"]}
    assert by_uid["default/sleep-1"]["local"] is True
    assert by_uid["default/sleep-1"]["enrollment"] == "enrolled"
    assert by_uid["default/sleep-1"]["tunnel_protocol"] == "HBONE"
    assert by_uid["prod/web-1"]["local"] is False
    assert "enrollment" not in by_uid["prod/web-1"]


def test_policies_list_local_workloads_they_apply_to() -> None:
    data = body(view().handle(Request("GET", "/policies")))
    assert isinstance(data, dict)
    pols = {p["key"]: p for p in data["policies"]}
    assert pols["default/deny-plain"]["applies_to"] == ["default/sleep-1"]
    assert pols["default/deny-plain"]["action"] == "DENY"
    assert pols["prod/web-only"]["applies_to"] == []  # web-1 is on another node


def test_certs_and_config_dump() -> None:
    v = view()
    certs = body(v.handle(Request("GET", "/certs")))
    assert isinstance(certs, dict)
    assert certs["certificates"][0]["serial"] == "0a1b"
    dump = body(v.handle(Request("GET", "/config_dump")))
    assert isinstance(dump, dict)
    assert dump["versions"] == {"workload": "7", "service": "3", "authorization": "5"}
    assert [s["hostname"] for s in dump["services"]] == ["web.prod.svc.cluster.local"]
    assert len(dump["workloads"]) == 2 and len(dump["policies"]) == 2 and len(dump["certificates"]) == 1


def test_certificates_of_any_shape() -> None:
    v = AdminView(MeshState(), lambda: [{"identity": "a"}, "plain"])
    assert v.certificates() == [{"identity": "a"}, {"value": "plain"}]


def test_index_healthz_unknown() -> None:
    v = view()
    assert v.handle(Request("GET", "/healthz")).body == b"ok\n"
    assert b"/config_dump" in v.handle(Request("GET", "/")).body
    assert v.handle(Request("GET", "/workloads/")).status == 200
    nf = v.handle(Request("GET", "/nope"))
    assert nf.status == 404 and b"/workloads" in nf.body


def test_metrics_and_readiness_handlers() -> None:
    reg = CollectorRegistry()
    Counter("demo", "demo", registry=reg).inc()
    m = metrics_handler(reg)
    assert b"demo_total 1.0" in m(Request("GET", "/metrics")).body
    assert m(Request("GET", "/stats/prometheus")).status == 200
    assert m(Request("GET", "/x")).status == 404
    ok = readiness_handler(lambda: Readiness(True))
    assert ok(Request("GET", "/healthz/ready")) == Response.text("ready")
    waiting = readiness_handler(lambda: Readiness.from_checks({"discovery": True, "certificates": False}))
    r = waiting(Request("GET", "/healthz/ready"))
    assert (r.status, r.body) == (503, b"not ready: waiting for certificates\n")

    def broken() -> Readiness:
        raise RuntimeError("boom")

    r = readiness_handler(broken)(Request("GET", "/healthz/ready"))
    assert r.status == 503 and b"boom" in r.body


def test_readiness_from_checks() -> None:
    assert Readiness.from_checks({}) == Readiness(True)
    assert Readiness.from_checks({"a": False, "b": False}) == Readiness(False, "waiting for a, b")


# --- real sockets ---------------------------------------------------------------------------------------

Ports = dict[str, int]


def with_servers(test: Callable[[Ports], Awaitable[None]], ready: Callable[[], Readiness] | None = None) -> None:
    reg = CollectorRegistry()
    Counter("istio_tcp_connections_opened", "x", registry=reg).inc(3)

    async def main() -> None:
        admin = AdminView(make_state(), lambda: CERTS, node="node-1")
        async with trio.open_nursery() as nursery:
            ports = {
                "admin": await nursery.start(partial(serve_http, admin.handle, "127.0.0.1", 0, name="admin")),
                "metrics": await nursery.start(partial(serve_metrics, reg, host="127.0.0.1", port=0)),
                "ready": await nursery.start(partial(serve_readiness, ready or (lambda: Readiness(True)),
                                                     host="127.0.0.1", port=0)),
            }
            with trio.fail_after(10):
                await test(ports)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def raw(port: int, data: bytes, *, chunks: int = 1) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    step = max(1, len(data) // chunks)
    for i in range(0, len(data), step):
        await stream.send_all(data[i:i + step])
    out = []
    while chunk := await stream.receive_some(65536):
        out.append(chunk)
    await stream.aclose()
    return b"".join(out)


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    reply = client.request(client.Endpoint.tcp("127.0.0.1", port), method, path)
    return reply.status, reply.content_type, reply.body


async def tget(port: int, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    return await trio.to_thread.run_sync(get, port, path, method)


def test_servers_answer_over_http() -> None:
    async def check(ports: Ports) -> None:
        status, ctype, data = await tget(ports["admin"], "/workloads")
        assert status == 200 and ctype == "application/json"
        assert {w["uid"] for w in json.loads(data)["workloads"]} == {"default/sleep-1", "prod/web-1"}
        status, _, data = await tget(ports["admin"], "/config_dump")
        assert json.loads(data)["versions"]["workload"] == "7"
        status, _, data = await tget(ports["admin"], "/certs")
        assert json.loads(data)["certificates"][0]["identity"].endswith("/sa/sleep")
        status, ctype, data = await tget(ports["metrics"], "/metrics")
        assert status == 200 and ctype.startswith("text/plain") and b"istio_tcp_connections_opened_total 3.0" in data
        assert (await tget(ports["ready"], "/healthz/ready"))[:1] == (200,)
        assert (await tget(ports["admin"], "/nope"))[0] == 404
        assert (await tget(ports["metrics"], "/healthz/ready"))[0] == 404

    with_servers(check)


def test_readiness_503_with_reason() -> None:
    async def check(ports: Ports) -> None:
        status, _, data = await tget(ports["ready"], "/healthz/ready")
        assert (status, data) == (503, b"not ready: waiting for discovery\n")

    with_servers(check, ready=lambda: Readiness.from_checks({"discovery": False}))


def test_keep_alive_and_head() -> None:
    async def check(ports: Ports) -> None:
        reply = await raw(ports["admin"], b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                                          b"HEAD /workloads HTTP/1.1\r\nHost: x\r\n\r\n"
                                          b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert reply.count(b"HTTP/1.1 200 OK") == 3
        assert reply.endswith(b"ok\n")
        assert b'"workloads"' not in reply  # HEAD: headers only

    with_servers(check)


def test_bad_requests_never_stop_the_server() -> None:
    async def check(ports: Ports) -> None:
        port = ports["admin"]
        assert status_of(await raw(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")) == 400
        assert status_of(await raw(port, b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")) == 400
        big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        assert status_of(await raw(port, big, chunks=4)) == 431
        assert status_of(await raw(port, b"POST /workloads HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")) == 405
        assert status_of(await raw(port, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == 404
        gone = await trio.open_tcp_stream("127.0.0.1", port)
        await gone.send_all(b"GET / HT")  # half a request, then the client goes away
        await gone.aclose()
        status, _, _ = await tget(port, "/healthz")
        assert status == 200

    with_servers(check)


def test_slow_request_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    import mesh.serve.server as admin

    monkeypatch.setattr(admin, "REQUEST_TIMEOUT", 0.2)

    async def check(ports: Ports) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", ports["admin"])
        await stream.send_all(b"GET /healthz HTTP/1.1\r\n")
        reply = b""
        while chunk := await stream.receive_some(4096):
            reply += chunk
        assert status_of(reply) == 408
        idle = await trio.open_tcp_stream("127.0.0.1", ports["admin"])
        assert await idle.receive_some(10) == b""  # an idle connection is closed without a word

    with_servers(check)


def test_handler_failure_is_500() -> None:
    def broken(_: Request) -> Response:
        raise RuntimeError("bug")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_http, broken, "127.0.0.1", 0))
            status, _, data = await tget(port, "/")
            assert status == 500 and b"RuntimeError: bug" in data
            assert (await tget(port, "/"))[0] == 500
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_port_in_use_is_one_clear_error() -> None:
    from mesh.serve.errors import ListenError as AdminError

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_http, lambda r: Response.text("x"), "127.0.0.1", 0))
            with pytest.raises(AdminError, match=rf"127\.0\.0\.1:{port}"):
                await serve_http(lambda r: Response.text("x"), "127.0.0.1", port, name="admin")
            nursery.cancel_scope.cancel()

    trio.run(main)
