"""`meshctl get -l SELECTOR`, `-o wide` and `-w` against a real apply API; label selectors; the agent's
services and connections views and a pod's certificate chain (pure renderers)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.config.apiserver import ApiServer
from controlplane.config.store import Store
from mesh.errors import UsageError
from meshctl import agent, agentviews, proxystatus, selector
from meshctl.main import main

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "fixtures" / "istio"


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    with ApiServer(Store(tmp_path / "store"), tmp_path / "api.sock"):
        yield str(tmp_path / "api.sock")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(("text", "labels", "expected"), [
    ("app=reviews", {"app": "reviews"}, True),
    ("app==reviews,version!=v1", {"app": "reviews", "version": "v2"}, True),
    ("app=reviews,version!=v1", {"app": "reviews", "version": "v1"}, False),
    ("version!=v1", {}, True),
    ("version in (v2, v3)", {"version": "v3"}, True),
    ("version notin (v2,v3),app", {"version": "v1", "app": "x"}, True),
    ("version notin (v2,v3)", {"version": "v2"}, False),
    ("app", {}, False),
    ("!canary", {"app": "x"}, True),
    ("!canary", {"canary": "yes"}, False),
])
def test_selector(text: str, labels: dict[str, str], expected: bool) -> None:
    assert selector.matches(selector.parse(text), labels) is expected


@pytest.mark.parametrize(("text", "message"), [
    ("app=x,", "an empty requirement"),
    ("a b=c", "'a b' is not a label key"),
    ("version in ()", "lists no values"),
    ("=x", "'' is not a label key"),
])
def test_selector_refused(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        selector.parse(text)


def test_get_selector_and_wide(sock: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "apply", "-f", str(FIXTURES / "bookinfo-platform.yaml"), "--socket", sock)[0] == 0
    rc, out, _ = run(capsys, "get", "pods", "-l", "app=reviews,version!=v1", "-o", "name", "--socket", sock)
    assert (rc, out) == (0, "pod/reviews-v2\npod/reviews-v3\n")
    rc, out, _ = run(capsys, "get", "pods", "-l", "version in (v1)", "-o", "wide", "--socket", sock)
    lines = out.splitlines()
    assert lines[0].split()[-1] == "LABELS" and [line.split()[0] for line in lines[1:]] == \
        ["details-v1", "productpage-v1", "ratings-v1", "reviews-v1"]
    assert lines[1].split()[-1] == "app=details,version=v1"
    rc, out, _ = run(capsys, "get", "svc", "reviews", "-o", "wide", "--socket", sock)
    assert out.splitlines()[0].split()[-2:] == ["SELECTOR", "LABELS"] and "app=reviews" in out.splitlines()[1]
    rc, out, err = run(capsys, "get", "pods", "-l", "app=nothing", "--socket", sock)
    assert (rc, out) == (0, "") and "No Pod resources found" in err
    rc, _, err = run(capsys, "get", "pods", "-l", "app=x,,", "--socket", sock)
    assert rc == 1 and "an empty requirement" in err
    rc, _, err = run(capsys, "get", "pods", "-w", "-o", "json", "--socket", sock)
    assert rc == 1 and "-w prints table rows" in err


def test_get_watch_prints_changes(sock: str, tmp_path: Path) -> None:
    vs = FIXTURES / "virtual-service-reviews-20-80.yaml"
    watcher = subprocess.Popen([sys.executable, "-m", "meshctl.main", "get", "vs", "-w", "--watch-interval", "0.1",
                                "--socket", sock], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert watcher.stderr is not None  # its first listing is done (empty): what follows is the watch's
        assert watcher.stderr.readline() == "No VirtualService resources found in namespace default.\n"
        assert main(["apply", "-f", str(FIXTURES / "bookinfo-platform.yaml"), "-f",
                     str(FIXTURES / "destination-rule-all.yaml"), "-f", str(vs), "--socket", sock]) == 0
        assert watcher.stdout is not None
        assert watcher.stdout.readline().split() == ["NAME", "HOSTS", "VERSION"]
        assert watcher.stdout.readline().split()[:2] == ["reviews", "reviews"]
        assert main(["delete", "-f", str(vs), "--socket", sock]) == 0
        assert watcher.stdout.readline().rstrip().endswith("(deleted)")
    finally:
        watcher.kill()
        watcher.wait()


def test_services_view() -> None:
    data = {"node": "node-1", "services": [
        {"name": "reviews", "namespace": "bookinfo", "hostname": "reviews.bookinfo.svc.cluster.local",
         "vips": ["10.96.0.12"], "ports": [{"service_port": 9080, "target_port": 9080, "app_protocol": "http"}],
         "waypoint": {"name": "waypoint", "namespace": "bookinfo"},
         "endpoints": [{"workload_uid": "a", "healthy": True}, {"workload_uid": "b", "healthy": False}]},
        {"name": "db", "namespace": "a", "vips": [], "ports": [{"service_port": 5432, "target_port": 15432}]},
    ]}
    assert agentviews.render_services(data).splitlines() == [
        "2 services known to the agent of node-1",
        "NAMESPACE  SERVICE  VIP         PORTS        WAYPOINT           ENDPOINTS",
        "a          db       -           5432->15432  -                  0/0",
        "bookinfo   reviews  10.96.0.12  9080/http    bookinfo/waypoint  1/2",
    ]


METRICS = """# TYPE istio_tcp_connections_opened counter
istio_tcp_connections_opened_total{reporter="source",source_workload="sleep",source_workload_namespace="bookinfo",destination_workload="productpage-v1",destination_workload_namespace="bookinfo",destination_service="productpage.bookinfo.svc.cluster.local",connection_security_policy="mutual_tls"} 5.0
istio_tcp_connections_opened_created{reporter="source",source_workload="sleep",source_workload_namespace="bookinfo",destination_workload="productpage-v1",destination_workload_namespace="bookinfo",destination_service="productpage.bookinfo.svc.cluster.local",connection_security_policy="mutual_tls"} 1.7e9
# TYPE istio_tcp_connections_closed counter
istio_tcp_connections_closed_total{reporter="source",source_workload="sleep",source_workload_namespace="bookinfo",destination_workload="productpage-v1",destination_workload_namespace="bookinfo",destination_service="productpage.bookinfo.svc.cluster.local",connection_security_policy="mutual_tls"} 3.0
# TYPE istio_tcp_sent_bytes counter
istio_tcp_sent_bytes_total{reporter="source",source_workload="sleep",source_workload_namespace="bookinfo",destination_workload="productpage-v1",destination_workload_namespace="bookinfo",destination_service="productpage.bookinfo.svc.cluster.local",connection_security_policy="mutual_tls"} 900.0
# TYPE mesh_agent_enrolled_pods gauge
mesh_agent_enrolled_pods 3.0
"""


def test_connections_view() -> None:
    rows = agentviews.connection_rows(METRICS)
    assert rows == [{"reporter": "source", "source": "bookinfo/sleep", "destination": "bookinfo/productpage-v1",
                     "service": "productpage.bookinfo.svc.cluster.local", "open": 2, "opened": 5, "closed": 3,
                     "received_bytes": 0, "sent_bytes": 900}]
    lines = agentviews.render_connections("node-1", rows).splitlines()
    assert lines[0] == "1 source/destination pairs proxied by the agent of node-1"
    assert lines[2].split() == ["outbound", "bookinfo/sleep", "bookinfo/productpage-v1",
                                "productpage.bookinfo.svc.cluster.local", "2", "5", "3", "0", "900"]
    assert agentviews.render_connections("n", []) == "0 source/destination pairs proxied by the agent of n"


def test_certificate_chain_by_identity() -> None:
    data = {"node": "node-1", "certificates": [
        {"identity": "spiffe://cluster.local/ns/bookinfo/sa/sleep", "state": "valid", "chain": "PEM\n"},
        {"identity": "spiffe://cluster.local/ns/bookinfo/sa/reviews", "state": "backoff", "chain": None,
         "last_error": "CA unreachable"}]}
    assert agent.chain_of(data, "bookinfo/sleep") == "PEM\n"
    assert agent.chain_of(data, "spiffe://cluster.local/ns/bookinfo/sa/sleep") == "PEM\n"
    with pytest.raises(agent.AgentCliError, match=r"holds no certificate for .*reviews yet \(state backoff: CA"):
        agent.chain_of(data, "bookinfo/reviews")
    with pytest.raises(agent.AgentCliError, match="holds no certificate for spiffe://x/ns/a/sa/b .it holds: "):
        agent.chain_of(data, "spiffe://x/ns/a/sa/b")
    with pytest.raises(UsageError, match="give spiffe://TRUST-DOMAIN/ns/NS/sa/SA or NS/SA"):
        agent.chain_of(data, "sleep")


@pytest.mark.parametrize(("node_id", "name"), [
    ("nodeagent~node-1~.", "nodeagent/node-1"),
    ("waypoint~node-2~waypoint.bookinfo", "bookinfo/waypoint"),
    ("debugger", "debugger"),
])
def test_proxy_status_names(node_id: str, name: str) -> None:
    assert proxystatus.display_name({"node_id": node_id}) == name
    assert proxystatus.render({"clients": [{"node_id": node_id, "types": {}}]}).splitlines()[2].startswith(name)
