"""The cluster plan: every name, address and rule the build will make, computed before any I/O.

`make_plan(spec)` is pure: it names the network namespaces (all under the `amb.<cluster>.` prefix),
gives addresses to nodes, pods and services, resolves each service's endpoints, and renders the
kube-proxy style iptables rules and the per-pod name-resolution files.  `build.py` then carries it out.

Addresses: on the underlay (default 172.30.0.0/24) `.1` is the underlay bridge, where cluster-wide
processes such as the control plane listen, and node *i* is `.10+i`.  In a node's pod CIDR `.1` is the
node's bridge (the pods' gateway) and pods take `.2` onwards in file order.  Services without a
`clusterIP` take addresses from `.10` of the service CIDR onwards.

Pod networking is CNI's (`cni_conflist`, one network configuration list per node, run by
`localcluster.cni`): Debian's `bridge` plugin with `host-local` IPAM over the node's pod CIDR, `loopback`,
then the mesh's own `ambient-cni`.  The plan's addresses stay the pods' addresses: each pod's ADD asks
host-local for its planned address with `IP=` in CNI_ARGS (`pod_cni_args`).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any

from localcluster.spec import ClusterSpec, PodSpec, ServicePort
from mesh import defaults
from nodeagent.cni import protocol as cni_protocol

PREFIX = "amb"
CLUSTER_DOMAIN = defaults.TRUST_DOMAIN
MASQ_MARK = "0x4000/0x4000"
CNI_VERSION = "1.0.0"
CNI_NETWORK = f"{PREFIX}-pods"  # the network's name in each node's conflist (host-local keeps its state by it)
NODE_BRIDGE = "cni0"  # the bridge plugin's bridge in each node, the pods' gateway
POD_IFNAME = "eth0"


def cluster_prefix(cluster: str) -> str:
    """The prefix of every network namespace and /etc/netns entry of one cluster."""
    return f"{PREFIX}.{cluster}."


def cluster_cgroup(cluster: str) -> str:
    """The cgroup (relative to the v2 root) under which every pod of the cluster has its own."""
    return f"{PREFIX}.{cluster}"


def node_netns(cluster: str, node: str) -> str:
    return f"{cluster_prefix(cluster)}node.{node}"


def bpf_prefix(cluster: str) -> str:
    """Where the cluster's node agents pin their eBPF programs, under /sys/fs/bpf (no dots allowed)."""
    return f"{PREFIX}-{cluster}"


def pod_cgroup(cluster: str, namespace: str, name: str) -> str:
    return f"{cluster_cgroup(cluster)}/pod.{namespace}.{name}"


@dataclass(frozen=True)
class NodePlan:
    name: str
    netns: str
    underlay_ip: ipaddress.IPv4Address
    underlay_port: str  # the veth end on the underlay bridge
    pod_cidr: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address  # the node bridge's address in its pod CIDR
    redirect_mode: str = defaults.REDIRECT_MODE  # how the node's agent captures its pods


@dataclass(frozen=True)
class PodPlan:
    name: str
    namespace: str
    node: str
    netns: str
    ip: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    prefixlen: int
    spec: PodSpec
    cgroup: str = ""  # the pod's cgroup, relative to the cgroup v2 root (as a kubelet makes one per pod)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Endpoint:
    pod: str  # namespace/name
    ip: ipaddress.IPv4Address
    port: int


@dataclass(frozen=True)
class ServicePortPlan:
    port: ServicePort
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class ServicePlan:
    name: str
    namespace: str
    cluster_ip: ipaddress.IPv4Address
    ports: tuple[ServicePortPlan, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"


@dataclass(frozen=True)
class ClusterPlan:
    name: str
    underlay_netns: str
    underlay_gateway: ipaddress.IPv4Address
    underlay_prefixlen: int
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    services: tuple[ServicePlan, ...]

    @property
    def prefix(self) -> str:
        return cluster_prefix(self.name)

    def node(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.name == name)

    def pod(self, namespace: str, name: str) -> PodPlan | None:
        return next((p for p in self.pods if p.namespace == namespace and p.name == name), None)

    def all_netns(self) -> list[str]:
        return [self.underlay_netns] + [n.netns for n in self.nodes] + [p.netns for p in self.pods]

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready summary for the state record (status, exec and logs read it)."""
        return {
            "underlay": {"netns": self.underlay_netns, "gateway": str(self.underlay_gateway)},
            "nodes": [{"name": n.name, "netns": n.netns, "ip": str(n.underlay_ip), "podCIDR": str(n.pod_cidr),
                       "redirectMode": n.redirect_mode} for n in self.nodes],
            "pods": [{"name": p.name, "namespace": p.namespace, "node": p.node, "netns": p.netns,
                      "cgroup": p.cgroup, "ip": str(p.ip), "serviceAccount": p.spec.service_account, "labels": p.spec.labels,
                      "annotations": dict((p.spec.document.get("metadata") or {}).get("annotations") or {}),
                      "ports": [cp.container_port for cp in p.spec.ports],
                      "runAsUser": p.spec.run_as_user, "runAsGroup": p.spec.run_as_group}
                     for p in self.pods],
            "services": [{"name": s.name, "namespace": s.namespace, "clusterIP": str(s.cluster_ip),
                          "ports": [{"port": sp.port.port, "name": sp.port.name,
                                     "endpoints": [f"{e.ip}:{e.port}" for e in sp.endpoints]}
                                    for sp in s.ports]}
                         for s in self.services],
        }


def make_plan(spec: ClusterSpec) -> ClusterPlan:
    prefix = cluster_prefix(spec.name)
    hosts = list(spec.underlay_cidr.hosts())
    nodes = tuple(
        NodePlan(name=n.name, netns=node_netns(spec.name, n.name), underlay_ip=hosts[9 + i], underlay_port=f"n{i}",
                 pod_cidr=n.pod_cidr, gateway=n.pod_cidr.network_address + 1, redirect_mode=n.redirect_mode)
        for i, n in enumerate(spec.nodes)
    )
    by_node = {n.name: n for n in nodes}
    next_host: dict[str, int] = {n.name: 2 for n in nodes}
    pods: list[PodPlan] = []
    for pod in spec.pods:
        node = by_node[pod.node]
        ip = node.pod_cidr.network_address + next_host[pod.node]
        next_host[pod.node] += 1
        pods.append(PodPlan(name=pod.name, namespace=pod.namespace, node=pod.node,
                            netns=f"{prefix}pod.{pod.namespace}.{pod.name}", ip=ip, gateway=node.gateway,
                            prefixlen=node.pod_cidr.prefixlen, spec=pod,
                            cgroup=pod_cgroup(spec.name, pod.namespace, pod.name)))
    return ClusterPlan(
        name=spec.name, underlay_netns=f"{prefix}underlay", underlay_gateway=hosts[0],
        underlay_prefixlen=spec.underlay_cidr.prefixlen, nodes=nodes, pods=tuple(pods),
        services=_services(spec, pods),
    )


def _services(spec: ClusterSpec, pods: list[PodPlan]) -> tuple[ServicePlan, ...]:
    taken = {s.cluster_ip for s in spec.services if s.cluster_ip is not None}
    free = (ip for ip in list(spec.service_cidr.hosts())[9:] if ip not in taken)
    out = []
    for svc in spec.services:
        selected = [p for p in pods if p.namespace == svc.namespace and svc.selector
                    and all(p.spec.labels.get(k) == v for k, v in svc.selector.items())]
        ports = []
        for port in svc.ports:
            endpoints = []
            for p in selected:
                target = _target_port(port, p.spec)
                if target is not None:
                    endpoints.append(Endpoint(p.key, p.ip, target))
            ports.append(ServicePortPlan(port, tuple(endpoints)))
        out.append(ServicePlan(svc.name, svc.namespace, svc.cluster_ip or next(free), tuple(ports)))
    return tuple(out)


def _target_port(port: ServicePort, pod: PodSpec) -> int | None:
    if isinstance(port.target_port, int):
        return port.target_port
    return next((cp.container_port for cp in pod.ports if cp.name == port.target_port), None)


# -- pod networking: CNI plugins ------------------------------------------------------------------

def cni_conflist(node: NodePlan, *, agent_socket: str, ipam_dir: str, cgroup_format: str) -> dict[str, Any]:
    """The node's network configuration list, as a node's /etc/cni/net.d holds it: the bridge plugin (the
    node's bridge, gateway `.1`, no masquerading: pods reach other nodes' pods by routing, and services
    are the node's kube-proxy rules) with host-local IPAM over the node's pod CIDR and the default route
    through the gateway, `loopback`, then the mesh's plugin, which hands the pod to the node agent at
    `agent_socket` (`cgroup_format` says where the pod's cgroup is, for eBPF capture)."""
    return {
        "cniVersion": CNI_VERSION,
        "name": CNI_NETWORK,
        "plugins": [
            {"type": "bridge", "bridge": NODE_BRIDGE, "isGateway": True, "ipMasq": False,
             # Hairpin mode, as kubelet sets it: a pod's connection to its own service is DNATed back to
             # the port it came in on, which a bridge otherwise refuses to send a frame out of.
             "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": ipam_dir,
                      "ranges": [[{"subnet": str(node.pod_cidr), "gateway": str(node.gateway)}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "loopback"},
            {"type": cni_protocol.PLUGIN_TYPE, "agentSocket": agent_socket,
             "excludeNamespaces": list(cni_protocol.EXCLUDED_NAMESPACES), "cgroupFormat": cgroup_format,
             "capabilities": {cni_protocol.RUNTIME_ANNOTATIONS: True}},  # the pod's annotations, as from containerd
        ],
    }


def pod_uid(pod: PodPlan) -> str:
    """The pod's uid as the mesh knows it: the local cluster's pods have no `metadata.uid`, so the control
    plane names their workloads `<namespace>/<name>` (the node agent matches handed-over pods by it)."""
    return pod.key


def pod_cni_args(pod: PodPlan, container_id: str) -> tuple[tuple[str, str], ...]:
    """CNI_ARGS for the pod's ADD and DEL: who the pod is, as a kubelet's runtime says it, and `IP`, the
    pod's planned address, which host-local gives it (the `IgnoreUnknown` makes every plugin ignore the
    arguments it does not know)."""
    return (("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", pod.namespace), ("K8S_POD_NAME", pod.name),
            ("K8S_POD_INFRA_CONTAINER_ID", container_id), ("K8S_POD_UID", pod_uid(pod)), ("IP", str(pod.ip)))


# -- name resolution inside pods -------------------------------------------------------------------

def hosts_file(plan: ClusterPlan, pod: PodPlan) -> str:
    """/etc/hosts for a pod: itself, then every service as `svc.ns.svc.cluster.local`, `svc.ns`, and
    plain `svc` for the services of its own namespace."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{pod.ip}\t{pod.name}"]
    for svc in plan.services:
        names = [svc.hostname, f"{svc.name}.{svc.namespace}"]
        if svc.namespace == pod.namespace:
            names.append(svc.name)
        lines.append(f"{svc.cluster_ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def resolv_conf(pod: PodPlan) -> str:
    search = f"{pod.namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}"
    return f"search {search}\nnameserver 127.0.0.1\noptions ndots:1 timeout:1 attempts:1\n"


# -- services, as kube-proxy's iptables mode does them ---------------------------------------------

def _chain(kind: str, *parts: object) -> str:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()[:16].upper()
    return f"AMB-{kind}-{digest}"


def service_rules(plan: ClusterPlan) -> str:
    """The iptables-restore input installed in every node's namespace: ClusterIP traffic is DNATed to
    one endpoint chosen at random with equal weights; a pod reaching itself through its service is
    masqueraded; a service port without endpoints rejects."""
    nat = ["*nat", ":AMB-SERVICES - [0:0]", ":AMB-MARK-MASQ - [0:0]", ":AMB-POSTROUTING - [0:0]"]
    nat_rules = [
        "-A PREROUTING -m comment --comment \"mesh local cluster services\" -j AMB-SERVICES",
        "-A OUTPUT -m comment --comment \"mesh local cluster services\" -j AMB-SERVICES",
        "-A POSTROUTING -j AMB-POSTROUTING",
        f"-A AMB-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}",
        f"-A AMB-POSTROUTING -m mark --mark {MASQ_MARK} -j MASQUERADE",
    ]
    filt = ["*filter", ":AMB-SERVICES - [0:0]"]
    filt_rules = ["-A FORWARD -j AMB-SERVICES", "-A OUTPUT -j AMB-SERVICES"]
    for svc in plan.services:
        for sp in svc.ports:
            match = f"-d {svc.cluster_ip}/32 -p tcp -m tcp --dport {sp.port.port}"
            comment = f"-m comment --comment \"{svc.key}:{sp.port.port}\""
            if not sp.endpoints:
                filt_rules.append(f"-A AMB-SERVICES {match} {comment} -j REJECT --reject-with tcp-reset")
                continue
            svc_chain = _chain("SVC", svc.key, sp.port.port)
            nat.append(f":{svc_chain} - [0:0]")
            nat_rules.append(f"-A AMB-SERVICES {match} {comment} -j {svc_chain}")
            n = len(sp.endpoints)
            for i, ep in enumerate(sp.endpoints):
                sep = _chain("SEP", svc.key, sp.port.port, ep.ip, ep.port)
                nat.append(f":{sep} - [0:0]")
                if i < n - 1:
                    nat_rules.append(f"-A {svc_chain} -m statistic --mode random --probability "
                                     f"{1.0 / (n - i):.10f} -j {sep}")
                else:
                    nat_rules.append(f"-A {svc_chain} -j {sep}")
                nat_rules.append(f"-A {sep} -s {ep.ip}/32 -j AMB-MARK-MASQ")
                nat_rules.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {ep.ip}:{ep.port}")
    return "\n".join(nat + nat_rules + ["COMMIT"] + filt + filt_rules + ["COMMIT"]) + "\n"
