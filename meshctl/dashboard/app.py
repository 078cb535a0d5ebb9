"""The dashboard process, assembled in one place: sources -> trace store and receiver -> API -> web server.

    dashboard = Dashboard(Options(cluster="demo"))
    url = dashboard.start()          # serving; spans received in the background
    ...
    dashboard.stop()

- The web server (the page, the JSON API, and OTLP/HTTP on `POST /v1/traces` too) listens on the host,
  127.0.0.1:20001 by default (Kiali's port), with `mesh.serve`'s server in a thread of its own.
- Spans (`plan_receiver`, pure): the cluster's proxies export to the OTLP endpoint they were started with
  (`cluster up --otlp-endpoint`).  When that endpoint is on the underlay's gateway address (where a
  collector of the cluster would be; `http://172.30.0.1:4318/v1/traces` by default) and nothing else
  listens there, the dashboard is the collector: it opens that socket inside the underlay namespace, which
  every node and pod reaches.  When the cluster exports nowhere it listens there all the same and says how
  to start a cluster that exports to it; when it exports to another collector, traces are read from that
  collector's Jaeger query API if `--jaeger-url` is given, else the page says where the spans go.
  A socket it cannot open (another collector has it) is a banner and a warning, not a failure.
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

from localcluster import state
from localcluster.spec import Observability
from mesh.serve.errors import ServeError
from mesh.serve.thread import ServerThread
from mesh.tracing.exporter import OTLP_HTTP_PORT
from mesh.tracing.otlp import TRACES_PATH
from mesh.tracing.receiver import MAX_BODY, OtlpReceiver, TraceStore
from meshctl.dashboard.api import DashboardApi, TraceSetup
from meshctl.dashboard.errors import DashboardError, SourceError
from meshctl.dashboard.sources import ClusterSources, Sources
from meshctl.dashboard.traces import JaegerTraces, ReceivedTraces, TraceSource

log = logging.getLogger("meshctl.dashboard")

DEFAULT_PORT = 20001  # Kiali's
DEFAULT_ADDRESS = "127.0.0.1"
MIN_REFRESH = 2.0


@dataclass(frozen=True)
class Options:
    cluster: str
    address: str = DEFAULT_ADDRESS
    port: int = DEFAULT_PORT
    prometheus_url: str | None = None
    otlp_listen: str | None = None  # HOST:PORT, "none", or None: decided from the cluster (`plan_receiver`)
    jaeger_url: str | None = None
    refresh: float | None = None  # seconds between the page's refreshes; None: the scrape interval


@dataclass(frozen=True)
class ReceiverPlan:
    """Where the dashboard receives spans (`host`:`port`, inside network namespace `netns` when set), and
    what the page should say about it."""

    host: str | None
    port: int = OTLP_HTTP_PORT
    netns: str | None = None
    note: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{TRACES_PATH}" + (f" (in network namespace {self.netns})"
                                                                 if self.netns else "")


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise DashboardError(f"--otlp-listen {value!r}: give HOST:PORT, e.g. 172.30.0.1:4318, or none")
    return host.strip("[]"), int(port)


def plan_receiver(record: dict[str, Any], otlp_listen: str | None, jaeger_url: str | None) -> ReceiverPlan:
    """Whether and where to receive spans, from the cluster's record and the options (pure)."""
    underlay = (record.get("plan") or {}).get("underlay") or {}
    gateway, netns = underlay.get("gateway", ""), underlay.get("netns")
    if otlp_listen == "none":
        return ReceiverPlan(None, note="" if jaeger_url else "this dashboard was started with --otlp-listen none: "
                                                                 "it shows no traces")
    if otlp_listen:
        host, port = _host_port(otlp_listen)
        return ReceiverPlan(host, port, netns if host == gateway else None)
    if jaeger_url:
        return ReceiverPlan(None)
    endpoint = Observability.from_record(record.get("observability")).otlp_endpoint
    if not endpoint:
        return ReceiverPlan(gateway, OTLP_HTTP_PORT, netns, note=(
            f"the cluster's proxies export no spans: start the cluster with --otlp-endpoint "
            f"http://{gateway}:{OTLP_HTTP_PORT}{TRACES_PATH} (this dashboard receives there), and sample with a "
            "Telemetry resource (examples/bookinfo/tracing.yaml)"))
    parts = urllib.parse.urlsplit(endpoint)
    if parts.hostname == gateway:
        return ReceiverPlan(gateway, parts.port or OTLP_HTTP_PORT, netns)
    return ReceiverPlan(None, note=f"the cluster's proxies send spans to the collector at {endpoint}: give "
                                   "--jaeger-url URL to read traces from its Jaeger query service")


class Dashboard:
    def __init__(self, opts: Options, sources: Sources | None = None) -> None:
        self.opts = opts
        self.sources = sources or ClusterSources(opts.cluster, opts.prometheus_url)
        self.store = TraceStore()
        self.receiver: OtlpReceiver | None = None
        self.web: ServerThread | None = None
        self.url = ""
        self.receiving = ""

    def _refresh(self, record: dict[str, Any]) -> float:
        if self.opts.refresh is not None:
            return max(0.5, self.opts.refresh)
        return max(MIN_REFRESH, Observability.from_record(record.get("observability")).scrape_interval)

    def _traces(self, record: dict[str, Any]) -> tuple[TraceSource | None, str]:
        """The trace source and the note the page shows; starts the OTLP receiver when planned."""
        plan = plan_receiver(record, self.opts.otlp_listen, self.opts.jaeger_url)
        if self.opts.jaeger_url:
            try:
                return JaegerTraces(self.opts.jaeger_url), plan.note
            except SourceError as exc:
                raise DashboardError(str(exc)) from None
        if plan.host is None:
            return None, plan.note
        self.receiver = OtlpReceiver(self.store.add, plan.host, plan.port, netns=plan.netns)
        try:
            self.receiver.start()
        except (ServeError, OSError) as exc:
            self.receiver = None
            note = f"cannot receive spans on {plan.url}: {exc}"
            log.warning("%s", note)
            return ReceivedTraces(self.store, "this dashboard (POST /v1/traces)"), note
        self.receiving = ReceiverPlan(plan.host, self.receiver.port, plan.netns).url
        log.info("receiving spans (OTLP/HTTP) on %s", self.receiving)
        return ReceivedTraces(self.store, f"this dashboard's receiver, {self.receiving}"), plan.note

    def start(self) -> str:
        """Open the receiver and the web server; the page's URL."""
        try:
            record = state.read_record(self.opts.cluster)
        except Exception as exc:
            raise DashboardError(f"cannot read cluster {self.opts.cluster!r}: {exc}") from None
        source, note = self._traces(record)
        api = DashboardApi(self.sources, TraceSetup(source, note, self.receiving, self.store.add),
                           refresh=self._refresh(record))
        self.web = ServerThread("dashboard").tcp(api.router(), self.opts.address, self.opts.port, name="dashboard",
                                                 max_body=MAX_BODY)
        try:
            (port,) = self.web.start()
        except ServeError as exc:
            self.stop()
            raise DashboardError(f"{exc}; choose another with --port") from None
        host = f"[{self.opts.address}]" if ":" in self.opts.address else self.opts.address
        self.url = f"http://{host}:{port}/"
        return self.url

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
            self.web = None
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None
