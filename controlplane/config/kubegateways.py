"""Ingress Gateway status on Kubernetes: the control plane's word on each Gateway of class istio, written
to the API as it writes route status (`controlplane.config.kuberoutes`).

The status is worked out by the function the local apply API uses
(`controlplane.translate.ingressstatus.gateway_statuses`: `Accepted`, each listener's `ResolvedRefs` from
its certificate, `attachedRoutes`), with the address taken the Kubernetes way (`on_kubernetes`): an
ingress Gateway is reached through its Service, named `<gateway>-istio` as Istio names it, of type
LoadBalancer.  Its `status.loadBalancer.ingress` gives `status.addresses` (IPAddress or Hostname) and
makes the Gateway and its servable listeners `Programmed`; without an address they are `Programmed` False
(`AddressNotAssigned`), and a Gateway none of whose listeners can be served stays False `Invalid`.

The whole status belongs to this controller (the class is ours): it is written as one JSON merge patch of
the status subresource whenever it changes, each condition keeping its `lastTransitionTime` while its
status stays the same.  The store's changes trigger a write; so does a look every `resync` seconds, since
a load balancer's address arrives on the Service's status, which the store does not hold.  A write that
fails is tried again at the next look; a Gateway that is gone is forgotten.

The gateway itself (its Deployment, ServiceAccount and that Service) is deployed by
`controlplane.config.kubedeploy`, as Istio's gateway deployment controller does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from controlplane.config.follower import StoreFollower
from controlplane.config.kuberoutes import NOT_FOUND, REQUEST_TIMEOUT, _now
from controlplane.config.store import Store
from controlplane.translate.ingressstatus import gateway_statuses
from mesh.api.kinds_gateway import GATEWAY_GROUP, ingress_service_account
from mesh.api.validate import Ref

log = logging.getLogger(__name__)

RESYNC = 10.0  # seconds between looks at the Gateways' Services (their load balancer's address)


def service_name(gateway: str) -> str:
    """The Service of an ingress Gateway's pods, as Istio names it (`<gateway>-istio`, like its account)."""
    return ingress_service_account(gateway)


def load_balancer_addresses(service: Mapping[str, Any] | None) -> list[dict[str, str]]:
    """`status.addresses` entries from a Service's `status.loadBalancer.ingress` (none for no Service)."""
    out = []
    for entry in (((service or {}).get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
        if entry.get("ip"):
            out.append({"type": "IPAddress", "value": str(entry["ip"])})
        elif entry.get("hostname"):
            out.append({"type": "Hostname", "value": str(entry["hostname"])})
    return out


def on_kubernetes(status: Mapping[str, Any], ref: Ref, service: Mapping[str, Any] | None) -> dict[str, Any]:
    """A Gateway's status (as translation works it out) with its address and `Programmed` conditions from
    its Service (None: there is none)."""
    addresses = load_balancer_addresses(service)
    where = f"Service {ref.namespace}/{service_name(ref.name)}"
    if addresses:
        programmed = ("True", "Programmed", f"reachable at {', '.join(a['value'] for a in addresses)} ({where})")
    elif service is None:
        programmed = ("False", "AddressNotAssigned", f"no {where} (type LoadBalancer) for the gateway's pods")
    else:
        programmed = ("False", "AddressNotAssigned", f"{where} has no load balancer address yet")

    def reprogram(conditions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for c in conditions:
            if c["type"] == "Programmed" and c["reason"] != "Invalid":
                c = {**c, "status": programmed[0], "reason": programmed[1], "message": programmed[2]}
            out.append(c)
        return out

    listeners = [{**{k: v for k, v in li.items() if k != "publishedAddress"},
                  "conditions": reprogram(li["conditions"])} for li in status.get("listeners") or []]
    return {"conditions": reprogram(list(status.get("conditions") or [])), "addresses": addresses,
            "listeners": listeners}


def with_times(status: Mapping[str, Any], before: Mapping[str, Any] | None, now: str) -> dict[str, Any]:
    """`status` with a `lastTransitionTime` on every condition (the Gateway's and each listener's):
    `before`'s where the same condition had the same status, else `now`."""
    def timed(conditions: list[dict[str, Any]], old: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prior = {c["type"]: c for c in old}
        return [{**c, "lastTransitionTime": prior[c["type"]]["lastTransitionTime"]
                 if c["type"] in prior and prior[c["type"]]["status"] == c["status"] else now} for c in conditions]

    before = before or {}
    old_listeners = {li["name"]: li for li in before.get("listeners") or []}
    return {**status, "conditions": timed(status["conditions"], before.get("conditions") or []),
            "listeners": [{**li, "conditions": timed(li["conditions"],
                                                     old_listeners.get(li["name"], {}).get("conditions") or [])}
                          for li in status["listeners"]]}


class GatewayStatusWriter(StoreFollower):
    """Writes ingress Gateway status (see the module docstring); `start()` subscribes, `stop()` ends it."""

    def __init__(self, api: ApiClient, store: Store, *, resync: float = RESYNC,
                 clock: Callable[[], str] = _now) -> None:
        super().__init__(store, "kube-gateway-status", what="work out the Gateways' status", every=resync)
        self._custom = CustomObjectsApi(api)
        self._core = CoreV1Api(api)
        self._clock = clock
        self._written: dict[Ref, dict[str, Any]] = {}  # what this process wrote last (without times)
        self._timed: dict[Ref, dict[str, Any]] = {}  # the same, with times

    def work(self) -> bool:
        return self.write_changed()  # a failed write is tried again at the next look

    def write_changed(self) -> bool:
        """Write every ingress Gateway status that changed; True if a read or write failed."""
        statuses = gateway_statuses(self._store.snapshot())
        for ref in [r for r in self._written if r not in statuses]:
            del self._written[ref]
            self._timed.pop(ref, None)
        failed = False
        for ref, status in sorted(statuses.items()):
            try:
                full = on_kubernetes(status, ref, self._service(ref))
                if self._written.get(ref) != full:
                    self._write(ref, full)
            except Exception as exc:  # noqa: BLE001 - one Gateway's failure is that Gateway's alone
                log.warning("kubernetes gateway status: cannot write the status of %s: %s", ref, exc)
                failed = True
        return failed

    def _service(self, ref: Ref) -> dict[str, Any] | None:
        try:
            response: Any = self._core.read_namespaced_service(service_name(ref.name), ref.namespace,
                                                               _request_timeout=REQUEST_TIMEOUT,
                                                               _preload_content=False)  # raw: JSON as sent
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                return None
            raise
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        return body if isinstance(body, dict) else None

    def _write(self, ref: Ref, status: dict[str, Any]) -> None:
        args = (GATEWAY_GROUP, "v1", ref.namespace, "gateways", ref.name)
        try:
            self._custom.get_namespaced_custom_object(*args, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == NOT_FOUND:  # deleted meanwhile: the store will hear of it
                return
            raise
        timed = with_times(status, self._timed.get(ref), self._clock())
        self._custom.patch_namespaced_custom_object_status(*args, {"status": timed}, _request_timeout=REQUEST_TIMEOUT)
        self._written[ref] = status
        self._timed[ref] = timed
        top = {c["type"]: c["status"] for c in status["conditions"]}
        log.info("kubernetes gateway status: %s Accepted=%s Programmed=%s addresses=%s", ref, top.get("Accepted"),
                 top.get("Programmed"), ",".join(a["value"] for a in status["addresses"]) or "none")
