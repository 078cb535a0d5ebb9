"""Node agents' tracing for real: sampling from the `Telemetry` of the source pod's namespace, and the spans
still queued sent when an agent stops.

Two meshed namespaces with a client each on node-1, an echo service on node-2; the agents start with
`--trace-sampling 0` (nothing sampled unless a Telemetry says so) and an export interval far longer than the
test (`--otlp-export-interval 600`), so spans reach the receiver only when an agent flushes on SIGTERM.  A
Telemetry in `traced` sets 100%; K connections from each client; then `meshctl agent restart` replaces each
agent (SIGTERM to the old one): the receiver on the underlay then holds exactly K outbound tunnel spans, all
from `traced`'s client, and K inbound spans at node-2, each a child of one of them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.tracing.otlp import ReceivedSpan
from mesh.tracing.receiver import OtlpReceiver, TraceStore
from tests.integration.conftest import Meshctl, leftovers, two_node_cluster
from tests.integration.test_mesh import PODTOOLS, Mesh, eventually

NAME = "t-trace"
GATEWAY = "172.30.0.1"
OTLP_PORT = 4318
K = 5  # connections from each client
TRACED, QUIET = "traced", "quiet"

CLUSTER = f"""\
{two_node_cluster(NAME)}
apiVersion: v1
kind: Namespace
metadata:
  name: {TRACED}
---
apiVersion: v1
kind: Namespace
metadata:
  name: {QUIET}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: {TRACED}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: {QUIET}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {TRACED}, labels: {{app: client}}}}
spec:
  nodeName: node-1
  serviceAccountName: client
  containers: [{{name: client, command: [sleep, infinity]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {QUIET}, labels: {{app: client}}}}
spec:
  nodeName: node-1
  serviceAccountName: client
  containers: [{{name: client, command: [sleep, infinity]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: echo, namespace: {TRACED}, labels: {{app: echo}}}}
spec:
  nodeName: node-2
  containers:
  - name: echo
    command: [{sys.executable}, {PODTOOLS / 'echo_server.py'}, "7000"]
    ports: [{{containerPort: 7000}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: {TRACED}}}
spec:
  selector: {{app: echo}}
  ports: [{{port: 7000}}]
"""

TELEMETRY = f"""\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: all-traced, namespace: {TRACED}}}
spec:
  tracing: [{{randomSamplingPercentage: 100.0}}]
"""

# K connections to the echo service, one line each way, one after the other.
CONNECT = """\
import socket, sys
host, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    with socket.create_connection((host, 7000), timeout=5) as s:
        s.sendall(b"hello %d\\n" % i)
        assert s.recv(64).startswith(b"hello"), "no echo"
print("ok", n)
"""


class TracedMesh(Mesh):
    store: TraceStore

    def agent_spans(self, node: str, direction: str) -> list[ReceivedSpan]:
        return [s for t in self.store.traces() for s in self.store.trace(t.trace_id)
                if s.service == "nodeagent" and s.resource.get("service.instance.id") == node
                and s.attributes.get("hbone.direction") == direction]


@pytest.fixture(scope="module")
def mesh(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TracedMesh]:
    tmp = tmp_path_factory.mktemp("trace")
    path = tmp / f"{NAME}.yaml"
    path.write_text(CLUSTER)
    m = TracedMesh(NAME, meshctl)
    m.store = TraceStore()
    receiver: OtlpReceiver | None = None
    try:
        meshctl("cluster", "up", "-f", str(path), "--no-prometheus",
                "--otlp-endpoint", f"http://{GATEWAY}:{OTLP_PORT}/v1/traces",
                "--agent-arg=--trace-sampling=0", "--agent-arg=--otlp-export-interval=600", timeout=300)
        receiver = OtlpReceiver(m.store.add, GATEWAY, OTLP_PORT, netns=f"amb.{NAME}.underlay")
        receiver.start()
        for ns in (TRACED, QUIET):
            m.ctl("label", "namespace", ns, "istio.io/dataplane-mode=ambient")

        def all_enrolled() -> bool:
            """every pod is enrolled by its node's agent"""
            states = {**m.enrollment("node-1"), **m.enrollment("node-2")}
            return all(states.get(p) == "enrolled" for p in (f"{TRACED}/client", f"{QUIET}/client", f"{TRACED}/echo"))

        eventually(all_enrolled, timeout=60)
        yield m
    finally:
        if receiver is not None:
            receiver.stop()
        meshctl("cluster", "down", NAME, check=False)
        assert leftovers(NAME) == []


def test_agents_sample_by_the_source_namespace_and_flush_their_spans_on_stop(mesh: TracedMesh, tmp_path: Path) -> None:
    mesh.apply(TELEMETRY, tmp_path)
    eventually(lambda: f"{TRACED}/all-traced" in mesh.agent_log("node-1"), timeout=30)  # the agent has it

    for ns in (TRACED, QUIET):
        out = mesh.exec(ns, "client", sys.executable, "-c", CONNECT, f"echo.{TRACED}.svc.cluster.local", str(K))
        assert out.stdout.strip() == f"ok {K}", out.stdout + out.stderr
    # Nothing is exported on a timer within the test: whatever arrives comes from the flush on stop.
    assert mesh.agent_spans("node-1", "outbound") == []

    mesh.ctl("agent", "restart", "node-1")  # SIGTERM to the old agent: it drains, then flushes

    def outbound() -> list[ReceivedSpan]:
        """node-1's old agent sent its queued outbound tunnel spans"""
        return mesh.agent_spans("node-1", "outbound")

    spans: list[ReceivedSpan] = eventually(outbound, timeout=30)  # type: ignore[assignment]
    principals = [s.attributes["source.principal"] for s in spans]
    assert principals == [f"spiffe://cluster.local/ns/{TRACED}/sa/client"] * K, principals  # none from quiet
    assert all(s.parent_span_id == "" and s.name.startswith("outbound tunnel ") for s in spans)

    # The destination followed the sender's decision (its own percentage is 0): K inbound spans, children of
    # the outbound ones, sent when node-2's agent stops in turn.
    mesh.ctl("agent", "restart", "node-2")
    inbound: list[ReceivedSpan] = eventually(lambda: mesh.agent_spans("node-2", "inbound"),  # type: ignore[assignment]
                                             timeout=30)
    assert sorted(s.parent_span_id for s in inbound) == sorted(s.span_id for s in spans)
    assert {s.trace_id for s in inbound} == {s.trace_id for s in spans}
