"""gRPC through a real waypoint: a grpcio client pod (node-1) calls a grpcio server pod (node-2) in an
ambient namespace with a waypoint, so every call goes client -> node agent -> HBONE -> waypoint (L7) ->
HBONE -> node agent -> server.  One cluster for the module (`t-grpc`).

The server (no .proto: generic handlers over raw bytes) records each call's peer address, so the test
counts the upstream connections the waypoint used at the server itself; the client pod runs one
scenario per `meshctl exec` and prints what it saw as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import Meshctl, two_node_cluster
from tests.integration.test_mesh import Mesh, eventually

NAME = "t-grpc"
NS = "grpc"
HOST = f"echo.{NS}.svc.cluster.local"
PORT = 50051

SERVER = '''
import json, sys, threading, time
from concurrent import futures
import grpc

lock = threading.Lock()
cond = threading.Condition(lock)
calls, peers, holding = {}, {}, [0]


def count(name, context):
    with lock:
        calls[name] = calls.get(name, 0) + 1
        peers.setdefault(name, set()).add(context.peer())
        return calls[name]


def say(request, context):
    count("Say", context)
    return b"hi " + request


def abort(request, context):
    count("Abort", context)
    return b"the fault filter should have answered"


def flaky(request, context):
    if count("Flaky", context) < 3:
        context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
    return b"third time " + request


def fail(request, context):
    count("Fail", context)
    context.set_trailing_metadata((("x-why", "because"),))
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no good: " + request.decode())


def stall(request, context):
    count("Stall", context)
    time.sleep(5)
    return b"late"


def hold(request, context):
    """Answers once `request` calls are held at once (all concurrent), or after 20 s (they were not)."""
    count("Hold", context)
    want = int(request)
    with cond:
        holding[0] += 1
        cond.notify_all()
        together = cond.wait_for(lambda: holding[0] >= want, timeout=20)
    return json.dumps({"together": together}).encode()


def stream(request, context):
    count("Stream", context)
    for i in range(int(request)):
        yield f"part {i}".encode()


def chat(requests, context):
    count("Chat", context)
    for message in requests:
        yield b"re: " + message


def stats(request, context):
    with lock:
        return json.dumps({"calls": calls, "peers": {k: sorted(v) for k, v in peers.items()}}).encode()


u = grpc.unary_unary_rpc_method_handler
handler = grpc.method_handlers_generic_handler("t.Echo", {
    "Say": u(say), "Abort": u(abort), "Flaky": u(flaky), "Fail": u(fail), "Stall": u(stall), "Hold": u(hold),
    "Stats": u(stats), "Stream": grpc.unary_stream_rpc_method_handler(stream),
    "Chat": grpc.stream_stream_rpc_method_handler(chat)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=96))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("0.0.0.0:" + sys.argv[1])
server.start()
print("grpc server listening", flush=True)
server.wait_for_termination()
'''

CLIENT = '''
import json, sys, threading
import grpc

case, target = sys.argv[1], sys.argv[2]
out = {}


def error(exc):
    return {"code": exc.code().name, "details": exc.details(), "trailers": dict(exc.trailing_metadata() or ())}


with grpc.insecure_channel(target) as ch:
    unary = lambda name: ch.unary_unary("/t.Echo/" + name)
    if case == "calls":
        out["say"] = unary("Say")(b"there", timeout=10).decode()
        out["stream"] = [m.decode() for m in ch.unary_stream("/t.Echo/Stream")(b"5", timeout=10)]
        ready = threading.Semaphore(1)

        def messages():
            for i in range(4):
                ready.acquire()  # the next message only once the answer to the last one came back
                yield f"m{i}".encode()
        out["chat"] = []
        for reply in ch.stream_stream("/t.Echo/Chat")(messages(), timeout=10):
            out["chat"].append(reply.decode())
            ready.release()
        try:
            unary("Fail")(b"x", timeout=10)
        except grpc.RpcError as exc:
            out["fail"] = error(exc)
    elif case == "faults":
        try:
            unary("Abort")(b"x", timeout=10)
        except grpc.RpcError as exc:
            out["abort"] = error(exc)
        out["flaky"] = unary("Flaky")(b"lucky", timeout=10).decode()
        out["stall"] = []
        for _ in range(3):
            try:
                unary("Stall")(b"x", timeout=10)
                out["stall"].append({"code": "OK"})
            except grpc.RpcError as exc:
                out["stall"].append(error(exc))
    elif case == "concurrent":
        n = int(sys.argv[3])
        calls = [unary("Hold").future(str(n).encode(), timeout=30) for _ in range(n)]
        out["hold"] = [json.loads(c.result()) for c in calls]
    out["stats"] = json.loads(unary("Stats")(b"", timeout=10))
print(json.dumps(out))
'''


def cluster(tools: Path) -> str:
    return f"""
{two_node_cluster(NAME)}
apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
  labels: {{istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: echo, namespace: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: {NS}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: echo
  namespace: {NS}
  labels: {{app: echo, version: v1}}
spec:
  nodeName: node-2
  serviceAccountName: echo
  containers:
  - name: echo
    command: [{sys.executable}, {tools / 'server.py'}, "{PORT}"]
    ports: [{{name: grpc, containerPort: {PORT}}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: {NS}
  labels: {{app: client}}
spec:
  nodeName: node-1
  serviceAccountName: client
  containers:
  - name: client
    command: [{sys.executable}, -c, "import time; time.sleep(86400)"]
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: {NS}
spec:
  selector: {{app: echo}}
  ports: [{{name: grpc, port: {PORT}, targetPort: {PORT}}}]
"""


def route(method: str, **extra: Any) -> dict[str, Any]:
    return {"name": method.lower(), "match": [{"uri": {"exact": f"/t.Echo/{method}"}}],
            "route": [{"destination": {"host": "echo", "subset": extra.pop("subset", "all")}}], **extra}


CONFIG: list[dict[str, Any]] = [
    {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "echo", "namespace": NS},
     "spec": {"hosts": ["echo"], "http": [
         route("Abort", fault={"abort": {"grpcStatus": "RESOURCE_EXHAUSTED", "percentage": {"value": 100}}}),
         route("Flaky", retries={"attempts": 3, "retryOn": "unavailable"}),
         # a stalled endpoint behind a route timeout and no retries: each timeout counts for outlier detection
         route("Stall", subset="stall", timeout="0.3s", retries={"attempts": 0}),
         {"name": "rest", "route": [{"destination": {"host": "echo", "subset": "all"}}]}]}},
    {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "echo", "namespace": NS},
     "spec": {"host": "echo", "subsets": [
         {"name": "all", "labels": {"app": "echo"}},
         {"name": "stall", "labels": {"app": "echo"}, "trafficPolicy": {"outlierDetection": {
             "consecutive5xxErrors": 2, "interval": "10s", "baseEjectionTime": "60s", "maxEjectionPercent": 100}}}]}},
]


class GrpcMesh(Mesh):
    tools: Path = Path()

    def call(self, case: str, *args: str) -> dict[str, Any]:
        out = self.exec(NS, "client", sys.executable, str(self.tools / "client.py"), case, f"echo:{PORT}", *args,
                        timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def waypoint_config(self) -> dict[str, Any]:
        out = subprocess.run(["ip", "netns", "exec", self.pod_netns(NS, "waypoint"), "curl", "-sS", "-m", "5",
                              "http://127.0.0.1:15000/config_dump"], capture_output=True, text=True)
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout.startswith("{") else {}

    def waypoint_access_log(self) -> list[dict[str, Any]]:
        path = self.dir / "logs" / f"{NS}.waypoint.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [e for line in lines if line.startswith("{") and "response_code" in (e := json.loads(line))]


@pytest.fixture(scope="module")
def mesh(meshctl: Meshctl, tmp_path_factory: pytest.TempPathFactory,
         pod_files: Callable[[str], Path]) -> Iterator[GrpcMesh]:
    tools = pod_files("grpc-tools")
    (tools / "server.py").write_text(SERVER)
    (tools / "client.py").write_text(CLIENT)
    tmp = tmp_path_factory.mktemp("grpc")
    path = tmp / f"{NAME}.yaml"
    path.write_text(cluster(tools))
    m = GrpcMesh(NAME, meshctl)
    m.tools = tools
    try:
        meshctl("cluster", "up", "-f", str(path))
        m.ctl("waypoint", "apply", "-n", NS, "--enroll-namespace")
        m.apply(yaml.safe_dump_all(CONFIG), tmp)

        def configured() -> bool:
            """the waypoint serves the echo service with the test's VirtualService"""
            cfg = m.waypoint_config()
            return HOST in cfg.get("services", []) and bool(cfg.get("virtual_services", {}).get(HOST))

        eventually(configured, timeout=90, interval=0.5)

        def through_waypoint() -> bool:
            """a call reaches the server through the waypoint"""
            out = m.exec(NS, "client", sys.executable, str(tools / "client.py"), "none", f"echo:{PORT}", check=False)
            return out.returncode == 0 and any(e["authority"] == f"echo:{PORT}" for e in m.waypoint_access_log())

        eventually(through_waypoint, timeout=60, interval=1.0)
        yield m
    finally:
        meshctl("cluster", "down", NAME, check=False)


def test_unary_streaming_and_a_failed_status_with_trailers(mesh: GrpcMesh) -> None:
    out = mesh.call("calls")
    assert out["say"] == "hi there"
    assert out["stream"] == [f"part {i}" for i in range(5)]
    assert out["chat"] == ["re: m0", "re: m1", "re: m2", "re: m3"]  # relayed message by message, both ways
    assert out["fail"] == {"code": "FAILED_PRECONDITION", "details": "no good: x",
                           "trailers": {"x-why": "because"}}
    calls = [e for e in mesh.waypoint_access_log() if e["path"] == "/t.Echo/Chat"]
    assert calls and calls[-1]["protocol"] == "HTTP/2" and calls[-1]["response_code"] == 200


def test_fault_abort_retry_on_unavailable_and_timeouts_eject(mesh: GrpcMesh) -> None:
    out = mesh.call("faults")
    assert out["abort"]["code"] == "RESOURCE_EXHAUSTED" and out["abort"]["details"] == "fault filter abort"
    assert "Abort" not in out["stats"]["calls"]  # answered by the waypoint
    assert out["flaky"] == "third time lucky" and out["stats"]["calls"]["Flaky"] == 3
    # the route's timeout answers as Envoy does (UNAVAILABLE), and twice in a row ejects the endpoint
    assert [s["details"] for s in out["stall"]] == ["upstream request timeout", "upstream request timeout",
                                                    "no healthy upstream"], out["stall"]
    assert {s["code"] for s in out["stall"]} == {"UNAVAILABLE"}
    assert out["stats"]["calls"]["Stall"] == 2


def test_fifty_concurrent_calls_share_one_upstream_connection(mesh: GrpcMesh) -> None:
    out = mesh.call("concurrent", "50")
    assert out["hold"] == [{"together": True}] * 50  # all 50 were open at the server at the same time
    assert len(out["stats"]["peers"]["Hold"]) == 1, out["stats"]["peers"]["Hold"]  # over one connection
