"""A waypoint in several processes (`--workers N`): one port group, one waypoint to its operator.

One process is capped at one core, so a waypoint with N workers runs N whole data paths, as ztunnel and
Envoy run worker threads.  The first process (the primary) reads the options and starts N-1 workers, the
same program with the same arguments and a hidden `--worker-index`:

    primary (worker 0)                                 worker i (1..N-1), a child process
      its own data path (`waypoint.app.Waypoint`)        its own data path: certificate (the CA, same token),
      :15008 (or the Gateway's ports), SO_REUSEPORT       discovery stream, :15008 with SO_REUSEPORT,
      the operator's :15020 :15021 :15000  <── channel ── metrics/readiness/admin on 127.0.0.1:<any>
                                              (Unix socket pair: JSON lines, worker -> primary)

The kernel spreads new connections over the port group's listeners.  The channel carries the worker's
private ports (`{"ports": ...}`) and every change of its readiness (`{"ready": ..., "reason": ...}`); the
primary never writes to it, so its end closing is the worker's sign that the primary is gone: the worker
drains and exits (no orphan, whatever killed the primary).

What the operator sees is one waypoint:
  - readiness :15021 is ready when every worker is (each as a single waypoint is: certificate, first
    configuration), 503 naming the first worker that is not, and 503 from the start of the drain;
  - metrics :15020 are every worker's merged (`waypoint.merge`): the same names as one process has, plus
    `waypoint_worker_up`, `waypoint_worker_requests_total` and `waypoint_worker_restarts_total` by
    `worker` label, so that the spread is visible;
  - admin: `/workers` lists them (pid, ports, readiness, restarts); `/stats` adds the workers' numbers up;
    `/config_dump` and `/certs` are the primary's (every worker has the same configuration source and
    identity); `POST /logging` is applied by the primary and then by every worker.

Lifecycle: SIGTERM (or SIGINT) to the primary is passed to every worker, each drains as a single waypoint
does, and the primary exits 0 once its own drain is done and every worker has exited (a worker still there
`STOP_GRACE` seconds after the drain time is killed).  A worker that exits otherwise is logged and started
again, after `RESTART_BACKOFF` seconds, doubled for each exit in a row (back to the first wait once it had
run `STEADY_SECONDS`).  Each process's log lines carry its index in the logger name
(`waypoint.inbound[1]`); access log lines are written whole, one write each, on the stdout they share.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

from mesh import logs, runtime
from mesh.process import split_hostport
from mesh.serve.endpoints import LOGGING_PATH, METRICS_PATHS, Readiness, admin_handler, serve_readiness
from mesh.serve.routes import Request, Response, Router, plain
from mesh.serve.server import serve_http
from waypoint import merge
from waypoint.app import Waypoint
from waypoint.discovery import SUBSCRIPTIONS
from waypoint.options import Options

log = logging.getLogger("waypoint.workers")
T = TypeVar("T")

PRIVATE_LISTEN = "127.0.0.1:0"  # a worker's own metrics, readiness and admin: loopback, any port
RESTART_BACKOFF = (0.5, 10.0)  # seconds before a worker that exited is started again: first, longest
STEADY_SECONDS = 30.0  # a worker that ran this long is restarted after the first wait again
STOP_GRACE = 2.0  # seconds after the drain time before a worker that has not exited is killed
FETCH_TIMEOUT = 2.0  # seconds for the primary to read a worker's metrics, stats or logging answer
READINESS_EVERY = 0.1  # seconds between a worker's readiness checks (a change is sent at once)
REQUESTS_SAMPLE = "istio_requests_total"


# ---- the process ----------------------------------------------------------------------------------------


class _WorkerName(logging.Filter):
    """Every record's logger name with the process's worker index: `waypoint.inbound[1]`."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.suffix = f"[{index}]"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.suffix):
            record.name += self.suffix
        return True


def run(opts: Options, argv: Sequence[str]) -> int:
    """The primary (it starts the workers) or, with `opts.worker_index`, one worker; the exit status."""
    logging.getLogger("waypoint.access").propagate = False  # access lines go to stdout as bare JSON
    logs.configure(opts.log_level)  # `runtime.run` finds it done
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerName(opts.worker_index))
    if opts.worker_index:
        body = functools.partial(serve_worker, opts)
    else:
        body = functools.partial(serve_primary, opts, list(argv))
    return runtime.run(opts, body, log, f'{{"event": "stopping", "waypoint": "{opts.key}", '
                                        f'"worker": {opts.worker_index}}}')


# ---- a worker -------------------------------------------------------------------------------------------


async def serve_worker(opts: Options, stop: trio.Event) -> None:
    """One worker's data path, reporting to the primary on its channel, until `stop` (SIGTERM) or the
    primary is gone; then the drain, as a single waypoint's."""
    channel = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=opts.worker_channel)))
    async with channel, runtime.open_certificates(opts, impersonate=False) as certs:
        waypoint = Waypoint(opts, certs)
        async with (runtime.open_discovery(opts, opts.node_info(), SUBSCRIPTIONS, waypoint.config.handle) as xds,
                    trio.open_nursery() as nursery):
            async def data_path(task_status: trio.TaskStatus[dict[str, int]]) -> None:
                await waypoint.run(xds, stop, task_status=task_status)
                nursery.cancel_scope.cancel()

            ports = await nursery.start(data_path)
            await _send(channel, {"ports": ports}, stop)
            nursery.start_soon(_report_readiness, waypoint, channel, stop)
            nursery.start_soon(_watch_primary, channel, stop)


async def _send(channel: trio.SocketStream, message: dict[str, Any], stop: trio.Event) -> None:
    try:
        await channel.send_all(json.dumps(message, separators=(",", ":")).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        _primary_gone(stop)


async def _report_readiness(waypoint: Waypoint, channel: trio.SocketStream, stop: trio.Event) -> None:
    last: tuple[bool, str] | None = None
    while True:
        ready = waypoint.readiness()
        if (ready.ready, ready.reason) != last:
            last = (ready.ready, ready.reason)
            await _send(channel, {"ready": ready.ready, "reason": ready.reason}, stop)
        await trio.sleep(READINESS_EVERY)


async def _watch_primary(channel: trio.SocketStream, stop: trio.Event) -> None:
    try:
        while await channel.receive_some(1024):
            pass  # the primary writes nothing; only its end closing matters
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    _primary_gone(stop)


def _primary_gone(stop: trio.Event) -> None:
    if not stop.is_set():
        log.warning('{"event": "primary gone", "action": "draining"}')
        stop.set()


# ---- the primary ----------------------------------------------------------------------------------------


@dataclass
class Worker:
    """A worker process as the primary knows it."""

    index: int
    pid: int = 0
    ports: dict[str, int] = field(default_factory=dict)  # its private endpoints and data path ports
    ready: bool = False
    reason: str = "starting"
    restarts: int = 0
    running: bool = False

    def view(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid, "running": self.running, "ready": self.ready,
                "reason": self.reason, "restarts": self.restarts, "ports": dict(self.ports)}

    def heard(self, line: bytes) -> None:
        """One line from the worker's channel."""
        try:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("not a JSON object")
            if "ports" in message:
                self.ports = {str(k): int(v) for k, v in message["ports"].items()}
            if "ready" in message:
                self.ready, self.reason = bool(message["ready"]), str(message.get("reason", ""))
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("worker %d sent a line that is not a report (%s): %r", self.index, exc, line[:200])


def worker_argv(argv: Sequence[str], index: int, channel: int, listen: str | None) -> list[str]:
    """The command line of worker `index`: the primary's, its endpoints made private, its HBONE port the
    one the primary bound (`listen`: the same even when the primary was given port 0)."""
    own = ["--worker-index", str(index), "--worker-channel", str(channel), "--metrics-listen", PRIVATE_LISTEN,
           "--ready-listen", PRIVATE_LISTEN, "--admin-listen", PRIVATE_LISTEN]
    return [sys.executable, "-m", "waypoint.main", *argv, *own, *(["--listen", listen] if listen else [])]


class Workers:
    """The primary's workers 1..N-1: started, watched, restarted, stopped with it."""

    def __init__(self, opts: Options, argv: Sequence[str], listen: str | None) -> None:
        self.opts = opts
        self.argv = list(argv)
        self.listen = listen
        self.workers = [Worker(i) for i in range(1, opts.workers)]

    async def run(self, stop: trio.Event) -> None:
        """Every worker, kept running until `stop`; returns once all have exited."""
        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                nursery.start_soon(self._keep, worker, stop)

    async def _keep(self, worker: Worker, stop: trio.Event) -> None:
        delay = RESTART_BACKOFF[0]
        while not stop.is_set():
            began = trio.current_time()
            try:
                status = await self._run_once(worker, stop)
            except OSError as exc:  # could not even start it (no memory, no processes left): try again later
                log.error("worker %d could not be started: %s", worker.index, exc)
                status = -1
            if stop.is_set():
                log.info('{"event": "worker stopped", "worker": %d, "pid": %d, "status": %d}', worker.index,
                         worker.pid, status)
                return
            if trio.current_time() - began >= STEADY_SECONDS:
                delay = RESTART_BACKOFF[0]
            log.warning('{"event": "worker exited", "worker": %d, "pid": %d, "status": %d, "restart_in": %.1f}',
                        worker.index, worker.pid, status, delay)
            with trio.move_on_after(delay):
                await stop.wait()
            delay = min(delay * 2, RESTART_BACKOFF[1])
            if not stop.is_set():
                worker.restarts += 1

    async def _run_once(self, worker: Worker, stop: trio.Event) -> int:
        ours, theirs = socket.socketpair()
        try:
            proc = await trio.lowlevel.open_process(
                worker_argv(self.argv, worker.index, theirs.fileno(), self.listen),
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker.pid, worker.ports, worker.ready, worker.reason, worker.running = proc.pid, {}, False, "starting", True
        log.info('{"event": "worker started", "worker": %d, "pid": %d}', worker.index, proc.pid)
        channel = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._hear, worker, channel)
                nursery.start_soon(self._stop_with, proc, stop)
                await proc.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:  # the primary itself is cancelled: no worker outlives it
                    proc.kill()
                    await proc.wait()
                await channel.aclose()
            worker.running, worker.ready, worker.reason = False, False, "exited"
        return proc.returncode if proc.returncode is not None else -1

    async def _hear(self, worker: Worker, channel: trio.SocketStream) -> None:
        buffered = b""
        try:
            while data := await channel.receive_some(65536):
                buffered += data
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    worker.heard(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _stop_with(self, proc: trio.Process, stop: trio.Event) -> None:
        await stop.wait()
        proc.send_signal(signal.SIGTERM)  # it drains as a single waypoint does
        await trio.sleep(self.opts.drain_seconds + STOP_GRACE)
        log.warning('{"event": "worker killed", "pid": %d, "reason": "still running after the drain"}', proc.pid)
        proc.kill()


def _on_loop(fn: Callable[[], T]) -> T:
    """`fn()` on the event loop when called from one of its worker threads (the endpoints' handlers run in
    threads: the primary's own data path is read where it runs), else here."""
    try:
        return trio.from_thread.run_sync(fn)
    except RuntimeError:  # not a thread trio started (a direct call)
        return fn()


def _fetch(port: int, path: str, *, method: str = "GET") -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as answer:  # noqa: S310 - loopback, http only
        body: bytes = answer.read()
        return body


class Primary:
    """The operator's endpoints of a waypoint with workers: see the module docstring."""

    def __init__(self, waypoint: Waypoint, workers: Workers, stop: trio.Event,
                 fetch: Callable[..., bytes] = _fetch) -> None:
        self.waypoint = waypoint
        self.workers = workers
        self.stop = stop
        self.fetch = fetch
        self._admin = admin_handler(f"waypoint admin of {waypoint.opts.key} ({workers.opts.workers} workers)", {
            "/config_dump": lambda _: Response.json({**_on_loop(waypoint.config_dump), "workers": self.view()}),
            "/certs": lambda _: Response.json({"certificates": [plain(c) for c in _on_loop(waypoint.certs.status)]}),
            "/stats": lambda _: Response.json(self.stats()),
            "/workers": lambda _: Response.json({"workers": self.view()}),
        })

    def view(self) -> list[dict[str, Any]]:
        ready = _on_loop(self.waypoint.readiness)
        own = {"index": 0, "pid": os.getpid(), "running": True, "ready": ready.ready, "reason": ready.reason,
               "restarts": 0, "ports": dict(self.waypoint.ports)}
        return [own, *(w.view() for w in self.workers.workers)]

    # ---- readiness ----------------------------------------------------------------------------------

    def readiness(self) -> Readiness:
        if self.stop.is_set():
            return Readiness(False, "draining")
        own = self.waypoint.readiness()
        if not own.ready:
            return Readiness(False, f"worker 0 {own.reason}")
        for worker in self.workers.workers:
            if not worker.ready:
                return Readiness(False, f"worker {worker.index} {worker.reason or 'not ready'}")
        return Readiness(True)

    # ---- metrics ------------------------------------------------------------------------------------

    def metrics(self, _: Request) -> Response:
        own = _on_loop(lambda: generate_latest(self.waypoint.registry))
        parsed: list[tuple[str, list[Metric]]] = [("0", merge.parse("worker 0", own.decode()))]
        up = {"0": 1.0}
        for worker in self.workers.workers:
            index = str(worker.index)
            up[index] = 0.0
            port = worker.ports.get("metrics")
            if not worker.running or not port:
                continue
            try:
                text = self.fetch(port, METRICS_PATHS[0]).decode("utf-8", "replace")
                parsed.append((index, merge.parse(f"worker {index}", text)))
                up[index] = 1.0
            except (OSError, merge.MergeError) as exc:
                log.warning("metrics of worker %s left out: %s", index, exc)
        merged = merge.merge(parsed)
        for error in merged.errors:
            log.warning("%s", error)
        extra = [
            merge.per_source("waypoint_worker_up", "1 when the worker's metrics were read in this scrape", "gauge",
                             "worker", up),
            merge.per_source("waypoint_worker_requests", "Requests each worker has served (istio_requests_total)",
                             "counter", "worker", {s: merge.total(f, REQUESTS_SAMPLE) for s, f in parsed}),
            merge.per_source("waypoint_worker_restarts", "Times the worker was started again after it exited",
                             "counter", "worker", {"0": 0.0, **{str(w.index): float(w.restarts)
                                                               for w in self.workers.workers}}),
        ]
        return Response(200, merged.text(extra), CONTENT_TYPE_LATEST)

    # ---- admin --------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The workers' `/stats` added up (numbers summed, flags true if any is), and each one's."""
        each: list[dict[str, Any]] = [{"worker": 0, **_on_loop(self.waypoint.stats)}]
        for worker in self.workers.workers:
            port = worker.ports.get("admin")
            if not worker.running or not port:
                each.append({"worker": worker.index, "error": "not running"})
                continue
            try:
                each.append({"worker": worker.index, **json.loads(self.fetch(port, "/stats"))})
            except (OSError, ValueError) as exc:
                each.append({"worker": worker.index, "error": str(exc)})
        total: dict[str, Any] = {}
        for stats in each:
            for key, value in stats.items():
                if key == "worker" or key == "error":
                    continue
                if isinstance(value, bool):
                    total[key] = total.get(key, False) or value
                elif isinstance(value, (int, float)):
                    total[key] = total.get(key, 0) + value
        return {**total, "workers": each}

    def admin(self, request: Request) -> Response:
        answer = self._admin(request)
        if request.path == LOGGING_PATH and request.method == "POST" and answer.status == 200:
            query = urllib.parse.urlencode(request.query)
            for worker in self.workers.workers:  # the same change in every worker
                port = worker.ports.get("admin")
                if not worker.running or not port:
                    continue
                try:
                    self.fetch(port, f"{LOGGING_PATH}?{query}", method="POST")
                except (OSError, urllib.error.HTTPError) as exc:
                    log.warning("log levels not changed in worker %d: %s", worker.index, exc)
        return answer

    def router(self) -> Router:
        return Router({path: self.metrics for path in METRICS_PATHS})


async def serve_primary(opts: Options, argv: Sequence[str], stop: trio.Event) -> None:
    """The primary: its own data path (worker 0), the workers, and the operator's endpoints, until `stop`
    and every worker's drain."""
    private = dataclasses.replace(opts, metrics_listen=PRIVATE_LISTEN, ready_listen=PRIVATE_LISTEN,
                                  admin_listen=PRIVATE_LISTEN)
    async with runtime.open_certificates(private, impersonate=False) as certs:
        waypoint = Waypoint(private, certs)
        async with (runtime.open_discovery(private, private.node_info(), SUBSCRIPTIONS, waypoint.config.handle) as xds,
                    trio.open_nursery() as endpoints):
            async with trio.open_nursery() as data_path:
                own = await data_path.start(functools.partial(waypoint.run, xds, stop))
                listen = None
                if not opts.ingress:
                    host, _ = split_hostport(opts.listen)
                    listen = f"[{host}]:{own['hbone']}" if ":" in host else f"{host}:{own['hbone']}"
                workers = Workers(opts, argv, listen)
                primary = Primary(waypoint, workers, stop)
                ports = await _serve_endpoints(endpoints, opts, primary)
                log.info('{"event": "workers", "waypoint": "%s", "workers": %d, "metrics": %d, "ready": %d, '
                         '"admin": %d}', opts.key, opts.workers, ports["metrics"], ports["ready"], ports["admin"])
                data_path.start_soon(workers.run, stop)
            endpoints.cancel_scope.cancel()  # drained, every worker gone: the endpoints close last


async def _serve_endpoints(nursery: trio.Nursery, opts: Options, primary: Primary) -> dict[str, int]:
    ports: dict[str, int] = {}
    host, port = split_hostport(opts.metrics_listen)
    # reading the workers' metrics and stats blocks: off the event loop, as the admin's answers are
    ports["metrics"] = await nursery.start(functools.partial(serve_http, primary.router(), host, port,
                                                             name="metrics", in_thread=True))
    host, port = split_hostport(opts.ready_listen)
    ports["ready"] = await nursery.start(functools.partial(serve_readiness, primary.readiness, host=host, port=port))
    host, port = split_hostport(opts.admin_listen)
    ports["admin"] = await nursery.start(functools.partial(serve_http, primary.admin, host, port, name="admin",
                                                           in_thread=True))
    return ports
