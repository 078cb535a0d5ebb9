"""gRPC's pure parts: what a gRPC request is, status mappings, `grpc-timeout`, local replies, gRPC retry
conditions, outlier counting of gRPC answers and timeouts, `fault.abort.grpcStatus` (compiled, and
refused when it is not a status name), and GOAWAY taken out of the peer's bytes."""

from __future__ import annotations

import pytest
from hyperframe.frame import DataFrame, GoAwayFrame, SettingsFrame

from mesh.api.loader import parse_text
from mesh.api.validate import validate_documents
from waypoint.http.http2_client import Goaway, GoawaySplitter
from waypoint.l7 import grpc
from waypoint.l7.model import RequestHead
from waypoint.l7.outlier import OutlierDetector
from waypoint.l7.retry import Outcome, retriable
from waypoint.l7.rules import OutlierPolicy, _fault


def head(ctype: str, timeout: str = "") -> RequestHead:
    headers = (("content-type", ctype),) + ((("grpc-timeout", timeout),) if timeout else ())
    return RequestHead("POST", "/t.Echo/Say", "echo", headers, protocol="HTTP/2")


def test_grpc_requests_are_recognised_as_envoy_does() -> None:
    assert grpc.is_grpc(head("application/grpc")) and grpc.is_grpc(head("application/grpc+proto"))
    assert not grpc.is_grpc(head("application/grpc-web")) and not grpc.is_grpc(head("application/json"))


@pytest.mark.parametrize("value,seconds", [("1S", 1.0), ("250m", 0.25), ("2M", 120.0), ("1H", 3600.0),
                                           ("5000u", 0.005), ("7n", 7e-9), ("", None), ("12", None), ("1s", None),
                                           ("123456789S", None), ("-1S", None), ("xS", None)])
def test_grpc_timeout_header(value: str, seconds: float | None) -> None:
    assert grpc.parse_timeout(value) == seconds


def test_grpc_timeout_is_capped_by_the_route_and_ignored_for_other_requests() -> None:
    assert grpc.request_timeout(None, head("application/grpc", "2S")) == 2.0
    assert grpc.request_timeout(0.5, head("application/grpc", "2S")) == 0.5
    assert grpc.request_timeout(5.0, head("application/grpc", "2S")) == 2.0
    assert grpc.request_timeout(5.0, head("application/grpc", "bad")) == 5.0
    assert grpc.request_timeout(5.0, head("application/json", "2S")) == 5.0


def test_status_mappings_and_local_reply() -> None:
    assert [grpc.http_to_grpc(s) for s in (400, 401, 403, 404, 429, 503, 504, 418)] == [13, 16, 7, 12, 14, 14, 14, 2]
    assert [grpc.grpc_to_http(c) for c in (0, 1, 4, 8, 13, 14, 99)] == [200, 499, 504, 429, 500, 503, 500]
    assert grpc.local_reply_headers(504, "upstream request timeout") == (
        ("content-type", "application/grpc"), ("grpc-status", "14"), ("grpc-message", "upstream request timeout"))
    assert dict(grpc.local_reply_headers(200, "100% ünïcode", 8))["grpc-message"] == "100%25 %C3%BCn%C3%AFcode"
    assert grpc.status_of((("grpc-status", "14"),)) == 14 and grpc.status_of((("grpc-status", "x"),)) is None


def test_grpc_retry_conditions_read_the_status() -> None:
    unavailable = Outcome(status=200, grpc_status=14)
    assert retriable(unavailable, frozenset({"unavailable"}))
    assert not retriable(unavailable, frozenset({"cancelled", "5xx"}))  # an HTTP 200 is not a 5xx
    for word, code in grpc.RETRY_ON.items():
        assert retriable(Outcome(status=200, grpc_status=code), frozenset({word}))
    assert not retriable(Outcome(status=200, grpc_status=0), frozenset(grpc.RETRY_ON))


def test_outlier_detection_counts_grpc_statuses_and_timeouts() -> None:
    assert Outcome(status=200, grpc_status=14).outlier_status == 503
    assert Outcome(status=200, grpc_status=5).outlier_status == 404
    assert Outcome(failure="timeout").outlier_status == 504
    o = OutlierDetector(OutlierPolicy(consecutive_gateway=2, max_ejection_percent=100))
    assert not o.record("a", Outcome(status=200, grpc_status=14).outlier_status, 0.0, 2)
    assert o.record("a", 504, 0.1, 2)  # a route timeout is recorded as 504


def test_fault_abort_grpc_status_compiles_and_a_bad_name_is_refused() -> None:
    f = _fault({"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 100}}})
    assert f is not None and f.abort_grpc_status == 14 and f.abort_status == 200
    with pytest.raises(ValueError):
        _fault({"abort": {"grpcStatus": "SOMETIMES"}})
    doc = ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo}\nspec:\n  hosts: [echo]\n"
           "  http:\n  - route:\n    - destination: {host: echo}\n    fault: {abort: {grpcStatus: %s}}\n")
    _, errors = validate_documents(parse_text(doc % "Unavailable", "vs.yaml"))
    assert [e.path for e in errors] == ["spec.http[0].fault.abort.grpcStatus"]
    assert "is not a gRPC status name" in str(errors[0])
    _, errors = validate_documents(parse_text(doc % "UNAVAILABLE", "vs.yaml"))
    assert errors == []


def test_goaway_is_taken_out_of_the_bytes_in_order_even_when_split() -> None:
    settings, data = SettingsFrame(0).serialize(), DataFrame(1, b"x" * 40).serialize()
    goaway = GoAwayFrame(0, last_stream_id=5, error_code=0).serialize()
    wire = settings + data + goaway + data
    for cut in range(1, len(wire)):
        splitter = GoawaySplitter()
        parts = splitter.feed(wire[:cut]) + splitter.feed(wire[cut:])
        frames = b"".join(p for p in parts if isinstance(p, bytes))
        assert frames == settings + data + data
        assert [p for p in parts if isinstance(p, Goaway)] == [Goaway(5, 0)]
        before = b"".join(p for p in parts[:[i for i, p in enumerate(parts) if isinstance(p, Goaway)][0]]
                          if isinstance(p, bytes))
        assert before == settings + data

    with pytest.raises(ValueError, match="a frame of 4740180 bytes is over the 16384 allowed"):
        GoawaySplitter().feed(b"HTTP/1.1 400 Bad Request\r\n\r\n")
