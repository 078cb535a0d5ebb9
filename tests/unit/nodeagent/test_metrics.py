"""Node agent metrics: Istio's TCP label set, per-connection counting, the agent's own gauges."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from nodeagent.metrics import (
    MUTUAL_TLS,
    PLAINTEXT,
    TCP_LABEL_NAMES,
    UNKNOWN,
    FailureReason,
    NodeAgentMetrics,
    Reporter,
    ResponseFlag,
    TcpLabels,
    TcpMetrics,
    canonical_app,
    canonical_version,
    tcp_labels,
)

SLEEP = pb.Workload(uid="default/sleep-1", name="sleep-1", namespace="default", service_account="sleep",
                    canonical_name="sleep", canonical_revision="v1", cluster_id="Kubernetes")
WEB = pb.Workload(uid="prod/web-1", name="web-1", namespace="prod", service_account="web",
                  trust_domain="example.org", labels={"app": "web", "version": "v2"})
WEB_SVC = pb.Service(name="web", namespace="prod", hostname="web.prod.svc.cluster.local")


def sample(reg: CollectorRegistry, name: str, labels: TcpLabels) -> float | None:
    return reg.get_sample_value(name, dict(zip(TCP_LABEL_NAMES, labels.values(), strict=True)))


def test_label_names_are_istios() -> None:
    assert set(TCP_LABEL_NAMES) == {
        "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
        "source_version", "source_canonical_service", "source_canonical_revision", "source_cluster",
        "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
        "destination_version", "destination_canonical_service", "destination_canonical_revision",
        "destination_service", "destination_service_name", "destination_service_namespace", "destination_cluster",
        "request_protocol", "response_flags", "connection_security_policy",
    }


@pytest.mark.parametrize(
    ("workload", "app", "version"),
    [
        (pb.Workload(name="p", canonical_name="cn", canonical_revision="cr", labels={"app": "a"}), "cn", "cr"),
        (pb.Workload(name="p", labels={"service.istio.io/canonical-name": "x", "app": "a",
                                       "service.istio.io/canonical-revision": "r1", "version": "v"}), "x", "r1"),
        (pb.Workload(name="p", labels={"app.kubernetes.io/name": "k", "app": "a",
                                       "app.kubernetes.io/version": "kv", "version": "v"}), "k", "kv"),
        (pb.Workload(name="p", labels={"app": "a", "version": "v"}), "a", "v"),
        (pb.Workload(name="p"), "p", "latest"),
        (pb.Workload(), UNKNOWN, "latest"),
    ],
)
def test_canonical_names(workload: pb.Workload, app: str, version: str) -> None:
    assert canonical_app(workload) == app
    assert canonical_version(workload) == version


def test_labels_from_both_ends() -> None:
    peer = SpiffeId("cluster.local", "default", "sleep")
    labels = tcp_labels(Reporter.DESTINATION, source=SLEEP, source_principal=peer, destination=WEB, service=WEB_SVC)
    assert labels == TcpLabels(
        reporter="destination",
        source_workload="sleep-1", source_workload_namespace="default",
        source_principal="spiffe://cluster.local/ns/default/sa/sleep", source_app="sleep", source_version="v1",
        source_canonical_service="sleep", source_canonical_revision="v1", source_cluster="Kubernetes",
        destination_workload="web-1", destination_workload_namespace="prod",
        destination_principal="spiffe://example.org/ns/prod/sa/web", destination_app="web",
        destination_version="v2", destination_canonical_service="web", destination_canonical_revision="v2",
        destination_service="web.prod.svc.cluster.local",
        destination_service_name="web", destination_service_namespace="prod", destination_cluster=UNKNOWN,
        request_protocol="tcp", response_flags="-", connection_security_policy=MUTUAL_TLS,
    )


def test_labels_for_unknown_ends_and_plaintext() -> None:
    labels = tcp_labels(Reporter.DESTINATION, source=SLEEP, destination=WEB, mutual_tls=False)
    assert labels.source_principal == UNKNOWN  # plaintext: no verified identity, even if the pod is known
    assert labels.source_workload == "sleep-1"
    assert labels.connection_security_policy == PLAINTEXT
    assert labels.destination_service == UNKNOWN
    outbound_plain = tcp_labels(Reporter.SOURCE, source=SLEEP, destination=WEB, mutual_tls=False)
    assert outbound_plain.source_principal == "spiffe://cluster.local/ns/default/sa/sleep"
    assert outbound_plain.connection_security_policy == PLAINTEXT
    bare = tcp_labels(Reporter.SOURCE)
    assert bare.values()[1:16] == (UNKNOWN,) * 15
    assert bare.reporter == "source"


def test_connection_counts_opened_bytes_closed() -> None:
    reg = CollectorRegistry()
    tcp = TcpMetrics(reg)
    labels = tcp_labels(Reporter.SOURCE, source=SLEEP, destination=WEB, service=WEB_SVC)
    conn = tcp.open(labels)
    assert sample(reg, "istio_tcp_connections_opened_total", labels) == 1
    assert sample(reg, "istio_tcp_connections_closed_total", labels) in (None, 0)
    conn.add_received(100)
    conn.add_received(0)
    conn.add_received(-5)  # ignored, never raises
    conn.add_sent(7)
    conn.add_sent(3)
    assert (conn.received, conn.sent) == (100, 10)
    assert sample(reg, "istio_tcp_received_bytes_total", labels) == 100
    assert sample(reg, "istio_tcp_sent_bytes_total", labels) == 10  # visible before close, on any scrape
    conn.close()
    conn.close()  # idempotent
    conn.add_sent(50)  # after close: ignored
    assert conn.closed
    assert sample(reg, "istio_tcp_connections_closed_total", labels) == 1
    assert sample(reg, "istio_tcp_sent_bytes_total", labels) == 10


def test_close_with_response_flags_labels_the_closed_counter_only() -> None:
    reg = CollectorRegistry()
    tcp = TcpMetrics(reg)
    labels = tcp_labels(Reporter.DESTINATION, destination=WEB)
    tcp.open(labels).close(ResponseFlag.DENIED)
    assert sample(reg, "istio_tcp_connections_opened_total", labels) == 1
    flagged = TcpLabels(**{**labels.__dict__, "response_flags": "RBAC"})
    assert sample(reg, "istio_tcp_connections_closed_total", flagged) == 1


def test_context_manager_closes() -> None:
    reg = CollectorRegistry()
    labels = tcp_labels(Reporter.SOURCE)
    with TcpMetrics(reg).open(labels) as conn:
        conn.add_received(1)
    assert sample(reg, "istio_tcp_connections_closed_total", labels) == 1


def test_exposition_has_istio_names() -> None:
    m = NodeAgentMetrics.create()
    m.tcp.open(tcp_labels(Reporter.SOURCE, source=SLEEP)).close()
    text = generate_latest(m.registry).decode()
    for name in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
                 "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total"):
        assert f"\n{name}{{" in text
    assert 'source_workload="sleep-1"' in text
    assert 'reporter="source"' in text


def test_agent_metrics() -> None:
    m = NodeAgentMetrics.create()
    reg = m.registry
    m.agent.connection_failed("inbound", FailureReason.DENIED)
    m.agent.connection_failed("inbound", FailureReason.DENIED)
    m.agent.connection_failed("outbound", FailureReason.UPSTREAM_REFUSED)
    assert reg.get_sample_value("mesh_agent_connection_failures_total",
                                {"direction": "inbound", "reason": "denied"}) == 2
    assert reg.get_sample_value("mesh_agent_connection_failures_total",
                                {"direction": "outbound", "reason": "upstream_refused"}) == 1
    m.agent.set_enrolled_pods(3)
    m.agent.set_xds_connected(True)
    assert reg.get_sample_value("mesh_agent_enrolled_pods") == 3
    assert reg.get_sample_value("mesh_agent_xds_connected") == 1
    m.agent.set_xds_connected(False)
    assert reg.get_sample_value("mesh_agent_xds_connected") == 0
    ident = SpiffeId("cluster.local", "default", "sleep")
    m.agent.set_certificate_expiry(ident, 1_900_000_000.0)
    assert reg.get_sample_value("mesh_agent_certificate_expiry_timestamp_seconds",
                                {"identity": str(ident)}) == 1_900_000_000.0
    m.agent.forget_certificate(ident)
    m.agent.forget_certificate(ident)  # twice is fine
    assert reg.get_sample_value("mesh_agent_certificate_expiry_timestamp_seconds", {"identity": str(ident)}) is None


def test_counting_bytes_is_cheap() -> None:
    tcp = TcpMetrics(CollectorRegistry())
    conn = tcp.open(tcp_labels(Reporter.SOURCE))
    start = time.perf_counter()
    for _ in range(20_000):
        conn.add_received(16384)
    per_call = (time.perf_counter() - start) / 20_000
    assert per_call < 20e-6  # a few hundred nanoseconds in practice; generous bound for slow CI
    assert conn.received == 20_000 * 16384
