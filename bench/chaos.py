"""One chaos run against a live local cluster under steady load (needs root):

    python -m bench.chaos [--rate 200] [--redirect-mode iptables|ebpf] [--state-dir DIR] [--keep]

It builds its own cluster `t-chaos` (bookinfo, in the mesh, with a waypoint for the namespace), sends
`--rate` HTTP requests a second from the meshed `sleep` pod on node-1 through the waypoint to reviews
and ratings (`bench/chaosload.py`, kept-alive connections, open loop), and then, in turn:

1. kill -9 the node agent of node-2; the local cluster's controller starts it again (as the DaemonSet's
   kubelet would, `localcluster.supervision`); back when the new one is ready.
2. kill -9 the control plane, and start it again from its state, as
   tests/integration/test_mesh.py::test_last_good_config_while_the_control_plane_is_away does; back
   when its readiness probe passes and every discovery client has reconnected.
3. kill -9 the waypoint; the local cluster's controller starts it again (as Istio's deployment
   controller would); back when the new one is ready.
4. rotate the root (`meshctl ca rotate-root`, short propagation and overlap); back when the rotation
   is over (the old root dropped).

For each: the requests that finished from the event until it was over (the component back, then
`QUIET` seconds without a failure), how many failed, and the time to recovery: from the event to its
last failed request (0 when none failed).  Prints a Markdown table and writes it, with the run's
settings, to `bench/results/chaos-<date>.md`.  The cluster is always torn down (unless `--keep`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from localcluster import components, processes, state
from localcluster.processes import ProcessRecord
from mesh.api.client import ApiClient
from meshctl import proxystatus

ROOT = Path(__file__).resolve().parents[1]
BOOKINFO = ROOT / "examples" / "bookinfo" / "cluster.yaml"
LOAD = Path(__file__).resolve().parent / "chaosload.py"
RESULTS = Path(__file__).resolve().parent / "results"
NAME = "t-chaos"
NS = "bookinfo"
TARGETS = ("reviews:9080/reviews/0", "ratings:9080/ratings/0")
BASELINE = 10.0  # seconds of load measured before the first event
QUIET = 5.0  # seconds without a failed request after which an event is over
RECOVERY_LIMIT = 120.0  # seconds an event may take before the run gives up waiting
ROTATION = (10.0, 20.0)  # root rotation: propagation, overlap (seconds)


class ChaosError(RuntimeError):
    pass


@dataclass
class Outcome:
    event: str
    started: float  # Unix time of the event
    ended: float  # when it was over: back, then QUIET seconds without a failure (or the limit)
    sent: int
    failed: int
    recovery: float  # seconds from the event to its last failed request (0: none failed)
    note: str


class Load:
    """The load generator in the sleep pod, its one-line-a-second report read as it comes."""

    def __init__(self, run: Run, rate: float) -> None:
        argv = ["exec", "--cluster", NAME, "-n", NS, "sleep", "--", sys.executable, str(LOAD),
                "--rate", str(rate), "--duration", "3600", *[a for t in TARGETS for a in ("--target", t)]]
        self.proc = run.meshctl_popen(*argv)
        self.seconds: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                with self._lock:
                    self.seconds.append(json.loads(line))

    def between(self, start: float, end: float) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.seconds if int(start) <= s["t"] < int(end) + 1]

    def reported_until(self) -> float:
        with self._lock:
            return float(self.seconds[-1]["t"] + 1) if self.seconds else 0.0

    def quiet_since(self, since: float) -> float | None:
        """When the failures after `since` stopped (the last one's time; `since` if none), once the report
        has gone QUIET seconds past it without another; None while that is not known yet."""
        rows = self.between(since, time.time())
        last = max((s["fail_last"] for s in rows if s["failed"]), default=since)
        return last if self.reported_until() >= last + QUIET else None

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()


class Run:
    def __init__(self, state_dir: Path, mode: str) -> None:
        self.state_dir = state_dir
        self.mode = mode
        os.environ["MESH_STATE_DIR"] = str(state_dir)  # for meshctl and the library calls alike

    @property
    def home(self) -> Path:
        return state.cluster_dir(NAME)

    def meshctl(self, *args: str, timeout: float = 300) -> str:
        out = subprocess.run([sys.executable, "-m", "meshctl.main", *args], capture_output=True, text=True,
                             cwd=ROOT, timeout=timeout, check=False)
        if out.returncode != 0:
            raise ChaosError(f"meshctl {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
        return out.stdout

    def meshctl_popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "meshctl.main", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, cwd=ROOT)

    def process(self, name: str) -> ProcessRecord:
        for p in state.read_record(NAME)["processes"]:
            if p["name"] == name:
                return ProcessRecord.from_json(p)
        raise ChaosError(f"the cluster record has no process {name!r}")

    def clients(self) -> int:
        try:
            return len(proxystatus.fetch_connections(str(self.home / "controlplane" / "debug.sock"),
                                                     timeout=2)["clients"])
        except Exception:  # noqa: BLE001 - not answering yet
            return 0

    def waypoint_ready(self) -> bool:
        out = subprocess.run(["ip", "netns", "exec", f"amb.{NAME}.pod.{NS}.waypoint", "curl", "-sS", "-m", "2",
                              "http://127.0.0.1:15021/healthz/ready"], capture_output=True, text=True, check=False)
        return out.stdout.strip() == "ready"


def until(check: Callable[[], object], what: str, timeout: float = RECOVERY_LIMIT, every: float = 0.1) -> float:
    """Poll `check` until it is true; the time it became so."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ChaosError(f"{what}: not after {timeout:.0f}s")
        time.sleep(every)
    return time.time()


def kill9(rec: ProcessRecord) -> float:
    """SIGKILL the process (and its group: what it started with it); when it was sent."""
    when = time.time()
    try:
        os.killpg(rec.pid, signal.SIGKILL) if os.getpgid(rec.pid) == rec.pid else os.kill(rec.pid, signal.SIGKILL)
    except ProcessLookupError as exc:
        raise ChaosError(f"{rec.name} (pid {rec.pid}) was not running") from exc
    return when


# ---- the events ---------------------------------------------------------------------------------------------


def kill_node_agent(run: Run, node: str = "node-2") -> tuple[float, float, str]:
    name = components.nodeagent_process(node)
    rec = run.process(name)
    started = kill9(rec)

    def replaced() -> bool:
        new = run.process(name)
        return new.pid != rec.pid and processes.is_running(new)

    def ready() -> bool:
        ip = next(n["ip"] for n in state.read_record(NAME)["plan"]["nodes"] if n["name"] == node)
        out = subprocess.run(["ip", "netns", "exec", f"amb.{NAME}.node.{node}", "curl", "-sS", "-m", "2",
                              f"http://{ip}:15021/healthz/ready"], capture_output=True, text=True, check=False)
        return out.stdout.strip() == "ready"

    restarted = until(replaced, "the controller to start the node agent again", every=0.2)
    back = until(ready, "the new node agent to be ready", every=0.2)
    return started, back, (f"restarted by the local cluster's controller {restarted - started:.1f}s after the kill, "
                           f"ready after {back - started:.1f}s")


def kill_control_plane(run: Run) -> tuple[float, float, str]:
    rec = run.process(components.CONTROLPLANE_PROCESS)
    clients = run.clients()
    started = kill9(rec)
    until(lambda: not processes.is_running(rec), "the killed control plane to be gone")
    record = state.read_record(NAME)
    underlay = record["plan"]["underlay"]
    new = components.run_control_plane(NAME, run.home, underlay["netns"], underlay["gateway"],
                                       components.load_workloads().control_plane)
    components.wait_control_plane(run.home, new.process, RECOVERY_LIMIT, readiness=new.run.readiness, ip=new.pod.ip)
    serving = time.time()
    record = state.read_record(NAME)
    record["processes"] = [p for p in record["processes"] if p["name"] != rec.name] + [new.process.to_json()]
    state.write_record(NAME, record)
    back = until(lambda: run.clients() >= clients, f"the {clients} discovery clients to reconnect", every=0.5)
    return started, back, (f"restarted from its state by this script; ready {serving - started:.1f}s after the "
                           f"kill, all {clients} discovery clients back after {back - started:.1f}s")


def kill_waypoint(run: Run) -> tuple[float, float, str]:
    name = f"waypoint {NS}/waypoint"
    rec = run.process(name)
    started = kill9(rec)

    def replaced() -> bool:
        try:
            new = run.process(name)
        except ChaosError:
            return False
        return new.pid != rec.pid and processes.is_running(new)

    restarted = until(replaced, "the controller to start the waypoint again", every=0.2)
    back = until(run.waypoint_ready, "the new waypoint to be ready", every=0.2)
    return started, back, (f"restarted by the local cluster's controller {restarted - started:.1f}s after the kill, "
                           f"ready after {back - started:.1f}s")


def rotate_root(run: Run) -> tuple[float, float, str]:
    api = ApiClient(run.home / "controlplane" / "api.sock", timeout=10)
    if not hasattr(api, "rotate_root"):
        raise NotImplementedError("root rotation is not available in this tree")
    propagation, overlap = ROTATION
    started = time.time()
    api.rotate_root(propagation, overlap)
    back = until(lambda: api.root_status()["phase"] == "idle", "the root rotation to finish",
                 timeout=propagation + overlap + RECOVERY_LIMIT, every=0.5)
    return started, back, (f"`meshctl ca rotate-root --propagation {propagation:g}s --overlap {overlap:g}s`: the "
                           f"old root dropped {back - started:.1f}s after the start")


EVENTS: list[tuple[str, Callable[[Run], tuple[float, float, str]]]] = [
    ("kill -9 node agent (node-2)", kill_node_agent),
    ("kill -9 control plane", kill_control_plane),
    ("kill -9 waypoint", kill_waypoint),
    ("rotate the root", rotate_root),
]


# ---- the run ------------------------------------------------------------------------------------------------


def measure(load: Load, event: str, started: float, back: float, note: str) -> Outcome:
    """The event is over once it is back and QUIET seconds have gone by without a failed request."""
    deadline = time.monotonic() + RECOVERY_LIMIT
    while (last := load.quiet_since(started)) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    ended = max(back, last or time.time()) + QUIET
    until(lambda: load.reported_until() >= ended, "the load's report", timeout=30, every=0.2)
    rows = load.between(started, ended)
    sent, failed = sum(r["sent"] for r in rows), sum(r["failed"] for r in rows)
    last_failure = max((r["fail_last"] for r in rows if r["failed"]), default=started)
    reasons: dict[str, int] = {}
    for r in rows:
        for reason, n in r["errors"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    if reasons:
        note += "; failures: " + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    if last is None:
        note += f"; still failing after {RECOVERY_LIMIT:.0f}s"
    return Outcome(event, started, ended, sent, failed, last_failure - started if failed else 0.0, note)


def build(run: Run, tmp: Path) -> None:
    text = BOOKINFO.read_text().replace("name: bookinfo\nspec:", f"name: {NAME}\nspec:", 1)
    text = text.replace("command: [python3, app.py]", f"command: [{sys.executable}, {BOOKINFO.parent / 'app.py'}]")
    path = tmp / f"{NAME}.yaml"
    path.write_text(text)
    run.meshctl("cluster", "up", "-f", str(path), "--redirect-mode", run.mode)
    run.meshctl("label", "namespace", NS, "istio.io/dataplane-mode=ambient", "--cluster", NAME)
    run.meshctl("waypoint", "apply", "-n", NS, "--enroll-namespace", "--cluster", NAME)
    until(lambda: any(p["name"] == f"waypoint {NS}/waypoint" for p in state.read_record(NAME)["processes"]),
          "the waypoint to start", every=0.5)
    until(run.waypoint_ready, "the waypoint to be ready", every=0.5)


def table(outcomes: list[Outcome]) -> str:
    lines = ["| event | requests sent | failed | time to recovery | notes |", "| --- | ---: | ---: | ---: | --- |"]
    for o in outcomes:
        recovery = f"{o.recovery:.1f} s" if o.failed else "0 s (none failed)"
        lines.append(f"| {o.event} | {o.sent} | {o.failed} | {recovery} | {o.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=200.0, help="HTTP requests a second (default %(default)s)")
    p.add_argument("--redirect-mode", choices=("iptables", "ebpf"), default="iptables")
    p.add_argument("--state-dir", type=Path, help="where the cluster's state goes (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="leave the cluster up at the end")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.chaos builds a cluster of network namespaces: run it as root", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    run = Run(args.state_dir or tmp / "state", args.redirect_mode)
    load: Load | None = None
    outcomes: list[Outcome] = []
    try:
        print(f"building cluster {NAME} ({args.redirect_mode}) with a waypoint ...", flush=True)
        build(run, tmp)
        load = feed = Load(run, args.rate)
        until(lambda: feed.reported_until() > 0, "the load to start", timeout=60)
        time.sleep(2)  # warm: connections and certificates made
        start = time.time()
        time.sleep(BASELINE)
        rows = load.between(start, start + BASELINE)
        outcomes.append(Outcome("none (baseline)", start, start + BASELINE, sum(r["sent"] for r in rows),
                                sum(r["failed"] for r in rows), 0.0, f"{BASELINE:.0f} s of steady load"))
        for event, act in EVENTS:
            print(f"{event} ...", flush=True)
            try:
                started, back, note = act(run)
            except NotImplementedError as exc:
                outcomes.append(Outcome(event, time.time(), time.time(), 0, 0, 0.0, f"not available: {exc}"))
                continue
            outcomes.append(measure(load, event, started, back, note))
            print(f"  {outcomes[-1]}", flush=True)
    finally:
        if load is not None:
            load.stop()
        if not args.keep:
            subprocess.run([sys.executable, "-m", "meshctl.main", "cluster", "down", NAME], cwd=ROOT,
                           capture_output=True, check=False)
    report = table(outcomes)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S")
    out = RESULTS / f"chaos-{stamp}.md"
    out.write_text(f"# Chaos run {stamp} (UTC)\n\n`python -m bench.chaos --rate {args.rate:g} --redirect-mode "
                   f"{args.redirect_mode}` on {os.uname().nodename} ({os.cpu_count()} CPUs): bookinfo with a "
                   f"waypoint, {args.rate:g} HTTP requests/s from sleep (node-1) through the waypoint to "
                   f"{' and '.join(t.split('/')[0] for t in TARGETS)}. An event's window runs from the event until "
                   f"it was back and {QUIET:g} s passed without a failed request; time to recovery is from the "
                   f"event to its last failed request.\n\n{report}\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
