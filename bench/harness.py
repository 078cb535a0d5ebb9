"""The run: build the bench cluster, alternate the modes in rounds, measure each phase, always clean up.

One run = `rounds` rounds; each round takes every mode once in the same order (a, b, ... f), so slow drift
of the machine (thermal, other tenants, page cache) touches every mode alike.  For each mode and round:

1. `enter` reconfigures the same cluster (labels, waypoint, sidecars and their iptables);
2. the mode's processes' memory once its capture is in place, before any load (`fresh_rss`); the first
   connection (what pre-warm saves), then a probe of 200 requests proves the path: the mode's proxies must
   have counted them;
3. the load phases, each with the CPU seconds of the mesh's processes (and of the server and the
   client) measured around it from /proc:
   - open:       the fixed rate (1,000 req/s over 16 connections, open loop, our generator);
   - closed:     one connection, closed loop (our generator): the pure added latency of each hop;
   - crosscheck: (no mesh only) the same with wrk, to show our generator agrees with a known one;
   - saturation: wrk with 64 connections, closed loop: requests per second;
   - stream:     one TCP stream of `stream_bytes` to the server's sink: MB/s;
   - newconn<R>: a new TCP connection for every request, R a second (open loop, `bench/newconn_bench.py`);
   - scale:      (b, e) `scale_tunnels` idle tunnels held at once: the agents' memory and CPU around them
                 (`bench/scale.py`);
4. the peak RSS of each mesh process, and `leave`.

The client side runs inside the client pod's network namespace, pinned to one CPU (`client_cpu`).
A mode that cannot run is recorded as "unavailable: <reason>" once and skipped in later rounds.
The cluster is removed in a `finally`, and SIGTERM is turned into an exception so it gets there too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import scale
from bench.modes import DEFAULT_MODES, MODES, Context, Mode, PathError, Unavailable, prewarms
from bench.netio import Proc, peak_rss_kib, rss_kib, tree_cpu_seconds
from bench.sidecar import Route, SidecarPair, SidecarPod
from localcluster import lifecycle, spec, state
from mesh import cgroup as mcgroup
from mesh import defaults
from mesh.identity import SpiffeId

BENCH_DIR = Path(__file__).resolve().parent
CLUSTER_FILE = BENCH_DIR / "cluster.yaml"
RESULTS_DIR = BENCH_DIR / "results"
NAMESPACE = "bench"
HTTP_SERVICE_PORT = 80
SINK_SERVICE_PORT = 9000
SCALE_SERVICE_PORTS = (81, 82, 83)  # the server's other HTTP ports: the scale phase's tunnels go to these and 80
PROBE_REQUESTS = 200
PHASE_TIMEOUT_SLACK = 60.0
NEWCONN = "newconn"  # the new-connection phases: "newconn<rate>"
SCALE_MODES = ("b", "e")  # the modes with a scale phase: the node agents' memory per idle tunnel
FIRST_CONNECTION_SETTLE = 1.0  # seconds between a mode's capture being in place and its first connection
CLIENT_POD = f"{NAMESPACE}/client"  # the pod whose pre-warm the first connection waits for
PREWARM_WAIT = 15.0  # at most this long for the client's node agent to report its pre-warm (modes b, e)
FRESH_RSS_SETTLE = 0.5  # seconds between readings of the mode's processes' memory before any load
FRESH_RSS_STEADY_KIB = 256  # ... until none moved by more than this between two readings


class BenchError(Exception):
    pass


class Interrupted(BaseException):
    """SIGTERM or SIGINT: stop measuring and clean up."""


@dataclass(frozen=True)
class Settings:
    modes: tuple[str, ...] = DEFAULT_MODES
    rounds: int = 3
    duration: float = 30.0  # seconds of each load phase (open, closed, saturation)
    rate: float = 1000.0
    connections: int = 16
    saturation_connections: int = 64
    stream_bytes: int = 256 << 20
    newconn_rates: tuple[float, ...] = (200.0, 1000.0)  # new connections per second, a phase each
    newconn_duration: float = 10.0  # seconds of each new-connection phase (at most `duration`)
    scale_tunnels: int = 10000  # idle tunnels held in the scale phase (0: no scale phase)
    scale_rate: float = 1000.0  # tunnels opened per second in the scale phase
    client_cpu: int = -1  # the CPU the client side is pinned to; -1 = the last one
    loadgen_processes: int = 1
    envoy_concurrency: int = 2
    waypoint_workers: int = 0  # mode c's waypoint --workers (0: the local cluster's default, 1)
    waypoint_engine: str = ""  # mode c's waypoint --engine ("": the waypoint's default, uvloop)
    cluster_file: Path = CLUSTER_FILE
    cluster_name: str | None = None  # default: the name in the cluster file
    output_dir: Path = RESULTS_DIR

    @classmethod
    def quick(cls, **overrides: Any) -> Settings:
        base = cls(rounds=1, duration=5.0, stream_bytes=16 << 20, newconn_rates=(200.0,), scale_tunnels=2000)
        return dataclasses.replace(base, **overrides)

    def pinned_cpu(self) -> int:
        n = os.cpu_count() or 1
        return n - 1 if self.client_cpu < 0 else min(self.client_cpu, n - 1)

    def phases(self, mode: str) -> list[str]:
        out = ["open", "closed"]
        if mode == "a":
            out.append("crosscheck")
        out += ["saturation", "stream", *(newconn_phase(r) for r in self.newconn_rates)]
        if mode in SCALE_MODES and self.scale_tunnels:
            out.append("scale")
        return out

    def phase_seconds(self, phase: str) -> float:
        if phase == "crosscheck":
            return min(self.duration, 5.0)
        if phase == "stream":
            return max(1.0, self.stream_bytes / 200e6)
        if phase.startswith(NEWCONN):
            return min(self.duration, self.newconn_duration)
        if phase == "scale":
            return self.scale_tunnels / self.scale_rate + 2 * scale.SETTLE
        return self.duration


def newconn_phase(rate: float) -> str:
    """The name of the new-connection phase at `rate` connections per second ("newconn200")."""
    return f"{NEWCONN}{rate:g}"


def newconn_rate(phase: str) -> float:
    return float(phase[len(NEWCONN):])


# -- progress -----------------------------------------------------------------------------------------

class Progress:
    """Prints what is running and an estimate of the time left (planned phases + observed overheads)."""

    def __init__(self, settings: Settings, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.say = say
        self.start = time.monotonic()
        self.overhead = 10.0  # seconds per mode switch, corrected as switches are observed
        self.switches = 0
        self.skipped: set[str] = set()

    def remaining(self, round_no: int, mode_index: int, phase_index: int) -> float:
        s = self.settings
        left = 0.0
        for r in range(round_no, s.rounds + 1):
            for i, m in enumerate(s.modes):
                if m in self.skipped or (r == round_no and i < mode_index):
                    continue
                phases = s.phases(m)
                first = phase_index if (r == round_no and i == mode_index) else 0
                left += sum(s.phase_seconds(p) for p in phases[first:])
                if first == 0:
                    left += self.overhead
        return left

    def observed_switch(self, seconds: float) -> None:
        self.switches += 1
        self.overhead += (seconds - self.overhead) / self.switches

    def phase(self, round_no: int, mode: Mode, mode_index: int, phase: str, phase_index: int) -> None:
        left = self.remaining(round_no, mode_index, phase_index)
        self.say(f"[round {round_no}/{self.settings.rounds}] mode {mode.key} ({mode.title}): {phase} "
                 f"{self.settings.phase_seconds(phase):.0f}s | elapsed {_mmss(time.monotonic() - self.start)}, "
                 f"about {_mmss(left)} left")


def _mmss(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


# -- the client side --------------------------------------------------------------------------------

def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_client(ctx: Context, settings: Settings, argv: list[str], timeout: float) -> tuple[str, float, int]:
    """Run a client command in the client pod, pinned; (stdout, its CPU seconds, exit status)."""
    cmd = ["ip", "netns", "exec", ctx.client_netns, "taskset", "-c", str(settings.pinned_cpu()), *argv]
    cpu0 = _children_cpu()
    # In the client pod's cgroup too, as the pod's own processes: eBPF capture (mode e) is per cgroup.
    group = Path(ctx.client_cgroup) if ctx.client_cgroup else None
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=BENCH_DIR.parent,
                         preexec_fn=(lambda: mcgroup.join_self(group)) if group else None)
    return out.stdout + (out.stderr if out.returncode else ""), _children_cpu() - cpu0, out.returncode


def client_process(ctx: Context, settings: Settings, argv: list[str]) -> subprocess.Popen[str]:
    """Start a client command in the client pod as `run_client` runs one, with pipes to talk to it."""
    cmd = ["ip", "netns", "exec", ctx.client_netns, "taskset", "-c", str(settings.pinned_cpu()), *argv]
    group = Path(ctx.client_cgroup) if ctx.client_cgroup else None
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=BENCH_DIR.parent,
                            preexec_fn=(lambda: mcgroup.join_self(group)) if group else None)


def _json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            data: dict[str, Any] = json.loads(line)
            return data
    raise BenchError(f"no result from the client: {text.strip()[-300:]}")


def parse_wrk(text: str) -> dict[str, Any]:
    """wrk's summary: requests/s, request count, latency percentiles (with --latency), errors."""
    out: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise BenchError(f"wrk printed no result: {text.strip()[-300:]}")
    out["requests_per_s"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if m:
        out["requests"] = int(m.group(1))
    errors: dict[str, int] = {}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        for name, value in zip(("connect", "read", "write", "timeout"), m.groups(), strict=True):
            if int(value):
                errors[f"socket {name}"] = int(value)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errors["non-2xx"] = int(m.group(1))
    out["errors"] = errors
    out["error_count"] = sum(errors.values())
    lat = {}
    for pct, value, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        lat[f"p{pct}"] = round(float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit], 1)
    if lat:
        out["latency_us"] = lat
    return out


def run_phase(ctx: Context, settings: Settings, phase: str, target_http: str, target_sink: str) -> dict[str, Any]:
    py = [sys.executable, "-m"]
    secs = settings.phase_seconds(phase)
    timeout = secs + PHASE_TIMEOUT_SLACK
    if phase == "open":
        argv = [*py, "bench.loadgen", "--target", target_http, "--rate", f"{settings.rate:g}",
                "--connections", str(settings.connections), "--duration", f"{secs:g}",
                "--processes", str(settings.loadgen_processes)]
    elif phase == "closed":
        argv = [*py, "bench.loadgen", "--target", target_http, "--closed", "--connections", "1",
                "--duration", f"{secs:g}"]
    elif phase == "crosscheck":
        argv = ["wrk", "-t1", "-c1", f"-d{max(1, round(secs))}s", "--latency", f"http://{target_http}/"]
    elif phase == "saturation":
        argv = ["wrk", "-t1", f"-c{settings.saturation_connections}", f"-d{max(1, round(secs))}s",
                f"http://{target_http}/"]
    elif phase == "stream":
        argv = [*py, "bench.stream", "--target", target_sink, "--bytes", str(settings.stream_bytes)]
    elif phase.startswith(NEWCONN):
        argv = [*py, "bench.newconn_bench", "--target", target_http, "--rate", f"{newconn_rate(phase):g}",
                "--duration", f"{secs:g}"]
    elif phase == "first":
        argv = [*py, "bench.newconn_bench", "--target", target_http, "--first", "--timeout", "10"]
    else:
        raise BenchError(f"unknown phase {phase}")
    text, client_cpu, code = run_client(ctx, settings, argv, timeout)
    try:
        result = parse_wrk(text) if argv[0] == "wrk" else _json_line(text)
    except (BenchError, ValueError) as exc:
        return {"error_count": 1, "errors": {"client": str(exc)}, "client_cpu_seconds": round(client_cpu, 3)}
    if "fatal" in result:
        return {"error_count": 1, "errors": {"client": result["fatal"]}, "client_cpu_seconds": round(client_cpu, 3)}
    if "error" in result:  # the stream sender
        result = {"error_count": 1, "errors": {"stream": result["error"]}}
    result.setdefault("error_count", 0)
    result["client_cpu_seconds"] = round(client_cpu, 3)
    if code != 0 and not result["error_count"]:
        result["error_count"] = 1
        result.setdefault("errors", {})["client"] = f"exited {code}"
    return result


# -- one run ----------------------------------------------------------------------------------------

def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Run:
    settings: Settings
    say: Callable[[str], None] = say
    results: dict[str, Any] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def execute(self) -> dict[str, Any]:
        s = self.settings
        cluster_spec = spec.load(s.cluster_file)
        if s.cluster_name:
            cluster_spec = dataclasses.replace(cluster_spec, name=s.cluster_name)
        name = cluster_spec.name
        started = datetime.now(UTC)
        self.results = {"meta": _meta(s, name, started), "modes": {}, "rounds": []}
        owner = os.getpid()
        ctx: Context | None = None
        with _signals_raise(owner):
            try:
                self.say(f"building the bench cluster {name!r} from {s.cluster_file}")
                cluster = lifecycle.up(cluster_spec, say=self.say)
                ctx = _context(cluster, s)
                self._rounds(ctx)
            except Interrupted:
                self.say("interrupted: removing the bench cluster")
                self.results["meta"]["interrupted"] = True
                raise
            finally:
                # Only here: a library may fork this process without exec (pyroute2 does, for
                # namespaces), and an exception unwinding the copy of this stack in such a child must
                # not tear down the cluster the parent is still using.
                if os.getpid() == owner:
                    self._clean_up(name, ctx)
        (s.output_dir / ".partial.json").unlink(missing_ok=True)
        self.results["meta"]["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.results["meta"]["seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
        for key in s.modes:
            mode = MODES[key]
            status = f"unavailable: {self.unavailable[key]}" if key in self.unavailable else "ok"
            rounds = [r for r in self.results["rounds"] if r["mode"] == key]
            if status == "ok" and any(r["error_count"] for r in rounds):
                status = "errors"
            self.results["modes"][key] = {"title": mode.title, "status": status}
        return self.results

    def _clean_up(self, name: str, ctx: Context | None) -> None:
        _ignore_signals()  # a second Ctrl-C must not cut the clean-up short
        try:
            if ctx is not None:
                ctx.sidecars.stop()
        except Exception as exc:  # noqa: BLE001 - the cluster goes whatever failed before
            self.say(f"warning: stopping the sidecars: {exc}")
        removed = lifecycle.down(name)
        self.say(f"bench cluster {name!r} removed ({', '.join(removed) or 'nothing left'})")

    def _rounds(self, ctx: Context) -> None:
        s = self.settings
        progress = Progress(s, self.say)
        target_http = f"{ctx.service_ip}:{HTTP_SERVICE_PORT}"
        target_sink = f"{ctx.service_ip}:{SINK_SERVICE_PORT}"
        for round_no in range(1, s.rounds + 1):
            for mode_index, key in enumerate(s.modes):
                mode = MODES[key]
                if key in self.unavailable:
                    continue
                t_switch = time.monotonic()
                record: dict[str, Any] = {"round": round_no, "mode": key, "phases": {}, "errors": [],
                                          "error_count": 0}
                warmed_before = len(prewarms(self._prewarm_log(ctx), CLIENT_POD)) if ctx.logs_dir else 0
                try:
                    mode.enter(ctx)
                    prewarm = self._await_prewarm(ctx, mode, warmed_before)
                    record["rss_fresh_kib"] = fresh_rss(mode, ctx)
                    record["path"] = self._prove(ctx, mode, target_http)
                except Unavailable as exc:
                    if any(r["mode"] == key for r in self.results["rounds"]):
                        # It ran in an earlier round: now failing is an error of this round, not a
                        # property of the machine, and must not hide the rounds already measured.
                        record["errors"].append(f"path: {exc}")
                        record["error_count"] += 1
                        self.say(f"[round {round_no}] mode {key}: {exc}")
                        _safe_leave(mode, ctx, self.say)
                        self.results["rounds"].append(record)
                        continue
                    self.unavailable[key] = str(exc)
                    progress.skipped.add(key)
                    self.say(f"[round {round_no}] mode {key} ({mode.title}) unavailable: {exc}")
                    _safe_leave(mode, ctx, self.say)
                    continue
                except PathError as exc:
                    record["errors"].append(f"path: {exc}")
                    record["error_count"] += 1
                    self.say(f"[round {round_no}] mode {key}: {exc}")
                    _safe_leave(mode, ctx, self.say)
                    self.results["rounds"].append(record)
                    continue
                progress.observed_switch(time.monotonic() - t_switch)
                record["first_connection"] = {**self._first_connection(ctx, mode, target_http), **prewarm}
                procs = mode.procs(ctx)
                record["processes"] = {p.role: p.pid for p in procs}
                for phase_index, phase in enumerate(s.phases(key)):
                    progress.phase(round_no, mode, mode_index, phase, phase_index)
                    record["phases"][phase] = self._measured(ctx, s, phase, procs, target_http, target_sink)
                    record["error_count"] += record["phases"][phase].get("error_count", 0)
                record["peak_rss_kib"] = {p.role: peak_rss_kib(p.pid) for p in procs if p.alive()}
                dead = [p.role for p in procs if not p.alive()]
                if dead:
                    record["errors"].append(f"exited during the round: {', '.join(dead)}")
                    record["error_count"] += 1
                _safe_leave(mode, ctx, self.say)
                self.results["rounds"].append(record)
                self._checkpoint()

    def _prove(self, ctx: Context, mode: Mode, target_http: str) -> str:
        """A short probe through the mode's path; its proxies must count it.  Modes that need time to take
        effect (a label the agents act on) get a few tries."""
        deadline = time.monotonic() + 20.0
        while True:
            before = mode.counters(ctx)
            text, _, _ = run_client(ctx, self.settings, [sys.executable, "-m", "bench.loadgen", "--target",
                                                         target_http, "--rate", "2000", "--connections", "4",
                                                         "--duration", f"{PROBE_REQUESTS / 2000:g}"], 30)
            try:
                probe = _json_line(text)
            except (BenchError, ValueError):
                probe = {"completed": 0, "errors": {"client": text.strip()[-200:]}}
            after = mode.counters(ctx)
            try:
                if probe.get("completed", 0) < PROBE_REQUESTS:
                    raise PathError(f"the probe completed {probe.get('completed', 0)} of {PROBE_REQUESTS} requests "
                                    f"({probe.get('errors') or probe.get('fatal')})")
                return mode.check_path(ctx, before, after, PROBE_REQUESTS)
            except PathError as exc:
                if time.monotonic() > deadline:
                    if mode.key in ("b", "c", "e"):
                        raise Unavailable(str(exc)) from exc
                    raise
                time.sleep(1.0)

    def _await_prewarm(self, ctx: Context, mode: Mode, warmed_before: int) -> dict[str, Any]:
        """In modes b and e, the client's node agent pre-warms its pooled connections once it has enrolled
        the pod.  Nothing is sent (the fresh RSS, the path's probe, the first connection) before it reports
        that (at most `PREWARM_WAIT`; a loaded machine takes longer), so that the probe does not open the
        connection the pre-warm was to open; what it opened and the wait are recorded."""
        if mode.key not in SCALE_MODES or not ctx.logs_dir:
            return {}
        started = time.monotonic()
        while len(events := prewarms(self._prewarm_log(ctx), CLIENT_POD)) <= warmed_before \
                and time.monotonic() - started < PREWARM_WAIT:
            time.sleep(0.1)
        return {"prewarmed": events[-1] if len(events) > warmed_before else None,
                "prewarm_wait_s": round(time.monotonic() - started, 2)}

    def _first_connection(self, ctx: Context, mode: Mode, target_http: str) -> dict[str, Any]:
        """The latency of the first connection after the mode is switched on and its capture is in place
        (a moment later, as an application starts after its pod is set up): what a pooled connection
        opened ahead of time (pre-warm, `_await_prewarm`) saves."""
        deadline = time.monotonic() + 20.0
        while not mode.captured(ctx) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(FIRST_CONNECTION_SETTLE)
        result = run_phase(ctx, self.settings, "first", target_http, "")
        return {"latency_us": result.get("latency_us", {}).get("p50"), "errors": result.get("errors", {})}

    @staticmethod
    def _prewarm_log(ctx: Context) -> Path:
        """The client's node agent's log, where it reports each pre-warm."""
        return Path(ctx.logs_dir) / f"nodeagent.{ctx.client_node}.log"

    def _measured(self, ctx: Context, s: Settings, phase: str, procs: list[Proc], target_http: str,
                  target_sink: str) -> dict[str, Any]:
        server = ctx.server_pid
        if phase == "scale":
            srv0 = tree_cpu_seconds(server)
            t0 = time.monotonic()
            targets = [f"{ctx.service_ip}:{port}" for port in (HTTP_SERVICE_PORT, *SCALE_SERVICE_PORTS)]
            result = scale.measure(lambda argv: client_process(ctx, s, argv), procs, targets,
                                   s.scale_tunnels, s.scale_rate, s.phase_seconds(phase) + PHASE_TIMEOUT_SLACK)
            result["wall_seconds"] = round(time.monotonic() - t0, 2)
            result["server_cpu_seconds"] = round(tree_cpu_seconds(server) - srv0, 3)
            return result
        cpu0 = {p.role: tree_cpu_seconds(p.pid) for p in procs}
        srv0 = tree_cpu_seconds(server)
        t0 = time.monotonic()
        result = run_phase(ctx, s, phase, target_http, target_sink)
        result["wall_seconds"] = round(time.monotonic() - t0, 2)
        result["mesh_cpu_seconds"] = {p.role: round(tree_cpu_seconds(p.pid) - cpu0[p.role], 3) for p in procs}
        result["server_cpu_seconds"] = round(tree_cpu_seconds(server) - srv0, 3)
        return result

    def _checkpoint(self) -> None:
        """Keep the raw figures so far beside the results (a crash or interruption loses nothing)."""
        s = self.settings
        s.output_dir.mkdir(parents=True, exist_ok=True)
        (s.output_dir / ".partial.json").write_text(json.dumps(self.results, indent=1))


def fresh_rss(mode: Mode, ctx: Context, settle: float = FRESH_RSS_SETTLE, timeout: float = 20.0) -> dict[str, int]:
    """The mode's processes' VmRSS once its capture is in place and before any load (not even the probe):
    what an agent holds with its pods enrolled and nothing to carry, and a fresh waypoint.  Read again every
    `settle` seconds until no process has moved by more than FRESH_RSS_STEADY_KIB (one still starting up
    grows), for up to `timeout`."""
    deadline = time.monotonic() + timeout
    while not mode.captured(ctx) and time.monotonic() < deadline:
        time.sleep(0.1)
    procs = mode.procs(ctx)
    last = {p.role: rss_kib(p.pid) for p in procs}
    while time.monotonic() < deadline:
        time.sleep(settle)
        now = {p.role: rss_kib(p.pid) for p in procs}
        steady = all(abs(now[role] - last[role]) <= FRESH_RSS_STEADY_KIB for role in now)
        last = now
        if steady:
            break
    return last


def _safe_leave(mode: Mode, ctx: Context, say: Callable[[str], None]) -> None:
    try:
        mode.leave(ctx)
    except (PathError, Unavailable, OSError, subprocess.SubprocessError) as exc:
        say(f"warning: leaving mode {mode.key}: {exc}")


def _context(cluster: lifecycle.Cluster, s: Settings) -> Context:
    plan = cluster.plan
    client = plan.pod(NAMESPACE, "client")
    server = plan.pod(NAMESPACE, "server")
    if client is None or server is None:
        raise BenchError(f"{s.cluster_file}: the bench cluster needs pods {NAMESPACE}/client and {NAMESPACE}/server")
    svc = next((x for x in plan.services if x.namespace == NAMESPACE and x.name == "server"), None)
    if svc is None:
        raise BenchError(f"{s.cluster_file}: the bench cluster needs the service {NAMESPACE}/server")
    routes = []
    for sp in svc.ports:
        ep = sp.endpoints[0]
        routes.append(Route(str(svc.cluster_ip), sp.port.port, str(ep.ip), ep.port, http=sp.port.port == HTTP_SERVICE_PORT))
    cid = SpiffeId(defaults.TRUST_DOMAIN, NAMESPACE, client.spec.service_account)
    sid = SpiffeId(defaults.TRUST_DOMAIN, NAMESPACE, server.spec.service_account)
    pair = SidecarPair(plan.name, cluster.dir, SidecarPod("client", client.netns, cid, sid),
                       SidecarPod("server", server.netns, sid, cid), routes, concurrency=s.envoy_concurrency)
    env = {"MESH_STATE_DIR": str(state.state_root())}
    server_pid = next(p.pid for p in cluster.processes if p.name == f"pod {server.key}")
    return Context(plan.name, NAMESPACE, client.netns, server.netns, {n.name: n.netns for n in plan.nodes}, pair,
                   env, service_ip=str(svc.cluster_ip), server_pid=server_pid,
                   client_cgroup=str(mcgroup.v2_root() / client.cgroup), logs_dir=str(cluster.dir / "logs"),
                   client_node=client.spec.node, waypoint_workers=s.waypoint_workers,
                   waypoint_engine=s.waypoint_engine)


def _meta(s: Settings, cluster: str, started: datetime) -> dict[str, Any]:
    uname = os.uname()
    envoy = ""
    try:
        from bench.sidecar import envoy_binary

        envoy = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=10,
                               check=False).stdout.strip().split("version:")[-1].strip()
    except Exception:  # noqa: BLE001 - the version is informative only
        envoy = "unknown"
    settings = {k: (_shown(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(s).items()}
    return {
        "started": started.isoformat(timespec="seconds"), "host": uname.nodename, "kernel": uname.release,
        "cpus": os.cpu_count(), "python": sys.version.split()[0], "envoy": envoy, "cluster": cluster,
        "client_pinned_cpu": s.pinned_cpu(), "wrk": shutil.which("wrk") or "missing", "settings": settings,
    }


def _shown(path: Path) -> str:
    """A path as the results record it: relative to the checkout when inside it (results are committed and
    compared across machines), else as given."""
    try:
        return str(path.resolve().relative_to(BENCH_DIR.resolve().parent))
    except ValueError:
        return str(path)


def _ignore_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def _signals_raise(owner: int) -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` in the main thread for the time of the run, in this process
    only: a forked child (not exec'd) that inherits the handler dies of the signal as it would have."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Interrupted(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
