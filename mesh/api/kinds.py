"""The registry of kinds: API groups and versions, scope, schemas, and the names `meshctl get` accepts."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from mesh.api.kinds_core import CORE_KINDS
from mesh.api.kinds_gateway import GATEWAY_KINDS
from mesh.api.kinds_networking import NETWORKING_KINDS
from mesh.api.kinds_routes import ROUTE_KINDS
from mesh.api.kinds_security import SECURITY_KINDS
from mesh.api.kinds_telemetry import TELEMETRY_KINDS
from mesh.api.names import check_dns1123_label, check_dns1123_subdomain
from mesh.api.schema import AnyValue, Node

ROOT_NAMESPACE = "istio-system"
DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True)
class KindInfo:
    kind: str
    group: str  # "" for core
    versions: tuple[str, ...]
    namespaced: bool
    spec: Node | None
    status: Node | None = None
    extra: dict[str, Node] = field(default_factory=dict)
    spec_required: bool = False
    name_check: Any = check_dns1123_subdomain
    aliases: tuple[str, ...] = ()

    @property
    def api_versions(self) -> tuple[str, ...]:
        return tuple(f"{self.group}/{v}" if self.group else v for v in self.versions)

    @property
    def display(self) -> str:
        """`virtualservice.networking.istio.io`, as kubectl prints it."""
        return f"{self.kind.lower()}.{self.group}" if self.group else self.kind.lower()


_ISTIO_NET = ("v1", "v1beta1", "v1alpha3")
_ISTIO_SEC = ("v1", "v1beta1")

KINDS: dict[str, KindInfo] = {}


def _add(info: KindInfo) -> None:
    KINDS[info.kind] = info


for _kind, (_spec, _status, _extra) in CORE_KINDS.items():
    _add(
        KindInfo(
            _kind, "", ("v1",), namespaced=_kind != "Namespace", spec=_spec, status=_status, extra=_extra,
            spec_required=_kind == "Pod",
            name_check=check_dns1123_label if _kind in ("Namespace", "Service") else check_dns1123_subdomain,
            aliases={"Namespace": ("ns",), "Service": ("svc",), "ServiceAccount": ("sa",), "Pod": ("po",),
                     "Secret": ()}[_kind],
        )
    )
for _kind, _spec in NETWORKING_KINDS.items():
    _add(KindInfo(_kind, "networking.istio.io", _ISTIO_NET, True, _spec, AnyValue(), spec_required=True,
                  aliases={"VirtualService": ("vs",), "DestinationRule": ("dr",), "ServiceEntry": ("se",)}[_kind]))
for _kind, _spec in SECURITY_KINDS.items():
    _add(KindInfo(_kind, "security.istio.io", _ISTIO_SEC, True, _spec, AnyValue(),
                  aliases={"AuthorizationPolicy": ("ap",), "PeerAuthentication": ("pa",),
                           "RequestAuthentication": ("ra",)}[_kind]))
for _kind, _spec in TELEMETRY_KINDS.items():
    _add(KindInfo(_kind, "telemetry.istio.io", ("v1", "v1alpha1"), True, _spec, AnyValue()))
for _kind, _spec in GATEWAY_KINDS.items():
    _add(KindInfo(_kind, "gateway.networking.k8s.io", ("v1", "v1beta1"), True, _spec, AnyValue(),
                  spec_required=True, aliases=("gtw",)))
for _kind, _spec in ROUTE_KINDS.items():  # status: the control plane's (controlplane.translate.gatewayapi)
    _add(KindInfo(_kind, "gateway.networking.k8s.io", {"HTTPRoute": ("v1", "v1beta1")}.get(_kind, ("v1", "v1alpha2")),
                  True, _spec, AnyValue(), spec_required=True))


def kind_info(kind: str) -> KindInfo | None:
    return KINDS.get(kind)


def resolve_kind(text: str) -> KindInfo | None:
    """The kind a user means by `virtualservice`, `virtualservices`, `vs`, `VirtualService` or
    `virtualservice.networking.istio.io`; None when nothing matches."""
    word = text.strip().lower()
    for info in KINDS.values():
        names = {info.kind.lower(), info.kind.lower() + "s", info.kind.lower() + "es", info.display, *info.aliases}
        if info.kind.lower().endswith("y"):
            names.add(info.kind.lower()[:-1] + "ies")
        if word in names or (info.group and word.split(".", 1)[0] in names and word.endswith(info.group)):
            return info
    return None


def suggest_kind(text: str) -> str:
    close = difflib.get_close_matches(text, list(KINDS), n=1, cutoff=0.6)
    if not close:
        lowered = {k.lower(): k for k in KINDS}
        close = [lowered[w] for w in difflib.get_close_matches(text.lower(), list(lowered), n=1, cutoff=0.6)]
    return f" (did you mean {close[0]}?)" if close else ""
