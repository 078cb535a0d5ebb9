"""Configuration analysis, as `istioctl analyze` does it: what is accepted but will not do what it says.

    messages = analyze(snapshot)            # pure: every resource of one store snapshot in, messages out
    for m in messages: print(m)             # Warning [AMB0106] (RequestAuthentication jwt.bookinfo) ...

The control plane runs it after every change: the messages about what a request just wrote are that
request's warnings (printed by `meshctl apply` and `meshctl label`, as kubectl prints admission
warnings), and every object's messages are shown in its `status.validationMessages` when it is read
(`GET /resources`; the store's bodies are not changed).  `GET /analyze` answers all of them, which is what
`meshctl analyze` prints.  The facts come from translation itself (`controlplane.translate`: which
service uses which waypoint, which VirtualService keeps a host, which pods are in the mesh), so the
analysis says what the mesh will really do.

Codes (our own numbering, after Istio's IST01xx; docs/ARCHITECTURE.md lists them):

    AMB0101 Error    UseWaypointNotFound        istio.io/use-waypoint names a waypoint that does not exist
    AMB0102 Warning  RouteWithoutWaypoint       a VirtualService or HTTPRoute for a service with no waypoint
    AMB0103 Error    SubsetNotFound             a route names a subset no DestinationRule defines
    AMB0104 Warning  PolicySelectsNothing       a policy's selector or targetRefs match nothing
    AMB0105 Warning  StrictRefusesOutsideMesh   STRICT mTLS while workloads outside the mesh exist
    AMB0106 Warning  RequestAuthnSelector       a RequestAuthentication with a selector (not enforced in ambient)
    AMB0107 Warning  CustomPolicyFailsClosed    a CUSTOM AuthorizationPolicy (enforced as DENY)
    AMB0108 Warning  L7RulesAtL4                an agent-enforced policy needing HTTP attributes
    AMB0109 Warning  ConflictingVirtualService  two VirtualServices for one host (the older one wins)
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.config.source import Snapshot
from controlplane.translate.l7 import lost_hosts
from controlplane.translate.workloads import Index, build_index, enrolled, labels_of, selects
from mesh.api.crossref import fqdn, subset_refs, subsets_for
from mesh.api.kinds import ROOT_NAMESPACE
from mesh.api.kinds_gateway import GATEWAY_NAME_LABEL, USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL
from mesh.api.validate import Ref
from mesh.policy.projection import _has_l7 as needs_l7  # the projection's own rule of what L4 cannot check

ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")  # Gateway API routes, read as stored (parentRefs to a Service)
MAX_NAMED = 3  # workloads named in one message

log = logging.getLogger(__name__)


class Level(enum.Enum):
    ERROR = "Error"
    WARNING = "Warning"
    INFO = "Info"


@dataclass(frozen=True)
class Code:
    code: str
    name: str
    level: Level


USE_WAYPOINT_NOT_FOUND = Code("AMB0101", "UseWaypointNotFound", Level.ERROR)
ROUTE_WITHOUT_WAYPOINT = Code("AMB0102", "RouteWithoutWaypoint", Level.WARNING)
SUBSET_NOT_FOUND = Code("AMB0103", "SubsetNotFound", Level.ERROR)
POLICY_SELECTS_NOTHING = Code("AMB0104", "PolicySelectsNothing", Level.WARNING)
STRICT_REFUSES_OUTSIDE = Code("AMB0105", "StrictRefusesOutsideMesh", Level.WARNING)
REQUEST_AUTHN_SELECTOR = Code("AMB0106", "RequestAuthnSelector", Level.WARNING)
CUSTOM_FAILS_CLOSED = Code("AMB0107", "CustomPolicyFailsClosed", Level.WARNING)
L7_RULES_AT_L4 = Code("AMB0108", "L7RulesAtL4", Level.WARNING)
CONFLICTING_VIRTUAL_SERVICE = Code("AMB0109", "ConflictingVirtualService", Level.WARNING)
CODES = (USE_WAYPOINT_NOT_FOUND, ROUTE_WITHOUT_WAYPOINT, SUBSET_NOT_FOUND, POLICY_SELECTS_NOTHING,
         STRICT_REFUSES_OUTSIDE, REQUEST_AUTHN_SELECTOR, CUSTOM_FAILS_CLOSED, L7_RULES_AT_L4,
         CONFLICTING_VIRTUAL_SERVICE)


@dataclass(frozen=True)
class Message:
    code: Code
    ref: Ref  # the resource it is about
    text: str

    @property
    def origin(self) -> str:
        """`Kind name.namespace` (`Kind name` for a cluster-scoped one), as istioctl names a resource."""
        return f"{self.ref.kind} {self.ref.name}.{self.ref.namespace}" if self.ref.namespace else \
            f"{self.ref.kind} {self.ref.name}"

    def __str__(self) -> str:
        return f"{self.code.level.value} [{self.code.code}] ({self.origin}) {self.text}"

    def warning(self) -> str:
        """The line an apply prints after `Warning: `."""
        return f"[{self.code.code}] ({self.origin}) {self.text}"

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code.code, "name": self.code.name, "level": self.code.level.value,
                "kind": self.ref.kind, "namespace": self.ref.namespace, "resource": self.ref.name,
                "origin": self.origin, "message": self.text}

    def validation_message(self) -> dict[str, Any]:
        """The entry of `status.validationMessages` (Istio's shape, with the text)."""
        return {"type": {"code": self.code.code, "name": self.code.name}, "level": self.code.level.name,
                "message": self.text}


def analyze(snapshot: Snapshot) -> list[Message]:
    """Every message about `snapshot`, sorted by resource then code.  Each resource is analyzed on its own:
    one that cannot be read (a saved body that no longer validates) is skipped, as translation leaves it
    out and reports it."""
    facts = _Facts(snapshot)
    out: list[Message] = []
    for kind, checks in CHECKS.items():
        for body in snapshot.of_kind(kind):
            for check in checks:
                try:
                    out.extend(check(facts, body))
                except (KeyError, TypeError, AttributeError, ValueError) as exc:
                    log.debug("analysis of %s skipped: %r", _ref(body), exc)
    return sorted(set(out), key=lambda m: (m.ref, m.code.code, m.text))


def about(messages: Iterable[Message], refs: Iterable[Ref]) -> list[Message]:
    wanted = set(refs)
    return [m for m in messages if m.ref in wanted]


def by_ref(messages: Iterable[Message]) -> dict[Ref, list[Message]]:
    out: dict[Ref, list[Message]] = {}
    for m in messages:
        out.setdefault(m.ref, []).append(m)
    return out


# ---- what translation knows ------------------------------------------------------------------------------

class _Facts:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.index: Index = build_index(snapshot)
        self.services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in self.index.services}
        self.hosts = {fqdn(name, ns): (ns, name) for ns, name in self.services}

    def waypoint_for_service(self, ns: str, name: str) -> str | None:
        """`ns/gateway` of the waypoint a service's traffic goes through, or None."""
        svc = self.services.get((ns, name))
        if svc is None:
            return None
        address = self.index.waypoint_of(svc, "service")
        return f"{address.namespace}/{address.name}" if address is not None else None

    @functools.cache  # noqa: B019 - one _Facts per analysis, dropped with it
    def outside_mesh(self) -> list[dict[str, Any]]:
        """Application pods that are not in the mesh (callers without a mesh identity)."""
        return [p for p in self.pods(None) if not self.in_mesh(p)]

    @functools.cache  # noqa: B019
    def lost_hosts(self) -> dict[tuple[str, str], set[str]]:
        """(namespace, name) of each VirtualService -> the hosts an older one keeps (translation's rule)."""
        return lost_hosts(self.snapshot.of_kind("VirtualService"), [])

    @functools.cache  # noqa: B019
    def host_owners(self) -> dict[str, str]:
        """Qualified host -> `name.namespace` of the VirtualService that keeps it."""
        lost = self.lost_hosts()
        out: dict[str, str] = {}
        for body in self.snapshot.of_kind("VirtualService"):
            try:
                meta, hosts = body["metadata"], (body.get("spec") or {}).get("hosts") or []
                for host in (fqdn(h, meta["namespace"]) for h in hosts):
                    if host not in lost.get((meta["namespace"], meta["name"]), set()):
                        out.setdefault(host, f"{meta['name']}.{meta['namespace']}")
            except (KeyError, TypeError, AttributeError):
                continue  # unreadable: translation leaves it out too
        return out

    def in_mesh(self, pod: Mapping[str, Any]) -> bool:
        return enrolled(pod, self.index) or self.index.is_waypoint_pod(pod)

    def pods(self, namespace: str | None) -> list[dict[str, Any]]:
        """Application pods (not waypoints) of `namespace`, or of every namespace."""
        return [p for p in self.index.pods if (namespace is None or p["metadata"]["namespace"] == namespace)
                and GATEWAY_NAME_LABEL not in labels_of(p)]


def _ref(body: Mapping[str, Any]) -> Ref:
    return Ref.of(dict(body))


def _names(pods: list[dict[str, Any]]) -> str:
    names = [f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in pods]
    more = f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else ""
    return ", ".join(names[:MAX_NAMED]) + more


# ---- the analyzers -----------------------------------------------------------------------------------------

def _use_waypoint(facts: _Facts, body: Mapping[str, Any]) -> Iterator[Message]:
    """AMB0101: a namespace, service or pod names a waypoint that does not exist: its traffic skips L7."""
    labels = labels_of(body)
    name = labels.get(USE_WAYPOINT_LABEL)
    if not name or name == "none":
        return
    meta = body["metadata"]
    gw_ns = labels.get(USE_WAYPOINT_NAMESPACE_LABEL) or meta.get("namespace") or meta["name"]
    if (gw_ns, name) not in facts.index.waypoints:
        yield Message(USE_WAYPOINT_NOT_FOUND, _ref(body),
                      f"{USE_WAYPOINT_LABEL}={name} names waypoint {gw_ns}/{name}, which does not exist: its "
                      f"traffic skips L7 processing (create it: meshctl waypoint apply -n {gw_ns} --name {name})")


def _virtual_service_without_waypoint(facts: _Facts, body: Mapping[str, Any]) -> Iterator[Message]:
    """AMB0102: L7 routing for a service whose traffic no waypoint takes is not applied."""
    spec = body.get("spec") or {}
    if "mesh" not in (spec.get("gateways") or ["mesh"]):
        return  # for ingress gateways only
    ns = body["metadata"]["namespace"]
    for host in dict.fromkeys(fqdn(h, ns) for h in spec.get("hosts") or []):
        service = facts.hosts.get(host)
        if service is not None and facts.waypoint_for_service(*service) is None:
            yield _no_waypoint(body, host, service)


def _route_without_waypoint(facts: _Facts, body: Mapping[str, Any]) -> Iterator[Message]:
    """AMB0102 for Gateway API routes whose parent is a Service (read as stored: `parentRefs`)."""
    ns = body["metadata"]["namespace"]
    for parent in (body.get("spec") or {}).get("parentRefs") or []:
        if parent.get("kind") != "Service" or parent.get("group") not in (None, "", "core"):
            continue
        service = (str(parent.get("namespace") or ns), str(parent.get("name")))
        if service in facts.services and facts.waypoint_for_service(*service) is None:
            yield _no_waypoint(body, fqdn(service[1], service[0]), service)


def _no_waypoint(body: Mapping[str, Any], host: str, service: tuple[str, str]) -> Message:
    return Message(ROUTE_WITHOUT_WAYPOINT, _ref(body),
                   f"service {host} has no waypoint: this {body['kind']} is not applied to its traffic (bind one: "
                   f"meshctl waypoint apply -n {service[0]} --enroll-namespace)")


def _subsets(facts: _Facts, body: Mapping[str, Any]) -> Iterator[Message]:
    """AMB0103: a route to a subset that no DestinationRule defines (the request would fail)."""
    for path, host, subset in subset_refs(dict(body)):
        defined = subsets_for(facts.snapshot.resources, host)
        if subset not in defined:
            known = ", ".join(sorted(defined)) or "none"
            yield Message(SUBSET_NOT_FOUND, _ref(body),
                          f"{path}: subset {subset!r} of host {host} is not defined by any DestinationRule "
                          f"(defined: {known})")


def _request_authn_selector(facts: _Facts, body: Mapping[str, Any]) -> Iterator[Message]:
    """AMB0106: a selector picks sidecars; in ambient mode a RequestAuthentication needs targetRefs."""
    spec = body.get("spec") or {}
    if spec.get("selector") and not (spec.get("targetRef") or spec.get("targetRefs")):
        yield Message(REQUEST_AUTHN_SELECTOR, _ref(body),
                      "a selector picks workloads' sidecars, and in ambient mode there are none: this "
                      "RequestAuthentication is not enforced (use targetRefs to the waypoint Gateway "
                      "or to a Service that has one)")


def _authorization(facts: _Facts, body: Mapping[str, Any]) -> Iterator[Message]:
    """AMB0107 and AMB0108: an AuthorizationPolicy that is enforced otherwise than it reads."""
    spec = body.get("spec") or {}
    if spec.get("action") == "CUSTOM":
        yield Message(CUSTOM_FAILS_CLOSED, _ref(body),
                      "CUSTOM needs an external authorizer, and this mesh has none: the policy is "
                      "enforced as DENY of the requests its rules match (fails closed)")
    targeted = spec.get("targetRef") or spec.get("targetRefs")
    if not targeted and any(needs_l7(rule) for rule in spec.get("rules") or []):
        effect = ("those rules are dropped (they allow nothing)" if spec.get("action", "ALLOW") == "ALLOW"
                  else "their HTTP conditions are dropped (they deny more)")
        yield Message(L7_RULES_AT_L4, _ref(body),
                      "rules need HTTP attributes (methods, paths, hosts, request principals or request "
                      f"conditions), and without targetRefs node agents enforce it at L4: {effect}; "
                      "target the waypoint with targetRefs")


def _selection(facts: _Facts, body: Mapping[str, Any]) -> Iterator[Message]:
    """AMB0104: a policy whose selector matches no pod, or whose targets do not take traffic."""
    kind = body["kind"]
    spec = body.get("spec") or {}
    ns = body["metadata"]["namespace"]
    selector = (spec.get("selector") or {}).get("matchLabels")
    if selector:
        scope = None if ns == ROOT_NAMESPACE else ns
        if not any(selects(selector, labels_of(p)) for p in facts.index.pods
                   if scope is None or p["metadata"]["namespace"] == scope):
            where = "any namespace" if scope is None else f"namespace {ns}"
            labels = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
            yield Message(POLICY_SELECTS_NOTHING, _ref(body), f"selector {labels} matches no pod in {where}: "
                                                              f"this {kind} applies to nothing")
    refs = list(spec.get("targetRefs") or []) + ([spec["targetRef"]] if spec.get("targetRef") else [])
    for target in refs:
        t_ns, t_name, t_kind = str(target.get("namespace") or ns), str(target.get("name")), target.get("kind")
        if t_kind == "Service":
            if (t_ns, t_name) not in facts.services:
                yield Message(POLICY_SELECTS_NOTHING, _ref(body),
                              f"targets Service {t_ns}/{t_name}, which does not exist")
            elif facts.waypoint_for_service(t_ns, t_name) is None:
                yield Message(POLICY_SELECTS_NOTHING, _ref(body),
                              f"targets Service {t_ns}/{t_name}, which has no waypoint: not enforced")
        elif t_kind == "Gateway" and (t_ns, t_name) not in facts.index.waypoints:
            what = "is not a waypoint" if facts.snapshot.get("Gateway", t_ns, t_name) else "does not exist"
            yield Message(POLICY_SELECTS_NOTHING, _ref(body), f"targets Gateway {t_ns}/{t_name}, which {what}: "
                                                              "not enforced")


def _strict(facts: _Facts, body: Mapping[str, Any]) -> Iterator[Message]:
    """AMB0105: STRICT mTLS refuses every caller without a mesh identity; say which workloads that is."""
    spec = body.get("spec") or {}
    modes = [(spec.get("mtls") or {}).get("mode")] + [v.get("mode") for v in (spec.get("portLevelMtls") or {}).values()]
    outside = facts.outside_mesh()
    if "STRICT" not in modes or not outside:
        return
    ns = body["metadata"]["namespace"]
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    scope = facts.pods(None if ns == ROOT_NAMESPACE else ns)
    protected = [p for p in scope if facts.in_mesh(p) and selects(selector, labels_of(p))]
    if protected:
        yield Message(STRICT_REFUSES_OUTSIDE, _ref(body),
                      f"STRICT mTLS refuses plaintext callers, and {len(outside)} workload(s) are outside the mesh "
                      f"({_names(outside)}): their connections to {_names(protected)} are refused (enroll them with "
                      "istio.io/dataplane-mode=ambient, or use PERMISSIVE)")


def _conflicting(facts: _Facts, body: Mapping[str, Any]) -> Iterator[Message]:
    """AMB0109: two VirtualServices for one host: the older keeps it, the other is ignored for it."""
    meta = body["metadata"]
    owners = facts.host_owners()
    for host in sorted(facts.lost_hosts().get((meta["namespace"], meta["name"]), set())):
        yield Message(CONFLICTING_VIRTUAL_SERVICE, _ref(body),
                      f"host {host} is also routed by VirtualService {owners.get(host, 'another')}, which is older "
                      "and is the one used: this one is ignored for that host (merge them into one)")


CHECKS: dict[str, tuple[Callable[[_Facts, Mapping[str, Any]], Iterable[Message]], ...]] = {
    "Namespace": (_use_waypoint,),
    "Service": (_use_waypoint,),
    "Pod": (_use_waypoint,),
    "VirtualService": (_virtual_service_without_waypoint, _subsets, _conflicting),
    **{kind: (_route_without_waypoint,) for kind in ROUTE_KINDS},
    "AuthorizationPolicy": (_selection, _authorization),
    "PeerAuthentication": (_selection, _strict),
    "RequestAuthentication": (_selection, _request_authn_selector),
}



# ---- what the apply API does with it ---------------------------------------------------------------------

VALIDATION_MESSAGES = "validationMessages"  # in `status`: the control plane's, never the writer's


def without_messages(body: Any) -> Any:
    """`body` without `status.validationMessages` (an object read back and applied again brings them)."""
    if not isinstance(body, dict) or not isinstance(body.get("status"), dict) or VALIDATION_MESSAGES not in body["status"]:
        return body
    status = {k: v for k, v in body["status"].items() if k != VALIDATION_MESSAGES}
    out = {**body, "status": status}
    if not status:
        del out["status"]
    return out


def with_messages(items: Iterable[dict[str, Any]], messages: Iterable[Message]) -> list[dict[str, Any]]:
    """`items` as read, each with its messages in `status.validationMessages` (bodies are copied, not changed)."""
    found = by_ref(messages)
    out = []
    for item in items:
        mine = found.get(Ref.of(item))
        if mine:
            status = item.get("status")
            status = dict(status) if isinstance(status, dict) else {}
            status[VALIDATION_MESSAGES] = [m.validation_message() for m in mine]
            item = {**item, "status": status}
        out.append(item)
    return out
