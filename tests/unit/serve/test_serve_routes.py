"""Routing and the standard endpoints as values: no sockets."""

from __future__ import annotations

import dataclasses
import json

from prometheus_client import CollectorRegistry, Counter

from mesh.serve.endpoints import Readiness, admin_handler, metrics_handler, readiness_handler
from mesh.serve.routes import JSON, Request, Response, Router, json_error, plain


def echo(request: Request) -> Response:
    return Response.json({"method": request.method, "path": request.path, "query": dict(request.query),
                          "body": request.json()})


def router() -> Router:
    return Router({"/items": echo}).add("/items", echo, methods=("POST",)).add("/", lambda _: Response.text("root"))


def test_query_parameters_are_parsed() -> None:
    r = Request.parse("get", "/items?kind=vs&kind=dr&empty=&flag")
    assert (r.method, r.path, dict(r.query)) == ("GET", "/items", {"kind": "dr", "empty": "", "flag": ""})
    assert Request.parse("GET", "").path == "/"
    assert Request.parse("GET", "/x", headers=[("Content-Type", "a/b")]).header("content-type") == "a/b"


def test_routes_by_path_and_method() -> None:
    rt = router()
    got = rt(Request.parse("GET", "/items/?a=1"))
    assert got.status == 200 and got.content_type == JSON
    assert json.loads(got.body) == {"method": "GET", "path": "/items/", "query": {"a": "1"}, "body": {}}
    posted = rt(Request.parse("POST", "/items", body=b'{"x": 1}'))
    assert json.loads(posted.body)["body"] == {"x": 1}
    assert rt(Request.parse("HEAD", "/items")).status == 200  # served by GET; the server drops the body
    assert rt(Request.parse("GET", "/")).body == b"root\n"


def test_unknown_path_is_404_and_names_the_paths() -> None:
    answer = router()(Request.parse("GET", "/nope"))
    assert answer.status == 404 and not answer.close
    assert answer.body == b"no endpoint /nope: try /items, /\n"


def test_wrong_method_is_405_and_closes() -> None:
    answer = router()(Request.parse("DELETE", "/items"))
    assert (answer.status, answer.close, answer.headers) == (405, True, (("allow", "GET, POST"),))
    assert b"use GET, POST" in answer.body


def test_json_errors_and_include() -> None:
    api = Router(error=json_error).add("/apply", echo, methods=("POST",))
    answer = api(Request.parse("GET", "/apply"))
    assert answer.status == 405 and answer.content_type == JSON
    assert json.loads(api(Request.parse("GET", "/x")).body)["error"].startswith("no endpoint /x")
    both = Router().include(api).include(router())
    assert both.paths == ["/apply", "/items", "/"]
    assert both(Request.parse("GET", "/x")).content_type != JSON  # the including router's own errors


def test_metrics_text_from_the_registry() -> None:
    reg = CollectorRegistry()
    Counter("requests", "requests served", ["code"], registry=reg).labels("200").inc(2)
    m = metrics_handler(reg)
    for path in ("/metrics", "/stats/prometheus"):
        answer = m(Request.parse("GET", path))
        assert answer.status == 200 and answer.content_type.startswith("text/plain; version=")
        assert b'requests_total{code="200"} 2.0' in answer.body
        assert b"# HELP requests_total requests served" in answer.body


def test_readiness_flips() -> None:
    state = {"discovery": False, "certificate": True}
    ready = readiness_handler(lambda: Readiness.from_checks(state))
    assert ready(Request.parse("GET", "/healthz/ready")) == Response.text("not ready: waiting for discovery", 503)
    state["discovery"] = True
    assert ready(Request.parse("GET", "/healthz/ready")) == Response.text("ready")
    assert readiness_handler(lambda: Readiness(False))(Request.parse("GET", "/healthz/ready")).body == \
        b"not ready: starting\n"


def test_admin_handler_lists_its_endpoints() -> None:
    admin = admin_handler("demo admin", {"/stats": lambda _: Response.json({"n": 1})})
    assert admin(Request.parse("GET", "/")).body == b"demo admin\n/\n/healthz\n/stats\n/logging\n/version\n"
    assert admin(Request.parse("GET", "/healthz")).body == b"ok\n"
    assert json.loads(admin(Request.parse("GET", "/stats")).body) == {"n": 1}


def test_plain_makes_status_values_json_ready() -> None:
    @dataclasses.dataclass
    class Status:
        identity: str

    assert [plain(Status("a")), plain({"b": 1}), plain(3)] == [{"identity": "a"}, {"b": 1}, {"value": "3"}]
