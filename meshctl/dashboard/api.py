"""The dashboard's JSON API and its page, as a `mesh.serve` Router (handlers: a `Request` in, a `Response` out).

    GET /                                 the page (static/index.html; static/app.js and static/style.css)
    GET /api/config                       the cluster, the refresh interval, where data comes from
    GET /api/namespaces                   namespaces with pods
    GET /api/graph?namespace=NS[&window=1m]     nodes, edges (source and destination workload, requests,
                                          errors, rate, error_rate, p50/p90/p99, mtls, waypoint), links
    GET /api/workloads?namespace=NS       the namespace's workloads
    GET /api/workload?namespace=NS&name=W[&minutes=15]   pods, node, identity, policies, routes, charts
    GET /api/traces[?service=NAME][&limit=20]   recent traces, each with its spans (service, proxy,
                                          start, offset, duration, status)
    GET /api/trace?id=TRACE_ID            one trace as a waterfall
    GET /api/health                       control plane, agents and waypoints (config versions), certificates
    POST /v1/traces                       OTLP/HTTP (when the dashboard receives spans itself)

Every answer about the mesh is 200 with what could be had and a `warnings` list: one entry per source
that failed (`{"source": "prometheus", "message": ...}`), which the page shows as a banner.  A source
that fails is logged as a warning once a minute at most, and once when it answers again.  Bad input
(a missing namespace, a malformed window) is a 400 with a JSON error; an unknown workload or trace 404.
"""

from __future__ import annotations

import datetime
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.serve.routes import Request, Response, Router, json_error
from mesh.tracing.receiver import otlp_router
from meshctl.dashboard import graph, health, traces, workload
from meshctl.dashboard.errors import SourceError
from meshctl.dashboard.sources import Sources, waypoints

log = logging.getLogger("meshctl.dashboard")

STATIC = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_WINDOW = re.compile(r"^[1-9][0-9]{0,3}[smh]$")
_TRACE_ID = re.compile(r"^[0-9a-fA-F]{1,32}$")
WARN_EVERY = 60.0
CHART_MINUTES = 15
MAX_POINTS = 120


class SourceLog:
    """A warning in the log when a source fails (at most once per `every` seconds per source), and a line
    when it answers again."""

    def __init__(self, every: float = WARN_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self._clock = clock
        self._failing: dict[str, float] = {}  # source -> when last warned
        self._lock = threading.Lock()

    def failed(self, error: SourceError) -> None:
        now = self._clock()
        with self._lock:
            last = self._failing.get(error.source)
            if last is not None and now - last < self.every:
                return
            self._failing[error.source] = now
        log.warning("%s: %s", error.source, error)

    def ok(self, source: str) -> None:
        with self._lock:
            if self._failing.pop(source, None) is None:
                return
        log.info("%s answers again", source)


@dataclass(frozen=True)
class TraceSetup:
    """Where traces come from: `source` (None: nowhere), `note` (shown with every answer about traces,
    "" for none), `receiving` (the OTLP/HTTP URL the dashboard receives on, "" when it does not)."""

    source: traces.TraceSource | None
    note: str = ""
    receiving: str = ""
    on_spans: Callable[[list[Any]], None] | None = field(default=None, compare=False)


class DashboardApi:
    def __init__(self, sources: Sources, trace_setup: TraceSetup, *, refresh: float = 5.0,
                 static: Path = STATIC, source_log: SourceLog | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.sources = sources
        self.traces = trace_setup
        self.refresh = refresh
        self.static = static
        self.log = source_log or SourceLog()
        self.clock = clock

    # ---- helpers -------------------------------------------------------------------------------------

    def _failed(self, warnings: list[dict[str, str]], error: SourceError) -> None:
        self.log.failed(error)
        if not any(w["message"] == str(error) for w in warnings):
            warnings.append({"source": error.source, "message": str(error)})

    def _answer(self, data: dict[str, Any], warnings: list[dict[str, str]], status: int = 200) -> Response:
        return Response.json({**data, "warnings": warnings, "at": self.clock()}, status)

    def _record(self, warnings: list[dict[str, str]]) -> dict[str, Any]:
        try:
            record = self.sources.record()
        except SourceError as exc:
            self._failed(warnings, exc)
            return {}
        self.log.ok("cluster")
        return record

    def _file(self, name: str) -> Callable[[Request], Response]:
        path = self.static / name

        def serve(_: Request) -> Response:
            try:
                body = path.read_bytes()
            except OSError:
                return Response.text(f"{name} is missing from the dashboard's static files", 404)
            return Response(200, body, CONTENT_TYPES.get(path.suffix, "application/octet-stream"))

        return serve

    # ---- the routes ----------------------------------------------------------------------------------

    def router(self) -> Router:
        r = Router(error=json_error)
        r.add("/", self._file("index.html"))
        for name in ("app.js", "style.css"):
            r.add(f"/static/{name}", self._file(name))
        r.add("/healthz", lambda _: Response.text("ok"))
        r.add("/api/config", self.config)
        r.add("/api/namespaces", self.namespaces)
        r.add("/api/graph", self.graph)
        r.add("/api/workloads", self.workloads)
        r.add("/api/workload", self.workload)
        r.add("/api/traces", self.trace_list)
        r.add("/api/trace", self.trace)
        r.add("/api/health", self.health)
        if self.traces.on_spans is not None:
            r.include(otlp_router(self.traces.on_spans))
        return r

    def config(self, _: Request) -> Response:
        return Response.json({"cluster": self.sources.cluster, "refresh": self.refresh,
                              "traces": {"source": self.traces.source.where if self.traces.source else None,
                                         "receiving": self.traces.receiving or None, "note": self.traces.note or None}})

    def namespaces(self, _: Request) -> Response:
        warnings: list[dict[str, str]] = []
        record = self._record(warnings)
        names = {p["namespace"] for p in (record.get("plan") or {}).get("pods", [])}
        return self._answer({"namespaces": sorted(names)}, warnings)

    def graph(self, request: Request) -> Response:
        namespace = request.query.get("namespace", "").strip()
        window = request.query.get("window", graph.DEFAULT_WINDOW)
        if not namespace:
            return json_error("give the namespace: /api/graph?namespace=NS", 400)
        if not _WINDOW.match(window):
            return json_error(f"window {window!r}: give a duration such as 1m, 30s or 1h", 400)
        warnings: list[dict[str, str]] = []
        record = self._record(warnings)
        results: dict[str, list[Any]] = {}
        try:
            prom = self.sources.prometheus()
            for name, expr in graph.queries(namespace, window).items():
                results[name] = prom.query(expr)
            self.log.ok("prometheus")
        except SourceError as exc:
            self._failed(warnings, exc)
        out = graph.build(namespace, results, waypoints(record), window)
        return self._answer(out, warnings)

    def workloads(self, request: Request) -> Response:
        namespace = request.query.get("namespace", "").strip()
        warnings: list[dict[str, str]] = []
        record = self._record(warnings)
        pods = [{"namespace": p["namespace"], "name": p["name"], "node": p.get("node"), "ip": p.get("ip"),
                 "running": p.get("running"), "waypoint": bool(p.get("waypoint"))}
                for p in (record.get("plan") or {}).get("pods", []) if not namespace or p["namespace"] == namespace]
        return self._answer({"namespace": namespace or None, "workloads": pods}, warnings)

    def workload(self, request: Request) -> Response:
        namespace, name = request.query.get("namespace", "").strip(), request.query.get("name", "").strip()
        if not namespace or not name:
            return json_error("give the workload: /api/workload?namespace=NS&name=NAME", 400)
        try:
            minutes = int(request.query.get("minutes", CHART_MINUTES))
        except ValueError:
            minutes = 0
        if not 1 <= minutes <= 24 * 60:
            return json_error("minutes: give a whole number of minutes from 1 to 1440", 400)
        warnings: list[dict[str, str]] = []
        record = self._record(warnings)
        try:
            resources = self.sources.resources()
            self.log.ok("controlplane")
        except SourceError as exc:
            self._failed(warnings, exc)
            resources = []
        view = workload.view(namespace, name, (record.get("plan") or {}).get("pods", []), resources)
        if view is None:
            if not record:
                return self._answer({"workload": None}, warnings)
            return json_error(f"no workload {namespace}/{name} in cluster {self.sources.cluster!r}", 404)
        end = self.clock()
        start = end - minutes * 60
        step = max(1.0, round(minutes * 60 / MAX_POINTS))
        answers: dict[tuple[str, str], list[Any]] = {}
        try:
            prom = self.sources.prometheus()
            for title, series, expr in workload.chart_queries(namespace, name):
                answers[(title, series)] = prom.query_range(expr, start, end, step)
            self.log.ok("prometheus")
        except SourceError as exc:
            self._failed(warnings, exc)
        view["charts"] = workload.charts(answers)
        view["range"] = {"start": start, "end": end, "step": step}
        return self._answer({"workload": view}, warnings)

    def _trace_source(self, warnings: list[dict[str, str]]) -> traces.TraceSource | None:
        if self.traces.note:
            warnings.append({"source": "traces", "message": self.traces.note})
        return self.traces.source

    def trace_list(self, request: Request) -> Response:
        service = request.query.get("service", "").strip()
        try:
            limit = max(1, min(traces.MAX_LIMIT, int(request.query.get("limit", traces.DEFAULT_LIMIT))))
        except ValueError:
            return json_error("limit: give a whole number of traces", 400)
        warnings: list[dict[str, str]] = []
        source = self._trace_source(warnings)
        found: list[dict[str, Any]] = []
        if source is not None:
            try:
                found = [traces.summary(tid, spans) for tid, spans in source.recent(service, limit)]
                self.log.ok("traces")
            except SourceError as exc:
                self._failed(warnings, exc)
        return self._answer({"service": service or None, "traces": found}, warnings)

    def trace(self, request: Request) -> Response:
        trace_id = request.query.get("id", "").strip()
        if not _TRACE_ID.match(trace_id):
            return json_error("give a trace id (hex): /api/trace?id=TRACE_ID", 400)
        trace_id = trace_id.lower().rjust(32, "0")
        warnings: list[dict[str, str]] = []
        source = self._trace_source(warnings)
        spans = []
        if source is not None:
            try:
                spans = source.trace(trace_id)
                self.log.ok("traces")
            except SourceError as exc:
                self._failed(warnings, exc)
                return self._answer({"trace": None}, warnings)
        if not spans:
            if warnings:
                return self._answer({"trace": None}, warnings)
            return json_error(f"no trace {trace_id} (the dashboard keeps the most recent traces only)", 404)
        return self._answer({"trace": traces.summary(trace_id, spans)}, warnings)

    def health(self, _: Request) -> Response:
        warnings: list[dict[str, str]] = []
        record = self._record(warnings)
        connections: Mapping[str, Any] | None = None
        try:
            connections = self.sources.connections()
            self.log.ok("controlplane")
        except SourceError as exc:
            self._failed(warnings, exc)
        up = None
        try:
            up = self.sources.prometheus().targets_up()
            self.log.ok("prometheus")
        except SourceError as exc:
            self._failed(warnings, exc)
        held, failed = self.sources.certificates(record) if record else ([], [])
        for error in failed:
            self._failed(warnings, error)
        now = datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)
        out = health.health(record, connections=connections, certs=held, up=up, now=now) if record else {}
        return self._answer({"health": out}, warnings)

