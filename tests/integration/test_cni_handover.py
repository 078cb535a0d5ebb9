"""The CNI handover for real: Debian's CNI plugins (loopback, then bridge with host-local) wire a pod's
network namespace as a runtime would, our plugin chained after them (installed by `nodeagent.cni.install`
into a conflist) hands the namespace to the agent's side (the handover server, the CNI pod source and the
enroller with the iptables redirector, in this process), which opens the pod's listeners and installs
the in-pod rules before the ADD returns.  CHECK agrees; a restarted agent finds the pod again from its
record and, without one, by scanning for its address; DEL removes the rules and lets go.

The runtime's part is played by a few lines here (libcni's order: ADD in the list's order with each
result as the next plugin's prevResult, DEL in reverse with the ADD result), the plugins run inside a
"node" namespace so that the bridge and host-side veth are made there.  Everything is named `ambt-...`
and removed by the fixture's finalizer.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from mesh.proto import discovery_pb2 as pb
from nodeagent.cni import install
from nodeagent.enroll import Enroller
from nodeagent.pods.cni import CniPodSource
from nodeagent.pods.handover import HandoverServer
from nodeagent.pods.source import PodRef
from nodeagent.proxy.sockets import listener_in
from nodeagent.redirect import iptables
from nodeagent.redirect.iptables import IptablesRedirector
from nodeagent.redirect.rules import HBONE_PORT, INBOUND_PLAIN_PORT, OUTBOUND_PORT
from nodeagent.state import WORKLOAD, MeshState

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

DEBIAN_CNI = Path("/usr/lib/cni")
NODE = "node-1"
POD = pb.Workload(uid="uid-web-0", name="web-0", namespace="shop", node=NODE, service_account="web",
                  tunnel_protocol=pb.HBONE)
PORTS = (OUTBOUND_PORT, INBOUND_PLAIN_PORT, HBONE_PORT)


# ---- the runtime's part -------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """What a container runtime does with CNI, for one pod: plugins run in the node's namespace."""

    node_netns: str
    pod_netns: str
    bin_dir: Path
    conf_dir: Path
    container_id: str = field(default_factory=lambda: secrets.token_hex(16))

    def exec(self, command: str, conf: dict[str, Any], ifname: str) -> dict[str, Any] | None:
        env = {"PATH": os.environ["PATH"], "AMBIENT_CNI_PYTHON": sys.executable, "CNI_COMMAND": command,
               "CNI_CONTAINERID": self.container_id, "CNI_NETNS": f"/run/netns/{self.pod_netns}",
               "CNI_IFNAME": ifname, "CNI_PATH": f"{self.bin_dir}:{DEBIAN_CNI}",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={POD.namespace};K8S_POD_NAME={POD.name};"
                           f"K8S_POD_INFRA_CONTAINER_ID={self.container_id};K8S_POD_UID={POD.uid}"}
        binary = next(p for d in (self.bin_dir, DEBIAN_CNI) if (p := d / conf["type"]).exists())
        done = subprocess.run(["nsenter", f"--net=/run/netns/{self.node_netns}", str(binary)],
                              input=json.dumps(conf).encode(), capture_output=True, env=env, timeout=60, check=False)
        if done.returncode != 0:
            raise AssertionError(f"{conf['type']} {command} failed: {done.stdout.decode()} {done.stderr.decode()}")
        return json.loads(done.stdout) if done.stdout.strip() else None

    def conflist(self) -> dict[str, Any]:
        (path,) = install.config_files(self.conf_dir)
        return dict(json.loads(path.read_text()))

    def _plugin_conf(self, conflist: dict[str, Any], plugin: dict[str, Any], prev: Any) -> dict[str, Any]:
        conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def add(self) -> dict[str, Any]:
        self.exec("ADD", {"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"}, "lo")
        conflist = self.conflist()
        result = None
        for plugin in conflist["plugins"]:
            result = self.exec("ADD", self._plugin_conf(conflist, plugin, result), "eth0")
        assert result is not None
        self.result = result
        return result

    def check(self) -> None:
        conflist = self.conflist()
        for plugin in conflist["plugins"]:
            self.exec("CHECK", self._plugin_conf(conflist, plugin, self.result), "eth0")

    def delete(self) -> None:
        conflist = self.conflist()
        for plugin in reversed(conflist["plugins"]):
            self.exec("DEL", self._plugin_conf(conflist, plugin, self.result), "eth0")
        self.exec("DEL", {"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"}, "lo")


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    if not (DEBIAN_CNI / "bridge").exists():
        pytest.skip("Debian's containernetworking-plugins is not installed (scripts/setup-system.sh installs it)")
    tag = secrets.token_hex(3)
    node, pod = f"ambt-{tag}-node", f"ambt-{tag}-pod"
    subnet = f"10.250.{secrets.randbelow(250) + 1}"
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-ambt.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": f"ambt-{tag}",
        "plugins": [{"type": "bridge", "bridge": "ambt0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": f"{subnet}.0/24"}]],
                              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(tmp_path / "ipam")}}],
    }))
    try:
        for name in (node, pod):
            subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", node, "link", "set", "lo", "up"], check=True)
        assert install.main(["--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(conf_dir),
                             "--agent-socket", str(tmp_path / "run" / "cni.sock"), "--agent-timeout", "20"]) == 0
        yield Runtime(node, pod, bin_dir, conf_dir)
    finally:
        for name in (pod, node):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


# ---- the agent's part ---------------------------------------------------------------------------------------


@dataclass
class PodListeners:
    listeners: dict[int, socket.socket]

    async def stop(self) -> None:
        for sock in self.listeners.values():
            sock.close()


async def start_pod(ref: PodRef) -> PodListeners:
    return PodListeners({port: listener_in(ref.netns, "0.0.0.0", port) for port in PORTS})


@dataclass
class Agent:
    pods: CniPodSource
    enroller: Enroller


@asynccontextmanager
async def agent(tmp_path: Path, *, state_dir: Path | None, pod: pb.Workload = POD) -> AsyncIterator[Agent]:
    state = MeshState()
    state.apply(WORKLOAD, {pod.uid: pod}, ())
    pods = await trio.to_thread.run_sync(lambda: CniPodSource.open(state, NODE, state_dir=state_dir,
                                                                   netns_dirs=("/run/netns",)))
    enroller = Enroller(pods, IptablesRedirector(), start_pod, resync_interval=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(enroller.run)
        await nursery.start(HandoverServer(str(tmp_path / "run" / "cni.sock"), pods, enroller).serve)
        yield Agent(pods, enroller)
        nursery.cancel_scope.cancel()
    for _, handle in enroller.enrolled.values():  # what the agent's exit closes (the rules stay)
        await handle.stop()
    pods.close()


def listening_ports(netns: str) -> set[int]:
    out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def captured_destination(rt: Runtime, listener: socket.socket, address: tuple[str, int]) -> tuple[str, int]:
    """Where a connection the pod's application makes to `address` was going, as the agent's outbound
    listener (15001) sees it."""
    client = subprocess.Popen(["ip", "netns", "exec", rt.pod_netns, sys.executable, "-c",
                               f"import socket; socket.create_connection({address!r}, timeout=5).sendall(b'hi')"])
    try:
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            return iptables.original_destination(conn)
    finally:
        listener.setblocking(False)
        client.wait(timeout=10)


# ---- the test -----------------------------------------------------------------------------------------------


def test_a_pod_wired_by_real_cni_plugins_is_handed_over_enrolled_found_again_and_let_go(
        runtime: Runtime, tmp_path: Path) -> None:
    pod_path = f"/run/netns/{runtime.pod_netns}"

    async def main() -> None:
        async with agent(tmp_path, state_dir=tmp_path / "state") as a:
            result = await trio.to_thread.run_sync(runtime.add)
            # Our plugin printed the bridge's result unchanged.
            (ip,) = [entry["address"].split("/")[0] for entry in result["ips"]]
            assert result["interfaces"][-1]["sandbox"] == pod_path
            # Enrolled before the ADD returned: listeners in the pod, then exactly our rules.
            (ref, handle), = a.enroller.enrolled.values()
            assert (ref.uid, ref.ip) == (POD.uid, ip)
            assert os.stat(ref.netns).st_ino == os.stat(pod_path).st_ino
            assert set(PORTS) <= listening_ports(runtime.pod_netns)
            assert iptables.inspect(pod_path).complete()
            gateway = result["ips"][0]["gateway"]
            assert captured_destination(runtime, handle.listeners[OUTBOUND_PORT], (gateway, 9)) == (gateway, 9)
            await trio.to_thread.run_sync(runtime.check)

        # A restarted agent: the plugin is not called again; the record says where the pod's namespace is.
        async with agent(tmp_path, state_dir=tmp_path / "state") as a:
            (ref, _), = a.enroller.enrolled.values()
            assert ref.ip == ip and a.pods.handovers()[0].pod.container_id == runtime.container_id
            assert iptables.inspect(pod_path).complete()  # adopted as it was

        # Without a record (as for pods running before the plugin was installed): found by the address
        # discovery has for it by now.
        running = pb.Workload()
        running.CopyFrom(POD)
        running.addresses.append(ip)
        async with agent(tmp_path, state_dir=None, pod=running) as a:
            (held,) = a.pods.handovers()
            assert held.pod.netns == pod_path and held.pod.ips == (ip,)
            assert [r.uid for r, _ in a.enroller.enrolled.values()] == [POD.uid]

        async with agent(tmp_path, state_dir=tmp_path / "state") as a:
            await trio.to_thread.run_sync(runtime.delete)
            assert iptables.inspect(pod_path).empty
            assert not set(PORTS) & listening_ports(runtime.pod_netns)
            assert a.enroller.enrolled == {} and a.pods.handovers() == []
            await trio.to_thread.run_sync(runtime.delete)  # DEL again: nothing left, and no error

    trio.run(main)
    assert json.loads((tmp_path / "state" / "cni" / "pods.json").read_text()) == []
    shutil.rmtree(tmp_path / "ipam", ignore_errors=True)
