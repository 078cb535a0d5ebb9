"""The service graph from canned Prometheus answers: edges, mTLS, waypoints, error rate, p99."""

from __future__ import annotations

import math

import pytest

from meshctl.dashboard.graph import WaypointRef, build, queries
from meshctl.dashboard.prom import Sample, histogram_quantile, parse_matrix, parse_vector

NS = "bookinfo"
WP = WaypointRef(NS, "waypoint", "spiffe://cluster.local/ns/bookinfo/sa/waypoint")
DETAILS = "details.bookinfo.svc.cluster.local"
REVIEWS = "reviews.bookinfo.svc.cluster.local"


def http(src: str, dst: str, service: str, value: float, code: str = "200", *, le: str | None = None,
         security: str = "mutual_tls", src_ns: str = NS) -> Sample:
    labels = {"namespace": NS, "pod": "waypoint", "source_workload": src, "source_workload_namespace": src_ns,
              "source_principal": f"spiffe://cluster.local/ns/{src_ns}/sa/{src}", "destination_workload": dst,
              "destination_workload_namespace": NS, "destination_principal": "spiffe://cluster.local/ns/bookinfo/sa/x",
              "destination_service": service, "destination_service_namespace": NS,
              "connection_security_policy": security}
    if le is not None:
        labels["le"] = le
    else:
        labels["response_code"] = code
    return Sample(labels, value)


def tcp(reporter: str, src: str, dst: str, value: float, *, security: str = "mutual_tls", src_ns: str = NS,
        service: str = "unknown", dst_principal: str = "", src_principal: str = "") -> Sample:
    return Sample({"reporter": reporter, "node": "node-1", "source_workload": src, "source_workload_namespace": src_ns,
                   "source_principal": src_principal or f"spiffe://cluster.local/ns/{src_ns}/sa/{src}",
                   "destination_workload": dst, "destination_workload_namespace": NS if dst != "unknown" else "unknown",
                   "destination_principal": dst_principal or f"spiffe://cluster.local/ns/{NS}/sa/{dst}",
                   "destination_service": service, "destination_service_namespace": NS if service != "unknown" else "unknown",
                   "connection_security_policy": security}, value)


def buckets(src: str, dst: str, service: str, counts: dict[str, float]) -> list[Sample]:
    return [http(src, dst, service, v, le=le) for le, v in counts.items()]


@pytest.fixture
def answers() -> dict[str, list[Sample]]:
    return {
        # sleep -> details through the waypoint: 37 requests, none failed.
        # productpage -> reviews-v2 through the waypoint: 10 requests, 2 of them 503.
        "http_total": [http("sleep", "details-v1", DETAILS, 37), http("productpage-v1", "reviews-v2", REVIEWS, 8),
                       http("productpage-v1", "reviews-v2", REVIEWS, 2, "503")],
        "http_rate": [http("sleep", "details-v1", DETAILS, 0.5), http("productpage-v1", "reviews-v2", REVIEWS, 0.4),
                      http("productpage-v1", "reviews-v2", REVIEWS, 0.1, "503")],
        "http_buckets": buckets("sleep", "details-v1", DETAILS, {"5": 0.1, "10": 0.4, "25": 0.5, "+Inf": 0.5})
        + buckets("productpage-v1", "reviews-v2", REVIEWS, {"5": 0.0, "10": 0.0, "25": 0.2, "50": 0.5, "+Inf": 0.5}),
        "tcp_total": [
            # The hop into the waypoint (source agent, the waypoint's identity expected): not an edge.
            tcp("source", "sleep", "unknown", 3, service=DETAILS, dst_principal=WP.principal),
            # The hop out of the waypoint (destination agent): the lock of waypoint -> details-v1.
            tcp("destination", "waypoint", "details-v1", 3, src_principal=WP.principal),
            # A plaintext client outside the mesh, as the destination agent saw it.
            tcp("destination", "sleep", "productpage-v1", 4, security="none", src_ns="legacy"),
            # ... and as the source side saw it: the destination's report wins, the service comes from here.
            tcp("source", "sleep", "productpage-v1", 5, security="none", src_ns="legacy",
                service="productpage.bookinfo.svc.cluster.local"),
            # A call to a pod outside the mesh: only its source agent reports it.
            tcp("source", "productpage-v1", "legacy-db", 2, security="none"),
        ],
        "tcp_sent": [tcp("destination", "sleep", "productpage-v1", 100.0, security="none", src_ns="legacy")],
    }


def edge(graph: dict, src: str, dst: str) -> dict:
    (found,) = [e for e in graph["edges"] if e["source"] == src and e["destination"] == dst]
    return found


def test_http_edges_have_counts_rates_errors_and_p99(answers: dict[str, list[Sample]]) -> None:
    g = build(NS, answers, [WP])
    details = edge(g, "sleep", "details-v1")
    assert (details["protocol"], details["requests"], details["errors"], details["rate"]) == ("http", 37, 0, 0.5)
    assert details["error_rate"] == 0.0 and details["mtls"] is True
    assert details["waypoint"] == "bookinfo/waypoint" and details["service"] == DETAILS
    # p99 of {<=5: 0.1, <=10: 0.4, <=25: 0.5}: rank 0.495 falls in (10, 25]: 10 + 15 * 0.095 / 0.1
    assert details["p99"] == pytest.approx(24.25)
    reviews = edge(g, "productpage-v1", "reviews-v2")
    assert (reviews["requests"], reviews["errors"], reviews["codes"]) == (10, 2, {"200": 8, "503": 2})
    assert reviews["error_rate"] == pytest.approx(0.2)
    assert reviews["p99"] == pytest.approx(25 + 25 * (0.495 - 0.2) / 0.3, abs=1e-3)


def test_waypoints_are_nodes_on_the_path_of_the_edges_they_carry(answers: dict[str, list[Sample]]) -> None:
    g = build(NS, answers, [WP])
    kinds = {n["id"]: n["kind"] for n in g["nodes"]}
    assert kinds["waypoint:bookinfo/waypoint"] == "waypoint" and kinds[f"service:{DETAILS}"] == "service"
    details = edge(g, "sleep", "details-v1")
    assert details["path"] == ["workload:bookinfo/sleep", f"service:{DETAILS}", "waypoint:bookinfo/waypoint",
                               "workload:bookinfo/details-v1"]
    # The hops in and out of the waypoint are no edges of their own.
    assert not [e for e in g["edges"] if "waypoint" in (e["source"], e["destination"])]
    assert not [e for e in g["edges"] if e["source"] == "sleep" and e["source_namespace"] == NS and e["protocol"] == "tcp"]
    links = {(lk["source"], lk["target"]): lk for lk in g["links"]}
    out = links[("waypoint:bookinfo/waypoint", "workload:bookinfo/details-v1")]
    assert out["mtls"] is True and out["requests"] == 37
    # Into reviews-v2 nobody reported the waypoint's hop: its lock is unknown, not guessed.
    assert links[("waypoint:bookinfo/waypoint", "workload:bookinfo/reviews-v2")]["mtls"] is None
    # Shared links merge their edges: the waypoint's inbound from two services.
    assert links[(f"service:{DETAILS}", "waypoint:bookinfo/waypoint")]["edges"] == [details["id"]]


def test_tcp_edges_prefer_the_destination_report_and_say_plaintext(answers: dict[str, list[Sample]]) -> None:
    g = build(NS, answers, [WP])
    (legacy,) = [e for e in g["edges"] if e["source_namespace"] == "legacy"]
    assert (legacy["protocol"], legacy["destination"], legacy["connections"]) == ("tcp", "productpage-v1", 4)
    assert legacy["mtls"] is False and legacy["service"] == "productpage.bookinfo.svc.cluster.local"
    assert legacy["bytes_sent_rate"] == 100.0 and legacy["requests"] is None and legacy["p99"] is None
    db = edge(g, "productpage-v1", "legacy-db")
    assert db["connections"] == 2 and db["mtls"] is False
    nodes = {n["id"]: n for n in g["nodes"]}
    assert nodes["workload:legacy/sleep"]["in_namespace"] is False
    assert nodes["workload:bookinfo/productpage-v1"]["in_namespace"] is True


def test_no_answers_is_an_empty_graph() -> None:
    assert build(NS, {}, [WP]) == {"namespace": NS, "window": "1m", "nodes": [], "edges": [], "links": []}


def test_unknown_clients_are_one_node() -> None:
    s = tcp("destination", "unknown", "details-v1", 1, security="none", src_ns="unknown")
    g = build(NS, {"tcp_total": [s]})
    assert {n["id"] for n in g["nodes"]} == {"unknown", "workload:bookinfo/details-v1"}
    assert g["edges"][0]["source"] == "unknown" and g["edges"][0]["mtls"] is False


def test_queries_select_the_namespace_on_either_end() -> None:
    q = queries(NS, "5m")
    assert set(q) == {"http_total", "http_rate", "http_buckets", "tcp_total", "tcp_rate", "tcp_sent", "tcp_received"}
    for label in ("source_workload_namespace", "destination_workload_namespace", "destination_service_namespace"):
        assert f'{label}="bookinfo"' in q["http_rate"]
    assert q["http_rate"].count(" or ") == 2 and "[5m]" in q["http_rate"] and 'reporter="waypoint"' in q["http_rate"]
    assert '"a\\"b"' in queries('a"b')["tcp_total"]  # quoted, never spliced


@pytest.mark.parametrize(("q", "counts", "expected"), [
    (0.5, {1.0: 1, 2.0: 2, 4.0: 4, math.inf: 4}, 2.0),
    (0.99, {1.0: 10, math.inf: 10}, 0.99),  # first bucket starts at 0
    (0.99, {1.0: 1, 2.0: 1, math.inf: 10}, 2.0),  # in +Inf: the highest finite bound
    (0.5, {1.0: 0, math.inf: 0}, None),  # no observations
    (0.5, {1.0: 3}, None),  # no +Inf bucket
])
def test_histogram_quantile_is_promqls(q: float, counts: dict[float, float], expected: float | None) -> None:
    got = histogram_quantile(q, counts)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_parse_prometheus_answers() -> None:
    vector = {"resultType": "vector", "result": [{"metric": {"job": "x"}, "value": [1, "1"]},
                                                 {"metric": {}, "value": [1, "NaN"]}]}
    got = parse_vector(vector)
    assert got[0] == Sample({"job": "x"}, 1.0) and math.isnan(got[1].value)
    matrix = {"resultType": "matrix", "result": [{"metric": {"a": "b"}, "values": [[1, "2"], [2, "3.5"]]}]}
    (series,) = parse_matrix(matrix)
    assert series.points == ((1.0, 2.0), (2.0, 3.5))
