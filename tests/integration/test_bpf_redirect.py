"""The eBPF capture (bpf/), for real: programs compiled by bcc, loaded into a "pod" made of a network
namespace and a cgroup v2, with a peer namespace at the other end of a veth.

The test process plays the node agent: it opens 15001, 15006 and 15008 inside the pod's namespace
(from outside the pod's cgroup, as the agent does) and the app's own listeners.  The app's client runs
as a subprocess that puts itself into the pod's cgroup and namespace before it makes its socket.

Everything made here is named `ambt-...` and removed by the fixtures' finalizers, whatever happens:
namespaces (the veth goes with them), cgroups, pins, and the private BPF file system they live on.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bpf import layout, objects
from bpf import loader as loader_module
from bpf.errors import AttachError, BpfCallError, EbpfUnavailable, NoOriginalDestination, PodTargetError
from bpf.loader import Loader, Outcome, socket_cookie
from mesh import netns

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
CGROUP2 = Path("/sys/fs/cgroup/unified")
POD_IP, PEER_IP = "10.77.0.1", "10.77.0.2"
APP_PORT, SKIPPED_PORT, PEER_PORT = 8080, 8081, 9090

# The app's client: joins the pod's cgroup and namespace, then connects and sends a token line.
APP_CLIENT = r"""
import ctypes, json, os, socket, sys
cfg = json.loads(sys.argv[1])
with open(cfg["cgroup"] + "/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
libc = ctypes.CDLL("libc.so.6", use_errno=True)
if libc.setns(os.open(cfg["netns"], os.O_RDONLY), 0x40000000) != 0:
    raise OSError(ctypes.get_errno(), "setns")
s = socket.socket(socket.AF_INET6 if cfg["v6"] else socket.AF_INET, socket.SOCK_STREAM)
if cfg["mark"]:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, cfg["mark"])
s.settimeout(5)
try:
    s.connect((cfg["host"], cfg["port"]))
except OSError as exc:
    print(json.dumps({"error": type(exc).__name__}))
    sys.exit(0)
s.sendall(cfg["token"].encode() + b"\n")
print(json.dumps({"local": list(s.getsockname()[:2]), "peer": list(s.getpeername()[:2])}))
"""

# A node agent that attaches a pod and exits (its 15006 listener dies with it).
ATTACH_AND_EXIT = r"""
import ctypes, json, os, socket, sys
from bpf.loader import Loader
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL("libc.so.6", use_errno=True)
own = os.open("/proc/self/ns/net", os.O_RDONLY)
assert libc.setns(os.open(cfg["netns"], os.O_RDONLY), 0x40000000) == 0
listener = socket.socket()
listener.bind(("0.0.0.0", 0))
listener.listen()
assert libc.setns(own, 0x40000000) == 0
loader = Loader(prefix=cfg["prefix"], bpffs=cfg["bpffs"])
print(loader.attach_pod(cfg["pod"], cfg["netns"], cfg["cgroup"], listener, pod_ip=cfg["pod_ip"]).name)
"""


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpffs() -> Iterator[Path]:
    """A private BPF file system (the loader mounts it), so the tests never touch /sys/fs/bpf."""
    path = Path(tempfile.mkdtemp(prefix="ambt-bpffs-"))
    try:
        yield path
    finally:
        while objects.fs_magic(str(path)) == objects.BPFFS_MAGIC:
            subprocess.run(["umount", str(path)], check=True)
        path.rmdir()


@pytest.fixture(scope="module")
def loader(bpffs: Path) -> Iterator[Loader]:
    ld = Loader(prefix=f"ambt-{secrets.token_hex(3)}", bpffs=bpffs)
    try:
        ld.probe()
        yield ld
    finally:
        for pod in ld.list_pods():
            ld.detach_pod(pod)
        ld.close()
        if ld.root.exists():
            for stale in ld.root.iterdir():  # staging directories a failed test may have left
                ld.detach_pod(layout.pod_id_of(stale.name.split("~")[-1]))
            ld.root.rmdir()


def make_cgroup(name: str) -> Path:
    path = CGROUP2 / name
    path.mkdir()
    return path


def remove_cgroup(path: Path) -> None:
    """Kills what the test left in the cgroup (only its own app clients can be there), then removes it."""
    if not path.exists():
        return
    for _ in range(50):
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        if not pids:
            break
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    path.rmdir()


@dataclass
class Pod:
    """A pod's network namespace and cgroup, and a peer namespace across a veth."""

    id: str
    pod_ns: str
    peer_ns: str
    cgroup: Path
    sockets: list[socket.socket] = field(default_factory=list)

    @property
    def netns_path(self) -> str:
        return str(netns.netns_path(self.pod_ns))

    def listen(self, ns: str, port: int) -> socket.socket:
        with netns.entered(ns):
            sock = socket.socket()
        self.sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(64)
        return sock

    def connect_from(self, ns: str, host: str, port: int) -> socket.socket:
        """A connection made by this (the agent's) process from inside `ns`: outside the pod's cgroup."""
        with netns.entered(ns):
            sock = socket.socket()
        self.sockets.append(sock)
        sock.settimeout(3)
        sock.connect((host, port))
        return sock

    def app_connect(self, host: str, port: int, token: str, *, mark: int = 0, v6: bool = False) -> dict[str, Any]:
        """Connects from a process inside the pod (its cgroup and namespace) and sends `token`."""
        cfg = {"cgroup": str(self.cgroup), "netns": self.netns_path, "host": host, "port": port,
               "token": token, "mark": mark, "v6": v6}
        out = subprocess.run([sys.executable, "-c", APP_CLIENT, json.dumps(cfg)], capture_output=True,
                             text=True, timeout=20, check=True)
        return dict(json.loads(out.stdout))


@pytest.fixture
def pod() -> Iterator[Pod]:
    tag = secrets.token_hex(3)
    p = Pod(id=f"ambt/pod-{tag}", pod_ns=f"ambt-{tag}-pod", peer_ns=f"ambt-{tag}-peer", cgroup=CGROUP2 / f"ambt-{tag}")
    try:
        run("ip", "netns", "add", p.pod_ns)
        run("ip", "netns", "add", p.peer_ns)
        run("ip", "link", "add", f"ambt-{tag}a", "netns", p.pod_ns, "type", "veth",
            "peer", "name", f"ambt-{tag}b", "netns", p.peer_ns)
        for ns, dev, ip in ((p.pod_ns, f"ambt-{tag}a", POD_IP), (p.peer_ns, f"ambt-{tag}b", PEER_IP)):
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        make_cgroup(p.cgroup.name)
        yield p
    finally:
        for sock in p.sockets:
            sock.close()
        remove_cgroup(p.cgroup)
        for ns in (p.pod_ns, p.peer_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@dataclass
class Agent:
    """The node agent's listeners in the pod, the app's listeners, and a server in the peer namespace."""

    outbound: socket.socket
    inbound: socket.socket
    hbone: socket.socket
    app: socket.socket
    app_skipped: socket.socket
    peer: socket.socket


@pytest.fixture
def agent(pod: Pod) -> Agent:
    return Agent(outbound=pod.listen(pod.pod_ns, layout.OUTBOUND_PORT),
                 inbound=pod.listen(pod.pod_ns, layout.INBOUND_PLAIN_PORT),
                 hbone=pod.listen(pod.pod_ns, layout.HBONE_PORT),
                 app=pod.listen(pod.pod_ns, APP_PORT), app_skipped=pod.listen(pod.pod_ns, SKIPPED_PORT),
                 peer=pod.listen(pod.peer_ns, PEER_PORT))


@pytest.fixture
def attach(loader: Loader, pod: Pod, agent: Agent) -> Iterator[Callable[..., Outcome]]:
    """attach(**settings): attaches the pod (detached again at the end, whatever happens)."""
    def do(**settings: Any) -> Outcome:
        return loader.attach_pod(pod.id, pod.netns_path, str(pod.cgroup), agent.inbound, **settings)
    try:
        yield do
    finally:
        loader.detach_pod(pod.id)


def accept(listener: socket.socket, timeout: float = 5) -> tuple[socket.socket, str]:
    """The next connection on `listener` and the token line it carries (empty for a silent client)."""
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    conn.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(100)
        if not chunk:
            break
        data += chunk
    return conn, data.decode().strip()


def nothing_waiting(listener: socket.socket) -> bool:
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


CGROUP_PROGRAMS = sorted(p.name for p in layout.PROGRAMS if p.target is layout.Target.CGROUP)


def cgroup_programs(cgroup: Path) -> list[str] | None:
    """What bpftool sees attached to the cgroup (None without bpftool)."""
    if shutil.which("bpftool") is None:
        return None
    out = run("bpftool", "-j", "cgroup", "show", str(cgroup)).strip()
    return sorted(p["name"] for p in json.loads(out)) if out else []


def netns_links(netns_path: str) -> list[int] | None:
    """Program ids bpftool sees linked to the network namespace (None without bpftool)."""
    if shutil.which("bpftool") is None:
        return None
    ino = os.stat(netns_path).st_ino
    return [link["prog_id"] for link in json.loads(run("bpftool", "-j", "link", "show"))
            if link.get("type") == "netns" and link.get("netns_ino") == ino]


# --- outbound ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pod_ip", [POD_IP, None], ids=["to-pod-ip", "to-loopback"])
def test_an_app_connection_lands_on_15001_and_the_agent_reads_where_it_was_going(
        pod: Pod, agent: Agent, attach: Callable[..., Outcome], loader: Loader, pod_ip: str | None) -> None:
    assert attach(pod_ip=pod_ip) is Outcome.INSTALLED
    sent = pod.app_connect(PEER_IP, PEER_PORT, "out-1")
    conn, token = accept(agent.outbound)
    assert token == "out-1"
    redirect_ip = pod_ip or "127.0.0.1"
    assert conn.getsockname() == (redirect_ip, layout.OUTBOUND_PORT)
    assert list(conn.getpeername()) == sent["local"]  # the agent sees the app's own address as its peer
    assert sent["local"][0] == redirect_ip  # the pod IP when the loader has it (as with iptables)
    assert loader.original_destination(conn) == (PEER_IP, PEER_PORT)
    with pytest.raises(NoOriginalDestination):  # read once: the record is gone
        loader.original_destination(conn)
    assert nothing_waiting(agent.peer)


def test_an_ipv4_mapped_connection_on_a_dual_stack_socket_is_captured_too(
        pod: Pod, agent: Agent, attach: Callable[..., Outcome], loader: Loader) -> None:
    attach(pod_ip=POD_IP)
    pod.app_connect(f"::ffff:{PEER_IP}", PEER_PORT, "v6-mapped", v6=True)
    conn, token = accept(agent.outbound)
    assert token == "v6-mapped"
    assert loader.original_destination(conn) == (PEER_IP, PEER_PORT)


def test_app_connections_the_iptables_rules_leave_alone_are_left_alone(
        pod: Pod, agent: Agent, attach: Callable[..., Outcome]) -> None:
    attach(pod_ip=POD_IP)
    pod.app_connect("127.0.0.1", APP_PORT, "loopback")
    assert accept(agent.app)[1] == "loopback"
    pod.app_connect(POD_IP, APP_PORT, "own-address")  # iptables: `! -d 127.0.0.1 -o lo -j ACCEPT`
    assert accept(agent.app)[1] == "own-address"
    pod.app_connect(PEER_IP, PEER_PORT, "marked", mark=layout.AGENT_MARK)  # the agent's mark
    conn, token = accept(agent.peer)
    assert token == "marked"
    assert conn.getpeername()[0] == POD_IP
    assert nothing_waiting(agent.outbound)


def test_the_agents_own_connections_are_neither_rewritten_nor_steered(
        pod: Pod, agent: Agent, attach: Callable[..., Outcome]) -> None:
    attach(pod_ip=POD_IP)
    out = pod.connect_from(pod.pod_ns, PEER_IP, PEER_PORT)  # outbound, from the pod's namespace
    out.sendall(b"agent-out\n")
    conn, token = accept(agent.peer)
    assert token == "agent-out"
    assert conn.getpeername()[0] == POD_IP
    to_app = pod.connect_from(pod.pod_ns, POD_IP, APP_PORT)  # to the app, as after 15006 or 15008
    to_app.sendall(b"agent-to-app\n")
    assert accept(agent.app)[1] == "agent-to-app"
    assert nothing_waiting(agent.outbound) and nothing_waiting(agent.inbound)


# --- inbound -------------------------------------------------------------------------------------------
def test_inbound_connections_land_on_15006_but_hbone_and_skipped_ports_go_through(
        pod: Pod, agent: Agent, attach: Callable[..., Outcome]) -> None:
    attach(pod_ip=POD_IP, skip_inbound_ports=[SKIPPED_PORT])
    c = pod.connect_from(pod.peer_ns, POD_IP, APP_PORT)
    c.sendall(b"plain\n")
    conn, token = accept(agent.inbound)
    assert token == "plain"
    assert conn.getsockname() == (POD_IP, APP_PORT)  # the agent learns the app port from its own socket
    assert conn.getpeername()[0] == PEER_IP
    pod.connect_from(pod.peer_ns, POD_IP, layout.HBONE_PORT).sendall(b"hbone\n")
    assert accept(agent.hbone)[1] == "hbone"
    pod.connect_from(pod.peer_ns, POD_IP, SKIPPED_PORT).sendall(b"skipped\n")
    assert accept(agent.app_skipped)[1] == "skipped"
    assert nothing_waiting(agent.app)


# --- lifecycle -------------------------------------------------------------------------------------------
def test_detach_restores_the_direct_paths(pod: Pod, agent: Agent, attach: Callable[..., Outcome],
                                          loader: Loader) -> None:
    attach(pod_ip=POD_IP)
    assert cgroup_programs(pod.cgroup) in (None, CGROUP_PROGRAMS)
    assert loader.detach_pod(pod.id) is True
    assert loader.detach_pod(pod.id) is False
    assert pod.id not in loader.list_pods()
    assert not layout.pod_dir(loader.root, pod.id).exists()
    assert cgroup_programs(pod.cgroup) in (None, [])
    assert netns_links(pod.netns_path) in (None, [])
    pod.app_connect(PEER_IP, PEER_PORT, "direct-out")
    assert accept(agent.peer)[1] == "direct-out"
    pod.connect_from(pod.peer_ns, POD_IP, APP_PORT).sendall(b"direct-in\n")
    assert accept(agent.app)[1] == "direct-in"
    assert nothing_waiting(agent.outbound) and nothing_waiting(agent.inbound)


def test_redirection_outlives_the_process_that_attached_it_and_is_adopted(
        pod: Pod, agent: Agent, attach: Callable[..., Outcome], loader: Loader, bpffs: Path) -> None:
    cfg = {"prefix": loader.root.name, "bpffs": str(bpffs), "pod": pod.id, "netns": pod.netns_path,
           "cgroup": str(pod.cgroup), "pod_ip": POD_IP}
    out = subprocess.run([sys.executable, "-c", ATTACH_AND_EXIT, json.dumps(cfg)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["INSTALLED"]

    # That agent is gone: the programs stay, its listener has left the sockmap.
    found = loader.inspect_pod(pod.id)
    assert found.exact, found.problems
    assert found.listener_cookie == 0
    assert cgroup_programs(pod.cgroup) in (None, CGROUP_PROGRAMS)
    assert netns_links(pod.netns_path) in (None, [s.prog_id for s in found.links if s.program == "steer_inbound"])
    # Outbound still goes to 15001 (refused when no agent listens there); inbound is refused, not let through.
    pod.app_connect(PEER_IP, PEER_PORT, "while-away")
    conn, _ = accept(agent.outbound)
    # A process that has not adopted the pod yet still finds the record in the pod's pinned map: a new
    # agent takes connections on its listeners a moment before it adopts (a hitless restart).
    assert loader.original_destination(conn) == (PEER_IP, PEER_PORT)
    pod.app_connect(PEER_IP, PEER_PORT, "while-away-2")
    conn, _ = accept(agent.outbound)
    with pytest.raises(ConnectionRefusedError):
        pod.connect_from(pod.peer_ns, POD_IP, APP_PORT)
    assert nothing_waiting(agent.app)

    # The next agent adopts exactly what is pinned, and puts its own listener in.
    assert attach(pod_ip=POD_IP) is Outcome.ADOPTED
    adopted = loader.inspect_pod(pod.id)
    assert [s.link_id for s in adopted.links] == [s.link_id for s in found.links]
    assert adopted.listener_cookie == socket_cookie(agent.inbound)
    assert loader.original_destination(conn) == (PEER_IP, PEER_PORT)  # recorded before the adoption
    pod.connect_from(pod.peer_ns, POD_IP, APP_PORT).sendall(b"back\n")
    assert accept(agent.inbound)[1] == "back"
    pod.app_connect(PEER_IP, PEER_PORT, "after")
    conn, token = accept(agent.outbound)
    assert token == "after"
    assert loader.original_destination(conn) == (PEER_IP, PEER_PORT)


def test_a_pinned_set_that_is_not_exactly_ours_is_redone(
        pod: Pod, agent: Agent, attach: Callable[..., Outcome], loader: Loader) -> None:
    assert attach(pod_ip=POD_IP) is Outcome.INSTALLED
    first = loader.inspect_pod(pod.id)
    os.unlink(first.pin_dir / "link_sockops")  # a half-removed set: sockops is detached with its pin
    half = loader.inspect_pod(pod.id)
    assert not half.exact
    assert any("sockops" in p for p in half.problems)
    assert attach(pod_ip=POD_IP) is Outcome.REDONE
    redone = loader.inspect_pod(pod.id)
    assert redone.exact, redone.problems
    assert {s.link_id for s in redone.links}.isdisjoint(s.link_id for s in first.links)
    assert cgroup_programs(pod.cgroup) in (None, CGROUP_PROGRAMS)  # the old ones are gone
    pod.app_connect(PEER_IP, PEER_PORT, "redone")
    conn, _ = accept(agent.outbound)
    assert loader.original_destination(conn) == (PEER_IP, PEER_PORT)


def test_moving_a_pod_to_another_cgroup_redoes_it_and_frees_the_old_one(
        pod: Pod, agent: Agent, attach: Callable[..., Outcome], loader: Loader) -> None:
    attach()
    other = make_cgroup(f"{pod.cgroup.name}-2")
    try:
        outcome = loader.attach_pod(pod.id, pod.netns_path, str(other), agent.inbound)
        assert outcome is Outcome.REDONE
        assert loader.inspect_pod(pod.id).cgroup_id == os.stat(other).st_ino
        assert cgroup_programs(pod.cgroup) in (None, [])
        assert cgroup_programs(other) in (None, CGROUP_PROGRAMS)
        pod.app_connect(PEER_IP, PEER_PORT, "old-cgroup")  # the old cgroup is no longer captured
        assert accept(agent.peer)[1] == "old-cgroup"
    finally:
        loader.detach_pod(pod.id)
        remove_cgroup(other)


def test_bpftool_sees_the_attachment(pod: Pod, agent: Agent, attach: Callable[..., Outcome],
                                     loader: Loader) -> None:
    if shutil.which("bpftool") is None:
        pytest.skip("bpftool is not installed (Debian package bpftool)")
    attach(pod_ip=POD_IP)
    found = loader.inspect_pod(pod.id)
    assert cgroup_programs(pod.cgroup) == CGROUP_PROGRAMS
    assert netns_links(pod.netns_path) == [s.prog_id for s in found.links if s.program == "steer_inbound"]
    maps = json.loads(run("bpftool", "-j", "map", "show", "pinned",
                          str(found.pin_dir / layout.map_pin_name(layout.MAP_ORIG_BY_CONN))))
    assert maps["type"] == "lru_hash" and maps["max_entries"] == layout.ORIG_DST_MAX_ENTRIES


def test_the_pod_has_no_iptables_or_nftables_rules(pod: Pod, attach: Callable[..., Outcome]) -> None:
    attach(pod_ip=POD_IP)
    saved = run("ip", "netns", "exec", pod.pod_ns, "iptables-save")
    assert [line for line in saved.splitlines() if line and not line.startswith("#")] == []
    if shutil.which("nft") is not None:
        assert run("ip", "netns", "exec", pod.pod_ns, "nft", "list", "ruleset").strip() == ""


# --- bad input ---------------------------------------------------------------------------------------------
def assert_nothing_attached(loader: Loader, pod: Pod) -> None:
    assert pod.id not in loader.list_pods()
    assert not loader.inspect_pod(pod.id).present
    assert [p.name for p in loader.root.iterdir() if layout.pod_key(pod.id) in p.name] == []
    assert cgroup_programs(pod.cgroup) in (None, [])
    assert netns_links(pod.netns_path) in (None, [])


@pytest.mark.parametrize("case", ["no-cgroup", "v1-or-plain-dir", "no-netns", "netns-is-a-file",
                                  "not-listening", "listener-elsewhere", "bad-pod-ip", "bad-port"])
def test_bad_targets_are_refused_with_a_clear_error_and_leave_nothing(
        pod: Pod, agent: Agent, loader: Loader, case: str, tmp_path: Path) -> None:
    netns_path, cgroup, listener = pod.netns_path, str(pod.cgroup), agent.inbound
    settings: dict[str, Any] = {}
    match = {"no-cgroup": "does not exist", "v1-or-plain-dir": "cgroup v2", "no-netns": "does not exist",
             "netns-is-a-file": "namespace", "not-listening": "listening TCP socket",
             "listener-elsewhere": "not in the pod's network namespace", "bad-pod-ip": "IPv4",
             "bad-port": "ports to skip"}[case]
    if case == "no-cgroup":
        cgroup = str(CGROUP2 / "ambt-does-not-exist")
    elif case == "v1-or-plain-dir":
        cgroup = str(tmp_path)
    elif case == "no-netns":
        netns_path = "/run/netns/ambt-does-not-exist"
    elif case == "netns-is-a-file":
        netns_path = str(tmp_path / "file")
        Path(netns_path).write_text("")
    elif case == "not-listening":
        with netns.entered(pod.pod_ns):
            listener = socket.socket()
        pod.sockets.append(listener)
    elif case == "listener-elsewhere":
        listener = socket.socket()
        pod.sockets.append(listener)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
    elif case == "bad-pod-ip":
        settings["pod_ip"] = "fe80::1"
    else:
        settings["skip_inbound_ports"] = [0]
    try:
        with pytest.raises(PodTargetError, match=match):
            loader.attach_pod(pod.id, netns_path, cgroup, listener, **settings)
        assert_nothing_attached(loader, pod)
    finally:
        loader.detach_pod(pod.id)


def test_a_program_that_does_not_compile_makes_ebpf_unavailable(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(loader_module.BPF_DIR / layout.HEADER, tmp_path)
    for source in layout.SOURCES:
        (tmp_path / source).write_text('#include "redirect.h"\nint connect4(struct bpf_sock_addr *ctx) { return x; }\n')
    monkeypatch.setattr(loader_module, "BPF_DIR", tmp_path)
    with pytest.raises(EbpfUnavailable, match=r"could not compile bpf/connect\.bpf\.c.*--redirect-mode iptables"):
        loader_module._compile()


def test_a_kernel_refusal_midway_leaves_nothing_attached(
        pod: Pod, agent: Agent, loader: Loader, monkeypatch: pytest.MonkeyPatch) -> None:
    real = objects.link_create

    def refuse_netns(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
        if attach_type == layout.ATTACH_SK_LOOKUP:  # the last link, after the three cgroup links
            raise BpfCallError(f"attaching {what}", 22)
        return real(prog_fd, target_fd, attach_type, what)

    monkeypatch.setattr(objects, "link_create", refuse_netns)
    try:
        with pytest.raises(AttachError, match="nothing new was left attached"):
            loader.attach_pod(pod.id, pod.netns_path, str(pod.cgroup), agent.inbound, pod_ip=POD_IP)
        assert_nothing_attached(loader, pod)
        pod.app_connect(PEER_IP, PEER_PORT, "unattached")
        assert accept(agent.peer)[1] == "unattached"
    finally:
        loader.detach_pod(pod.id)


def test_the_compiler_lives_in_a_child_process_and_never_in_the_loaders(loader: Loader) -> None:
    loader.probe()  # compiled (once per process), by `bpf.compiler` in a child
    mapped = Path("/proc/self/maps").read_text()
    assert "libLLVM" not in mapped and "libclang" not in mapped and "libbcc" not in mapped
    assert "bcc" not in sys.modules
    # What the child printed is what this process loads copies of: the kernel's tags agree.
    program_set = loader_module.compiled()
    maps = [objects.map_create(spec) for spec in program_set.maps.values()]
    try:
        fds = dict(zip(program_set.maps, maps, strict=True))
        for name, program in program_set.programs.items():
            fd = loader_module._load_copy(program, fds)
            try:
                assert objects.prog_info(fd).tag == program.tag, name
            finally:
                os.close(fd)
    finally:
        for fd in maps:
            os.close(fd)


def test_a_program_the_verifier_refuses_says_what_the_verifier_said() -> None:
    exit_only = bytes([0x95, 0, 0, 0, 0, 0, 0, 0])  # "exit" with r0 never set
    with pytest.raises(BpfCallError, match=r"loading program refused .*verifier: .*R0 !read_ok"):
        objects.prog_load(layout.PROG_TYPE_SOCK_OPS, "refused", exit_only, "GPL")
