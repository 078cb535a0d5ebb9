"""The local cluster's Prometheus: scrape targets and rules rendered from the cluster record (checked with
Debian's promtool when it is installed), the cluster file's settings, and the reload when waypoints come
and go (a SIGHUP to the recorded process, the waypoint controller's hook)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import prometheus, spec, state
from localcluster.plan import make_plan
from localcluster.processes import ProcessRecord, start_time
from localcluster.prometheus import Settings, Target
from localcluster.spec import ClusterFileError, Observability
from localcluster.waypoints import WaypointController

ROOT = Path(__file__).resolve().parents[3]
BOOKINFO = ROOT / "examples" / "bookinfo" / "cluster.yaml"
ANNOTATED = """
---
apiVersion: v1
kind: Pod
metadata:
  name: exporter
  namespace: bookinfo
  annotations: {prometheus.io/scrape: "true", prometheus.io/port: "9100", prometheus.io/path: /stats}
spec:
  nodeName: node-2
  containers:
  - command: [sleep, infinity]
    ports: [{containerPort: 9100}]
"""
WAYPOINT_POD = {"name": "waypoint", "namespace": "bookinfo", "node": "node-1", "netns": "amb.t.pod.bookinfo.waypoint",
                "ip": "10.244.1.254", "serviceAccount": "waypoint", "labels": {}, "waypoint": True}


def record(tmp_path: Path, *, waypoint: bool = False, extra: str = ANNOTATED) -> dict[str, Any]:
    path = tmp_path / "cluster.yaml"
    path.write_text(BOOKINFO.read_text() + extra)
    plan = make_plan(dataclasses.replace(spec.load(path), name="t"))
    rec = {"name": "t", "plan": plan.to_record(), "processes": [], "observability": Observability().to_record()}
    if waypoint:
        rec["plan"]["pods"].append(dict(WAYPOINT_POD))
    return rec


def test_every_component_is_a_target(tmp_path: Path) -> None:
    targets = prometheus.targets(record(tmp_path, waypoint=True))
    assert targets[:3] == [Target("controlplane", "172.30.0.1:15014"),
                           Target("nodeagent", "172.30.0.10:15020", {"node": "node-1"}),
                           Target("nodeagent", "172.30.0.11:15020", {"node": "node-2"})]
    assert Target("waypoint", "10.244.1.254:15020", {"namespace": "bookinfo", "pod": "waypoint", "node": "node-1"}) \
        in targets
    pods = [t for t in targets if t.job == "pods"]  # only the annotated one: bookinfo's apps have no /metrics
    assert pods == [Target("pods", f"{pods[0].address.split(':')[0]}:9100",
                           {"namespace": "bookinfo", "pod": "exporter", "node": "node-2"}, "/stats")]


def test_config_and_rules_render(tmp_path: Path) -> None:
    rec = record(tmp_path, waypoint=True)
    config = yaml.safe_load(prometheus.render_config(rec, Settings(1.5), tmp_path / "rules.yml"))
    assert config["global"]["scrape_interval"] == "1500ms" and config["global"]["evaluation_interval"] == "1500ms"
    assert config["global"]["external_labels"] == {"cluster": "t"}
    jobs = {j["job_name"]: j["static_configs"] for j in config["scrape_configs"]}
    assert set(jobs) == {"controlplane", "nodeagent", "waypoint", "pods"}
    assert jobs["pods"][0]["labels"]["__metrics_path__"] == "/stats"
    assert jobs["waypoint"] == [{"targets": ["10.244.1.254:15020"],
                                 "labels": {"namespace": "bookinfo", "pod": "waypoint", "node": "node-1"}}]
    rules = yaml.safe_load(prometheus.render_rules(Settings(2.0)))["groups"][0]
    assert rules["interval"] == "2s"
    recorded = {r["record"] for r in rules["rules"]}
    assert {"workload_edge:istio_requests:rate1m", "workload_edge:istio_requests_errors:rate1m",
            "workload_edge:istio_requests_errors:ratio1m", "workload_edge:istio_request_duration_milliseconds:p99_1m",
            "workload_edge:istio_tcp_sent_bytes:rate1m", "workload_edge:istio_tcp_received_bytes:rate1m"} <= recorded
    assert prometheus.duration(5) == "5s" and prometheus.duration(0.25) == "250ms"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) not installed")
def test_promtool_accepts_what_is_written(tmp_path: Path) -> None:
    config = prometheus.write_files(tmp_path, record(tmp_path, waypoint=True), Settings(1.0))
    out = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 10 rules found" in out.stdout + out.stderr


def test_the_daemonsets_rules_are_the_local_clusters() -> None:
    shipped = (ROOT / "daemonset" / "prometheus" / "rules.yaml").read_text()
    assert shipped == prometheus.render_rules(), (
        "daemonset/prometheus/rules.yaml is stale: python -c 'from localcluster.prometheus import render_rules; "
        "print(render_rules(), end=\"\")' > daemonset/prometheus/rules.yaml")
    jobs = yaml.safe_load((ROOT / "daemonset" / "prometheus" / "scrape-config.yaml").read_text())
    assert [j["job_name"] for j in jobs] == ["ambient-mesh", "ambient-mesh-pods"]
    assert all(any(r.get("source_labels") == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
                   for r in j["relabel_configs"]) for j in jobs)


# ---- the cluster file's settings ----------------------------------------------------------------------------


def test_observability_in_the_cluster_file(tmp_path: Path) -> None:
    text = BOOKINFO.read_text().replace(
        "spec:\n  serviceCIDR", "spec:\n  observability:\n    prometheus: {scrapeInterval: 2s}\n"
        "    tracing: {otlpEndpoint: 'http://172.30.0.1:4318/v1/traces'}\n  serviceCIDR", 1)
    parsed = spec.parse(text, tmp_path / "c.yaml")
    assert parsed.observability == Observability(True, 2.0, "http://172.30.0.1:4318/v1/traces")
    assert parsed.observability.proxy_args() == ["--otlp-endpoint=http://172.30.0.1:4318/v1/traces"]
    assert Observability.from_record(parsed.observability.to_record()) == parsed.observability
    assert spec.parse(BOOKINFO.read_text(), tmp_path / "c.yaml").observability == Observability()
    flags = spec.with_observability(parsed, prometheus=False, scrape_interval=1.0, otlp_endpoint="")
    assert flags.observability == Observability(False, 1.0, "")


@pytest.mark.parametrize(("block", "fragment"), [
    ("prometheus: {scrapeInterval: soon}", "spec.observability.prometheus.scrapeInterval: 'soon' is not a duration"),
    ("prometheus: {scrapeInterval: 5m}", "out of range"),
    ("prometheus: {enabled: yes-please}", "spec.observability.prometheus.enabled: must be true or false"),
    ("tracing: {otlpEndpoint: 'collector:4318'}", "spec.observability.tracing.otlpEndpoint: OTLP endpoint"),
    ("grafana: {}", "spec.observability.grafana: unknown field"),
])
def test_bad_observability_is_refused(tmp_path: Path, block: str, fragment: str) -> None:
    text = BOOKINFO.read_text().replace("spec:\n  serviceCIDR", f"spec:\n  observability:\n    {block}\n  serviceCIDR", 1)
    with pytest.raises(ClusterFileError) as refused:
        spec.parse(text, tmp_path / "c.yaml")
    assert any(fragment in p for p in refused.value.problems), refused.value.problems


# ---- reloading ----------------------------------------------------------------------------------------------

HUP_COUNTER = """
import signal, sys, time
path = sys.argv[1]
def hup(*_):
    with open(path, "a") as f:
        f.write("hup\\n")
signal.signal(signal.SIGHUP, hup)
open(path, "a").close()
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def state_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_a_waypoint_change_rewrites_the_targets_and_reloads_prometheus(tmp_path: Path, state_root: Path) -> None:
    """The controller's hook: its record gains the waypoint, then `refresh` writes the configuration from
    it and SIGHUPs the recorded Prometheus (here a stand-in that counts SIGHUPs)."""
    hups = tmp_path / "hups"
    stand_in = subprocess.Popen([sys.executable, "-c", HUP_COUNTER, str(hups)])
    try:
        while not hups.exists():
            time.sleep(0.01)
        rec = record(tmp_path)
        rec["processes"] = [ProcessRecord("prometheus", stand_in.pid, start_time(stand_in.pid) or 0, "", "").to_json()]
        state.write_record("t", rec)
        prometheus.write_files(state.cluster_dir("t"), rec, Settings(1.0))
        config = state.cluster_dir("t") / "prometheus" / "prometheus.yml"
        assert "10.244.1.254:15020" not in config.read_text()

        calls: list[str] = []
        controller = WaypointController("t", make_plan(dataclasses.replace(spec.load(BOOKINFO), name="t")),
                                        state.cluster_dir("t"), on_change=lambda c: calls.append(c) or prometheus.refresh(c))
        controller.running["bookinfo/waypoint"] = {"pod": {k: v for k, v in WAYPOINT_POD.items() if k != "waypoint"},
                                                   "process": ProcessRecord("waypoint bookinfo/waypoint", 1, 0, "", "").to_json()}
        controller._save()  # what create() does after starting the pod
        assert calls == ["t"] and "10.244.1.254:15020" in config.read_text()
        deadline = time.monotonic() + 5
        while hups.read_text().count("hup") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hups.read_text().count("hup") == 1

        controller.running.clear()  # ... and remove() when it goes
        controller._save()
        assert "10.244.1.254:15020" not in config.read_text()
        while hups.read_text().count("hup") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hups.read_text().count("hup") == 2
    finally:
        stand_in.send_signal(signal.SIGKILL)
        stand_in.wait()


def test_no_prometheus_no_reload(state_root: Path, tmp_path: Path) -> None:
    state.write_record("t", record(tmp_path))
    assert prometheus.refresh("t") is False
    assert not (state.cluster_dir("t") / "prometheus").exists()
    assert os.environ["MESH_STATE_DIR"] == str(state_root)
