"""The names the DNS proxy answers for itself, built from the services the agent already has.

    table = NameTable.of(state.services())
    table.lookup("reviews", namespace="default") -> Lookup | None   (None: not ours, forward it)

What is ours (as ztunnel's DNS proxy does):
- a Kubernetes service, as `name.ns.svc.cluster.local`, `name.ns.svc`, `name.ns`, and `name` from a pod
  of its own namespace;
- a ServiceEntry host exactly, and a wildcard host (`*.example.com`) for every name under it (the most
  specific wildcard wins); only from the namespaces its `exportTo` reaches;
- any of those with one of the pod's search domains appended (`<ns>.svc.cluster.local`,
  `svc.cluster.local`, `cluster.local`), which a resolver adds to a name with few dots before it tries
  the name alone.
A name that is ours but has no IPv4 address (a ServiceEntry with resolution NONE, a headless service)
is left to the upstream resolver: it knows the real addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from mesh.proto import discovery_pb2 as pb

CLUSTER_DOMAIN = "cluster.local"
SVC_SUFFIX = f".svc.{CLUSTER_DOMAIN}"


def search_domains(namespace: str) -> tuple[str, ...]:
    """A pod's search domains, as Kubernetes writes them into its resolv.conf."""
    return (f"{namespace}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}", CLUSTER_DOMAIN)


@dataclass(frozen=True)
class Lookup:
    hostname: str  # the service (or ServiceEntry host) the name stands for
    addresses: tuple[str, ...]  # its IPv4 VIPs


@dataclass(frozen=True)
class _Entry:
    service: pb.Service

    def visible_from(self, namespace: str) -> bool:
        return not self.service.export_to or namespace in self.service.export_to

    def lookup(self) -> Lookup | None:
        v4 = tuple(v for v in self.service.vips if _is_v4(v))
        return Lookup(self.service.hostname, v4) if v4 else None


def _is_v4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False


@dataclass(frozen=True)
class NameTable:
    exact: dict[str, list[_Entry]] = field(default_factory=dict)  # name -> entries (several namespaces)
    wildcards: dict[str, list[_Entry]] = field(default_factory=dict)  # "example.com" for "*.example.com"

    @classmethod
    def of(cls, services: Iterable[pb.Service]) -> NameTable:
        exact: dict[str, list[_Entry]] = {}
        wildcards: dict[str, list[_Entry]] = {}
        for svc in sorted(services, key=lambda s: (s.namespace, s.hostname)):
            host = svc.hostname.lower().rstrip(".")
            entry = _Entry(svc)
            if host.startswith("*."):
                wildcards.setdefault(host[2:], []).append(entry)
            elif host == "*":
                wildcards.setdefault("", []).append(entry)
            else:
                exact.setdefault(host, []).append(entry)
                if host.endswith(SVC_SUFFIX) and svc.source_kind != "ServiceEntry":
                    short = host[: -len(SVC_SUFFIX)]  # name.ns
                    exact.setdefault(short, []).append(entry)
                    exact.setdefault(f"{short}.svc", []).append(entry)
        return cls(exact, wildcards)

    def lookup(self, name: str, namespace: str) -> Lookup | None:
        """What `name`, asked by a pod of `namespace`, stands for; None when the proxy does not know it
        (or knows it without an address): then it is forwarded."""
        name = name.lower().rstrip(".")
        for candidate in self._candidates(name, namespace):
            found = self._one(candidate, namespace)
            if found is not None:
                return found
        return None

    def _candidates(self, name: str, namespace: str) -> list[str]:
        out = [name]
        if "." not in name:  # a bare service name: one of the pod's own namespace
            out.append(f"{name}.{namespace}{SVC_SUFFIX}")
        for domain in search_domains(namespace):
            if name.endswith("." + domain):
                stripped = name[: -len(domain) - 1]
                out.append(stripped)
                if "." not in stripped:
                    out.append(f"{stripped}.{namespace}{SVC_SUFFIX}")
        return list(dict.fromkeys(out))

    def _one(self, name: str, namespace: str) -> Lookup | None:
        for entry in self.exact.get(name, []):
            if entry.visible_from(namespace):
                return entry.lookup()
        labels = name.split(".")
        for i in range(1, len(labels) + 1):  # the longest wildcard first
            for entry in self.wildcards.get(".".join(labels[i:]), []):
                if entry.visible_from(namespace):
                    found = entry.lookup()
                    return Lookup(name, found.addresses) if found is not None else None
        return None
