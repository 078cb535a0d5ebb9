"""The CNI plugin as the runtime runs it (the `ambient-cni` wrapper, a real process, the config on stdin)
against the agent's real handover server, pod source and enroller on a Unix socket in a temporary
directory; only the capture itself is scripted.  The pod's "network namespace" is the test's own
(`/proc/self/ns/net` as the plugin opens it), which needs no root."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from mesh.proto import discovery_pb2 as pb
from nodeagent.cni import protocol
from nodeagent.enroll import Enroller
from nodeagent.errors import RedirectError
from nodeagent.pods.cni import CniPodSource
from nodeagent.pods.handover import HandoverServer
from nodeagent.pods.source import PodRef
from nodeagent.redirect.base import Capture, Outcome
from nodeagent.state import WORKLOAD, MeshState

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[3]
WRAPPER = ROOT / "nodeagent" / "cni" / "ambient-cni"
NODE = "node-1"
PREV_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "9a:3c:1f:00:00:05", "sandbox": "/var/run/netns/cni-1"}],
    "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}],
    "dns": {},
}


def workload(name: str, *, namespace: str = "shop", mesh: bool = True, uid: str = "") -> pb.Workload:
    return pb.Workload(uid=uid or f"uid-{name}", name=name, namespace=namespace, node=NODE,
                       service_account=name, tunnel_protocol=pb.HBONE if mesh else pb.NONE)


# ---- the agent's side: real server, source and enroller; scripted capture -----------------------------------


class Redirector:
    mode = "scripted"

    def __init__(self, events: list[str], fail: dict[str, Exception]) -> None:
        self.events = events
        self.fail = fail

    def install(self, pod: PodRef, listeners: Mapping[int, socket.socket]) -> Outcome:
        if pod.name in self.fail:
            raise self.fail[pod.name]
        assert os.path.exists(pod.netns)
        self.events.append(f"install {pod.name} {pod.ip}")
        return Outcome.INSTALLED

    def adopt(self, pod: PodRef, listeners: Mapping[int, socket.socket]) -> bool:
        return False

    def remove(self, pod: PodRef) -> bool:
        assert os.path.exists(pod.netns), "capture is removed while the namespace is still held"
        self.events.append(f"remove {pod.name}")
        return True

    def verify(self, pod: PodRef) -> Capture:
        return Capture(self.mode, present=False, exact=False)

    def original_destination(self, sock: socket.socket) -> tuple[str, int]:
        raise AssertionError("not used")


@dataclass
class Handle:
    name: str
    events: list[str]
    listeners: dict[int, socket.socket] = field(default_factory=dict)

    async def stop(self) -> None:
        self.events.append(f"stop {self.name}")


@dataclass
class Agent:
    socket: Path
    pods: CniPodSource
    enroller: Enroller
    state: MeshState
    events: list[str]


@asynccontextmanager
async def agent(tmp_path: Path, *workloads: pb.Workload, fail: dict[str, Exception] | None = None) -> AsyncIterator[Agent]:
    state = MeshState()
    state.apply(WORKLOAD, {w.uid: w for w in workloads}, ())
    events: list[str] = []

    async def start_pod(ref: PodRef) -> Handle:
        events.append(f"listen {ref.name}")
        return Handle(ref.name, events)

    pods = CniPodSource(state, NODE, state_dir=tmp_path / "state", netns_dirs=(), proc=str(tmp_path / "no-proc"))
    enroller = Enroller(pods, Redirector(events, {} if fail is None else fail), start_pod, resync_interval=60)
    path = tmp_path / "run" / "cni.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(enroller.run)
        await nursery.start(HandoverServer(str(path), pods, enroller, prune_interval=0.05).serve)
        yield Agent(path, pods, enroller, state, events)
        nursery.cancel_scope.cancel()
    pods.close()  # the agent's exit lets go of the namespaces


# ---- the plugin, as the runtime runs it ---------------------------------------------------------------------


@dataclass
class Ran:
    code: int
    out: Any  # stdout as JSON, or None when empty
    err: str


def config(sock: Path | str, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": protocol.PLUGIN_TYPE,
            "agentSocket": str(sock), "agentTimeout": 5, "prevResult": PREV_RESULT, **extra}


def cni_env(command: str, *, pod: str = "web-0", namespace: str = "shop", uid: str = "", container: str = "c1",
            netns: str = "/proc/self/ns/net") -> dict[str, str]:
    args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container}"
    return {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
            "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": args + f";K8S_POD_UID={uid or 'uid-' + pod}"}


async def plugin(env: Mapping[str, str], stdin: bytes | dict[str, Any]) -> Ran:
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    done = await trio.run_process([str(WRAPPER)], stdin=data, capture_stdout=True, capture_stderr=True, check=False,
                                  env={"PATH": os.environ["PATH"], "AMBIENT_CNI_PYTHON": sys.executable, **env})
    text = done.stdout.decode()
    return Ran(done.returncode, json.loads(text) if text.strip() else None, done.stderr.decode())


def run_plugin(env: Mapping[str, str], stdin: bytes | dict[str, Any]) -> Ran:
    return trio.run(plugin, env, stdin)


def error(ran: Ran, code: int) -> str:
    assert ran.code != 0, ran
    assert set(ran.out) == {"cniVersion", "code", "msg", "details"}, ran.out
    assert ran.out["code"] == code, ran.out
    return str(ran.out["msg"])


# ---- VERSION and what the runtime gets wrong ----------------------------------------------------------------


def test_version_lists_the_supported_versions() -> None:
    ran = run_plugin({"CNI_COMMAND": "VERSION"}, {"cniVersion": "1.0.0"})
    assert ran.code == 0
    assert ran.out == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}
    assert run_plugin({"CNI_COMMAND": "VERSION"}, b"").out["supportedVersions"][-1] == "1.0.0"


@pytest.mark.parametrize(("env", "stdin", "code", "says"), [
    ({}, {"cniVersion": "1.0.0"}, 4, "CNI_COMMAND is not set"),
    ({"CNI_COMMAND": "ATTACH"}, {"cniVersion": "1.0.0"}, 4, "not a CNI command"),
    ({**cni_env("ADD"), "CNI_NETNS": ""}, None, 4, "ADD needs CNI_NETNS"),
    ({k: v for k, v in cni_env("ADD").items() if k != "CNI_PATH"}, None, 4, "CNI_PATH"),
    ({**cni_env("ADD"), "CNI_ARGS": "K8S_POD_NAME"}, None, 4, "CNI_ARGS: 'K8S_POD_NAME' is not KEY=VALUE"),
    (cni_env("ADD"), b"{not json", 6, "not JSON"),
    (cni_env("ADD"), b"[1, 2]", 6, "not a JSON object"),
    (cni_env("ADD"), {"name": "n", "type": protocol.PLUGIN_TYPE}, 7, "no cniVersion"),
    (cni_env("ADD"), {"cniVersion": "0.2.0", "name": "n", "type": protocol.PLUGIN_TYPE}, 1, "0.2.0 is not supported"),
    (cni_env("ADD"), {"cniVersion": "1.0.0", "type": protocol.PLUGIN_TYPE, "prevResult": PREV_RESULT}, 7, "no 'name'"),
    (cni_env("ADD"), {"cniVersion": "1.0.0", "name": "n", "type": protocol.PLUGIN_TYPE}, 7, "must be chained after"),
    (cni_env("ADD"), {**config("/x"), "agentTimeout": "soon"}, 7, "agentTimeout must be a positive number"),
    (cni_env("ADD"), {**config("/x"), "excludeNamespaces": "kube-system"}, 7, "excludeNamespaces must be a list"),
    (cni_env("ADD"), {**config("/x"), "failOpen": "yes"}, 7, "failOpen must be true or false"),
    (cni_env("ADD"), {**config("/x"), "prevResult": {"ips": [{"address": "10.0.0.300/24"}]}}, 7, "is not an address"),
    (cni_env("CHECK"), {**config("/x"), "cniVersion": "0.3.1"}, 1, "CHECK needs cniVersion 0.4.0"),
    (cni_env("ADD", netns="/nonexistent/netns"), None, 3, "cannot open the network namespace /nonexistent/netns"),
])
def test_what_the_runtime_gets_wrong_is_a_cni_error(env: dict[str, str], stdin: Any, code: int, says: str) -> None:
    ran = run_plugin(env, config("/nonexistent/cni.sock") if stdin is None else stdin)
    assert says in error(ran, code)
    assert says in ran.err  # and the runtime's log says it too


# ---- ADD ----------------------------------------------------------------------------------------------------


def test_add_hands_the_pod_over_and_answers_once_it_is_enrolled(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, workload("web-0")) as a:
            ran = await plugin(cni_env("ADD"), config(a.socket))
            assert ran.code == 0, ran
            assert ran.out == PREV_RESULT  # unchanged
            assert a.events == ["listen web-0", "install web-0 10.244.1.5"]  # before the answer
            assert "pod shop/web-0: enrolled" in ran.err
            (held,) = a.pods.handovers()
            assert held.pod.container_id == "c1" and held.pod.ips == ("10.244.1.5",)
            assert os.readlink(f"/proc/self/fd/{held.fd}").startswith("net:[")
            assert os.stat(held.link).st_ino == os.stat("/proc/self/ns/net").st_ino
            (ref, _), = a.enroller.enrolled.values()
            assert (ref.uid, ref.ip, ref.netns, str(ref.identity)) == (
                "uid-web-0", "10.244.1.5", held.link, "spiffe://cluster.local/ns/shop/sa/web-0")
            record = json.loads((tmp_path / "state" / "cni" / "pods.json").read_text())
            assert [r["pod"]["name"] for r in record] == ["web-0"]

    trio.run(main)


def test_add_of_a_pod_outside_the_mesh_answers_not_in_mesh_and_keeps_the_pod(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, workload("web-0", mesh=False)) as a:
            ran = await plugin(cni_env("ADD"), config(a.socket))
            assert ran.code == 0 and ran.out == PREV_RESULT
            assert "not-in-mesh" in ran.err and a.events == []
            # Held all the same: when its namespace joins the mesh it is enrolled without a new sandbox.
            assert [r.name for r in a.pods.on_node()] == ["web-0"]
            a.state.apply(WORKLOAD, {"uid-web-0": workload("web-0")}, ())
            await a.enroller.settle()
            assert a.events == ["listen web-0", "install web-0 10.244.1.5"]

    trio.run(main)


def test_add_waits_for_discovery_to_know_the_pod(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path) as a:
            async with trio.open_nursery() as nursery:
                async def learn() -> None:
                    await trio.sleep(0.5)
                    a.state.apply(WORKLOAD, {"uid-web-0": workload("web-0")}, ())

                nursery.start_soon(learn)
                ran = await plugin(cni_env("ADD"), config(a.socket))
            assert ran.code == 0, ran
            assert "install web-0 10.244.1.5" in a.events

    trio.run(main)


def test_add_fails_when_discovery_never_knows_the_pod(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path) as a:
            ran = await plugin(cni_env("ADD"), config(a.socket, agentTimeout=1.5))
            assert "discovery does not know pod shop/web-0 on node node-1" in error(ran, 11)

    trio.run(main)


def test_add_fails_with_the_reason_when_the_pod_cannot_be_captured(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, workload("web-0"), fail={"web-0": RedirectError("iptables-restore failed")}) as a:
            ran = await plugin(cni_env("ADD"), config(a.socket))
            msg = error(ran, 11)
            assert "did not enroll pod shop/web-0" in msg and "iptables-restore failed" in msg
            assert "must not start uncaptured" in ran.out["details"]

    trio.run(main)


def test_add_fails_when_no_agent_listens_and_says_where_it_looked(tmp_path: Path) -> None:
    ran = run_plugin(cni_env("ADD"), config(tmp_path / "cni.sock"))
    msg = error(ran, 11)
    assert f"the node agent is not reachable at {tmp_path / 'cni.sock'}" in msg
    assert "is the node agent running on this node?" in ran.out["details"]


def test_add_fails_when_the_agent_does_not_answer_in_time(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as mute:
        mute.bind(str(tmp_path / "cni.sock"))
        mute.listen()
        ran = run_plugin(cni_env("ADD"), config(tmp_path / "cni.sock", agentTimeout=0.5))
    assert f"the node agent at {tmp_path / 'cni.sock'} did not answer within" in error(ran, 11)


def test_fail_open_starts_the_pod_without_an_agent(tmp_path: Path) -> None:
    ran = run_plugin(cni_env("ADD"), config(tmp_path / "cni.sock", failOpen=True))
    assert ran.code == 0 and ran.out == PREV_RESULT
    assert "starts without the mesh" in ran.err


def test_excluded_namespaces_and_sandboxes_that_are_not_pods_pass_through(tmp_path: Path) -> None:
    for env in (cni_env("ADD", namespace="istio-system"), {**cni_env("ADD"), "CNI_ARGS": "IgnoreUnknown=1"}):
        ran = run_plugin(env, config(tmp_path / "no-agent.sock"))
        assert ran.code == 0 and ran.out == PREV_RESULT, ran
    ran = run_plugin(cni_env("ADD", namespace="batch"), config(tmp_path / "no-agent.sock", excludeNamespaces=["batch"]))
    assert ran.code == 0 and ran.out == PREV_RESULT


def test_the_same_sandbox_handed_over_twice_is_held_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, workload("web-0")) as a:
            for _ in range(2):
                assert (await plugin(cni_env("ADD"), config(a.socket))).code == 0
            assert len(a.pods.handovers()) == 1
            assert a.events == ["listen web-0", "install web-0 10.244.1.5"]  # not released and redone

    trio.run(main)


# ---- DEL and CHECK ------------------------------------------------------------------------------------------


def test_del_releases_the_pod_then_closes_its_namespace_and_is_idempotent(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, workload("web-0")) as a:
            assert (await plugin(cni_env("ADD"), config(a.socket))).code == 0
            (held,) = a.pods.handovers()
            for _ in range(2):
                ran = await plugin(cni_env("DEL"), config(a.socket))
                assert (ran.code, ran.out) == (0, None), ran
            assert a.events == ["listen web-0", "install web-0 10.244.1.5", "remove web-0", "stop web-0"]
            assert a.pods.handovers() == [] and a.enroller.enrolled == {}
            assert not os.path.lexists(held.link)
            with pytest.raises(OSError):
                os.fstat(held.fd)
            assert json.loads((tmp_path / "state" / "cni" / "pods.json").read_text()) == []

    trio.run(main)


def test_a_late_del_of_an_old_sandbox_leaves_the_new_one(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, workload("web-0")) as a:
            assert (await plugin(cni_env("ADD", container="c2"), config(a.socket))).code == 0
            assert (await plugin(cni_env("DEL", container="c1"), config(a.socket))).code == 0
            assert [h.pod.container_id for h in a.pods.handovers()] == ["c2"]
            assert "remove web-0" not in a.events

    trio.run(main)


def test_del_succeeds_without_an_agent_and_without_a_netns(tmp_path: Path) -> None:
    env = {**cni_env("DEL"), "CNI_NETNS": "", "CNI_IFNAME": "", "CNI_PATH": ""}
    ran = run_plugin(env, config(tmp_path / "cni.sock"))
    assert (ran.code, ran.out) == (0, None)
    assert "deleted without telling the node agent" in ran.err


def test_check_says_whether_the_pod_is_enrolled(tmp_path: Path) -> None:
    async def main() -> None:
        fail: dict[str, Exception] = {}
        async with agent(tmp_path, workload("web-0"), workload("db-0", mesh=False), fail=fail) as a:
            for pod in ("web-0", "db-0"):
                assert (await plugin(cni_env("ADD", pod=pod), config(a.socket))).code == 0
                ran = await plugin(cni_env("CHECK", pod=pod), config(a.socket))
                assert (ran.code, ran.out) == (0, None), ran
            ran = await plugin(cni_env("CHECK", pod="cache-0"), config(a.socket))
            assert "the node agent does not hold pod shop/cache-0" in error(ran, 100)
            fail["db-0"] = RedirectError("iptables-restore failed")
            a.state.apply(WORKLOAD, {"uid-db-0": workload("db-0")}, ())  # joins the mesh, cannot be captured
            await a.enroller.settle()
            ran = await plugin(cni_env("CHECK", pod="db-0"), config(a.socket))
            assert "pod shop/db-0 is not enrolled in the mesh: iptables-restore failed" in error(ran, 100)

    trio.run(main)


def test_a_pod_discovery_forgets_is_released_and_its_namespace_closed(tmp_path: Path) -> None:
    # As when the plugin's DEL never reached the agent.
    async def main() -> None:
        async with agent(tmp_path, workload("web-0")) as a:
            assert (await plugin(cni_env("ADD"), config(a.socket))).code == 0
            (held,) = a.pods.handovers()
            a.state.apply(WORKLOAD, {}, ["uid-web-0"])
            with trio.fail_after(5):
                while os.path.lexists(held.link):
                    await trio.sleep(0.02)
            assert a.events[-2:] == ["remove web-0", "stop web-0"] and a.pods.handovers() == []
            assert json.loads((tmp_path / "state" / "cni" / "pods.json").read_text()) == []

    trio.run(main)


def test_check_fails_without_an_agent(tmp_path: Path) -> None:
    assert "not reachable" in error(run_plugin(cni_env("CHECK"), config(tmp_path / "cni.sock")), 11)


# ---- across a restart of the agent --------------------------------------------------------------------------


def test_a_restarted_agent_holds_the_pods_of_its_record_again(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, workload("web-0")) as a:
            assert (await plugin(cni_env("ADD"), config(a.socket))).code == 0
        # The record names the namespace as the runtime did (here the plugin's /proc/self/ns/net, which
        # is the test's namespace too): opened again, it is the same namespace.
        pods = CniPodSource(MeshState(), NODE, state_dir=tmp_path / "state", netns_dirs=(), proc=str(tmp_path))
        assert pods.restore() == 1
        (held,) = pods.handovers()
        assert held.pod.container_id == "c1" and os.stat(held.link).st_ino == os.stat("/proc/self/ns/net").st_ino
        pods.close()

    trio.run(main)


def test_a_malformed_request_is_answered_not_obeyed(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent(tmp_path, workload("web-0")) as a:
            def ask() -> bytes:
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                    s.connect(str(a.socket))
                    s.send(b'{"v": 1, "op": "add", "pod": {"namespace": "shop"}}')
                    return s.recv(65536)

            answer = protocol.Answer.decode(await trio.to_thread.run_sync(ask))
            assert answer.result == protocol.FAILED and "name: required" in answer.msg
            assert a.pods.handovers() == []

    trio.run(main)
