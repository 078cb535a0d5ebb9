"""Telling users, through the Kubernetes API, about objects the mesh refused.

When the Kubernetes source meets an object the strict validator refuses (a bad VirtualService created
with kubectl while the admission webhook was not installed, say), this reporter

- logs it (a warning in the control plane's log);
- posts a Warning Event on the object (reason `InvalidConfiguration`, the validator's message), which
  `kubectl describe` and `kubectl get events` show;
- for the kinds whose status the mesh owns (the Istio kinds and waypoint Gateways), sets the status
  condition `Accepted` to False with the same message, and back to True once a later version of the
  object is accepted.

Each distinct refusal of an object is reported once (a condition already on the object counts, so a
restarted control plane does not repeat itself).  Reports go out from a thread of their own through a
bounded queue, so a slow or failing API server never holds up the watches; a report that fails is
logged and dropped.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import queue
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client import (
    ApiClient,
    CoreV1Api,
    CoreV1Event,
    CustomObjectsApi,
    V1EventSource,
    V1ObjectMeta,
    V1ObjectReference,
)

from controlplane.config.kubeobjects import Resource, describe, name_of, ref_of
from mesh.api.validate import Ref

log = logging.getLogger(__name__)

COMPONENT = "ambient-istiod"
CONDITION = "Accepted"
REFUSED_REASON = "InvalidConfiguration"
ACCEPTED_REASON = "Accepted"
MAX_EVENT_MESSAGE = 1024
QUEUE_SIZE = 1000
REQUEST_TIMEOUT = 10.0
EVENTS_NAMESPACE = "default"  # where Events about cluster-scoped objects go, as kubectl does


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _our_condition(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(condition, dict) and condition.get("type") == CONDITION:
            return condition
    return None


class Reporter:
    """Reports refused objects (see the module docstring); `start()` before use, `stop()` when done."""

    def __init__(self, api: ApiClient, *, component: str = COMPONENT, instance: str | None = None,
                 queue_size: int = QUEUE_SIZE) -> None:
        self._core = CoreV1Api(api)
        self._custom = CustomObjectsApi(api)
        self.component = component
        self.instance = instance or socket.gethostname()
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._reported: dict[Ref, tuple[str, str]] = {}  # ref -> (uid, message) last reported
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kube-reporter", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)  # after the reports queued before it
        self._thread.join(timeout)
        self._thread = None

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until every queued report was sent (tests)."""
        done = threading.Event()
        self._queue.put(done.set, timeout=timeout)
        done.wait(timeout)

    # ---- what the source tells ---------------------------------------------------------------------

    def refused(self, resource: Resource, obj: Mapping[str, Any], message: str) -> bool:
        """Report that `obj` was refused with `message`; False if that was reported already."""
        ref, uid = ref_of(resource, obj), str((obj.get("metadata") or {}).get("uid") or "")
        with self._lock:
            if self._reported.get(ref) == (uid, message):
                return False
            self._reported[ref] = (uid, message)
        log.warning("refused %s from the Kubernetes API (the mesh keeps its previous version, if any): %s",
                    describe(resource, obj), message)
        condition = _our_condition(obj)
        if condition is not None and condition.get("status") == "False" and condition.get("message") == message:
            return False  # said on the object already (by an earlier run)
        self._send(lambda: self._post_event(resource, obj, message))
        if resource.has_status:
            self._send(lambda: self._set_condition(resource, obj, "False", REFUSED_REASON, message))
        return True

    def accepted(self, resource: Resource, obj: Mapping[str, Any]) -> None:
        """`obj` was accepted: clear a refusal this reporter (or an earlier run) put on it."""
        with self._lock:
            self._reported.pop(ref_of(resource, obj), None)
        condition = _our_condition(obj)
        if resource.has_status and condition is not None and condition.get("reason") == REFUSED_REASON:
            self._send(lambda: self._set_condition(resource, obj, "True", ACCEPTED_REASON,
                                                   "accepted by the mesh's validator"))

    def forget(self, ref: Ref) -> None:
        """The object is gone."""
        with self._lock:
            self._reported.pop(ref, None)

    def retain(self, kind: str, present: set[Ref]) -> None:
        """Only the objects of `kind` in `present` still exist (after a list)."""
        with self._lock:
            for ref in [r for r in self._reported if r.kind == kind and r not in present]:
                del self._reported[ref]

    def refusals(self) -> dict[Ref, str]:
        """The objects refused now, and why."""
        with self._lock:
            return {ref: message for ref, (_, message) in self._reported.items()}

    # ---- the API calls ------------------------------------------------------------------------------

    def _send(self, call: Callable[[], None]) -> None:
        try:
            self._queue.put_nowait(call)
        except queue.Full:
            log.warning("kubernetes reporter: %d reports waiting; dropping one", self._queue.qsize())

    def _run(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            try:
                call()
            except Exception as exc:
                log.warning("kubernetes reporter: %s", exc)

    def _post_event(self, resource: Resource, obj: Mapping[str, Any], message: str) -> None:
        namespace, name = name_of(obj)
        meta = obj.get("metadata") or {}
        now = _now()
        text = message if len(message) <= MAX_EVENT_MESSAGE else message[:MAX_EVENT_MESSAGE - 3] + "..."
        event = CoreV1Event(
            metadata=V1ObjectMeta(generate_name=f"{name}.", namespace=namespace or EVENTS_NAMESPACE),
            involved_object=V1ObjectReference(
                api_version=resource.api_version, kind=resource.kind, name=name, namespace=namespace or None,
                uid=meta.get("uid"), resource_version=meta.get("resourceVersion"),
            ),
            type="Warning", reason=REFUSED_REASON, message=text, count=1,
            first_timestamp=now, last_timestamp=now,
            source=V1EventSource(component=self.component),
            reporting_component=self.component, reporting_instance=self.instance,
        )
        try:
            self._core.create_namespaced_event(namespace or EVENTS_NAMESPACE, event, _request_timeout=REQUEST_TIMEOUT)
        except Exception as exc:
            raise RuntimeError(f"cannot post an Event about {resource.kind} {namespace}/{name}: {exc}") from None

    def _set_condition(self, resource: Resource, obj: Mapping[str, Any], status: str, reason: str,
                       message: str) -> None:
        namespace, name = name_of(obj)
        meta = obj.get("metadata") or {}
        ours = {"type": CONDITION, "status": status, "reason": reason, "message": message,
                "lastTransitionTime": _now().isoformat().replace("+00:00", "Z")}
        if meta.get("generation") is not None:
            ours["observedGeneration"] = meta["generation"]
        others = [c for c in (obj.get("status") or {}).get("conditions") or []
                  if not (isinstance(c, dict) and c.get("type") == CONDITION)]
        body = {"status": {"conditions": [*others, ours]}}
        try:
            self._custom.patch_namespaced_custom_object_status(
                resource.group, resource.version, namespace, resource.plural, name, body,
                _request_timeout=REQUEST_TIMEOUT)
        except Exception as exc:
            raise RuntimeError(f"cannot set the status of {resource.kind} {namespace}/{name}: {exc}") from None
