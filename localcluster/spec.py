"""The cluster file: parse and validate it into frozen values, before anything is built.

A cluster file is Kubernetes-style YAML with several documents: one `Cluster` (name, nodes with their
pod CIDRs, the service CIDR, the mesh's capture mode, observability: Prometheus and where spans go), then
`Namespace`, `ServiceAccount`, `Pod` and `Service` documents.  Every
problem is reported as `file:document N:field: what is wrong`, all of them at once, and a file with any
error is refused whole.  A service that selects no pod is only a warning.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from localcluster.fields import Doc, kind_of
from localcluster.sandbox import MAX_ID, NOBODY, POD_UID_BASE
from mesh import defaults
from mesh.api.schema import parse_duration
from mesh.errors import MeshError
from mesh.tracing.errors import TracingError
from mesh.tracing.exporter import OtlpEndpoint

CLUSTER_API_VERSION = "mesh.local/v1alpha1"
DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
DEFAULT_UNDERLAY_CIDR = "172.30.0.0/24"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
MAX_CLUSTER_NAME = 20
DEFAULT_SCRAPE_INTERVAL = 5.0  # seconds; Prometheus' own default is 1m, Istio's samples use 15s
SCRAPE_INTERVAL_RANGE = (0.1, 30.0)  # 30s still leaves two samples in the recording rules' 1m window


class ClusterFileError(MeshError):
    """A cluster file with one or more errors; `problems` holds each located message."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("cluster file refused:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class NodeSpec:
    name: str
    pod_cidr: ipaddress.IPv4Network
    redirect_mode: str = defaults.REDIRECT_MODE  # how this node's agent captures pods: iptables or ebpf


@dataclass(frozen=True)
class ContainerPort:
    container_port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True)
class PodSpec:
    name: str
    namespace: str
    node: str
    labels: dict[str, str]
    service_account: str
    container_name: str
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    ports: tuple[ContainerPort, ...]
    working_dir: str
    document: dict[str, Any] = field(compare=False, repr=False)
    # Who its processes run as (`securityContext`, else a uid of its own: `localcluster.sandbox`).
    run_as_user: int = NOBODY
    run_as_group: int = NOBODY

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    namespace: str
    labels: dict[str, str]
    selector: dict[str, str]
    ports: tuple[ServicePort, ...]
    cluster_ip: ipaddress.IPv4Address | None
    document: dict[str, Any] = field(compare=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Observability:
    """`spec.observability`: Prometheus (on by default) and where the proxies send spans.

        observability:
          prometheus: {enabled: true, scrapeInterval: 5s}
          tracing: {otlpEndpoint: http://172.30.0.1:4318/v1/traces}
    """

    prometheus: bool = True
    scrape_interval: float = DEFAULT_SCRAPE_INTERVAL  # seconds
    otlp_endpoint: str = ""  # OTLP/HTTP traces URL for node agents and waypoints; "" sends no spans

    def to_record(self) -> dict[str, Any]:
        return {"prometheus": {"enabled": self.prometheus, "scrapeInterval": self.scrape_interval},
                "tracing": {"otlpEndpoint": self.otlp_endpoint}}

    @classmethod
    def from_record(cls, data: dict[str, Any] | None) -> Observability:
        data = data or {}
        prom, tracing = data.get("prometheus") or {}, data.get("tracing") or {}
        return cls(bool(prom.get("enabled", True)), float(prom.get("scrapeInterval", DEFAULT_SCRAPE_INTERVAL)),
                   str(tracing.get("otlpEndpoint") or ""))

    def proxy_args(self) -> list[str]:
        """The flags node agents and waypoints get for it."""
        return [f"--otlp-endpoint={self.otlp_endpoint}"] if self.otlp_endpoint else []


def check_scrape_interval(seconds: float) -> str | None:
    lo, hi = SCRAPE_INTERVAL_RANGE
    return None if lo <= seconds <= hi else f"{seconds:g}s is out of range: give {lo:g}s to {hi:g}s"


def check_otlp_endpoint(url: str) -> str | None:
    try:
        OtlpEndpoint.parse(url)
    except TracingError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    nodes: tuple[NodeSpec, ...]
    service_cidr: ipaddress.IPv4Network
    underlay_cidr: ipaddress.IPv4Network
    namespaces: dict[str, dict[str, str]]
    service_accounts: tuple[tuple[str, str], ...]
    pods: tuple[PodSpec, ...]
    services: tuple[ServiceSpec, ...]
    source: Path
    warnings: tuple[str, ...] = ()
    observability: Observability = Observability()
    # Every document of the file but the Cluster one, as written: the control plane registers them.
    documents: tuple[dict[str, Any], ...] = field(default=(), compare=False, repr=False)

    def node(self, name: str) -> NodeSpec:
        return next(n for n in self.nodes if n.name == name)


def with_redirect_mode(spec: ClusterSpec, mode: str) -> ClusterSpec:
    """The cluster with every node capturing its pods in `mode` (`meshctl cluster up --redirect-mode`)."""
    if mode not in defaults.REDIRECT_MODES:
        raise MeshError(f"{mode!r} is not a redirect mode (one of: {', '.join(defaults.REDIRECT_MODES)})")
    return dataclasses.replace(spec, nodes=tuple(dataclasses.replace(n, redirect_mode=mode) for n in spec.nodes))


def with_observability(spec: ClusterSpec, *, prometheus: bool | None = None, scrape_interval: float | None = None,
                       otlp_endpoint: str | None = None) -> ClusterSpec:
    """The cluster with `meshctl cluster up`'s observability flags over the file's settings."""
    obs = spec.observability
    if scrape_interval is not None:
        if (why := check_scrape_interval(scrape_interval)) is not None:
            raise MeshError(f"--scrape-interval: {why}")
        obs = dataclasses.replace(obs, scrape_interval=scrape_interval)
    if otlp_endpoint is not None:
        if otlp_endpoint and (why := check_otlp_endpoint(otlp_endpoint)) is not None:
            raise MeshError(f"--otlp-endpoint: {why}")
        obs = dataclasses.replace(obs, otlp_endpoint=otlp_endpoint)
    if prometheus is not None:
        obs = dataclasses.replace(obs, prometheus=prometheus)
    return dataclasses.replace(spec, observability=obs)


def load(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster file; raise ClusterFileError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise MeshError(f"{path}: cannot read the cluster file: {exc.strerror}") from exc
    return parse(text, path)


def parse(text: str, source: Path) -> ClusterSpec:
    name = str(source)
    try:
        docs = [d for d in yaml.safe_load_all(text)]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:line {mark.line + 1}" if mark is not None else name
        raise ClusterFileError([f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from exc
    return _Parser(name, source).run(docs)


class _Parser:
    def __init__(self, name: str, source: Path) -> None:
        self.name = name
        self.source = source
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.observability = Observability()

    def run(self, docs: list[Any]) -> ClusterSpec:
        cluster: tuple[str, tuple[NodeSpec, ...], Any, Any] | None = None
        namespaces: dict[str, dict[str, str]] = {"default": {}}
        declared_ns: dict[str, str] = {}
        accounts: dict[tuple[str, str], str] = {}
        pods: list[tuple[PodSpec, Doc]] = []
        services: list[tuple[ServiceSpec, Doc]] = []
        kept: list[dict[str, Any]] = []
        for index, raw in enumerate(docs, start=1):
            if raw is None:
                continue
            d = Doc(f"{self.name}:document {index}", self.problems)
            if not isinstance(raw, dict):
                d.error("", f"must be a mapping with apiVersion and kind, not {kind_of(raw)}")
                continue
            kind = raw.get("kind")
            if kind == "Cluster":
                if cluster is not None:
                    d.error("kind", "a second Cluster document; a file describes one cluster")
                    continue
                cluster = self.cluster(raw, d)
                continue
            if kind not in ("Namespace", "ServiceAccount", "Pod", "Service"):
                d.error("kind", f"{kind!r} is not a kind a cluster file holds "
                        "(Cluster, Namespace, ServiceAccount, Pod, Service)")
                continue
            if raw.get("apiVersion") != "v1":
                d.error("apiVersion", f"{kind} needs apiVersion v1, not {raw.get('apiVersion')!r}")
            meta = self.metadata(raw, d, namespaced=kind != "Namespace")
            if meta is None:
                continue
            kept.append(raw)
            if kind == "Namespace":
                if meta[0] in declared_ns:
                    d.error("metadata.name", f"duplicate Namespace {meta[0]!r} (first in {declared_ns[meta[0]]})")
                declared_ns[meta[0]] = d.where
                namespaces[meta[0]] = meta[2]
                d.mapping(raw.get("spec"), "spec", ())
            elif kind == "ServiceAccount":
                key = (meta[1], meta[0])
                if key in accounts:
                    d.error("metadata.name", f"duplicate ServiceAccount {meta[1]}/{meta[0]} (first in {accounts[key]})")
                accounts[key] = d.where
            elif kind == "Pod":
                pod = self.pod(raw, d, meta, index=len(pods))
                if pod is not None:
                    pods.append((pod, d))
            else:
                svc = self.service(raw, d, meta)
                if svc is not None:
                    services.append((svc, d))
        if cluster is None:
            self.problems.append(f"{self.name}: no Cluster document (kind: Cluster, apiVersion: "
                                 f"{CLUSTER_API_VERSION}) naming the cluster and its nodes")
            raise ClusterFileError(self.problems)
        cname, nodes, service_cidr, underlay_cidr = cluster
        self.cross_check(nodes, namespaces, accounts, pods, services, service_cidr)
        if self.problems:
            raise ClusterFileError(self.problems)
        return ClusterSpec(
            name=cname, nodes=nodes, service_cidr=service_cidr, underlay_cidr=underlay_cidr,
            namespaces=namespaces, service_accounts=tuple(sorted(accounts)),
            pods=tuple(p for p, _ in pods), services=tuple(s for s, _ in services),
            source=self.source, warnings=tuple(self.warnings), documents=tuple(kept),
            observability=self.observability,
        )

    # -- documents ---------------------------------------------------------------------------------

    def cluster(self, raw: dict[str, Any], d: Doc) -> tuple[str, tuple[NodeSpec, ...], Any, Any]:
        top = d.mapping(raw, "", ("apiVersion", "kind", "metadata", "spec"), ("metadata", "spec"))
        if top.get("apiVersion") != CLUSTER_API_VERSION:
            d.error("apiVersion", f"a Cluster needs apiVersion {CLUSTER_API_VERSION}, not {top.get('apiVersion')!r}")
        meta = d.mapping(top.get("metadata"), "metadata", ("name", "labels", "annotations"), ("name",))
        name = d.string(meta.get("name"), "metadata.name", DNS1123_LABEL, "cluster name (lower-case letters, "
                        "digits and '-')")
        if len(name) > MAX_CLUSTER_NAME:
            d.error("metadata.name", f"{name!r} is longer than {MAX_CLUSTER_NAME} characters")
        spec = d.mapping(top.get("spec"), "spec", ("nodes", "serviceCIDR", "underlayCIDR", "mesh", "observability"),
                         ("nodes",))
        self.observability = self.parse_observability(spec.get("observability"), d)
        mesh = d.mapping(spec.get("mesh"), "spec.mesh", ("redirectMode",))
        cluster_mode = self.redirect_mode(mesh.get("redirectMode"), "spec.mesh.redirectMode", d,
                                          defaults.REDIRECT_MODE)
        service_cidr = d.network(spec.get("serviceCIDR", DEFAULT_SERVICE_CIDR), "spec.serviceCIDR")
        underlay_cidr = d.network(spec.get("underlayCIDR", DEFAULT_UNDERLAY_CIDR), "spec.underlayCIDR")
        nodes: list[NodeSpec] = []
        raw_nodes = spec.get("nodes")
        if raw_nodes is not None and not isinstance(raw_nodes, list):
            d.error("spec.nodes", f"must be a list of nodes, not {kind_of(raw_nodes)}")
            raw_nodes = []
        seen: dict[str, str] = {}
        nets: list[tuple[str, ipaddress.IPv4Network]] = []
        if service_cidr is not None:
            nets.append(("spec.serviceCIDR", service_cidr))
        if underlay_cidr is not None:
            nets.append(("spec.underlayCIDR", underlay_cidr))
        for i, node in enumerate(raw_nodes or []):
            p = f"spec.nodes[{i}]"
            nd = d.mapping(node, p, ("name", "podCIDR", "redirectMode"), ("name", "podCIDR"))
            mode = self.redirect_mode(nd.get("redirectMode"), f"{p}.redirectMode", d, cluster_mode)
            nname = d.string(nd.get("name"), f"{p}.name", DNS1123_LABEL, "node name")
            if nname in seen:
                d.error(f"{p}.name", f"duplicate node name {nname!r} (also {seen[nname]})")
            seen[nname] = p
            cidr = d.network(nd.get("podCIDR"), f"{p}.podCIDR") if "podCIDR" in nd else None
            if cidr is not None:
                nets.append((f"{p}.podCIDR", cidr))
            if nname and cidr is not None:
                nodes.append(NodeSpec(nname, cidr, mode))
        for i, (pa, a) in enumerate(nets):
            for pb, b in nets[i + 1:]:
                if a.overlaps(b):
                    d.error(pb, f"{b} overlaps {pa} ({a})")
        if underlay_cidr is not None and len(nodes) + 10 > underlay_cidr.num_addresses - 2:
            d.error("spec.underlayCIDR", f"{underlay_cidr} has too few addresses for {len(nodes)} nodes")
        return name, tuple(nodes), service_cidr, underlay_cidr

    @staticmethod
    def parse_observability(value: Any, d: Doc) -> Observability:
        top = d.mapping(value, "spec.observability", ("prometheus", "tracing"))
        prom = d.mapping(top.get("prometheus"), "spec.observability.prometheus", ("enabled", "scrapeInterval"))
        tracing = d.mapping(top.get("tracing"), "spec.observability.tracing", ("otlpEndpoint",))
        out = Observability()
        enabled = prom.get("enabled", True)
        if not isinstance(enabled, bool):
            d.error("spec.observability.prometheus.enabled", f"must be true or false, not {kind_of(enabled)}")
        else:
            out = dataclasses.replace(out, prometheus=enabled)
        raw = prom.get("scrapeInterval")
        if raw is not None:
            try:
                seconds = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else parse_duration(raw)
            except ValueError:
                d.error("spec.observability.prometheus.scrapeInterval", f"{raw!r} is not a duration such as 5s or 500ms")
            else:
                why = check_scrape_interval(seconds)
                if why is None:
                    out = dataclasses.replace(out, scrape_interval=seconds)
                else:
                    d.error("spec.observability.prometheus.scrapeInterval", why)
        url = tracing.get("otlpEndpoint")
        if url is not None:
            why = check_otlp_endpoint(url) if isinstance(url, str) else f"must be a URL, not {kind_of(url)}"
            if why is None:
                out = dataclasses.replace(out, otlp_endpoint=str(url))
            else:
                d.error("spec.observability.tracing.otlpEndpoint", why)
        return out

    @staticmethod
    def redirect_mode(value: Any, path: str, d: Doc, default: str) -> str:
        if value is None:
            return default
        if value not in defaults.REDIRECT_MODES:
            d.error(path, f"{value!r} is not a redirect mode (one of: {', '.join(defaults.REDIRECT_MODES)})")
            return default
        return str(value)

    def metadata(self, raw: dict[str, Any], d: Doc, namespaced: bool) -> tuple[str, str, dict[str, str]] | None:
        allowed: tuple[str, ...] = ("apiVersion", "kind", "metadata", "spec")
        if raw.get("kind") == "ServiceAccount":
            allowed = ("apiVersion", "kind", "metadata")
        d.mapping(raw, "", allowed)
        meta = d.mapping(raw.get("metadata"), "metadata", ("name", "namespace", "labels", "annotations"), ("name",))
        name = d.string(meta.get("name"), "metadata.name", DNS1123_LABEL, "name (lower-case letters, digits, '-')")
        if len(name) > 63:
            d.error("metadata.name", "is longer than 63 characters")
        ns = "default"
        if namespaced:
            ns = d.string(meta.get("namespace", "default"), "metadata.namespace", DNS1123_LABEL, "namespace name")
        elif "namespace" in meta:
            d.error("metadata.namespace", "a Namespace is not itself namespaced")
        labels = d.labels(meta.get("labels"), "metadata.labels")
        if not name or not ns:
            return None
        return name, ns, labels

    def pod(self, raw: dict[str, Any], d: Doc, meta: tuple[str, str, dict[str, str]], *,
            index: int) -> PodSpec | None:
        """The `index`th pod of the file (its default uid is `POD_UID_BASE + index`)."""
        name, ns, labels = meta
        spec = d.mapping(raw.get("spec"), "spec", ("nodeName", "serviceAccountName", "containers", "securityContext"),
                         ("nodeName", "containers"))
        node = d.string(spec.get("nodeName"), "spec.nodeName", DNS1123_LABEL, "node name")
        sa = d.string(spec.get("serviceAccountName", "default"), "spec.serviceAccountName", DNS1123_LABEL,
                      "service account name")
        containers = spec.get("containers")
        if containers is None:
            return None
        if not isinstance(containers, list) or len(containers) != 1:
            d.error("spec.containers", "must be a list with exactly one container")
            return None
        p = "spec.containers[0]"
        c = d.mapping(containers[0], p, ("name", "image", "command", "args", "env", "ports", "workingDir",
                                         "securityContext"))
        uid, gid = self.run_as(spec.get("securityContext"), c.get("securityContext"), p, d, POD_UID_BASE + index)
        cname = d.string(c.get("name", name), f"{p}.name", DNS1123_LABEL, "container name")
        command: list[str] = []
        for key in ("command", "args"):
            items = c.get(key)
            if items is None:
                continue
            if not isinstance(items, list) or not all(isinstance(x, (str, int, float)) for x in items):
                d.error(f"{p}.{key}", "must be a list of strings")
                continue
            command += [str(x) for x in items]
        if not command:
            d.error(f"{p}.command", "is required: the command the pod runs (a list, such as [sleep, infinity])")
        env: list[tuple[str, str]] = []
        raw_env = c.get("env") or []
        if not isinstance(raw_env, list):
            d.error(f"{p}.env", "must be a list of {name, value}")
            raw_env = []
        for i, e in enumerate(raw_env):
            em = d.mapping(e, f"{p}.env[{i}]", ("name", "value"), ("name",))
            ename = d.string(em.get("name"), f"{p}.env[{i}].name", ENV_NAME, "environment variable name")
            value = em.get("value", "")
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                d.error(f"{p}.env[{i}].value", f"must be a string, not {kind_of(value)}")
                continue
            if ename:
                env.append((ename, str(value)))
        ports: list[ContainerPort] = []
        raw_ports = c.get("ports") or []
        if not isinstance(raw_ports, list):
            d.error(f"{p}.ports", "must be a list of {containerPort, name, protocol}")
            raw_ports = []
        for i, port in enumerate(raw_ports):
            pp = f"{p}.ports[{i}]"
            pm = d.mapping(port, pp, ("containerPort", "name", "protocol"), ("containerPort",))
            number = d.integer(pm.get("containerPort"), f"{pp}.containerPort", 1, 65535) if "containerPort" in pm else None
            proto = pm.get("protocol", "TCP")
            if proto not in ("TCP", "UDP"):
                d.error(f"{pp}.protocol", f"{proto!r} is not TCP or UDP")
            pname = d.string(pm.get("name", ""), f"{pp}.name")
            if number is not None:
                ports.append(ContainerPort(number, pname, str(proto)))
        wd = d.string(c.get("workingDir", ""), f"{p}.workingDir")
        if not (node and cname and command):
            return None
        return PodSpec(name=name, namespace=ns, node=node, labels=labels, service_account=sa or "default",
                       container_name=cname, command=tuple(command), env=tuple(env), ports=tuple(ports),
                       working_dir=wd, document=raw, run_as_user=uid, run_as_group=gid)

    @staticmethod
    def run_as(pod_level: Any, container_level: Any, container: str, d: Doc, default_uid: int) -> tuple[int, int]:
        """The uid and gid a pod runs as: the container's `securityContext` over the pod's, else
        `default_uid`; the group is the user's unless `runAsGroup` says.  Fields that ask for what the
        local cluster never gives (privileges, capabilities) are refused rather than ignored."""
        fields: dict[str, tuple[str, Any]] = {}  # field -> (where, value), the container's winning
        for where, value in (("spec.securityContext", pod_level), (f"{container}.securityContext", container_level)):
            if value is None:
                continue
            sc = d.mapping(value, where, ("runAsUser", "runAsGroup", "runAsNonRoot", "privileged",
                                          "allowPrivilegeEscalation", "capabilities"))
            for key, v in sc.items():
                fields[key] = (f"{where}.{key}", v)
        ids = {}
        for key in ("runAsUser", "runAsGroup"):
            if key in fields:
                ids[key] = d.integer(fields[key][1], fields[key][0], 0, MAX_ID)
        uid = ids.get("runAsUser")
        uid = default_uid if uid is None else uid
        gid = ids.get("runAsGroup")
        gid = uid if gid is None else gid
        for key, why in (("privileged", "pods of the local cluster never run privileged"),
                         ("allowPrivilegeEscalation", "pods always run with no_new_privs")):
            if key in fields:
                where, value = fields[key]
                if not isinstance(value, bool):
                    d.error(where, f"must be true or false, not {kind_of(value)}")
                elif value:
                    d.error(where, f"{why}: leave it out or set it to false")
        if "runAsNonRoot" in fields:
            where, value = fields["runAsNonRoot"]
            if not isinstance(value, bool):
                d.error(where, f"must be true or false, not {kind_of(value)}")
            elif value and uid == 0:
                d.error(where, "the pod would run as root (runAsUser 0)")
        if "capabilities" in fields:
            where, value = fields["capabilities"]
            caps = d.mapping(value, where, ("add", "drop"))
            for key in ("add", "drop"):
                names = caps.get(key) or []
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    d.error(f"{where}.{key}", "must be a list of capability names")
                elif key == "add" and names:
                    d.error(f"{where}.add", "pods of the local cluster run without capabilities "
                            "(every one is dropped)")
        return uid, gid

    def service(self, raw: dict[str, Any], d: Doc, meta: tuple[str, str, dict[str, str]]) -> ServiceSpec | None:
        name, ns, labels = meta
        spec = d.mapping(raw.get("spec"), "spec", ("selector", "ports", "clusterIP", "type"), ("ports",))
        if spec.get("type", "ClusterIP") != "ClusterIP":
            d.error("spec.type", f"{spec.get('type')!r} is not supported; the local cluster has ClusterIP services")
        selector = d.labels(spec.get("selector"), "spec.selector")
        cluster_ip: ipaddress.IPv4Address | None = None
        if spec.get("clusterIP") not in (None, ""):
            try:
                cluster_ip = ipaddress.IPv4Address(str(spec["clusterIP"]))
            except ValueError:
                d.error("spec.clusterIP", f"{spec['clusterIP']!r} is not an IPv4 address")
        ports: list[ServicePort] = []
        raw_ports = spec.get("ports") or []
        if not isinstance(raw_ports, list):
            d.error("spec.ports", "must be a list of {name, port, targetPort, protocol}")
            raw_ports = []
        seen: set[int] = set()
        for i, port in enumerate(raw_ports):
            pp = f"spec.ports[{i}]"
            pm = d.mapping(port, pp, ("name", "port", "targetPort", "protocol", "appProtocol"), ("port",))
            number = d.integer(pm.get("port"), f"{pp}.port", 1, 65535) if "port" in pm else None
            target: int | str | None = number
            if "targetPort" in pm:
                tp = pm["targetPort"]
                target = tp if isinstance(tp, str) and tp else d.integer(tp, f"{pp}.targetPort", 1, 65535)
            if pm.get("protocol", "TCP") != "TCP":
                d.error(f"{pp}.protocol", f"{pm.get('protocol')!r} is not supported; services here are TCP")
            if number is not None and number in seen:
                d.error(f"{pp}.port", f"duplicate service port {number}")
            if number is not None and target is not None:
                seen.add(number)
                ports.append(ServicePort(number, target, d.string(pm.get("name", ""), f"{pp}.name")))
        return ServiceSpec(name=name, namespace=ns, labels=labels, selector=selector, ports=tuple(ports),
                           cluster_ip=cluster_ip, document=raw)

    # -- across documents --------------------------------------------------------------------------

    def cross_check(self, nodes: tuple[NodeSpec, ...], namespaces: dict[str, dict[str, str]],
                    accounts: dict[tuple[str, str], str], pods: list[tuple[PodSpec, Doc]],
                    services: list[tuple[ServiceSpec, Doc]], service_cidr: Any) -> None:
        node_names = {n.name for n in nodes}
        node_pods: dict[str, int] = {}
        seen_pods: dict[str, str] = {}
        for pod, d in pods:
            if pod.key in seen_pods:
                d.error("metadata.name", f"duplicate Pod {pod.key} (first in {seen_pods[pod.key]})")
            seen_pods[pod.key] = d.where
            if pod.namespace not in namespaces:
                d.error("metadata.namespace", f"namespace {pod.namespace!r} is not defined in this file")
            if pod.node not in node_names:
                d.error("spec.nodeName", f"unknown node {pod.node!r} (nodes: {', '.join(sorted(node_names))})")
            else:
                node_pods[pod.node] = node_pods.get(pod.node, 0) + 1
            if pod.service_account != "default" and (pod.namespace, pod.service_account) not in accounts:
                d.error("spec.serviceAccountName", f"service account {pod.service_account!r} is not defined "
                        f"in namespace {pod.namespace!r}")
        for node in nodes:
            if node_pods.get(node.name, 0) > node.pod_cidr.num_addresses - 3:
                self.problems.append(f"{self.name}: node {node.name}: pod CIDR {node.pod_cidr} is too small "
                                     f"for {node_pods[node.name]} pods")
        seen_svcs: dict[str, str] = {}
        ips: dict[ipaddress.IPv4Address, str] = {}
        for svc, d in services:
            if svc.key in seen_svcs:
                d.error("metadata.name", f"duplicate Service {svc.key} (first in {seen_svcs[svc.key]})")
            seen_svcs[svc.key] = d.where
            if svc.namespace not in namespaces:
                d.error("metadata.namespace", f"namespace {svc.namespace!r} is not defined in this file")
            if svc.cluster_ip is not None:
                if service_cidr is not None and svc.cluster_ip not in service_cidr:
                    d.error("spec.clusterIP", f"{svc.cluster_ip} is outside the service CIDR {service_cidr}")
                elif svc.cluster_ip in ips:
                    d.error("spec.clusterIP", f"{svc.cluster_ip} is already used by {ips[svc.cluster_ip]}")
                ips[svc.cluster_ip] = svc.key
            selected = [p for p, _ in pods if p.namespace == svc.namespace and svc.selector
                        and all(p.labels.get(k) == v for k, v in svc.selector.items())]
            if not selected:
                self.warnings.append(f"{d.where}: service {svc.key} selects no pod")
            for i, port in enumerate(svc.ports):
                if isinstance(port.target_port, str):
                    for p in selected:
                        if not any(cp.name == port.target_port for cp in p.ports):
                            d.error(f"spec.ports[{i}].targetPort", f"pod {p.key} has no port named "
                                    f"{port.target_port!r}")
