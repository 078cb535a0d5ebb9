"""The Kubernetes configuration source: the cluster's objects, listed and watched, in the configuration store.

    api = api_client(kubeconfig)                  # in-cluster configuration when kubeconfig is None
    store = Store(check_references=False)         # in memory: the API server is the truth
    source = KubernetesSource(api, store)
    source.start(); source.wait_synced(60)        # every collection listed once
    TranslatedSource(store, translate)            # then exactly as in local mode
    ...
    source.stop()

It feeds the same `Store` and translation as the local cluster: each object is mapped to the mesh's
document (`controlplane.config.kubeobjects`) and applied, so it passes the same strict validator as
`meshctl apply`.  An object the validator refuses is reported (`controlplane.config.kubereport`: the
log, a Warning Event, a status condition) and left out; the mesh keeps that object's previous accepted
version, if it had one, as if the admission webhook had refused the change.  Nothing else waits for it:
the other objects of a batch are applied without it.  Deletions always go through.  HTTPRoutes and
GRPCRoutes are given their status (`status.parents`) by `controlplane.config.kuberoutes`, ingress
Gateways theirs by `controlplane.config.kubegateways`; the Secrets ingress Gateways name, and only
those, are watched one by one (`controlplane.config.kubesecrets`); each ingress Gateway's Deployment,
Service and ServiceAccount are applied by `controlplane.config.kubedeploy`.

One reflector (client-go's word) per collection (`RESOURCES`), each in a thread of its own:

1. List, page by page (`limit`/`continue`), and make the store's objects of that kind exactly the list:
   apply what is there, delete what is not.  The list's `metadata.resourceVersion` is where to watch from.
2. Watch from there (`watch=1&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=T`): ADDED and
   MODIFIED apply one object, DELETED deletes it, BOOKMARK only moves the resourceVersion on.  When the
   API server ends the watch (timeoutSeconds), watch again from the last resourceVersion.
3. An ERROR event or answer with code 410 (Gone: "too old resource version") means the history is
   compacted: list again (step 1), which also removes what was deleted meanwhile.  Anything else that
   fails (a dropped connection, a 5xx, a timeout) is retried from the same resourceVersion after a
   capped exponential backoff with jitter, reset once events flow again.
4. A collection the API server does not serve (404: the Gateway API or Istio CRDs are not installed)
   counts as empty and is listed again now and then, so CRDs installed later are picked up.

Nodes and EndpointSlices are not documents of the mesh: they are kept as the API server sent them
(`objects(kind)`), for what needs them later (locality, services without selectors).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kubernetes import config as kube_config
from kubernetes import watch as kube_watch
from kubernetes.client import ApiClient, Configuration, CoreV1Api, CustomObjectsApi, DiscoveryV1Api
from kubernetes.client.exceptions import ApiException

from controlplane.config.kubedeploy import DeployOptions, GatewayDeployer
from controlplane.config.kubegateways import GatewayStatusWriter
from controlplane.config.kubeobjects import (
    RESOURCES,
    SECRET,
    Resource,
    describe,
    name_of,
    ref_of,
    refusal_message,
    to_document,
)
from controlplane.config.kubereport import Reporter
from controlplane.config.kuberoutes import RouteStatusWriter
from controlplane.config.kubesecrets import GatewaySecrets
from controlplane.config.store import Store
from mesh.api.errors import ApiError, FieldError, ValidationError
from mesh.api.validate import Document, Ref
from mesh.errors import MeshError
from mesh.xds.client import backoff_delay

log = logging.getLogger(__name__)

GONE = 410
NOT_FOUND = 404


class KubernetesSourceError(MeshError):
    """The Kubernetes API cannot be used: no configuration, or the collections could not be listed."""


@dataclass(frozen=True)
class Timing:
    backoff_initial: float = 0.5  # seconds before the first retry; doubled per failure, with jitter
    backoff_max: float = 30.0
    watch_timeout: int = 300  # timeoutSeconds of a watch: the API server ends it then, and we watch again
    request_timeout: float = 30.0  # connecting, and reading a list; a watch may be silent for its timeout
    page_size: int = 500  # objects per list page
    status_resync: float = 10.0  # seconds between looks at the ingress Gateways' Services (their address)
    deploy_resync: float = 60.0  # seconds between applies of the ingress Gateways' Deployments and Services


def api_client(kubeconfig: Path | str | None = None) -> ApiClient:
    """A client of the cluster's API: from `kubeconfig`, or the pod's service account (in-cluster)."""
    cfg = Configuration()
    try:
        if kubeconfig is None:
            kube_config.load_incluster_config(client_configuration=cfg)
        else:
            kube_config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg,
                                         persist_config=False)
    except (kube_config.ConfigException, OSError, ValueError) as exc:
        where = f"kubeconfig {kubeconfig}" if kubeconfig is not None else \
            "the in-cluster configuration (not running in a pod? pass --kubeconfig)"
        raise KubernetesSourceError(f"cannot use {where}: {exc}") from None
    cfg.retries = False  # the source retries itself, with backoff; a TokenReview fails closed at once
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, len(RESOURCES) + 8)
    return ApiClient(cfg)


def lister(api: ApiClient, resource: Resource) -> tuple[Callable[..., Any], tuple[str, ...]]:
    """The client's list function for `resource` (across all namespaces), and its positional arguments."""
    if resource.custom:
        return CustomObjectsApi(api).list_cluster_custom_object, (resource.group, resource.version, resource.plural)
    core = CoreV1Api(api)
    functions: dict[str, Callable[..., Any]] = {
        "namespaces": core.list_namespace,
        "serviceaccounts": core.list_service_account_for_all_namespaces,
        "services": core.list_service_for_all_namespaces,
        "pods": core.list_pod_for_all_namespaces,
        "nodes": core.list_node,
        "endpointslices": DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
    }
    return functions[resource.plural], ()


class KubernetesSource:
    """Keeps `store` equal to the cluster's objects (see the module docstring)."""

    def __init__(self, api: ApiClient, store: Store, *, reporter: Reporter | None = None,
                 resources: Iterable[Resource] = RESOURCES, timing: Timing = Timing(),
                 deploy: DeployOptions | None = None) -> None:
        self.store = store
        self.reporter = reporter if reporter is not None else Reporter(api)
        self.route_status = RouteStatusWriter(api, store)
        self.gateway_status = GatewayStatusWriter(api, store, resync=timing.status_resync)
        self.gateway_deploy = GatewayDeployer(api, store, options=deploy or DeployOptions(),
                                              resync=timing.deploy_resync)
        self.gateway_secrets = GatewaySecrets(
            store, lambda sink, stopping, call: _Reflector(SECRET, api, sink, timing, stopping, call),
            CoreV1Api(api).list_namespaced_secret)
        self._stopping = threading.Event()
        self._objects_lock = threading.Lock()
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self._reflectors = {r.kind: _Reflector(r, api, self, timing, self._stopping) for r in resources}
        self._threads: list[threading.Thread] = []

    # ---- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self.reporter.start()
        self.route_status.start()
        self.gateway_status.start()
        self.gateway_deploy.start()
        self.gateway_secrets.start()
        for kind, reflector in self._reflectors.items():
            thread = threading.Thread(target=reflector.run, name=f"kube-{kind}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wait_synced(self, timeout: float) -> None:
        """Return once every collection was listed; `KubernetesSourceError` after `timeout` seconds."""
        waiting = list(self._reflectors.values())
        deadline = time.monotonic() + timeout
        for reflector in waiting:
            reflector.synced.wait(max(0.0, deadline - time.monotonic()))
        missing = [r for r in waiting if not r.synced.is_set()]
        if missing:
            why = "; ".join(f"{r.resource}: {r.last_error or 'no answer yet'}" for r in missing)
            raise KubernetesSourceError(
                f"could not list {', '.join(str(r.resource) for r in missing)} from the Kubernetes API within "
                f"{timeout:g}s ({why}): is the API server reachable, and may the control plane list them?")

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        deadline = time.monotonic() + timeout
        # A watch that was just being opened when first interrupted may miss it: interrupt until it ends.
        while any(t.is_alive() for t in self._threads) and time.monotonic() < deadline:
            for reflector in self._reflectors.values():
                reflector.interrupt()
            for thread in self._threads:
                thread.join(0.02)
        self._threads.clear()
        self.gateway_secrets.stop(timeout)
        self.gateway_deploy.stop(timeout)
        self.gateway_status.stop(timeout)
        self.route_status.stop(timeout)
        self.reporter.stop(timeout)

    # ---- reading ----------------------------------------------------------------------------------------

    def objects(self, kind: str) -> list[dict[str, Any]]:
        """The kept objects of a kind that is not a document (Node, EndpointSlice), as the API sent them."""
        with self._objects_lock:
            return [obj for _, obj in sorted(self._objects.get(kind, {}).items())]

    def resource_version(self, kind: str) -> str | None:
        """Where the watch of `kind` stands (None before its first list, or while it lists again)."""
        return self._reflectors[kind].resource_version

    def counts(self, kind: str) -> tuple[int, int]:
        """(lists, watches) the reflector of `kind` has made."""
        reflector = self._reflectors[kind]
        return reflector.lists, reflector.watches

    # ---- what the reflectors tell (from their threads) -----------------------------------------------

    def replace(self, resource: Resource, items: list[dict[str, Any]]) -> None:
        """The complete list of `resource`: make the store (or the kept objects) exactly that."""
        if not resource.stored:
            with self._objects_lock:
                self._objects[resource.kind] = {name_of(obj): obj for obj in items}
            return
        present = {ref_of(resource, obj) for obj in items}
        self.reporter.retain(resource.kind, present)
        docs: dict[Ref, tuple[dict[str, Any], dict[str, Any]]] = {}
        not_ours: list[Ref] = []
        for obj in items:
            doc = to_document(resource, obj)
            if doc is None:
                not_ours.append(ref_of(resource, obj))
            else:
                docs[ref_of(resource, obj)] = (doc, obj)
        self._apply(resource, docs)
        gone = [ref for ref in self.store.snapshot() if ref.kind == resource.kind and ref not in present]
        self._remove([*gone, *not_ours])

    def upsert(self, resource: Resource, obj: dict[str, Any]) -> None:
        if not resource.stored:
            with self._objects_lock:
                self._objects.setdefault(resource.kind, {})[name_of(obj)] = obj
            return
        doc = to_document(resource, obj)
        if doc is None:
            self._remove([ref_of(resource, obj)])
        else:
            self._apply(resource, {ref_of(resource, obj): (doc, obj)})

    def delete(self, resource: Resource, obj: dict[str, Any]) -> None:
        if not resource.stored:
            with self._objects_lock:
                self._objects.get(resource.kind, {}).pop(name_of(obj), None)
            return
        ref = ref_of(resource, obj)
        self.reporter.forget(ref)
        self._remove([ref])

    # ---- the store ----------------------------------------------------------------------------------

    def _apply(self, resource: Resource, docs: Mapping[Ref, tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Apply every document the validator accepts; report each one it refuses, without the others."""
        pending = dict(docs)
        while pending:
            try:
                self.store.apply([Document(str(ref), 0, doc) for ref, (doc, _) in pending.items()])
                break
            except ValidationError as exc:
                refused = _errors_by_ref(exc.errors)
                if not refused.keys() & pending.keys():
                    log.error("kubernetes: %s refused without naming an object: %s", resource, exc)
                    return
                for ref, errors in refused.items():
                    if ref in pending:
                        _, obj = pending.pop(ref)
                        self.reporter.refused(resource, obj, refusal_message(errors))
            except ApiError as exc:
                log.error("kubernetes: cannot store %d %s: %s", len(pending), resource, exc)
                return
        for _, obj in pending.values():
            self.reporter.accepted(resource, obj)

    def _remove(self, refs: list[Ref]) -> None:
        if refs:
            try:
                self.store.delete_refs(refs, ignore_not_found=True)
            except ApiError as exc:
                log.error("kubernetes: cannot remove %s from the store: %s", ", ".join(map(str, refs)), exc)


def _errors_by_ref(errors: Iterable[FieldError]) -> dict[Ref, list[FieldError]]:
    """The errors of each document, by the `Ref` each document was named with (its `source`)."""
    out: dict[Ref, list[FieldError]] = {}
    for error in errors:
        try:
            out.setdefault(Ref.parse(error.source), []).append(error)
        except ValueError:
            continue
    return out


class _Gone(Exception):
    """The resourceVersion watched from is compacted away: list again."""


class Sink(Protocol):
    """What a reflector tells what it lists and watches (`KubernetesSource`, or one watched Secret's keeper)."""

    def replace(self, resource: Resource, items: list[dict[str, Any]]) -> None: ...

    def upsert(self, resource: Resource, obj: dict[str, Any]) -> None: ...

    def delete(self, resource: Resource, obj: dict[str, Any]) -> None: ...


class _Reflector:
    """Lists and watches one collection into its sink, until `stopping` is set (see the module docstring).
    `call`: the client's list function and its arguments, when not the whole collection (`lister`)."""

    def __init__(self, resource: Resource, api: ApiClient, sink: Sink, timing: Timing,
                 stopping: threading.Event, call: tuple[Callable[..., Any], tuple[Any, ...]] | None = None) -> None:
        self.resource = resource
        self.sink = sink
        self.timing = timing
        self._stopping = stopping
        listing: tuple[Callable[..., Any], tuple[Any, ...]] = call or lister(api, resource)
        self._list, self._args = listing
        self._watch: kube_watch.Watch | None = None
        self.resource_version: str | None = None
        self.synced = threading.Event()
        self.last_error: str | None = None
        self.lists = 0
        self.watches = 0
        self._failures = 0
        self._not_served = False

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                if self.resource_version is None:
                    self._relist()
                else:
                    self._watch_once()
            except _Gone:
                log.info("kubernetes: the watch of %s expired (410 Gone); listing again", self.resource)
                self.resource_version = None
            except Exception as exc:
                if self._stopping.is_set():
                    return
                self._failed(exc)

    def interrupt(self) -> None:
        """Unblock a watch waiting for events (stopping)."""
        watch = self._watch
        if watch is not None:
            watch.stop()

    def _relist(self) -> None:
        try:
            items, version = self._list_all()
        except ApiException as exc:
            if exc.status != NOT_FOUND:
                raise
            self._unserved()
            return
        self.sink.replace(self.resource, items)
        if self._not_served:
            log.info("kubernetes: %s is served now", self.resource)
            self._not_served = False
        self.resource_version = version
        self.last_error = None
        self.synced.set()
        log.info("kubernetes: listed %d %s at resourceVersion %s", len(items), self.resource, version)

    def _list_all(self) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self.timing.page_size, "_preload_content": False,
                                      "_request_timeout": self.timing.request_timeout}
            if token:
                kwargs["_continue"] = token
            self.lists += 1
            response = self._list(*self._args, **kwargs)
            try:
                page = json.loads(response.data)
            finally:
                response.release_conn()
            if not isinstance(page, dict):
                raise ValueError(f"listing {self.resource}: the answer is not a JSON object")
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def _unserved(self) -> None:
        """A 404 on the list: the collection's CRD is not installed.  Empty for now; look again later."""
        if not self._not_served:
            log.warning("kubernetes: the API server does not serve %s (is its CRD installed?); "
                        "treating it as empty and listing again every %gs", self.resource, self.timing.backoff_max)
            self._not_served = True
        self.sink.replace(self.resource, [])
        self.synced.set()
        self._stopping.wait(self.timing.backoff_max)

    def _watch_once(self) -> None:
        """One watch request, from `resource_version`, until the API server ends it."""
        timing = self.timing
        self._watch = watch = kube_watch.Watch(return_type="object")
        self.watches += 1
        try:
            for event in watch.stream(
                self._list, *self._args, resource_version=self.resource_version, allow_watch_bookmarks=True,
                timeout_seconds=timing.watch_timeout,
                _request_timeout=(timing.request_timeout, timing.watch_timeout + timing.request_timeout),
            ):
                if self._stopping.is_set():
                    return
                self._handle(event)
        except ApiException as exc:
            if exc.status == GONE:
                raise _Gone from None
            raise
        finally:
            self._watch = None

    def _handle(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("raw_object")
        if not isinstance(obj, dict):
            return
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self.sink.upsert(self.resource, obj)
        elif kind == "DELETED":
            self.sink.delete(self.resource, obj)
        elif kind != "BOOKMARK":
            log.warning("kubernetes: unknown watch event %r for %s", kind, describe(self.resource, obj))
        if version:
            self.resource_version = str(version)
        self._failures = 0

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        self.last_error = _explain(exc)
        delay = backoff_delay(self._failures - 1, self.timing.backoff_initial, self.timing.backoff_max)
        log.warning("kubernetes: %s %s failed (%s); retrying in %.2fs", "watching" if self.resource_version else
                    "listing", self.resource, self.last_error, delay)
        self._stopping.wait(delay)


def _explain(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"the API server answered {exc.status} {exc.reason or ''}".rstrip()
    reason = getattr(exc, "reason", None)
    return f"{type(exc).__name__}: {reason or exc}"
