"""Istio metrics with cached children: the exposition must be exactly what plain `labels()` calls give."""

from __future__ import annotations

import random
from dataclasses import fields, replace

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from mesh.istiometrics import (
    DURATION_BUCKETS,
    REQUEST_LABEL_NAMES,
    SIZE_BUCKETS,
    TCP_LABEL_NAMES,
    UNKNOWN,
    Reporter,
    RequestLabels,
    RequestMetrics,
    TcpLabels,
    TcpMetrics,
    _Children,
    recorder,
)


def _random_labels(kind: type, rng: random.Random, n: int) -> list:
    choices = ["", "a", "b", "web", "spiffe://cluster.local/ns/x/sa/y", "200", "503"]
    out = []
    for _ in range(n):
        kw = {f.name: rng.choice(choices) for f in fields(kind) if f.name != "reporter"}
        out.append(kind(reporter=rng.choice(["source", "destination", "waypoint"]), **kw))
    return out


def _exposition(reg: CollectorRegistry) -> list[bytes]:
    """The text exposition without the `_created` samples (the creation times of the two registries)."""
    lines = [line for line in generate_latest(reg).splitlines() if b"_created" not in line]
    assert len(lines) > 1000
    return lines


def _reference_request_metrics(reg: CollectorRegistry) -> tuple:
    names = REQUEST_LABEL_NAMES
    return (Counter("istio_requests_total", "Requests handled by the waypoint", names, registry=reg),
            Histogram("istio_request_duration_milliseconds", "Request duration in milliseconds", names,
                      buckets=DURATION_BUCKETS, registry=reg),
            Histogram("istio_request_bytes", "Request sizes in bytes (headers and body)", names,
                      buckets=SIZE_BUCKETS, registry=reg),
            Histogram("istio_response_bytes", "Response sizes in bytes (headers and body)", names,
                      buckets=SIZE_BUCKETS, registry=reg))


def _reference_values(labels: RequestLabels | TcpLabels) -> tuple[str, ...]:
    """The label values as they were computed before (field by field)."""
    out = [str(getattr(labels, f.name)) or UNKNOWN for f in fields(labels)]
    if isinstance(labels, RequestLabels):
        out[REQUEST_LABEL_NAMES.index("grpc_response_status")] = labels.grpc_response_status
    return tuple(out)


def test_request_exposition_matches_plain_labels_calls() -> None:
    rng = random.Random(7)
    label_sets = _random_labels(RequestLabels, rng, 300)
    reg, ref_reg = CollectorRegistry(), CollectorRegistry()
    metrics = RequestMetrics(reg, " by the waypoint")
    metrics._children = _Children(metrics.requests, metrics.duration, metrics.request_bytes,
                                  metrics.response_bytes, size=16)  # small: the cache is emptied many times
    requests, duration, req_bytes, resp_bytes = _reference_request_metrics(ref_reg)
    for _ in range(3000):
        labels = rng.choice(label_sets)
        if rng.random() < 0.3:  # an equal but distinct object, whose values are not computed yet
            labels = replace(labels)
        d, q, r = rng.uniform(0, 5000), rng.randrange(10**7), rng.randrange(10**7)
        metrics.record(labels, d, q, r)
        values = _reference_values(labels)
        requests.labels(*values).inc()
        duration.labels(*values).observe(d)
        req_bytes.labels(*values).observe(q)
        resp_bytes.labels(*values).observe(r)
    assert _exposition(reg) == _exposition(ref_reg)


def test_tcp_exposition_matches_plain_labels_calls() -> None:
    rng = random.Random(11)
    label_sets = _random_labels(TcpLabels, rng, 200)
    reg, ref_reg = CollectorRegistry(), CollectorRegistry()
    metrics = TcpMetrics(reg)
    metrics._open_children = _Children(metrics.opened, metrics.sent_bytes, metrics.received_bytes, size=8)
    metrics._closed_children = _Children(metrics.closed, size=8)
    names = TCP_LABEL_NAMES
    ref_opened = Counter("istio_tcp_connections_opened", "TCP connections opened.", names, registry=ref_reg)
    ref_closed = Counter("istio_tcp_connections_closed", "TCP connections closed.", names, registry=ref_reg)
    ref_sent = Counter("istio_tcp_sent_bytes", "Bytes sent to the client (response direction).", names,
                       registry=ref_reg)
    ref_received = Counter("istio_tcp_received_bytes", "Bytes received from the client (request direction).",
                           names, registry=ref_reg)
    for _ in range(1500):
        labels = rng.choice(label_sets)
        conn = metrics.open(labels)
        values = _reference_values(labels)
        ref_opened.labels(*values).inc()
        sent, received = rng.randrange(1, 10**6), rng.randrange(1, 10**6)
        conn.add_sent(sent)
        conn.add_received(received)
        ref_sent.labels(*values).inc(sent)
        ref_received.labels(*values).inc(received)
        flag = rng.choice([None, "-", "UF", "NR"])
        conn.close(flag)
        closed_labels = labels if flag is None else replace(labels, response_flags=flag)
        ref_closed.labels(*_reference_values(closed_labels)).inc()
        conn.close("UF")  # idempotent
    assert _exposition(reg) == _exposition(ref_reg)


def test_values_match_the_field_by_field_reading() -> None:
    # the fast path (all non-empty strings) and the slow one (empty values, a str enum, other types)
    rng = random.Random(3)
    choices: list[object] = ["", "a", "200", Reporter.SOURCE, 0, 503]
    for kind in (TcpLabels, RequestLabels):
        for _ in range(2000):
            kw = {f.name: rng.choice(choices) if rng.random() < 0.2 else rng.choice(["x", "y"])
                  for f in fields(kind)}
            labels = kind(**kw)
            assert labels.values() == _reference_values(labels)
            if kind is TcpLabels:  # (a request's gRPC status is passed on as it is, as before)
                assert all(type(v) is str for v in labels.values())
    assert RequestLabels(reporter="waypoint").values()[REQUEST_LABEL_NAMES.index("grpc_response_status")] == ""
    assert TcpLabels(reporter="source", source_workload="").values()[1] == UNKNOWN


def test_children_cache_is_bounded_and_counts_into_the_metric_children() -> None:
    reg = CollectorRegistry()
    counter = Counter("c_total", "c", ["a"], registry=reg)
    children = _Children(counter, size=4)
    for i in range(20):
        (record,) = children.recorders((str(i),))
        record(1)  # into the metric's own child
        assert reg.get_sample_value("c_total", {"a": str(i)}) == 1
        assert len(children._recorders) <= 4
    (record,) = children.recorders(("3",))  # made again after the cache was emptied: the same child
    record(2)
    assert reg.get_sample_value("c_total", {"a": "3"}) == 3


def test_recorders_count_what_inc_and_observe_count() -> None:
    """`recorder` skips prometheus_client's per-call checks: the exposition is the same as with `inc` and
    `observe`, amounts on the buckets' bounds, below the first, infinite and negative included."""
    rng = random.Random(5)

    def metrics(reg: CollectorRegistry) -> tuple[Counter, Histogram, Histogram]:
        return (Counter("c", "c", ["a"], registry=reg),
                Histogram("d", "d", ["a"], buckets=DURATION_BUCKETS, registry=reg),
                Histogram("s", "s", ["a"], buckets=SIZE_BUCKETS, registry=reg))

    reg, ref_reg = CollectorRegistry(), CollectorRegistry()
    ours, ref = metrics(reg), metrics(ref_reg)
    amounts = [0.0, 0.5, 1.0, 1.0000001, 4.999, 5.0, 10.0, 1e8, 3600000.0, 3600001.0, 1e12, float("inf"), -3.0]
    amounts += [rng.uniform(0, 1e6) for _ in range(400)] + [float(rng.randrange(10**6)) for _ in range(400)]
    for i, amount in enumerate(amounts):
        a = str(i % 3)
        for metric, reference in zip(ours[1:], ref[1:], strict=True):
            recorder(metric.labels(a))(amount)
            reference.labels(a).observe(amount)
        if amount >= 0:
            recorder(ours[0].labels(a))(amount)
            ref[0].labels(a).inc(amount)
    ours_lines = [line for line in generate_latest(reg).splitlines() if b"_created" not in line]
    assert ours_lines == [line for line in generate_latest(ref_reg).splitlines() if b"_created" not in line]
    # and the installed client is one whose values the recorders reach (else they would be the methods)
    counter_child, histogram_child = ours[0].labels("0"), ours[1].labels("0")
    assert recorder(counter_child) != counter_child.inc
    assert recorder(histogram_child) != histogram_child.observe
