"""The modes a run compares, each a way of reconfiguring the same cluster, and how each proves its path.

    a  no mesh           plain pod-to-pod (through the service address), no capture anywhere
    b  mesh L4           the namespace labelled istio.io/dataplane-mode=ambient: node agents capture
    c  mesh L7           as b, plus a waypoint for the namespace (meshctl waypoint apply --enroll-namespace)
    d  sidecar model     Envoy beside each app, in-pod iptables capture, mTLS between the Envoys
    e  mesh L4, eBPF     as b, with the node agents restarted in eBPF capture mode (cgroup connect and
                         sk_lookup programs instead of in-pod iptables rules); `leave` restarts them in
                         the cluster's own mode
    f  L4 floor          the Envoy pair of d doing only the node agents' job: tcp_proxy with mTLS between
                         the pods, plain TCP to the apps (the cost the node agents are measured against)

A mode is switched on with `enter`, proven with `counters` (read before and after a short probe: the
proxies of the mode must have counted the probe's traffic), and switched off with `leave`.  A mode that
cannot run here raises `Unavailable` with the reason, and the run reports it as such instead of
measuring something else under its name.  Modes b and c only use the mesh's public interface (the
`meshctl` commands a user would type), so they run as soon as the node agent and waypoint do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.netio import ProbeError, Proc, http_get, run_in, tree_cpu_seconds
from bench.sidecar import SidecarError, SidecarPair
from localcluster import processes
from localcluster.plan import bpf_prefix

AMBIENT_LABEL = "istio.io/dataplane-mode"
METRICS_PORT = 15020
SWITCH_TIMEOUT = 20.0
CAPTURE_TARGETS = ("REDIRECT", "TPROXY", "DNAT")
BPFFS = Path("/sys/fs/bpf")


class Unavailable(Exception):
    """This mode cannot run on this machine or build; the message says why."""


class PathError(Exception):
    """The mode is set up but the traffic did not take its path."""


@dataclass
class Context:
    """What modes need to know about the running bench cluster."""

    cluster: str
    namespace: str
    client_netns: str
    server_netns: str
    node_netns: dict[str, str]
    sidecars: SidecarPair
    state_env: dict[str, str] = field(default_factory=dict)
    service_ip: str = ""
    server_pid: int = 0
    client_cgroup: str = ""  # the client pod's cgroup v2 directory: clients run in it, as the pod's processes
    logs_dir: str = ""  # where the cluster's processes log (the node agents' logs say what they pre-warmed)
    client_node: str = ""  # the node of the client pod
    waypoint_workers: int = 0  # the waypoint's worker processes in mode c (0: the cluster's default)
    waypoint_engine: str = ""  # the waypoint's engine in mode c ("": the waypoint's default)

    def meshctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env.update(self.state_env)
        return subprocess.run([sys.executable, "-m", "meshctl.main", *args, "--cluster", self.cluster],
                              capture_output=True, text=True, env=env, timeout=60, check=False)

    def meshctl_ok(self, *args: str) -> str:
        out = self.meshctl(*args)
        if out.returncode != 0:
            raise Unavailable(f"`meshctl {' '.join(args)}` failed: {(out.stderr or out.stdout).strip()[-300:]}")
        return out.stdout


# -- finding the mesh's processes --------------------------------------------------------------------

def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def mesh_processes(cluster: str, kind: str) -> list[Proc]:
    """The cluster's processes running `kind` ("nodeagent" or "waypoint"), found by the cluster's
    process marker and their command line, so it does not matter how they were started."""
    found: list[Proc] = []
    for pid in sorted(processes.marked_pids(cluster)):
        argv = _cmdline(pid)
        modules = [a for a in argv if a.startswith(f"{kind}.") or a == kind or a.endswith(f"/{kind}")]
        if not modules:
            continue
        if any(p.pid in _ancestors(pid) for p in found):
            continue  # a child of one already found (its cost is counted with the parent's tree)
        name = kind
        for flag in ("--node", "--name"):
            if flag in argv and argv.index(flag) + 1 < len(argv):
                name = f"{kind} {argv[argv.index(flag) + 1]}"
        found.append(Proc(name, pid))
    return found


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        out.add(pid)
    return out


def listening_address(pid: int, port: int) -> str | None:
    """The address a process's network namespace listens on at `port` (from /proc/<pid>/net/tcp)."""
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        local, st = fields[1], fields[3]
        addr_hex, port_hex = local.split(":")
        if st == "0A" and int(port_hex, 16) == port:
            ip = ".".join(str(int(addr_hex[i:i + 2], 16)) for i in (6, 4, 2, 0))
            return "127.0.0.1" if ip == "0.0.0.0" else ip
    return None


def prometheus_counters(text: str, prefix: str = "istio_") -> dict[str, float]:
    """Sum each counter family (`*_total`) starting with `prefix` over all its label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if not name.startswith(prefix) or not name.endswith("_total"):
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        out[name] = out.get(name, 0.0) + value
    return out


def proxy_counters(procs: list[Proc]) -> dict[str, float]:
    """Counters that move when traffic passes `procs`: their Prometheus istio_* counters on 15020 when
    they serve them, and in any case their CPU seconds (a proxy in the path cannot stay idle)."""
    out: dict[str, float] = {}
    for p in procs:
        out[f"{p.role}:cpu_seconds"] = tree_cpu_seconds(p.pid)
        addr = listening_address(p.pid, METRICS_PORT)
        if addr is None:
            continue
        try:
            text = http_get(f"/proc/{p.pid}/ns/net", addr, METRICS_PORT, "/metrics")
        except ProbeError:
            continue
        for name, value in prometheus_counters(text).items():
            out[f"{p.role}:{name}"] = value
    return out


def moved(before: dict[str, float], after: dict[str, float], role_prefix: str, min_cpu: float) -> bool:
    """Did traffic pass the processes whose role starts with `role_prefix`?  By their connection or
    request counters when they export them, else by CPU (at least `min_cpu` seconds during the probe)."""
    traffic = [k for k in after if k.startswith(role_prefix) and
               any(w in k for w in ("connections_opened", "requests_total"))]
    if traffic:
        return any(after[k] > before.get(k, 0.0) for k in traffic)
    cpu = [k for k in after if k.startswith(role_prefix) and k.endswith(":cpu_seconds")]
    return any(after[k] - before.get(k, 0.0) >= min_cpu for k in cpu)


def prewarms(log: Path, pod: str) -> list[dict[str, object]]:
    """The node agent's `prewarmed` events for `pod` ("namespace/name") in its log, oldest first."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        if '"event": "prewarmed"' in line and f'"pod": "{pod}"' in line:
            try:
                found.append(json.loads(line[line.index("{"):]))
            except ValueError:
                continue
    return found


def last_prewarm(log: Path, pod: str) -> dict[str, object] | None:
    """The node agent's last `prewarmed` event for `pod` in its log, if any."""
    events = prewarms(log, pod)
    return events[-1] if events else None


def capture_rules_in(netns: str) -> list[str]:
    """Rules in a pod that take its traffic elsewhere (nat/mangle REDIRECT, TPROXY, DNAT)."""
    out = run_in(netns, ["iptables-save"], check=False).stdout
    return [line for line in out.splitlines()
            if line.startswith("-A") and any(f"-j {t}" in line for t in CAPTURE_TARGETS)]


# -- the modes --------------------------------------------------------------------------------------

class Mode:
    key = "?"
    title = "?"

    def enter(self, ctx: Context) -> None:
        raise NotImplementedError

    def leave(self, ctx: Context) -> None:
        pass

    def procs(self, ctx: Context) -> list[Proc]:
        """The mesh processes whose cost this mode's figures include."""
        return []

    def counters(self, ctx: Context) -> dict[str, float]:
        return {}

    def captured(self, ctx: Context) -> bool:
        """Is the client pod's traffic taken by this mode's path (its capture in place)?"""
        return True

    def check_path(self, ctx: Context, before: dict[str, float], after: dict[str, float], requests: int) -> str:
        """Raise PathError unless the probe's `requests` took this mode's path; else say how it was proven."""
        return "no check"


class NoMesh(Mode):
    key = "a"
    title = "no mesh"

    def enter(self, ctx: Context) -> None:
        ctx.sidecars.stop()

    def check_path(self, ctx: Context, before: dict[str, float], after: dict[str, float], requests: int) -> str:
        for netns in (ctx.client_netns, ctx.server_netns):
            rules = capture_rules_in(netns)
            if rules:
                raise PathError(f"capture rules left in {netns}: {rules[0]} ...")
        return "no capture rules in either pod"


class MeshL4(Mode):
    key = "b"
    title = "mesh L4 (node agents)"

    def procs(self, ctx: Context) -> list[Proc]:
        return mesh_processes(ctx.cluster, "nodeagent")

    def enter(self, ctx: Context) -> None:
        agents = self.procs(ctx)
        if len(agents) < len(ctx.node_netns):
            raise Unavailable(f"{len(agents)} node agents running for {len(ctx.node_netns)} nodes: "
                              "`cluster up` does not start a node agent per node in this build")
        ctx.meshctl_ok("label", "namespace", ctx.namespace, f"{AMBIENT_LABEL}=ambient")

    def captured(self, ctx: Context) -> bool:
        return all(capture_rules_in(n) for n in (ctx.client_netns, ctx.server_netns))

    def leave(self, ctx: Context) -> None:
        ctx.meshctl("label", "namespace", ctx.namespace, f"{AMBIENT_LABEL}-")
        _wait_no_capture(ctx)

    def counters(self, ctx: Context) -> dict[str, float]:
        return proxy_counters(self.procs(ctx))

    def check_path(self, ctx: Context, before: dict[str, float], after: dict[str, float], requests: int) -> str:
        if not moved(before, after, "nodeagent", min_cpu=0.05):
            raise PathError("the probe's traffic did not pass the node agents (their connection counters on "
                            f"{METRICS_PORT} and their CPU time did not move)")
        return "node agents counted the probe's connections"


class MeshL7(MeshL4):
    key = "c"
    title = "mesh L7 (waypoint)"

    def procs(self, ctx: Context) -> list[Proc]:
        return mesh_processes(ctx.cluster, "nodeagent") + mesh_processes(ctx.cluster, "waypoint")

    def apply_args(self, ctx: Context) -> list[str]:
        """The `meshctl waypoint apply` that `enter` runs: the bench's waypoint, with the run's `--workers`
        and `--engine` when it sets them (else the cluster's defaults)."""
        workers = ["--workers", str(ctx.waypoint_workers)] if ctx.waypoint_workers else []
        engine = ["--engine", ctx.waypoint_engine] if ctx.waypoint_engine else []
        return ["waypoint", "apply", "-n", ctx.namespace, "--enroll-namespace", *workers, *engine]

    def enter(self, ctx: Context) -> None:
        super().enter(ctx)
        ctx.meshctl_ok(*self.apply_args(ctx))
        deadline = time.monotonic() + SWITCH_TIMEOUT
        while not mesh_processes(ctx.cluster, "waypoint"):
            if time.monotonic() > deadline:
                raise Unavailable(f"no waypoint process started within {SWITCH_TIMEOUT:.0f}s of "
                                  "`meshctl waypoint apply`: the local cluster does not run waypoints in this build")
            time.sleep(0.5)

    def leave(self, ctx: Context) -> None:
        ctx.meshctl("waypoint", "delete", "-n", ctx.namespace, "--all")
        super().leave(ctx)

    def check_path(self, ctx: Context, before: dict[str, float], after: dict[str, float], requests: int) -> str:
        super().check_path(ctx, before, after, requests)
        if not moved(before, after, "waypoint", min_cpu=0.05):
            raise PathError("the probe's traffic did not pass the waypoint (its counters and CPU time did not move)")
        return "node agents and the waypoint counted the probe's traffic"


class Sidecars(Mode):
    key = "d"
    title = "sidecar model (Envoy)"

    def enter(self, ctx: Context) -> None:
        try:
            ctx.sidecars.start()
        except SidecarError as exc:
            ctx.sidecars.stop()
            raise PathError(str(exc)) from exc

    def leave(self, ctx: Context) -> None:
        ctx.sidecars.stop()

    def procs(self, ctx: Context) -> list[Proc]:
        return [Proc(role, pid) for role, pid in ctx.sidecars.pids().items()]

    def counters(self, ctx: Context) -> dict[str, float]:
        try:
            return {k: float(v) for k, v in ctx.sidecars.stats().items()}
        except ProbeError as exc:
            raise PathError(f"cannot read the sidecars' admin stats: {exc}") from exc

    def check_path(self, ctx: Context, before: dict[str, float], after: dict[str, float], requests: int) -> str:
        def delta(key: str) -> float:
            return after.get(key, 0.0) - before.get(key, 0.0)

        out = delta("client:cluster.outbound_http_80.upstream_rq_total")
        inb = delta("server:cluster.inbound_8080.upstream_rq_total")
        tls = after.get("server:listener.0.0.0.0_15006.ssl.handshake", 0.0)
        if out < requests or inb < requests:
            raise PathError(f"the sidecars forwarded {out:.0f} (client) and {inb:.0f} (server) of the probe's "
                            f"{requests} requests")
        if tls < 1:
            raise PathError("the server sidecar completed no TLS handshake")
        return f"client and server Envoys forwarded all {requests} probe requests over mTLS"


ADMIN_COUNTER = "http.admin.downstream_cx_total"


class L4Floor(Sidecars):
    """The same pair of Envoys doing only the node agents' job: mutual TLS between the pods, plain TCP to
    the apps, with `tcp_proxy` for every port (no HTTP parsing, no HTTP/2).  What a relay pair written in C++
    costs for that job: the floor the node agents are compared with."""

    key = "f"
    title = "L4 floor (Envoy tcp_proxy)"

    def enter(self, ctx: Context) -> None:
        try:
            ctx.sidecars.start(l4=True)
        except SidecarError as exc:
            ctx.sidecars.stop()
            raise PathError(str(exc)) from exc

    def check_path(self, ctx: Context, before: dict[str, float], after: dict[str, float], requests: int) -> str:
        def delta(key: str) -> float:
            return after.get(key, 0.0) - before.get(key, 0.0)

        # tcp_proxy's own counters (`tcp.<stat prefix>.*`): the connections went through it, not through
        # an HTTP connection manager (whose counters are `http.*`; `http.admin.*` is our reading the stats).
        out = delta("client:tcp.outbound_tcp_80.downstream_cx_total")
        inb = delta("server:tcp.inbound_8080.downstream_cx_total")
        tls = after.get("server:listener.0.0.0.0_15006.ssl.handshake", 0.0)
        if out < 1 or inb < 1:
            raise PathError(f"the Envoys' tcp_proxy took {out:.0f} (client) and {inb:.0f} (server) of the probe's "
                            "connections")
        if any(k.startswith(("client:http.", "server:http.")) and not k.endswith(ADMIN_COUNTER) and delta(k)
               for k in after):
            raise PathError("the Envoys parsed HTTP in the L4 floor mode (their HTTP counters moved)")
        if tls < 1:
            raise PathError("the server Envoy completed no TLS handshake")
        return f"client and server Envoys (tcp_proxy) carried the probe's {out:.0f} connections over mTLS"


class EbpfCapture(MeshL4):
    key = "e"
    title = "mesh L4, eBPF capture"

    def enter(self, ctx: Context) -> None:
        ctx.meshctl("label", "namespace", ctx.namespace, f"{AMBIENT_LABEL}-")
        _wait_no_capture(ctx)
        self._restart_agents(ctx, "ebpf")
        super().enter(ctx)
        deadline = time.monotonic() + SWITCH_TIMEOUT
        while len(pinned_pods(ctx.cluster)) < 2:
            if time.monotonic() > deadline:
                raise PathError(f"the node agents did not attach eBPF programs to the pods within {SWITCH_TIMEOUT:.0f}s")
            time.sleep(0.2)

    def leave(self, ctx: Context) -> None:
        super().leave(ctx)
        self._restart_agents(ctx, "")

    def captured(self, ctx: Context) -> bool:
        return len(pinned_pods(ctx.cluster)) >= 2

    def _restart_agents(self, ctx: Context, mode: str) -> None:
        env = dict(os.environ)
        env.update(ctx.state_env)
        for node in ctx.node_netns:
            argv = [sys.executable, "-m", "meshctl.main", "agent", "restart", node, "--cluster", ctx.cluster]
            out = subprocess.run([*argv, *(["--redirect-mode", mode] if mode else [])], capture_output=True,
                                 text=True, env=env, timeout=60, check=False)
            if out.returncode != 0:
                raise Unavailable(f"restarting the agent of {node} in {mode or 'its own'} mode failed: "
                                  f"{(out.stderr or out.stdout).strip()[-300:]}")
        deadline = time.monotonic() + SWITCH_TIMEOUT
        while len(self.procs(ctx)) < len(ctx.node_netns):
            if time.monotonic() > deadline:
                raise Unavailable("the restarted node agents did not come back")
            time.sleep(0.2)

    def check_path(self, ctx: Context, before: dict[str, float], after: dict[str, float], requests: int) -> str:
        super().check_path(ctx, before, after, requests)
        for netns in (ctx.client_netns, ctx.server_netns):
            rules = capture_rules_in(netns)
            if rules:
                raise PathError(f"iptables capture rules in {netns} in eBPF mode: {rules[0]} ...")
        return "node agents counted the probe's connections; the pods have eBPF programs and no iptables rules"


MODES: dict[str, Mode] = {m.key: m for m in (NoMesh(), MeshL4(), MeshL7(), Sidecars(), EbpfCapture(), L4Floor())}
DEFAULT_MODES = ("a", "b", "c", "d", "e", "f")


def pinned_pods(cluster: str) -> list[Path]:
    """The pods of the cluster with eBPF capture pinned (a directory each under the cluster's prefix)."""
    root = BPFFS / bpf_prefix(cluster)
    return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith("~")] if root.is_dir() else []


def _wait_no_capture(ctx: Context) -> None:
    deadline = time.monotonic() + SWITCH_TIMEOUT
    while any(capture_rules_in(n) for n in (ctx.client_netns, ctx.server_netns)) or pinned_pods(ctx.cluster):
        if time.monotonic() > deadline:
            raise PathError(f"capture rules still in the pods {SWITCH_TIMEOUT:.0f}s after removing the ambient label")
        time.sleep(0.5)
