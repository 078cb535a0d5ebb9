"""Ingress Gateways (`gatewayClassName: istio`): their listeners, which routes attach to them, their
certificates, and the hostnames a route is served for on each listener.  Pure, like the rest of
translation; the routes themselves are translated by `controlplane.translate.gatewayapi`, the Gateway's
status by `controlplane.translate.ingressstatus`.

Attachment, as the Gateway API defines it.  A route's `parentRefs` entry naming an ingress Gateway picks
its listeners (all, or the one `sectionName` names, and of those the ones on `port` when given); a listener
takes the route when
- `allowedRoutes.namespaces.from` allows the route's namespace (`Same`, the default: the Gateway's own;
  `All`; `Selector`: a namespace whose labels hold `matchLabels`),
- `allowedRoutes.kinds` (default: HTTPRoute and GRPCRoute) lists the route's kind, and
- the route's `hostnames` and the listener's `hostname` intersect: a listener without a hostname takes any
  (and a route without hostnames is served for `*`), otherwise each route hostname the listener's covers is
  kept, and a wildcard route hostname that covers the listener's narrows to the listener's.
When no listener takes it the parent is refused: `NotAllowedByListeners` when none allows it, else
`NoMatchingListenerHostname`.  Each accepted (listener, hostname) becomes part of the Gateway's routing
configuration (a VirtualService-shaped L7Config per hostname, `gateways: [<ns>/<gateway>]`, sent to that
Gateway's pods only).

Certificates.  An HTTPS listener terminates TLS with the first of its `certificateRefs`: a Secret of the
Gateway's namespace of type `kubernetes.io/tls` whose `tls.crt` is a PEM certificate (chain) and `tls.key`
the PEM private key of its first certificate (`data`, base64, or `stringData`).  `certificate` says why one
is not usable (the listener's `ResolvedRefs` False, `InvalidCertificateRef`); a Secret in another
namespace is `RefNotPermitted` (no ReferenceGrant).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh.api.crossref import host_covers
from mesh.api.kinds_core import TLS_SECRET_TYPE
from mesh.api.kinds_gateway import GATEWAY_GROUP, is_ingress

ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")
CERT_KEY, KEY_KEY = "tls.crt", "tls.key"


@dataclass(frozen=True)
class Listener:
    name: str
    port: int
    protocol: str  # HTTP or HTTPS
    hostname: str = ""  # "" takes any
    allowed_from: str = "Same"
    selector: tuple[tuple[str, str], ...] = ()  # matchLabels of `Selector`
    kinds: tuple[str, ...] = ROUTE_KINDS
    certificate_refs: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class IngressGateway:
    namespace: str
    name: str
    listeners: tuple[Listener, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def listener(self, name: str) -> Listener | None:
        return next((li for li in self.listeners if li.name == name), None)


@dataclass(frozen=True)
class Attachment:
    """One listener a route attached to, and the hostnames it is served for there."""

    gateway: str  # "ns/name"
    listener: str
    port: int
    hostnames: tuple[str, ...]


@dataclass(frozen=True)
class Attached:
    """What one parentRef to an ingress Gateway comes to: accepted (with where) or refused (with why)."""

    ok: bool
    reason: str
    message: str
    attachments: tuple[Attachment, ...] = ()


def _listener(entry: Mapping[str, Any]) -> Listener:
    allowed = entry.get("allowedRoutes") or {}
    namespaces = allowed.get("namespaces") or {}
    kinds = tuple(k["kind"] for k in allowed.get("kinds") or [] if k.get("group", GATEWAY_GROUP) == GATEWAY_GROUP)
    return Listener(name=str(entry["name"]), port=int(entry["port"]), protocol=str(entry["protocol"]),
                    hostname=str(entry.get("hostname") or ""), allowed_from=str(namespaces.get("from", "Same")),
                    selector=tuple(sorted(((namespaces.get("selector") or {}).get("matchLabels") or {}).items())),
                    kinds=kinds or ROUTE_KINDS,
                    certificate_refs=tuple((entry.get("tls") or {}).get("certificateRefs") or ()))


def ingress_gateway(body: Mapping[str, Any]) -> IngressGateway:
    meta = body["metadata"]
    return IngressGateway(str(meta["namespace"]), str(meta["name"]),
                          tuple(_listener(e) for e in body["spec"].get("listeners") or []))


def ingress_gateways(snapshot: Any) -> dict[str, IngressGateway]:
    """Every ingress Gateway of `snapshot`, by `ns/name`."""
    out = {}
    for body in snapshot.of_kind("Gateway"):
        if is_ingress(body):
            gw = ingress_gateway(body)
            out[gw.key] = gw
    return out


# ---- hostnames --------------------------------------------------------------------------------------------

def intersect(listener_hostname: str, route_hostnames: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The hostnames a route is served for on a listener (empty: none, so it does not attach there)."""
    if not route_hostnames:
        return (listener_hostname or "*",)
    if not listener_hostname:
        return tuple(dict.fromkeys(route_hostnames))
    out = []
    for h in route_hostnames:
        if host_covers(listener_hostname, h):
            out.append(h)
        elif h.startswith("*.") and host_covers(h, listener_hostname):
            out.append(listener_hostname)
    return tuple(dict.fromkeys(out))


def specificity(pattern: str) -> tuple[int, int]:
    """How narrowly a hostname pattern matches (larger: narrower): an exact name over any wildcard, then
    the longer wildcard suffix."""
    if pattern == "*":
        return (0, 0)
    return (0, len(pattern)) if pattern.startswith("*.") else (1, len(pattern))


# ---- attaching a route ------------------------------------------------------------------------------------

def _namespace_allowed(listener: Listener, gateway_ns: str, route_ns: str, snapshot: Any) -> bool:
    if listener.allowed_from == "All":
        return True
    if listener.allowed_from == "Selector":
        ns = snapshot.get("Namespace", "", route_ns)
        have = ((ns or {}).get("metadata") or {}).get("labels") or {}
        return all(have.get(k) == v for k, v in listener.selector)
    return route_ns == gateway_ns


def attach(gw: IngressGateway, ref: Mapping[str, Any], route_kind: str, route_ns: str,
           route_hosts: list[str], snapshot: Any) -> Attached:
    """Which of `gw`'s listeners a route takes through the parentRef `ref` (see the module docstring)."""
    section, port = ref.get("sectionName"), int(ref.get("port") or 0)
    listeners = [li for li in gw.listeners if (not section or li.name == section) and (not port or li.port == port)]
    if not listeners:
        what = " and ".join(x for x in (f"named {section!r}" if section else "", f"on port {port}" if port else "") if x)
        return Attached(False, "NoMatchingParent", f"Gateway {gw.key} has no listener {what}")
    allowed = [li for li in listeners if route_kind in li.kinds and _namespace_allowed(li, gw.namespace, route_ns, snapshot)]
    if not allowed:
        return Attached(False, "NotAllowedByListeners", f"no listener of Gateway {gw.key} allows a {route_kind} from "
                        f"namespace {route_ns} (allowedRoutes: {', '.join(sorted({li.allowed_from for li in listeners}))})")
    attachments = tuple(Attachment(gw.key, li.name, li.port, hosts) for li in allowed
                        if (hosts := intersect(li.hostname, route_hosts)))
    if not attachments:
        return Attached(False, "NoMatchingListenerHostname", f"the route's hostnames {route_hosts} match no hostname "
                        f"of Gateway {gw.key}'s listeners ({', '.join(li.hostname or '*' for li in allowed)})")
    names = ", ".join(f"{a.listener} ({'/'.join(a.hostnames)})" for a in attachments)
    return Attached(True, "Accepted", f"attached to Gateway {gw.key}: {names}", attachments)


# ---- certificates -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Certificate:
    """The PEM certificate chain and key an HTTPS listener serves, or why there is none (`reason`)."""

    chain: bytes = b""
    key: bytes = b""
    reason: str = ""  # "" when usable; else InvalidCertificateRef or RefNotPermitted
    problem: str = ""


def _secret_value(secret: Mapping[str, Any], name: str) -> bytes | None:
    text = (secret.get("stringData") or {}).get(name)
    if text is not None:
        return str(text).encode()
    data = (secret.get("data") or {}).get(name)
    if data is None:
        return None
    try:
        return base64.b64decode(str(data), validate=True)
    except (binascii.Error, ValueError):
        return None


def certificate(gw: IngressGateway, listener: Listener, snapshot: Any) -> Certificate:
    """The certificate of an HTTPS listener, checked: its Secret exists, is of type kubernetes.io/tls, and
    holds a PEM certificate chain and the private key of its first certificate."""
    if not listener.certificate_refs:
        return Certificate(reason="InvalidCertificateRef", problem=f"listener {listener.name} names no certificate")
    ref = listener.certificate_refs[0]
    ns, name = ref.get("namespace") or gw.namespace, str(ref["name"])
    where = f"listener {listener.name}: Secret {ns}/{name}"
    if ns != gw.namespace:
        return Certificate(reason="RefNotPermitted", problem=f"{where} is in another namespace (ReferenceGrant is not "
                           "supported): put the Secret in the Gateway's namespace")
    secret = snapshot.get("Secret", ns, name)
    if secret is None:
        return Certificate(reason="InvalidCertificateRef", problem=f"{where} does not exist")
    if secret.get("type") != TLS_SECRET_TYPE:
        return Certificate(reason="InvalidCertificateRef",
                           problem=f"{where} is of type {secret.get('type') or 'Opaque'}, not {TLS_SECRET_TYPE}")
    chain, key = _secret_value(secret, CERT_KEY), _secret_value(secret, KEY_KEY)
    if not chain or not key:
        missing = " and ".join(k for k, v in ((CERT_KEY, chain), (KEY_KEY, key)) if not v)
        return Certificate(reason="InvalidCertificateRef", problem=f"{where} has no {missing}")
    try:
        certs = x509.load_pem_x509_certificates(chain)
    except ValueError:
        return Certificate(reason="InvalidCertificateRef", problem=f"{where}: {CERT_KEY} is not a PEM certificate")
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        return Certificate(reason="InvalidCertificateRef",
                           problem=f"{where}: {KEY_KEY} is not a PEM private key (without a passphrase)")
    public = private.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    if certs[0].public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) != public:
        return Certificate(reason="InvalidCertificateRef",
                           problem=f"{where}: {KEY_KEY} is not the key of the first certificate in {CERT_KEY}")
    return Certificate(chain, key)
