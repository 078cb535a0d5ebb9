"""Prometheus for the local cluster: Debian's `prometheus` server, scraping every component.

It runs in the underlay namespace and listens on the underlay's `.1` address, port 9090, beside the
control plane: from there it reaches the control plane (`.1:15014`), every node agent (`<node>:15020`,
the underlay routes to the nodes), every waypoint and every pod (`<pod ip>`, the underlay has a route
to each node's pod CIDR).  Its data is under `<cluster dir>/prometheus/`, removed with the cluster.

Pure (tested without a server):

    targets(record)                 what to scrape, from the cluster record (the plan, and the waypoint
                                    pods the controller adds to it)
    render_config(record, settings) prometheus.yml: one job per kind of component, the recording rules
    render_rules(settings)          rules.yml: the RED figures of each workload edge (request rate, error
                                    rate and ratio, p50/p90/p99 latency) and TCP byte and connection rates

I/O: `start` (write both files, spawn, wait for /-/ready), `refresh` (write the configuration again from
the record and SIGHUP the server: the waypoint controller calls it when waypoints come and go), and
`endpoint` (where it listens, for `cluster status` and queries).

Jobs and target labels: `controlplane`, `nodeagent` (`node`), `waypoint` (`namespace`, `pod`, `node`),
`pods` (`namespace`, `pod`, `node`): every pod annotated `prometheus.io/scrape: "true"`, on
`prometheus.io/port` (else its first declared port) and `prometheus.io/path` (else /metrics), which is
what the DaemonSet's and the Deployment's annotations say on Kubernetes (daemonset/prometheus/).
Every series gets `cluster=<name>` (external label).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from localcluster import processes, state
from localcluster.components import component_env
from localcluster.processes import ProcessRecord
from localcluster.spec import Observability
from mesh import defaults
from mesh.errors import MeshError
from mesh.files import write_atomic
from mesh.serve import client
from mesh.serve.errors import ServeError

PORT = 9090
PROCESS = "prometheus"
SUBDIR = "prometheus"
CONFIG_FILE = "prometheus.yml"
RULES_FILE = "rules.yml"
BINARY = "prometheus"
RETENTION = "1d"
RATE_WINDOW = "1m"
SCRAPE_ANNOTATION = "prometheus.io/scrape"
PORT_ANNOTATION = "prometheus.io/port"
PATH_ANNOTATION = "prometheus.io/path"
# The labels of a workload edge (who called whom), what a service graph is drawn from.
EDGE = ("reporter", "source_workload", "source_workload_namespace", "destination_workload",
        "destination_workload_namespace", "destination_service")


class PrometheusError(MeshError):
    pass


@dataclass(frozen=True)
class Settings:
    scrape_interval: float  # seconds
    port: int = PORT

    @classmethod
    def of(cls, obs: Observability) -> Settings:
        return cls(obs.scrape_interval)


@dataclass(frozen=True)
class Target:
    job: str
    address: str  # host:port
    labels: dict[str, str] = field(default_factory=dict)
    path: str = "/metrics"


# ---- pure -------------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """A Prometheus duration: whole seconds as `5s`, else milliseconds (`500ms`)."""
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{round(seconds * 1000)}ms"


def _pod_target(pod: dict[str, Any]) -> Target | None:
    notes = pod.get("annotations") or {}
    if str(notes.get(SCRAPE_ANNOTATION, "")).lower() != "true":
        return None
    port = str(notes.get(PORT_ANNOTATION) or next((str(p) for p in pod.get("ports") or []), ""))
    if not port.isdigit():
        return None
    return Target("pods", f"{pod['ip']}:{port}", {"namespace": pod["namespace"], "pod": pod["name"],
                                                  "node": pod["node"]}, str(notes.get(PATH_ANNOTATION) or "/metrics"))


def targets(record: dict[str, Any]) -> list[Target]:
    """Every component of the cluster to scrape, from its record."""
    plan = record["plan"]
    out = [Target("controlplane", f"{plan['underlay']['gateway']}:{defaults.CONTROLPLANE_METRICS_PORT}")]
    out += [Target("nodeagent", f"{n['ip']}:{defaults.METRICS_PORT}", {"node": n["name"]}) for n in plan["nodes"]]
    for pod in plan["pods"]:
        labels = {"namespace": pod["namespace"], "pod": pod["name"], "node": pod["node"]}
        if pod.get("waypoint"):
            out.append(Target("waypoint", f"{pod['ip']}:{defaults.METRICS_PORT}", labels))
        elif (t := _pod_target(pod)) is not None:
            out.append(t)
    return out


def render_config(record: dict[str, Any], settings: Settings, rules_file: Path | str = RULES_FILE) -> str:
    """prometheus.yml for the cluster of `record`."""
    interval = duration(settings.scrape_interval)
    jobs: dict[str, list[dict[str, Any]]] = {}
    for t in targets(record):
        labels = dict(t.labels)
        if t.path != "/metrics":
            labels["__metrics_path__"] = t.path
        jobs.setdefault(t.job, []).append({"targets": [t.address], **({"labels": labels} if labels else {})})
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": duration(min(settings.scrape_interval, 10.0)),
                   "evaluation_interval": interval, "external_labels": {"cluster": record["name"]}},
        "rule_files": [str(rules_file)],
        "scrape_configs": [{"job_name": job, "static_configs": static} for job, static in jobs.items()],
    }
    return "# Generated by localcluster/prometheus.py from the cluster record; rewritten when waypoints " \
           "come and go.\n" + yaml.safe_dump(config, sort_keys=False)


def _by(labels: tuple[str, ...]) -> str:
    return f"sum by ({', '.join(labels)})"


def render_rules(settings: Settings | None = None) -> str:
    """rules.yml: what a dashboard reads per workload edge (`EDGE` labels); evaluated every scrape
    interval of `settings`, else at the server's global evaluation interval (daemonset/prometheus/)."""
    w, by = RATE_WINDOW, _by(EDGE)
    requests = f"{by} (rate(istio_requests_total[{w}]))"
    errors = f'{by} (rate(istio_requests_total{{response_code=~"5.."}}[{w}]))'
    rules: list[dict[str, str]] = [
        {"record": "workload_edge:istio_requests:rate1m", "expr": requests},
        # Every edge with traffic has an error rate, 0 when nothing failed, so the ratio always exists.
        {"record": "workload_edge:istio_requests_errors:rate1m", "expr": f"{errors} or ({requests} * 0)"},
        {"record": "workload_edge:istio_requests_errors:ratio1m",
         "expr": "workload_edge:istio_requests_errors:rate1m / workload_edge:istio_requests:rate1m"},
    ]
    for q in ("50", "90", "99"):
        rules.append({"record": f"workload_edge:istio_request_duration_milliseconds:p{q}_1m",
                      "expr": f"histogram_quantile(0.{q}, {_by(('le', *EDGE))} "
                              f"(rate(istio_request_duration_milliseconds_bucket[{w}])))"})
    for metric in ("istio_tcp_sent_bytes", "istio_tcp_received_bytes", "istio_tcp_connections_opened",
                   "istio_tcp_connections_closed"):
        rules.append({"record": f"workload_edge:{metric}:rate1m", "expr": f"{by} (rate({metric}_total[{w}]))"})
    group: dict[str, Any] = {"name": "mesh-workload-edges"}
    if settings is not None:
        group["interval"] = duration(settings.scrape_interval)
    group["rules"] = rules
    return "# Generated by localcluster/prometheus.py: the RED figures per workload edge.\n" + \
        yaml.safe_dump({"groups": [group]}, sort_keys=False, width=200)


# ---- I/O ---------------------------------------------------------------------------------------------------


def directory(home: Path) -> Path:
    return home / SUBDIR


def endpoint(record: dict[str, Any]) -> client.Endpoint:
    """Where the cluster's Prometheus listens (inside the underlay namespace)."""
    return client.Endpoint.tcp(record["plan"]["underlay"]["gateway"], PORT, netns=record["plan"]["underlay"]["netns"])


def installed() -> bool:
    return shutil.which(BINARY) is not None


def write_files(home: Path, record: dict[str, Any], settings: Settings) -> Path:
    """prometheus.yml and rules.yml in the cluster's prometheus directory; the configuration's path."""
    d = directory(home)
    (d / "data").mkdir(parents=True, exist_ok=True)
    write_atomic(d / RULES_FILE, render_rules(settings).encode())
    write_atomic(d / CONFIG_FILE, render_config(record, settings, d / RULES_FILE).encode())
    return d / CONFIG_FILE


def start(home: Path, record: dict[str, Any], settings: Settings, timeout: float = 30.0) -> ProcessRecord:
    """Write the configuration, start Prometheus in the underlay namespace and wait until it is ready."""
    if not installed():
        raise PrometheusError("the prometheus server is not installed: run `make setup` (apt-get install "
                              "prometheus), or start the cluster with --no-prometheus")
    config = write_files(home, record, settings)
    underlay = record["plan"]["underlay"]
    argv = [shutil.which(BINARY) or BINARY, f"--config.file={config}",
            f"--storage.tsdb.path={directory(home) / 'data'}", f"--storage.tsdb.retention.time={RETENTION}",
            f"--web.listen-address={underlay['gateway']}:{settings.port}", "--web.enable-lifecycle",
            "--log.level=warn"]
    rec = processes.spawn(record["name"], PROCESS, underlay["netns"], argv, component_env(),
                          home / "logs" / "prometheus.log")
    wait_ready(record, rec, timeout)
    return rec


def wait_ready(record: dict[str, Any], rec: ProcessRecord, timeout: float) -> None:
    where = endpoint(record)
    deadline = time.monotonic() + timeout
    while True:
        if not processes.is_running(rec):
            raise PrometheusError(f"prometheus exited while starting; its log ends with:\n{processes.tail(rec.log)}")
        try:
            if client.get(where, "/-/ready", timeout=1).status == 200:
                return
        except ServeError:
            pass
        if time.monotonic() > deadline:
            raise PrometheusError(f"prometheus at {where} was not ready after {timeout:.0f}s; its log ends with:\n"
                                  f"{processes.tail(rec.log)}")
        time.sleep(0.2)


def running(record: dict[str, Any]) -> ProcessRecord | None:
    """The cluster's Prometheus process, if it runs."""
    for data in record.get("processes", []):
        if data["name"] == PROCESS:
            rec = ProcessRecord.from_json(data)
            return rec if processes.is_running(rec) else None
    return None


def refresh(cluster: str) -> bool:
    """Write the scrape configuration again from the cluster's record and have Prometheus reload it
    (SIGHUP).  False when the cluster runs no Prometheus."""
    record = state.read_record(cluster)
    rec = running(record)
    if rec is None:
        return False
    write_files(state.cluster_dir(cluster), record, Settings.of(Observability.from_record(record.get("observability"))))
    os.kill(rec.pid, signal.SIGHUP)
    return True
