"""Build and remove a cluster's network: namespaces, veths, bridges, routes, rules (pyroute2), and the pods'
interfaces, made by CNI plugins.

Nothing is created in the host's own namespace.  The underlay is a namespace of its own holding a
bridge; each node namespace is wired to it with a veth made from inside the node namespace (so its
peer never exists in the host namespace).  A pod is wired as a kubelet's runtime wires a sandbox: its
namespace is made, then its node's network configuration list (`plan.cni_conflist`, written to
`<cluster dir>/cni/<node>/net.d/` as a node's /etc/cni/net.d) is run by `localcluster.cni` inside the node's
namespace: Debian's `bridge` makes the node's bridge (at the first pod) and the pod's veth, `host-local`
gives the pod its planned address (its state in `<cluster dir>/cni/<node>/networks/`), `loopback` brings
`lo` up, and the mesh's `ambient-cni` (run from this tree, with the node's python3) hands the pod to the
node's agent.  Removing a pod runs the list's DEL, then removes its namespace.
Cross-node pod traffic goes pod -> node bridge -> node routing -> underlay -> other node -> pod.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pyroute2 import NetNS, netns

import nodeagent.cni
from localcluster import cni, components, processes
from localcluster.plan import (
    CNI_NETWORK,
    POD_IFNAME,
    ClusterPlan,
    NodePlan,
    PodPlan,
    hosts_file,
    node_netns,
    pod_cni_args,
    resolv_conf,
    service_rules,
)
from mesh import netns as mnetns
from mesh.errors import MeshError
from mesh.files import write_atomic
from nodeagent.cni.protocol import RUNTIME_ANNOTATIONS

log = logging.getLogger(__name__)

ETC_NETNS = Path("/etc/netns")
UNDERLAY_BRIDGE = "ul0"
DEBIAN_CNI_PLUGINS = Path("/usr/lib/cni")  # containernetworking-plugins: bridge, host-local, loopback, ...
MESH_CNI_PLUGINS = Path(nodeagent.cni.__file__).resolve().parent  # the ambient-cni wrapper, run from the tree
CNI_BIN_DIRS = (MESH_CNI_PLUGINS, DEBIAN_CNI_PLUGINS)  # CNI_PATH
CNI_SUBDIR = "cni"
CONFLIST_FILE = f"10-{CNI_NETWORK}.conflist"


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


def create_netns(name: str, *, loopback: bool = True) -> None:
    """A new namespace, with `lo` up unless a plugin brings it up (a pod's: CNI's `loopback`)."""
    if mnetns.exists(name):
        raise NetworkError(f"network namespace {name} already exists")
    netns.create(name)
    if loopback:
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
        # The node's bridge (cni0, the pods' gateway) is the bridge plugin's, made at the node's first pod.
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


# -- pods: CNI ---------------------------------------------------------------------------------------

def cni_dir(home: Path, node: str) -> Path:
    """A node's CNI files in the cluster's directory: what /etc/cni/net.d, /var/lib/cni/networks (host-local)
    and /var/lib/cni/results (the runtime's cache) are on a Kubernetes node."""
    return home / CNI_SUBDIR / node


def ipam_dir(home: Path, node: str) -> Path:
    return cni_dir(home, node) / "networks"


def conflist_path(home: Path, node: str) -> Path:
    return cni_dir(home, node) / "net.d" / CONFLIST_FILE


def write_cni_config(home: Path, node: str, conflist: dict[str, Any]) -> Path:
    path = conflist_path(home, node)
    write_atomic(path, (json.dumps(conflist, indent=2) + "\n").encode())
    return path


def cni_config(home: Path, node: str) -> cni.Conflist:
    """The node's network configuration list, read as a runtime reads it before each sandbox."""
    path = conflist_path(home, node)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NetworkError(f"node {node} has no readable CNI configuration at {path}: {exc} (was the cluster "
                           "made by `meshctl cluster up`?)") from exc
    try:
        return cni.Conflist.parse(data, str(path))
    except cni.CniError as exc:
        raise NetworkError(str(exc)) from exc


def cni_runtime(home: Path, cluster: str, node: str) -> cni.Runtime:
    """The runtime of one node: plugins run in the node's namespace and carry the cluster's marker."""
    return cni.Runtime(CNI_BIN_DIRS, cni_dir(home, node) / "results",
                       netns=node_netns(cluster, node), env=components.component_env({processes.MARKER: cluster}))


def require_cni_plugins(cluster: str, conflist: dict[str, Any]) -> None:
    """Refuse, before anything is built, a configuration whose plugins this machine does not have."""
    missing = cni.missing(cni.Conflist.parse(conflist), CNI_BIN_DIRS)
    if missing:
        raise NetworkError(f"cluster {cluster!r} needs the CNI plugins {', '.join(missing)}, which are not in "
                           f"{DEBIAN_CNI_PLUGINS} or {MESH_CNI_PLUGINS}: install Debian's containernetworking-plugins "
                           "(`make setup` does)")


def pod_attachment(pod: PodPlan, container_id: str) -> cni.Attachment:
    """The pod's attachment, with its annotations offered to the plugins that ask for them, as containerd does."""
    annotations = {str(k): str(v) for k, v in ((pod.spec.document.get("metadata") or {}).get("annotations") or {}).items()}
    return cni.Attachment(container_id, str(mnetns.netns_path(pod.netns)), POD_IFNAME, pod_cni_args(pod, container_id),
                          {RUNTIME_ANNOTATIONS: annotations})


def create_pod(home: Path, plan: ClusterPlan, pod: PodPlan) -> dict[str, Any]:
    """The pod's sandbox: its namespace and name files, then CNI ADD on its node (the interface, its
    address, and the node agent's answer: a pod in the mesh is captured when this returns).  The result."""
    create_netns(pod.netns, loopback=False)
    write_name_files(plan, pod)
    container_id = secrets.token_hex(32)  # a sandbox's id, as runtimes make them
    try:
        return cni_runtime(home, plan.name, pod.node).add(cni_config(home, pod.node), pod_attachment(pod, container_id))
    except cni.CniError as exc:
        raise NetworkError(f"pod {pod.key}: CNI ADD on node {pod.node} failed: {exc}") from exc


def delete_pod(home: Path, cluster: str, node: str, pod_netns: str) -> None:
    """Remove a pod's sandbox: CNI DEL of what was added for its namespace (the agent lets go of it,
    host-local frees its address, the veth goes), then the namespace and its name files."""
    runtime = cni_runtime(home, cluster, node)
    path = str(mnetns.netns_path(pod_netns))
    try:
        for entry in runtime.attachments():
            if entry.attachment.netns == path:
                runtime.delete(entry.network, entry.attachment)
    except cni.CniError as exc:
        raise NetworkError(f"{pod_netns}: CNI DEL on node {node} failed: {exc}") from exc
    finally:
        remove_netns(pod_netns)


def remove_cni(home: Path, cluster: str) -> int:
    """CNI DEL of every attachment still cached on the cluster's nodes (`cluster down`, after the pods'
    processes stopped); best effort: the namespaces and the state directory go next in any case.  How many
    were deleted."""
    done = 0
    nodes = sorted(p.name for p in (home / CNI_SUBDIR).iterdir()) if (home / CNI_SUBDIR).is_dir() else []
    for node in nodes:
        if not mnetns.exists(node_netns(cluster, node)):
            continue  # the node is gone, and every link of its pods with it
        runtime = cni_runtime(home, cluster, node)
        for entry in runtime.attachments():
            try:
                runtime.delete(entry.network, entry.attachment)
                done += 1
            except cni.CniError as exc:
                log.warning("CNI DEL of %s on node %s: %s", entry.attachment.netns, node, exc)
    return done


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
