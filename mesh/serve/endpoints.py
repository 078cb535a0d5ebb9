"""The endpoints every process exposes, as handlers and as servers.

    metrics    GET /metrics (also /stats/prometheus)   Prometheus text of a `CollectorRegistry`
    readiness  GET /healthz/ready                      200 "ready", or 503 "not ready: <reason>"
    admin      GET /  (the list of endpoints)  GET /healthz (200 "ok")  + the process's own routes
               GET /logging (the log levels)  POST /logging?level=SPEC | ?reset  (as ztunnel's; `mesh.logs`)
    version    GET /version: what this process runs (the mesh's version, Python's, its pid and start time);
               on every admin endpoint and the control plane's debug socket (`meshctl version`)
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mesh import defaults, logs
from mesh.serve.routes import Handler, Request, Response, Router
from mesh.serve.server import serve_http

METRICS_PATHS = ("/metrics", "/stats/prometheus")
READINESS_PATH = "/healthz/ready"
LOGGING_PATH = "/logging"
VERSION_PATH = "/version"
DISTRIBUTION = "ambient-mesh"  # the project's package name (pyproject.toml)
STARTED = time.time()  # when this module was first imported: at the process's start, for every component
log = logging.getLogger("mesh.logs")


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str = ""

    @classmethod
    def from_checks(cls, checks: Mapping[str, bool]) -> Readiness:
        """Ready when every check passes; otherwise the reason names those that do not."""
        failing = [name for name, ok in checks.items() if not ok]
        return cls(True) if not failing else cls(False, "waiting for " + ", ".join(failing))


def metrics_handler(registry: CollectorRegistry) -> Router:
    def metrics(_: Request) -> Response:
        return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    return Router({path: metrics for path in METRICS_PATHS})


def readiness_handler(ready: Callable[[], Readiness]) -> Router:
    def readiness(_: Request) -> Response:
        try:
            r = ready()
        except Exception as exc:  # a failing check means "not ready", not a server error
            r = Readiness(False, f"readiness check failed: {type(exc).__name__}: {exc}")
        return Response.text("ready") if r.ready else Response.text(f"not ready: {r.reason or 'starting'}", 503)

    return Router({READINESS_PATH: readiness})


def admin_handler(title: str, routes: Mapping[str, Handler]) -> Router:
    """An admin endpoint: `/` lists the endpoints under `title`, `/healthz` answers "ok", then `routes`."""
    router = Router()
    router.add("/", lambda _: Response.text(title + "\n" + "\n".join(router.paths)))
    router.add("/healthz", lambda _: Response.text("ok"))
    for path, handler in routes.items():
        router.add(path, handler)
    router.add(LOGGING_PATH, log_levels, methods=("GET", "POST"))
    router.include(version_handler())
    return router


def mesh_version() -> str:
    # Imported when asked: `importlib.metadata` (email parsing, zip paths) is ~0.8 MiB of every
    # process's memory, for a figure asked once.
    import importlib.metadata

    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def version_info() -> dict[str, object]:
    started = datetime.datetime.fromtimestamp(STARTED, datetime.UTC)
    return {"version": mesh_version(), "python": platform.python_version(), "pid": os.getpid(),
            "started": started.isoformat(timespec="seconds")}


def version_handler() -> Router:
    return Router({VERSION_PATH: lambda _: Response.json(version_info())})


def log_levels(request: Request) -> Response:
    """GET: the levels; POST `?level=SPEC` (`mesh.logs.parse_levels`) or `?reset`: change them, then the
    levels.  Only from the process's own host (the admin listens on loopback; this refuses anything else)."""
    if request.method == "POST":
        if not request.local:
            return Response.text("log levels are changed only from the loopback address", 403)
        if "reset" in request.query:
            logs.reset_levels()
        elif "level" in request.query:
            try:
                logs.apply_levels(logs.parse_levels(request.query["level"]))
            except logs.LogLevelError as exc:
                return Response.text(str(exc), 400)
        else:
            return Response.text("say what to change: POST /logging?level=debug (or info,LOGGER=debug), or "
                                 "/logging?reset", 400)
        log.info('{"event": "log levels changed", "levels": %s}', json.dumps(logs.current_levels()))
    return Response.json({"levels": logs.current_levels()})


async def serve_metrics(
    registry: CollectorRegistry,
    *,
    host: str = "0.0.0.0",
    port: int = defaults.METRICS_PORT,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_http(metrics_handler(registry), host, port, name="metrics", reuse_port=reuse_port,
                     task_status=task_status)


async def serve_readiness(
    ready: Callable[[], Readiness],
    *,
    host: str = "0.0.0.0",
    port: int = defaults.READINESS_PORT,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_http(readiness_handler(ready), host, port, name="readiness", reuse_port=reuse_port,
                     task_status=task_status)
