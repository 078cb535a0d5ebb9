"""The endpoints every process exposes, as handlers and as servers.

    metrics    GET /metrics (also /stats/prometheus)   Prometheus text of a `CollectorRegistry`
    readiness  GET /healthz/ready                      200 "ready", or 503 "not ready: <reason>"
    admin      GET /  (the list of endpoints)  GET /healthz (200 "ok")  + the process's own routes
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mesh import defaults
from mesh.serve.routes import Handler, Request, Response, Router
from mesh.serve.server import serve_http

METRICS_PATHS = ("/metrics", "/stats/prometheus")
READINESS_PATH = "/healthz/ready"


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
    return router


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
