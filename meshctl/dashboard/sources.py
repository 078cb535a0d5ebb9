"""Where the dashboard's data comes from (the I/O), for one local cluster.

    record()        the cluster's record with each process's liveness (`localcluster.lifecycle.status`)
    prometheus()    a `PromClient` for the cluster's Prometheus (`localcluster.prometheus.endpoint`: its
                    underlay address, reached from inside the underlay namespace), or the one given
    connections()   the control plane's discovery clients and versions (what `meshctl proxy-status` reads,
                    from its local-only debug socket)
    resources()     the configuration in the control plane's store (its apply API socket)
    certificates()  the certificates each node agent (admin port, in its node's namespace) and each waypoint
                    (admin port, in its pod's namespace) holds
    waypoints()     the cluster's waypoint pods and their identities, for the graph

Each failure is a `SourceError` naming the source, which the API shows as a banner.  Every call is
blocking with a short timeout: the API's handlers run in worker threads.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any, Protocol

from localcluster import lifecycle, state
from localcluster import prometheus as cluster_prometheus
from mesh import defaults, netns
from mesh.api.client import ApiClient
from mesh.errors import MeshError
from mesh.serve import client
from mesh.serve.errors import ServeError
from meshctl import agent, proxystatus
from meshctl.dashboard.errors import SourceError
from meshctl.dashboard.graph import WaypointRef
from meshctl.dashboard.prom import PromClient

TIMEOUT = 3.0


class Sources(Protocol):
    """What the API reads; `ClusterSources` for a local cluster, fakes in unit tests."""

    cluster: str

    def record(self) -> dict[str, Any]: ...

    def prometheus(self) -> PromClient: ...

    def connections(self) -> dict[str, Any]: ...

    def resources(self) -> list[dict[str, Any]]: ...

    def certificates(self, record: Mapping[str, Any]) -> tuple[list[tuple[str, dict[str, Any]]], list[SourceError]]:
        ...


def prometheus_endpoint(url: str) -> client.Endpoint:
    """`http://host:port` (a Prometheus the host reaches) as an endpoint; `SourceError` if it is not one."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or 9090
    except ValueError:
        port = 0
    if parts.scheme != "http" or not parts.hostname or not port:
        raise SourceError("prometheus", f"--prometheus {url!r}: give Prometheus' http URL, e.g. http://127.0.0.1:9090")
    return client.Endpoint.tcp(parts.hostname, port)


def waypoints(record: Mapping[str, Any]) -> list[WaypointRef]:
    return [WaypointRef(p["namespace"], p["name"],
                        f"spiffe://{defaults.TRUST_DOMAIN}/ns/{p['namespace']}/sa/{p.get('serviceAccount') or p['name']}")
            for p in (record.get("plan") or {}).get("pods", []) if p.get("waypoint")]


class ClusterSources:
    def __init__(self, cluster: str, prometheus_url: str | None = None, timeout: float = TIMEOUT) -> None:
        self.cluster = cluster
        self.timeout = timeout
        self._prometheus = prometheus_endpoint(prometheus_url) if prometheus_url else None

    def record(self) -> dict[str, Any]:
        try:
            return lifecycle.status(self.cluster)
        except MeshError as exc:
            raise SourceError("cluster", f"cannot read the record of cluster {self.cluster!r}: {exc}") from None

    def prometheus(self) -> PromClient:
        if self._prometheus is not None:
            return PromClient(self._prometheus, self.timeout)
        record = self.record()
        if record.get("prometheus") is None:
            raise SourceError("prometheus", f"cluster {self.cluster!r} runs no Prometheus (it was started with "
                                            "--no-prometheus, or Debian's prometheus is not installed: `make setup`); "
                                            "give one with --prometheus URL")
        return PromClient(cluster_prometheus.endpoint(record), self.timeout)

    def connections(self) -> dict[str, Any]:
        path = state.cluster_dir(self.cluster) / proxystatus.DEBUG_SOCKET
        try:
            return proxystatus.fetch_connections(socket_path=str(path), timeout=self.timeout)
        except MeshError as exc:
            raise SourceError("controlplane", str(exc)) from None

    def resources(self) -> list[dict[str, Any]]:
        try:
            return ApiClient(state.cluster_dir(self.cluster) / defaults.CONTROLPLANE_DIR / defaults.API_SOCKET,
                             timeout=self.timeout).get()
        except MeshError as exc:
            raise SourceError("controlplane", f"cannot read the configuration: {exc}") from None

    def certificates(self, record: Mapping[str, Any]) -> tuple[list[tuple[str, dict[str, Any]]], list[SourceError]]:
        held: list[tuple[str, dict[str, Any]]] = []
        failed: list[SourceError] = []
        plan = record.get("plan") or {}
        for node in plan.get("nodes", []):
            holder = f"nodeagent {node['name']}"
            try:
                held.append((holder, agent.fetch("/certs", node["name"], cluster=self.cluster)))
            except MeshError as exc:
                failed.append(SourceError("agent", f"{holder}: {exc}"))
        for pod in plan.get("pods", []):
            if not pod.get("waypoint"):
                continue
            holder = f"waypoint {pod['namespace']}/{pod['name']}"
            where = client.Endpoint.tcp("127.0.0.1", defaults.ADMIN_PORT, netns=pod["netns"])
            try:
                reply = client.get(where, "/certs", timeout=self.timeout)
                data = reply.json() if reply.status == 200 else None
            except (ServeError, netns.NetnsError, ValueError) as exc:
                failed.append(SourceError("waypoint", f"{holder}: its admin endpoint did not answer ({exc})"))
                continue
            if isinstance(data, dict):
                held.append((holder, data))
            else:
                failed.append(SourceError("waypoint", f"{holder}: its admin endpoint answered {reply.status}"))
        return held, failed
