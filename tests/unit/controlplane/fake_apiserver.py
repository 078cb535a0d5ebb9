"""A stand-in for kube-apiserver that speaks its documented wire format.

No kube-apiserver can be installed where these tests run, so the control plane's Kubernetes code (the
real `kubernetes` client underneath) is tested against this small HTTP/1.1 server, written from the
Kubernetes API documentation ("API Concepts": lists, watches, bookmarks, 410 Gone; the TokenReview,
Event and status-subresource references).  What it serves:

- lists: `GET /api/v1/pods`, `/apis/<group>/<version>/<plural>` (all namespaces) answer
  `{"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "N"}, "items": [...]}`,
  paged with `limit` and `continue`;
- watches: `?watch=1&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=T` stream one JSON
  object a line, `{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": {...}}`, chunked: first
  what happened after N, then what happens until T.  A resourceVersion older than the compacted
  history gets one ERROR event carrying a Status with `code: 410`, reason `Expired`, as the real one;
- one object: `GET /api/v1/namespaces/<ns>/pods/<name>` (404 Status when absent);
- lists and watches of one namespace (`/api/v1/namespaces/<ns>/secrets`) and with a `fieldSelector` of
  `metadata.name=` / `metadata.namespace=` terms (comma-separated, all must hold) see only what matches;
- `POST /apis/authentication.k8s.io/v1/tokenreviews`: `status.authenticated`, `status.user.username`,
  `status.user.extra["authentication.kubernetes.io/pod-name" | "pod-uid"]`, `status.audiences` (the
  requested audiences the token is for; none in common means not authenticated, with `status.error`);
- `POST /api/v1/namespaces/<ns>/events` (recorded; `generateName` honoured);
- `PATCH .../<plural>/<name>/status` with a JSON merge patch (the object changes and watchers see it);
- server-side apply: `PATCH .../<plural>/<name>?fieldManager=M&force=true` with
  `application/apply-patch+yaml` creates the object (201) or, with one field manager as here, makes its
  labels, annotations, ownerReferences and spec the applied ones (200); the body's apiVersion, kind, name
  and namespace must be the path's (400), and `fieldManager` is required (400).

Resource versions are one counter for the whole server, as etcd's revision is.  Tests change the state
with `put` / `delete` / `bookmark` / `compact` and break things with `fail`, `drop_watches` and
`review_delay`.  Every request is recorded (`requests`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# (group, version, plural) -> (kind, namespaced): the collections this stand-in serves
COLLECTIONS: dict[tuple[str, str, str], tuple[str, bool]] = {
    ("", "v1", "namespaces"): ("Namespace", False),
    ("", "v1", "nodes"): ("Node", False),
    ("", "v1", "pods"): ("Pod", True),
    ("", "v1", "services"): ("Service", True),
    ("", "v1", "serviceaccounts"): ("ServiceAccount", True),
    ("apps", "v1", "deployments"): ("Deployment", True),
    ("discovery.k8s.io", "v1", "endpointslices"): ("EndpointSlice", True),
    ("security.istio.io", "v1", "authorizationpolicies"): ("AuthorizationPolicy", True),
    ("security.istio.io", "v1", "peerauthentications"): ("PeerAuthentication", True),
    ("security.istio.io", "v1", "requestauthentications"): ("RequestAuthentication", True),
    ("networking.istio.io", "v1", "virtualservices"): ("VirtualService", True),
    ("networking.istio.io", "v1", "destinationrules"): ("DestinationRule", True),
    ("networking.istio.io", "v1", "serviceentries"): ("ServiceEntry", True),
    ("gateway.networking.k8s.io", "v1", "gateways"): ("Gateway", True),
}
SA_PREFIX = "system:serviceaccount:"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"


def _selected(namespace: str, field_selector: str) -> Any:
    """Whether an object is in `namespace` ("": any) and matches `fieldSelector` (metadata.name and
    metadata.namespace equality terms, as the API server supports them for every kind)."""
    terms: list[tuple[str, str]] = []
    for term in filter(None, field_selector.split(",")):
        field, sep, value = term.replace("==", "=").partition("=")
        if not sep or field not in ("metadata.name", "metadata.namespace"):
            raise ValueError(f"unsupported field selector {field_selector!r}")
        terms.append((field.split(".", 1)[1], value))

    def wanted(obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        if namespace and meta.get("namespace") != namespace:
            return False
        return all(str(meta.get(key, "")) == value for key, value in terms)

    return wanted


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


@dataclass
class Token:
    """A service-account token the stand-in knows: whose it is, its pod and its audiences."""

    namespace: str
    service_account: str
    pod_name: str = ""
    pod_uid: str = ""
    audiences: tuple[str, ...] = ("istio-ca",)


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Collection:
    kind: str
    namespaced: bool
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)  # (rv, type, object)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # every collection's reflector connects at once


class FakeApiServer:
    """Serves on 127.0.0.1 (a free port) in threads; `with FakeApiServer() as api: api.url`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._revision = 100
        self._compacted = 0  # watches from a resourceVersion below this get 410
        self._collections = {key: _Collection(kind, ns) for key, (kind, ns) in COLLECTIONS.items()}
        self._watch_generation = 0  # bumped by drop_watches / expire_watches
        self._expire = False
        self._watch_sockets: set[Any] = set()
        self.requests: list[Recorded] = []
        self.events: list[dict[str, Any]] = []
        self.tokens: dict[str, Token] = {}
        self.review_delay = 0.0  # seconds before a TokenReview is answered
        self.review_ignores_audiences = False  # answer as an authenticator that does not support audiences
        self._failures: list[list[Any]] = []  # [method, path, query key or "", status, times left]
        self.unserved: set[str] = set()  # plurals answered 404, as if their CRD were not installed
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeApiServer:
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-apiserver",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.drop_watches()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, token: str = "control-plane-token") -> str:
        """A kubeconfig (YAML text) pointing at this server with a bearer token."""
        return (
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters:\n- name: fake\n  cluster:\n    server: {self.url}\n"
            f"users:\n- name: cp\n  user:\n    token: {token}\n"
            "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: cp\n"
        )

    # ---- changing the cluster ---------------------------------------------------------------------------

    def put(self, obj: dict[str, Any], *, history: bool = True) -> dict[str, Any]:
        """Create or replace an object (its collection from apiVersion and kind); watchers see it, unless
        `history` is False: a change in history already compacted away, which only a list shows."""
        with self._cond:
            coll = self._collection_of(obj)
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            key = (meta.get("namespace", "") if coll.namespaced else "", meta["name"])
            before = coll.objects.get(key)
            if before is not None and "status" in before and "status" not in obj:
                obj["status"] = copy.deepcopy(before["status"])  # a write of the object leaves its status be
            self._revision += 1
            meta["resourceVersion"] = str(self._revision)
            meta.setdefault("uid", (before or {}).get("metadata", {}).get("uid") or str(uuid.uuid4()))
            if "spec" in obj:
                old_gen = int((before or {}).get("metadata", {}).get("generation", 0))
                same_spec = before is not None and before.get("spec") == obj.get("spec")
                meta["generation"] = old_gen if same_spec else old_gen + 1
            coll.objects[key] = obj
            if history:
                coll.history.append((self._revision, "MODIFIED" if before else "ADDED", copy.deepcopy(obj)))
            self._cond.notify_all()
            return copy.deepcopy(obj)

    def delete(self, kind: str, namespace: str, name: str, *, history: bool = True) -> None:
        with self._cond:
            coll = next(c for c in self._collections.values() if c.kind == kind)
            obj = coll.objects.pop((namespace if coll.namespaced else "", name))
            self._revision += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._revision)
            if history:
                coll.history.append((self._revision, "DELETED", obj))
            self._cond.notify_all()

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            coll = next(c for c in self._collections.values() if c.kind == kind)
            found = coll.objects.get((namespace if coll.namespaced else "", name))
            return copy.deepcopy(found) if found is not None else None

    def bookmark(self, kind: str) -> str:
        """Something elsewhere in the cluster moved the revision on; watchers of `kind` get a BOOKMARK."""
        with self._cond:
            coll = next(c for c in self._collections.values() if c.kind == kind)
            self._revision += 1
            group_version = next(f"{g}/{v}" if g else v for (g, v, _), c in self._collections.items() if c is coll)
            coll.history.append((self._revision, "BOOKMARK", {"kind": kind, "apiVersion": group_version,
                                                              "metadata": {"resourceVersion": str(self._revision)}}))
            self._cond.notify_all()
            return str(self._revision)

    def compact(self) -> None:
        """Forget the history: a watch from any resourceVersion seen so far gets 410 Gone."""
        with self._cond:
            self._revision += 1
            self._compacted = self._revision
            for coll in self._collections.values():
                coll.history.clear()

    def expire_watches(self) -> None:
        """Compact, and tell every open watch so with an ERROR event (410 Expired)."""
        with self._cond:
            self.compact()
            self._expire = True
            self._watch_generation += 1
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch connection without a word (a network failure)."""
        with self._cond:
            self._expire = False
            self._watch_generation += 1
            sockets = list(self._watch_sockets)
            self._cond.notify_all()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def fail(self, method: str, path: str, code: int, times: int = 1, *, when: str = "") -> None:
        """Answer the next `times` requests for `path` (and with query key `when`, e.g. "watch") with `code`."""
        with self._cond:
            self._failures.append([method, path, when, code, times])

    def watch_requests(self, plural: str) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith("/" + plural) and r.query.get("watch") in ("1", "true")]

    def list_requests(self, plural: str) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith("/" + plural) and r.method == "GET"
                and r.query.get("watch") not in ("1", "true")]

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return bool(predicate())

    # ---- internals ------------------------------------------------------------------------------------

    def _collection_of(self, obj: dict[str, Any]) -> _Collection:
        group, _, version = obj["apiVersion"].rpartition("/")
        for (g, v, _), coll in self._collections.items():
            if g == group and v == version and coll.kind == obj["kind"]:
                return coll
        raise KeyError(f"no collection for {obj['apiVersion']} {obj['kind']}")

    def _injected_failure(self, method: str, path: str, query: dict[str, str]) -> int | None:
        with self._cond:
            for failure in self._failures:
                f_method, f_path, f_when, code, left = failure
                if f_method == method and path == f_path and (not f_when or f_when in query) and left > 0:
                    failure[4] -= 1
                    return int(code)
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server._dispatch(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                server._dispatch(self, "POST")

            def do_PATCH(self) -> None:  # noqa: N802
                server._dispatch(self, "PATCH")

        return Handler

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        length = int(h.headers.get("content-length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        self.requests.append(Recorded(method, parts.path, query, {k.lower(): v for k, v in h.headers.items()}, body))
        code = self._injected_failure(method, parts.path, query)
        if code is not None:
            self._send(h, code, status(code, "InternalError" if code >= 500 else "Injected", f"injected {code}"))
            return
        segments = [s for s in parts.path.split("/") if s]
        try:
            if method == "POST" and parts.path == "/apis/authentication.k8s.io/v1/tokenreviews":
                self._token_review(h, body)
            elif method == "POST" and len(segments) == 5 and segments[:2] == ["api", "v1"] and segments[4] == "events":
                self._post_event(h, segments[3], body)
            elif method == "PATCH" and segments[-1] == "status":
                self._patch_status(h, segments, body, h.headers.get("content-type", ""))
            elif method == "PATCH":
                self._apply(h, segments, query, body, h.headers.get("content-type", ""))
            elif method == "GET":
                self._get(h, segments, query)
            else:
                self._send(h, 405, status(405, "MethodNotAllowed", f"{method} {parts.path}"))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, h: BaseHTTPRequestHandler, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _route(self, segments: list[str]) -> tuple[tuple[str, str, str], str, str] | None:
        """(collection key, namespace, name) of a path; namespace and name may be ""."""
        if segments[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", segments[2:]
        elif segments[:1] == ["apis"] and len(segments) >= 4:
            group, version, rest = segments[1], segments[2], segments[3:]
        else:
            return None
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest:
            return None
        key = (group, version, rest[0])
        if key not in self._collections:
            return None
        return key, namespace, rest[1] if len(rest) > 1 else ""

    def _get(self, h: BaseHTTPRequestHandler, segments: list[str], query: dict[str, str]) -> None:
        route = self._route(segments)
        if route is None or route[0][2] in self.unserved:
            self._send(h, 404, status(404, "NotFound", "the server could not find the requested resource"))
            return
        key, namespace, name = route
        coll = self._collections[key]
        if name:
            with self._cond:
                obj = coll.objects.get((namespace, name))
            if obj is None:
                self._send(h, 404, status(404, "NotFound", f'{key[2]} "{name}" not found'))
            else:
                self._send(h, 200, obj)
            return
        if query.get("watch") in ("1", "true"):
            self._watch(h, key, coll, query, namespace)
            return
        wanted = _selected(namespace, query.get("fieldSelector", ""))
        with self._cond:
            items = [copy.deepcopy(o) for _, o in sorted(coll.objects.items()) if wanted(o)]
            revision = str(self._revision)
        start = int(query.get("continue") or 0)
        limit = int(query.get("limit") or 0) or len(items) or 1
        page = items[start:start + limit]
        meta: dict[str, Any] = {"resourceVersion": revision}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        group, version, _ = key
        self._send(h, 200, {"kind": f"{coll.kind}List", "apiVersion": f"{group}/{version}" if group else version,
                            "metadata": meta, "items": page})

    def _watch(self, h: BaseHTTPRequestHandler, key: tuple[str, str, str], coll: _Collection,
               query: dict[str, str], namespace: str = "") -> None:
        since = int(query.get("resourceVersion") or 0)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        wanted = _selected(namespace, query.get("fieldSelector", ""))
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def chunk(obj: Any) -> None:
            data = json.dumps(obj).encode() + b"\n"
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        with self._cond:
            self._watch_sockets.add(h.connection)
            generation = self._watch_generation
            gone = since < self._compacted
        try:
            if gone:
                chunk({"type": "ERROR", "object": status(410, "Expired", f"too old resource version: {since}")})
            else:
                sent = since
                while True:
                    with self._cond:
                        while True:
                            pending = [(rv, t, o) for rv, t, o in coll.history if rv > sent]
                            if pending or self._watch_generation != generation or time.monotonic() >= deadline:
                                break
                            self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                        dropped = self._watch_generation != generation
                        expired = dropped and self._expire
                    if dropped:
                        if expired:
                            chunk({"type": "ERROR", "object": status(410, "Expired", "too old resource version")})
                            break
                        return  # cut off: no terminating chunk
                    for rv, typ, obj in pending:
                        sent = rv
                        if typ != "BOOKMARK" and not wanted(obj):
                            continue
                        if typ != "BOOKMARK" or bookmarks:
                            chunk({"type": typ, "object": obj})
                    if not pending and time.monotonic() >= deadline:
                        break
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except OSError:
            pass
        finally:
            with self._cond:
                self._watch_sockets.discard(h.connection)
            h.close_connection = True

    def _token_review(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        if self.review_delay:
            time.sleep(self.review_delay)
        spec = (body or {}).get("spec") or {}
        wanted = list(spec.get("audiences") or [])
        token = self.tokens.get(spec.get("token", ""))
        review_status: dict[str, Any]
        if token is None:
            review_status = {"authenticated": False, "error": "[invalid bearer token, square/go-jose: error in "
                                                               "cryptographic primitive]"}
        else:
            common = [a for a in wanted if a in token.audiences] if wanted else list(token.audiences)
            if not common and not self.review_ignores_audiences:
                review_status = {"authenticated": False, "error": f"[invalid bearer token, token audiences "
                                 f"{json.dumps(list(token.audiences))} is invalid for the target audiences "
                                 f"{json.dumps(wanted)}]"}
            else:
                extra: dict[str, list[str]] = {}
                if token.pod_name:
                    extra[POD_NAME] = [token.pod_name]
                    extra[POD_UID] = [token.pod_uid]
                review_status = {
                    "authenticated": True,
                    "user": {"username": f"{SA_PREFIX}{token.namespace}:{token.service_account}",
                             "uid": str(uuid.uuid5(uuid.NAMESPACE_OID, token.service_account)),
                             "groups": ["system:serviceaccounts", f"system:serviceaccounts:{token.namespace}",
                                        "system:authenticated"],
                             "extra": extra},
                    "audiences": [] if self.review_ignores_audiences else common,
                }
        self._send(h, 201, {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                            "metadata": {"creationTimestamp": None}, "spec": spec, "status": review_status})

    def _post_event(self, h: BaseHTTPRequestHandler, namespace: str, body: Any) -> None:
        event = copy.deepcopy(body)
        meta = event.setdefault("metadata", {})
        if not meta.get("name"):
            meta["name"] = meta.get("generateName", "event.") + uuid.uuid4().hex[:5]
        meta["namespace"] = namespace
        with self._cond:
            self._revision += 1
            meta["resourceVersion"] = str(self._revision)
            self.events.append(event)
        self._send(h, 201, event)

    def _patch_status(self, h: BaseHTTPRequestHandler, segments: list[str], body: Any, content_type: str) -> None:
        route = self._route(segments[:-1])
        if content_type.split(";")[0] != "application/merge-patch+json":
            self._send(h, 415, status(415, "UnsupportedMediaType", f"this stand-in takes merge patches, not {content_type}"))
            return
        if route is None or not route[2]:
            self._send(h, 404, status(404, "NotFound", "no such object"))
            return
        key, namespace, name = route
        with self._cond:
            current = self._collections[key].objects.get((namespace, name))
            if current is None:
                self._send(h, 404, status(404, "NotFound", f'{key[2]} "{name}" not found'))
                return
            updated = copy.deepcopy(current)
            updated["status"] = _merge(updated.get("status") or {}, (body or {}).get("status") or {})
        self._send(h, 200, self.put(updated))

    def _apply(self, h: BaseHTTPRequestHandler, segments: list[str], query: dict[str, str], body: Any,
               content_type: str) -> None:
        route = self._route(segments)
        if content_type.split(";")[0] != "application/apply-patch+yaml":
            self._send(h, 415, status(415, "UnsupportedMediaType",
                                      f"this stand-in takes server-side apply only, not {content_type}"))
            return
        if route is None or not route[2]:
            self._send(h, 404, status(404, "NotFound", "no such object"))
            return
        key, namespace, name = route
        group, version, _ = key
        coll = self._collections[key]
        meta = (body or {}).get("metadata") or {}
        expected = (f"{group}/{version}" if group else version, coll.kind, name, namespace)
        got = ((body or {}).get("apiVersion"), (body or {}).get("kind"), meta.get("name"), meta.get("namespace", namespace))
        if not query.get("fieldManager"):
            self._send(h, 400, status(400, "BadRequest", "fieldManager is required for apply requests"))
            return
        if got != expected:
            self._send(h, 400, status(400, "BadRequest", f"the applied object {got} is not the path's {expected}"))
            return
        with self._cond:
            current = coll.objects.get((namespace, name))
            if current is None:
                created = copy.deepcopy(body)
                created["metadata"]["namespace"] = namespace
                self._send(h, 201, self.put(created))
                return
            updated = copy.deepcopy(current)
            for field_name in ("labels", "annotations", "ownerReferences"):
                if field_name in meta:
                    updated["metadata"][field_name] = copy.deepcopy(meta[field_name])
            if "spec" in body:
                updated["spec"] = copy.deepcopy(body["spec"])
            if updated == current:  # an apply that changes nothing writes nothing
                self._send(h, 200, copy.deepcopy(current))
                return
            self._send(h, 200, self.put(updated))


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out
