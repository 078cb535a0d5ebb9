"""Node agents follow the `Telemetry` resources: the control plane sends them the Telemetry envelopes (and no
other L7 configuration), the agent resolves each pod's namespace as a waypoint resolves its own, and its tunnel
spans are sampled (and reported) accordingly; `--trace-sampling` stays the default where none applies."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format, struct_pb2

from bench.ports import free_port
from controlplane.app import ControlPlaneThread
from controlplane.discovery.filter import view
from controlplane.options import Options
from mesh.api.client import ApiClient
from mesh.api.validate import Document
from mesh.proto import discovery_pb2 as pb
from mesh.tracing.span import Span
from mesh.tracing.tracer import Tracer
from mesh.xds import resources as rs
from mesh.xds.client_state import Update
from mesh.xds.node import NodeInfo
from nodeagent.app import SUBSCRIPTIONS, apply_update
from nodeagent.state import MeshState
from nodeagent.tracing import TelemetryView, TunnelTracer

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[3]
TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


def telemetry(ns: str, name: str, spec: dict[str, Any], kind: int = pb.TELEMETRY) -> pb.L7Config:
    s = struct_pb2.Struct()
    json_format.ParseDict(spec, s)
    return pb.L7Config(kind=kind, name=name, namespace=ns, api_version="telemetry.istio.io/v1", spec=s)


def sampling(pct: float, **extra: Any) -> dict[str, Any]:
    return {"tracing": [{"randomSamplingPercentage": pct, **extra}]}


DOCS = [
    telemetry("istio-system", "mesh-default", sampling(10.0)),
    telemetry("a", "all", sampling(100.0)),
    telemetry("b", "sidecars", {"selector": {"matchLabels": {"app": "x"}}, **sampling(100.0)}),
    telemetry("c", "waypoint", {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                                "name": "waypoint"}], **sampling(100.0)}),
    telemetry("d", "quiet", {"tracing": [{"disableSpanReporting": True}]}),
    telemetry("a", "routes", {"hosts": ["x"]}, kind=pb.VIRTUAL_SERVICE),  # not for agents: ignored if it came
]


def loaded(docs: list[pb.L7Config]) -> TelemetryView:
    v = TelemetryView()
    v.apply({rs.name_of(d): d for d in docs})
    return v


def test_each_namespace_resolves_as_a_waypoint_resolves_its_own() -> None:
    v = loaded(DOCS)
    assert v.policy("a").percentage == 100.0 and v.policy("a").sources == ("istio-system/mesh-default", "a/all")
    # A selector picks sidecars and targetRefs a waypoint: neither applies to an agent; the root's does.
    assert v.policy("b").percentage == 10.0 and v.policy("c").percentage == 10.0
    assert v.policy("d").percentage == 10.0 and not v.policy("d").reporting
    assert v.policy("elsewhere").percentage == 10.0
    # Without the root's: nothing set, so the agent's --trace-sampling applies.
    bare = loaded(DOCS[1:])
    assert bare.policy("elsewhere").percentage is None and bare.policy("a").percentage == 100.0
    # The whole set is replaced, resolved namespaces with it.
    v.apply({})
    assert v.policy("a").percentage is None and v.policy("elsewhere").percentage is None


def test_a_resource_of_another_type_is_refused() -> None:
    with pytest.raises(TypeError, match="expected an L7Config"):
        TelemetryView().apply({"x": pb.Workload(uid="x")})


def test_the_discovery_handler_feeds_the_view() -> None:
    state, v = MeshState(), TelemetryView()
    assert rs.L7_CONFIG in SUBSCRIPTIONS
    resources = {rs.name_of(d): d for d in DOCS}
    apply_update(state, v, Update(rs.L7_CONFIG, "1", "n", resources, (), resources))
    assert v.policy("a").percentage == 100.0 and state.workloads() == []


class Sink:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    def submit(self, span: Span) -> None:
        self.spans.append(span)


def pod(ns: str) -> str:
    return f"spiffe://cluster.local/ns/{ns}/sa/app"


def test_tunnel_spans_follow_the_pods_namespace() -> None:
    sink = Sink()
    tracer = TunnelTracer(Tracer(sink, sampling=0.0, rng=random.Random(1)), "node-1", loaded(DOCS[1:]))
    for ns in ("a", "elsewhere", "d"):
        span = tracer.outbound("10.0.0.1:80", source="10.244.1.2:4000", source_principal=pod(ns),
                               destination_principal=pod("z"))
        assert span.started.context.sampled == (ns == "a")
        span.end(flag="-", bytes_sent=1, bytes_received=1)
    assert [dict(s.attributes)["source.principal"] for s in sink.spans] == [pod("a")]
    sink.spans.clear()

    def inbound(traceparent: str | None, ns: str) -> None:
        tracer.inbound(traceparent, "10.244.2.3:80", source="10.244.1.2:4000", source_principal=pod("z"),
                       destination_principal=pod(ns)).end(flag="-", bytes_sent=1, bytes_received=1)

    inbound(f"00-{TRACE}-{SPAN}-01", "elsewhere")  # the sender sampled: followed, whatever the namespace says
    inbound(f"00-{TRACE}-{SPAN}-00", "a")  # the sender did not: followed too
    inbound(None, "a")  # no context: the destination pod's namespace decides (100%)
    inbound(None, "elsewhere")  # ... (none applies: the agent's 0%)
    inbound(f"00-{TRACE}-{SPAN}-01", "d")  # sampled, but `d` disables reporting
    got = [(f"{s.parent_span_id:016x}" if s.parent_span_id else "", dict(s.attributes)["destination.principal"])
           for s in sink.spans]
    assert got == [(SPAN, pod("elsewhere")), ("", pod("a"))]

    # Without a view (or for a source that is no workload identity) the tracer's default applies.
    plain = TunnelTracer(Tracer(sink, sampling=100.0), "node-1")
    assert plain.outbound("x:1", source="s", source_principal=pod("d"), destination_principal="").started.recording
    assert tracer.policy("not-an-identity").percentage is None


def test_the_control_plane_sends_agents_only_the_telemetry() -> None:
    packed = {rs.name_of(d): (rs.version_of(rs.pack(d)), rs.pack(d)) for d in DOCS}
    agent = view(NodeInfo(id="a", role="nodeagent", node="node-1"), {rs.L7_CONFIG: packed})
    assert sorted(agent[rs.L7_CONFIG]) == sorted(n for n in packed if n.startswith("Telemetry/"))
    assert len(agent[rs.L7_CONFIG]) == 5
    waypoint = view(NodeInfo(id="w", role="waypoint", namespace="c", name="waypoint"), {rs.L7_CONFIG: packed})
    assert waypoint[rs.L7_CONFIG] == {}  # a waypoint still gets only what names it


TELEMETRY = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: all, namespace: shop}
spec:
  tracing: [{randomSamplingPercentage: 100.0}]
"""


def test_a_real_agent_gets_the_telemetry_over_discovery(tmp_path: Path) -> None:
    """The control plane translates a Telemetry, sends it over delta xDS (TLS) to a real agent process, and
    the agent's handler takes it (it logs the set it now follows)."""
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    running = cp.start()
    home = tmp_path / "controlplane"
    api = ApiClient(home / "api.sock", timeout=10)
    token = tmp_path / "token"
    token.write_text(api.node_token("node-1"))
    log = tmp_path / "nodeagent.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodeagent.main", "--node", "node-1",
             "--control-plane", f"127.0.0.1:{running.grpc_port}", "--root-cert", str(home / "ca" / "root-cert.pem"),
             "--token-file", str(token), "--pod-netns", str(tmp_path / "netns" / "{namespace}.{name}"),
             "--otlp-endpoint", "http://127.0.0.1:9/v1/traces",
             *[a for k in ("admin", "metrics", "ready") for a in (f"--{k}-listen", f"127.0.0.1:{free_port()}")]],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        def wait_for(text: str) -> None:
            deadline = time.monotonic() + 30
            while text not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)

        wait_for('"event": "telemetry", "resources": []')  # synced with none
        api.apply([Document("t", i, body) for i, body in enumerate(yaml.safe_load_all(TELEMETRY), 1)])
        wait_for('"event": "telemetry", "resources": ["shop/all"]')
    finally:
        proc.terminate()
        proc.wait(15)
        cp.stop()
