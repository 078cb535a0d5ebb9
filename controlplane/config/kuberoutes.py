"""Route status on Kubernetes: the control plane's word on each HTTPRoute and GRPCRoute, written to the API.

After every change of the store, the status of every route is worked out again with the function the
local apply API uses (`controlplane.translate.gatewayapi.route_statuses`), and each route whose status
changed is written, from a thread of its own: the object is read, the `status.parents` entries of other
controllers are kept, this controller's are replaced, and the result goes out as a JSON merge patch of
the status subresource.  A condition keeps its `lastTransitionTime` while its status stays the same (the
times are this process's: a restarted control plane writes each route once more).  A write that fails
is logged and tried again after `retry` seconds; a route that is gone is forgotten.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from controlplane.config.follower import StoreFollower
from controlplane.config.kubeobjects import resource_for
from controlplane.config.store import Store
from controlplane.translate.gatewayapi import CONTROLLER, route_statuses
from mesh.api.validate import Ref

log = logging.getLogger(__name__)

RETRY = 5.0  # seconds before a failed write is tried again
REQUEST_TIMEOUT = 10.0
NOT_FOUND = 404


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def with_times(status: Mapping[str, Any], before: Mapping[str, Any] | None, now: str) -> dict[str, Any]:
    """`status` with a `lastTransitionTime` on each condition: `before`'s where that condition (same parent,
    same type) had the same status, else `now`."""
    old: dict[tuple[str, str], Mapping[str, Any]] = {}
    for parent in (before or {}).get("parents") or []:
        for c in parent.get("conditions") or []:
            old[(repr(sorted(parent["parentRef"].items())), c["type"])] = c
    parents = []
    for parent in status.get("parents") or []:
        key = repr(sorted(parent["parentRef"].items()))
        conditions = []
        for c in parent["conditions"]:
            prior = old.get((key, c["type"]))
            when = prior["lastTransitionTime"] if prior is not None and prior["status"] == c["status"] else now
            conditions.append({**c, "lastTransitionTime": when})
        parents.append({**parent, "conditions": conditions})
    return {"parents": parents}


class RouteStatusWriter(StoreFollower):
    """Writes route status (see the module docstring); `start()` subscribes to `store`, `stop()` ends it."""

    def __init__(self, api: ApiClient, store: Store, *, retry: float = RETRY,
                 clock: Callable[[], str] = _now) -> None:
        super().__init__(store, "kube-route-status", what="work out the routes' status", retry=retry)
        self._custom = CustomObjectsApi(api)
        self._clock = clock
        self._written: dict[Ref, dict[str, Any]] = {}  # what this process wrote last (without times)
        self._timed: dict[Ref, dict[str, Any]] = {}  # the same, with times

    def work(self) -> bool:
        return self.write_changed()

    def write_changed(self) -> bool:
        """Write every route status that changed; True if a write failed (to be tried again)."""
        statuses = route_statuses(self._store.snapshot())
        for ref in [r for r in self._written if r not in statuses]:
            del self._written[ref]
            self._timed.pop(ref, None)
        failed = False
        for ref, status in sorted(statuses.items()):
            if self._written.get(ref) == status:
                continue
            try:
                self._write(ref, status)
            except Exception as exc:  # noqa: BLE001 - one route's failure is that route's alone
                log.warning("kubernetes route status: cannot write the status of %s: %s", ref, exc)
                failed = True
        return failed

    def _write(self, ref: Ref, status: dict[str, Any]) -> None:
        resource = resource_for(ref.kind)
        assert resource is not None
        args = (resource.group, resource.version, ref.namespace, resource.plural, ref.name)
        try:
            current = self._custom.get_namespaced_custom_object(*args, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == NOT_FOUND:  # deleted meanwhile: the store will hear of it
                return
            raise
        timed = with_times(status, self._timed.get(ref), self._clock())
        status_now = current.get("status") if isinstance(current, dict) else None  # the client types it `object`
        others = [p for p in (status_now or {}).get("parents") or []
                  if isinstance(p, dict) and p.get("controllerName") != CONTROLLER]
        body = {"status": {"parents": [*others, *timed["parents"]]}}
        self._custom.patch_namespaced_custom_object_status(*args, body, _request_timeout=REQUEST_TIMEOUT)
        self._written[ref] = status
        self._timed[ref] = timed
        log.info("kubernetes route status: %s %s", ref, "; ".join(
            f"{p['parentRef'].get('name')}: " + ", ".join(f"{c['type']}={c['status']}" for c in p["conditions"])
            for p in status["parents"]) or "no parents")
