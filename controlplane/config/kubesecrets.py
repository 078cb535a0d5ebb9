"""The Secrets ingress Gateways name for their certificates, watched on Kubernetes: those, and only those.

An HTTPS listener of an ingress Gateway (`gatewayClassName: istio`) names a `kubernetes.io/tls` Secret of
its own namespace (`tls.certificateRefs`).  The control plane needs those Secrets (translation checks the
certificate, the gateway's pods get it), and no other: it never lists the cluster's Secrets.  Whenever the
Gateways in the store change, the Secrets they name (`kubeobjects.referenced_secrets`) are worked out
again, and each one gets a reflector of its own (the source's list-and-watch loop: relist on 410 Gone,
backoff on failures) on `GET /api/v1/namespaces/<ns>/secrets?fieldSelector=metadata.name=<name>`, the
form of a list or watch that the API server authorizes as a read of that one Secret.  The Secret is put
in the store as the mesh's document (type and data); a Secret no Gateway names any more stops being
watched and leaves the store.  A named Secret that does not exist is simply absent (the Gateway's status
says so: `ResolvedRefs` False), and appears when it is created.

RBAC cannot name Secrets that users create later, so the control plane's role allows reading Secrets
(get, list, watch; never writing them): what it reads is limited here, by name.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from controlplane.config.follower import StoreFollower
from controlplane.config.kubeobjects import SECRET, Resource, name_of, referenced_secrets, to_document
from controlplane.config.store import Store
from mesh.api.errors import ApiError
from mesh.api.validate import Document, Ref

log = logging.getLogger(__name__)

STOP_TIMEOUT = 2.0  # seconds a reflector no longer needed is given to end its watch


class Reflector(Protocol):
    def run(self) -> None: ...

    def interrupt(self) -> None: ...


# (sink, its own stop event, (list function, its arguments)) -> a reflector for one Secret
ReflectorFactory = Callable[[Any, threading.Event, tuple[Callable[..., Any], tuple[Any, ...]]], Reflector]


class OneSecret:
    """The sink of one Secret's reflector: that Secret, kept in the store as the mesh's document."""

    def __init__(self, store: Store, namespace: str, name: str) -> None:
        self.store = store
        self.key = (namespace, name)
        self.ref = Ref("Secret", namespace, name)

    def replace(self, resource: Resource, items: list[dict[str, Any]]) -> None:
        mine = [obj for obj in items if name_of(obj) == self.key]
        if mine:
            self.upsert(resource, mine[0])
        else:
            self._remove()

    def upsert(self, resource: Resource, obj: dict[str, Any]) -> None:
        if name_of(obj) != self.key:  # the field selector keeps others away; never store one not asked for
            return
        doc = to_document(SECRET, obj)
        assert doc is not None
        try:
            self.store.apply([Document(str(self.ref), 0, doc)])
        except ApiError as exc:
            log.warning("kubernetes: Secret %s/%s named by an ingress Gateway cannot be used: %s", *self.key, exc)

    def delete(self, resource: Resource, obj: dict[str, Any]) -> None:
        if name_of(obj) == self.key:
            self._remove()

    def _remove(self) -> None:
        try:
            self.store.delete_refs([self.ref], ignore_not_found=True)
        except ApiError as exc:
            log.error("kubernetes: cannot remove Secret %s/%s from the store: %s", *self.key, exc)


@dataclass
class _Watch:
    stopping: threading.Event
    reflector: Reflector
    thread: threading.Thread


class GatewaySecrets(StoreFollower):
    """Keeps one reflector per Secret the store's ingress Gateways name (see the module docstring)."""

    def __init__(self, store: Store, make_reflector: ReflectorFactory,
                 list_namespaced: Callable[..., Any]) -> None:
        super().__init__(store, "kube-gateway-secrets", what="follow the Secrets of the ingress Gateways",
                         wants=lambda event: "Gateway" in event.kinds)
        self._make_reflector = make_reflector
        self._list_namespaced = list_namespaced  # the client's list_namespaced_secret
        self._watches: dict[tuple[str, str], _Watch] = {}

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        for key in list(self._watches):
            self._end(key, remove=False)

    def watched(self) -> set[tuple[str, str]]:
        """(namespace, name) of the Secrets watched now."""
        return set(self._watches)

    def work(self) -> bool:
        self.sync()
        return False

    def sync(self) -> None:
        """Watch exactly the Secrets the store's Gateways name now."""
        wanted = referenced_secrets(self._store.snapshot().of_kind("Gateway"))
        for key in sorted(self._watches.keys() - wanted):
            self._end(key, remove=True)
        for key in sorted(wanted - self._watches.keys()):
            self._begin(key)

    def _begin(self, key: tuple[str, str]) -> None:
        namespace, name = key
        stopping = threading.Event()
        call = (self._list_namespaced, (namespace,))
        reflector = self._make_reflector(OneSecret(self._store, namespace, name), stopping,
                                         (_by_name(call[0], name), call[1]))
        thread = threading.Thread(target=reflector.run, name=f"kube-secret-{namespace}-{name}", daemon=True)
        self._watches[key] = _Watch(stopping, reflector, thread)
        thread.start()
        log.info("kubernetes: watching Secret %s/%s (named by an ingress Gateway)", namespace, name)

    def _end(self, key: tuple[str, str], *, remove: bool) -> None:
        watch = self._watches.pop(key)
        watch.stopping.set()
        for _ in range(int(STOP_TIMEOUT / 0.02)):  # a watch being opened may miss the first interruption
            watch.reflector.interrupt()
            watch.thread.join(0.02)
            if not watch.thread.is_alive():
                break
        if remove:
            OneSecret(self._store, *key)._remove()
            log.info("kubernetes: no longer watching Secret %s/%s (no ingress Gateway names it)", *key)


def _by_name(list_namespaced: Callable[..., Any], name: str) -> Callable[..., Any]:
    """The list function, limited to one object by name (for its lists and its watches alike)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return list_namespaced(*args, field_selector=f"metadata.name={name}", **kwargs)
    return call
