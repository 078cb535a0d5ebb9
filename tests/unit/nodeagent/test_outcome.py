"""The outcome reporter: each connection recorded once (flag, bytes each way, error, metrics, one access-log
line), whether it was relayed, refused by a decision, or failed with an error that carries its flag."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import trio
import trio.testing
from agent_resources import SLEEP, WEB, identity, pod_of, view

from mesh.hbone.errors import TunnelRejected
from mesh.hbone.relay import relay
from mesh.proto import discovery_pb2 as pb
from mesh.secrets.errors import NoCertificateError
from nodeagent.accesslog import AccessLog
from nodeagent.metrics import TCP_LABEL_NAMES, FailureReason, NodeAgentMetrics, ResponseFlag
from nodeagent.proxy import admission
from nodeagent.proxy.errors import (
    NoCertificate,
    NoHealthyUpstream,
    ProxyError,
    TunnelRefused,
    UpstreamConnectError,
    UpstreamTimeout,
    upstream_error,
)
from nodeagent.proxy.outcome import ConnectionOutcome, OutcomeRecorder
from nodeagent.proxy.routing import decide

WEB2 = WEB[1]
MESH = view(SLEEP, WEB2)
SRC, DST = ("10.244.1.2", 40112), ("10.244.2.3", 8080)


class Recorded:
    """A recorder for one pod over fresh metrics and a log in memory, and what they hold afterwards."""

    def __init__(self, pod: Any) -> None:
        self.metrics = NodeAgentMetrics.create()
        self.out = io.StringIO()
        self.recorder = OutcomeRecorder(self.metrics, AccessLog(self.out), pod)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def tcp(self, name: str, **labels: str) -> float:
        """The sum of `name` over the series whose labels include `labels`."""
        total = 0.0
        for metric in self.metrics.registry.collect():
            for s in metric.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def failures(self, direction: str, reason: str) -> float | None:
        return self.metrics.registry.get_sample_value("mesh_agent_connection_failures_total",
                                                      {"direction": direction, "reason": reason})

    def outbound(self, dst: tuple[str, int] = DST) -> ConnectionOutcome:
        return self.recorder.outbound(SRC, dst, SLEEP, decide(MESH, SLEEP, *dst))


async def _echo_once(stream: trio.abc.HalfCloseableStream, answer: bytes) -> bytes:
    got = b""
    while chunk := await stream.receive_some():
        got += chunk
    await stream.send_all(answer)
    await stream.send_eof()
    return got


def test_a_relayed_connection_counts_its_bytes_once_and_writes_one_line() -> None:
    r = Recorded(pod_of(SLEEP))
    outcome = r.outbound()

    async def main() -> None:
        app, client_side = trio.testing.memory_stream_pair()
        upstream_side, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_echo_once, server, b"world!")
            await app.send_all(b"hello")
            await app.send_eof()
            with outcome:
                outcome.relayed(await relay(client_side, upstream_side, counter=outcome.bytes))
            assert await app.receive_some() == b"world!"

    trio.run(main)
    outcome.record()  # a second record does nothing
    [line] = r.lines()
    assert line["direction"] == "outbound" and line["result"] == "200" and "error" not in line
    assert (line["bytes_received"], line["bytes_sent"]) == (5, 6)
    assert line["source_principal"] == str(identity("sleep")) and line["destination_workload"] == "web-2"
    assert line["destination_address"] == "10.244.2.3:8080" and line["connection_security_policy"] == "mutual_tls"
    assert r.tcp("istio_tcp_received_bytes_total") == 5 and r.tcp("istio_tcp_sent_bytes_total") == 6
    assert r.tcp("istio_tcp_connections_opened_total") == 1
    assert r.tcp("istio_tcp_connections_closed_total", response_flags="-") == 1
    assert r.tcp("istio_tcp_connections_closed_total") == 1


def test_outbound_labels_are_the_source_reporters() -> None:
    r = Recorded(pod_of(SLEEP))
    r.outbound().record()
    [sample] = [s for m in r.metrics.registry.collect() for s in m.samples
                if s.name == "istio_tcp_connections_opened_total"]
    assert set(sample.labels) == set(TCP_LABEL_NAMES)
    assert sample.labels["reporter"] == "source"
    assert sample.labels["source_workload"] == "sleep"
    assert sample.labels["source_principal"] == str(identity("sleep"))
    assert sample.labels["destination_workload"] == "web-2"
    assert sample.labels["destination_principal"] == str(identity("web"))
    assert sample.labels["connection_security_policy"] == "mutual_tls"


def test_an_error_leaving_the_block_is_recorded_with_its_own_flag_and_goes_no_further() -> None:
    r = Recorded(pod_of(SLEEP))
    with r.outbound(("10.96.0.20", 80)) as outcome:
        raise NoHealthyUpstream("service web.default.svc.cluster.local has no healthy endpoint for port 80")
    assert outcome.recorded
    [line] = r.lines()
    assert line["result"] == "503 service web.default.svc.cluster.local has no healthy endpoint for port 80"
    assert line["error"] == "service web.default.svc.cluster.local has no healthy endpoint for port 80"
    assert r.tcp("istio_tcp_connections_closed_total", response_flags="UH") == 1
    assert r.failures("outbound", "no_healthy_endpoint") == 1


def test_a_tunnel_the_next_hop_denied_reads_as_its_401() -> None:
    r = Recorded(pod_of(SLEEP))
    with r.outbound():
        raise upstream_error(TunnelRejected("10.244.2.3:8080", 401, "denied by default/deny-sleep"))
    [line] = r.lines()
    assert line["result"] == "401 denied by default/deny-sleep"
    assert line["error"] == "CONNECT 10.244.2.3:8080 refused with 401: denied by default/deny-sleep"
    assert r.tcp("istio_tcp_connections_closed_total", response_flags="RBAC") == 1
    assert r.failures("outbound", "denied") == 1


def test_any_other_exception_is_recorded_and_raised() -> None:
    r = Recorded(pod_of(SLEEP))
    with pytest.raises(trio.BrokenResourceError), r.outbound():
        raise trio.BrokenResourceError("client went away")
    [line] = r.lines()
    assert line["result"] == "200" and line["error"] == "client went away"
    assert r.tcp("istio_tcp_connections_closed_total") == 1


@pytest.mark.parametrize(("exc", "kind", "flag", "failure", "status"), [
    (ConnectionRefusedError(111, "Connection refused"), UpstreamConnectError, ResponseFlag.UPSTREAM_CONNECT_FAILURE,
     FailureReason.UPSTREAM_REFUSED, 503),
    (TimeoutError("connecting to 10.244.2.3:15008 timed out after 5s"), UpstreamTimeout,
     ResponseFlag.UPSTREAM_CONNECT_FAILURE, FailureReason.UPSTREAM_TIMEOUT, 503),
    (NoCertificateError("no certificate for sleep yet"), NoCertificate, ResponseFlag.UPSTREAM_CONNECT_FAILURE,
     FailureReason.NO_CERTIFICATE, 503),
    (TunnelRejected("10.244.2.3:8080", 401, "denied"), TunnelRefused, ResponseFlag.DENIED, FailureReason.DENIED, 401),
    (TunnelRejected("10.244.2.3:8080", 503, "no app"), TunnelRefused, ResponseFlag.UPSTREAM_CONNECT_FAILURE,
     FailureReason.UPSTREAM_REFUSED, 503),
], ids=["refused", "timeout", "no-certificate", "tunnel-401", "tunnel-503"])
def test_errors_carry_their_flag(exc: Exception, kind: type[ProxyError], flag: ResponseFlag,
                                 failure: FailureReason, status: int) -> None:
    error = upstream_error(exc, "connection to the application on port 8080 failed")
    assert type(error) is kind
    assert (error.flag, error.failure, error.status) == (flag, failure, status)


def test_an_inbound_refusal_is_recorded_with_the_deciding_policy() -> None:
    deny = admission.Refusal(401, ResponseFlag.DENIED, "denied by default/strict", FailureReason.DENIED)
    pod = pod_of(WEB2)
    r = Recorded(pod)
    conn = admission.plaintext(pod, ("10.244.1.2", 33000), 8080)
    with r.recorder.inbound(conn, deny, SLEEP, WEB2) as outcome:
        outcome.refused(deny)
    [line] = r.lines()
    assert line["direction"] == "inbound" and line["result"] == "401 denied by default/strict"
    assert line["source_workload"] == "sleep" and line["source_principal"] == "unknown"
    assert line["destination_principal"] == str(identity("web")) and line["connection_security_policy"] == "none"
    assert r.tcp("istio_tcp_connections_closed_total", reporter="destination", response_flags="RBAC",
                 source_principal="unknown", connection_security_policy="none") == 1
    assert r.failures("inbound", "denied") == 1


def test_an_admitted_inbound_connection_logs_the_allowing_policy() -> None:
    pod = pod_of(WEB2)
    verdict = admission.decide(MESH, pod, admission.plaintext(pod, ("10.244.1.2", 33000), 8080))
    assert isinstance(verdict, admission.Admit)
    r = Recorded(pod)
    with r.recorder.inbound(admission.plaintext(pod, ("10.244.1.2", 33000), 8080), verdict, SLEEP, WEB2):
        pass
    [line] = r.lines()
    assert line["result"] == "200" and line["destination_address"] == "10.244.2.3:8080"
    assert r.failures("inbound", "denied") is None


class Broken(trio.abc.HalfCloseableStream):
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise trio.BrokenResourceError("connection reset by peer")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.BrokenResourceError("connection reset by peer")

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(("client_breaks", "flag"), [(True, "DC"), (False, "UC")], ids=["client", "upstream"])
def test_a_side_that_breaks_mid_relay_is_flagged_and_stops_the_other_direction(client_breaks: bool, flag: str) -> None:
    r = Recorded(pod_of(SLEEP))
    outcome = r.outbound()

    async def main() -> None:
        _, healthy = trio.testing.memory_stream_pair()  # never sends: only a stopped direction ends the relay
        a, b = (Broken(), healthy) if client_breaks else (healthy, Broken())
        with trio.fail_after(5), outcome:
            copied = await relay(a, b, counter=outcome.bytes)
            assert copied.failed == ("a" if client_breaks else "b") and "connection reset" in (copied.error or "")
            outcome.relayed(copied)

    trio.run(main)
    [line] = r.lines()
    assert "connection reset by peer" in line["error"]
    assert r.tcp("istio_tcp_connections_closed_total", response_flags=flag) == 1


def test_labels_are_resolved_again_when_a_workload_record_changes() -> None:
    """The connection labels are cached per the records of its two ends: the same records give the
    same labels, a record replaced by discovery (a new version of the workload) gives the new ones."""
    r = Recorded(pod_of(SLEEP))
    first, again = r.outbound(), r.outbound()
    assert first.bytes.labels is again.bytes.labels
    assert first.bytes.labels.source_version == "latest"
    relabelled = pb.Workload()
    relabelled.CopyFrom(SLEEP)
    relabelled.canonical_revision = "v2"
    changed = r.recorder.outbound(SRC, DST, relabelled, decide(MESH, relabelled, *DST))
    assert changed.bytes.labels.source_version == "v2"
    assert r.outbound().bytes.labels is first.bytes.labels  # the record held before is still its own entry
    for outcome in (first, again, changed):
        outcome.record()
