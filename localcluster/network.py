"""Build and remove a cluster's network with pyroute2: namespaces, veths, bridges, routes, rules.

Nothing is created in the host's own namespace.  The underlay is a namespace of its own holding a
bridge; each node namespace is wired to it with a veth made from inside the node namespace (so its
peer never exists in the host namespace), and each pod namespace to its node's bridge the same way.
Cross-node pod traffic goes pod -> node bridge -> node routing -> underlay -> other node -> pod.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from pyroute2 import NetNS, netns

from localcluster.plan import ClusterPlan, NodePlan, PodPlan, hosts_file, resolv_conf, service_rules
from mesh import netns as mnetns
from mesh.errors import MeshError

log = logging.getLogger(__name__)

ETC_NETNS = Path("/etc/netns")
UNDERLAY_BRIDGE = "ul0"
NODE_BRIDGE = "cni0"


class NetworkError(MeshError):
    pass


def _open(name: str) -> NetNS:
    """A handle on an existing namespace.  pyroute2 creates a missing one by default, which would
    bring back a namespace that a concurrent `down` has just removed."""
    if not mnetns.exists(name):
        raise NetworkError(f"network namespace {name} does not exist (is the cluster being removed?)")
    return NetNS(name, flags=0)


def _up(ns: NetNS, ifname: str) -> int:
    index: int = ns.link_lookup(ifname=ifname)[0]
    ns.link("set", index=index, state="up")
    return index


def create_netns(name: str) -> None:
    if mnetns.exists(name):
        raise NetworkError(f"network namespace {name} already exists")
    netns.create(name)
    with _open(name) as ns:
        _up(ns, "lo")


def build_underlay(plan: ClusterPlan) -> None:
    create_netns(plan.underlay_netns)
    with _open(plan.underlay_netns) as ns:
        ns.link("add", ifname=UNDERLAY_BRIDGE, kind="bridge")
        index = _up(ns, UNDERLAY_BRIDGE)
        ns.addr("add", index=index, address=str(plan.underlay_gateway), prefixlen=plan.underlay_prefixlen)


def build_node(plan: ClusterPlan, node: NodePlan) -> None:
    create_netns(node.netns)
    with _open(node.netns) as ns:
        ns.link("add", ifname="eth0", kind="veth",
                peer={"ifname": node.underlay_port, "net_ns_fd": plan.underlay_netns})
        eth0 = _up(ns, "eth0")
        ns.addr("add", index=eth0, address=str(node.underlay_ip), prefixlen=plan.underlay_prefixlen)
        ns.link("add", ifname=NODE_BRIDGE, kind="bridge")
        bridge = _up(ns, NODE_BRIDGE)
        ns.addr("add", index=bridge, address=str(node.gateway), prefixlen=node.pod_cidr.prefixlen)
        for other in plan.nodes:
            if other.name != node.name:
                ns.route("add", dst=str(other.pod_cidr), gateway=str(other.underlay_ip))
    with _open(plan.underlay_netns) as ul:
        port = ul.link_lookup(ifname=node.underlay_port)[0]
        ul.link("set", index=port, master=ul.link_lookup(ifname=UNDERLAY_BRIDGE)[0], state="up")
        # The control plane listens in the underlay: pods that talk to it themselves (waypoints) need
        # the way back to their node's pod CIDR.
        ul.route("add", dst=str(node.pod_cidr), gateway=str(node.underlay_ip))
    mnetns.write_sysctl(node.netns, "net.ipv4.ip_forward", "1")
    # Bridged traffic between pods of one node must pass the node's conntrack, or the replies of a
    # service connection DNATed to a pod on the same bridge would skip the reverse translation.
    mnetns.write_sysctl(node.netns, "net.bridge.bridge-nf-call-iptables", "1")


def build_pod(plan: ClusterPlan, pod: PodPlan) -> None:
    create_netns(pod.netns)
    node = plan.node(pod.node)
    with _open(node.netns) as ns:
        ns.link("add", ifname=pod.host_veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod.netns})
        index = ns.link_lookup(ifname=pod.host_veth)[0]
        ns.link("set", index=index, master=ns.link_lookup(ifname=NODE_BRIDGE)[0], state="up")
        # Hairpin mode, as kubelet sets it: a pod's connection to its own service is DNATed back to
        # the port it came in on, which a bridge otherwise refuses to send a frame out of.
        ns.brport("set", index=index, mode=1)
    with _open(pod.netns) as ns:
        eth0 = _up(ns, "eth0")
        ns.addr("add", index=eth0, address=str(pod.ip), prefixlen=pod.prefixlen)
        ns.route("add", dst="0.0.0.0/0", gateway=str(pod.gateway))
    write_name_files(plan, pod)


def write_name_files(plan: ClusterPlan, pod: PodPlan) -> None:
    """/etc/netns/<pod netns>/{hosts,resolv.conf}, which `ip netns exec` shows the pod as /etc's.

    Written in place (not renamed over) so that running pods, which see them through bind mounts of
    the original inodes, read the new content."""
    directory = ETC_NETNS / pod.netns
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in (("hosts", hosts_file(plan, pod)), ("resolv.conf", resolv_conf(pod))):
        with open(directory / name, "w") as f:
            f.write(content)


def install_service_rules(plan: ClusterPlan, node: NodePlan) -> None:
    run_in(node.netns, ["iptables-restore", "--noflush"], stdin=service_rules(plan))


def run_in(netns_name: str, argv: list[str], stdin: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", netns_name, *argv]
    try:
        out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise NetworkError(f"{argv[0]} is not installed: run `make setup`") from exc
    if out.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} in {netns_name} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def remove_netns(name: str) -> None:
    """Delete one namespace (and with it its links) and its /etc/netns entry."""
    if mnetns.exists(name):
        netns.remove(name)
    shutil.rmtree(ETC_NETNS / name, ignore_errors=True)


def remove_all(prefix: str) -> list[str]:
    """Delete every namespace and /etc/netns entry whose name starts with `prefix`; pods first, so
    their veths go before the bridges they hang on.  Returns what was removed."""
    removed = []
    names = [n for n in mnetns.list_named() if n.startswith(prefix)]
    names.sort(key=lambda n: (0 if ".pod." in n else 1 if ".node." in n else 2, n))
    for name in names:
        try:
            netns.remove(name)
            removed.append(name)
        except OSError as exc:
            log.warning("could not remove network namespace %s: %s", name, exc)
    if ETC_NETNS.is_dir():
        for entry in ETC_NETNS.iterdir():
            if entry.name.startswith(prefix):
                shutil.rmtree(entry, ignore_errors=True)
    return removed
