"""The apply API: HTTP/1.1 with JSON bodies on a Unix socket, in front of a `Store`.

    server = ApiServer(store, state_dir / "controlplane" / "api.sock")
    server.start()      # binds the socket (mode 0600) and serves in a thread of its own; returns at once
    ...
    server.stop()       # stops serving, joins the thread, removes the socket file
(or `with ApiServer(store, path): ...`).  Served by `mesh.serve` (a `ServerThread`), as every endpoint is.

Endpoints (every response is a JSON object; errors carry `error` (one line) and `errors` (all lines)):
    GET  /healthz                         -> {"version": N}
    POST /apply   {"documents": [{"source", "index", "body"}], "namespace"?}
                                          -> {"version", "outcomes": [{"ref", "action", "text"}]}
    POST /delete  {"documents": [...]} or {"refs": ["Kind/ns/name"]}, "namespace"?, "ignoreNotFound"?
    GET  /resources?kind=K&namespace=NS&name=N   -> {"version", "items": [body, ...]}
                  (an object the analysis has messages about shows them in `status.validationMessages`)
    GET  /analyze?namespace=NS            -> {"version", "messages": [{"code", "level", "origin", "message", ...}]}
                  (`controlplane.analysis`; /apply and /label answer the messages about what they wrote
                  as `warnings`: ["[CODE] (Kind name.ns) text", ...])
                  (an HTTPRoute's or GRPCRoute's `status` is the control plane's, as of this read)
    POST /label   {"ref": "Kind/ns/name", "set": {k: v}, "remove": [k]}
    POST /token   {"node": NAME} or {"identity": "spiffe://..."}, "expirationSeconds"?
                                          -> {"token": JWT, "expirationTimestamp"}
                  a node agent's token, or a workload's (a waypoint's) for its own identity, signed with
                  the CA's token key (the one place that key is read: `ca.server`); it lives the control
                  plane's `--token-ttl`, or `expirationSeconds` if that is shorter (as a TokenRequest);
                  404 without a minter
    GET  /ca/token-key                    -> {"current": kid, "algorithm", "since", "retiring": [{"kid", "until"}]}
    POST /ca/token-key/rotate  {"overlapSeconds": S}   a new signing key; the old one is accepted S more seconds
    GET  /ca/root                         -> {"phase", "roots": [...], "signingRoot", "activateAt"?, "retireAt"?}
    POST /ca/root/rotate  {"propagationSeconds": P, "overlapSeconds": S}   a new root (`ca.rotation`);
                                          409 while a rotation is under way
Status codes: 200 done, 400 malformed request, 404 not found, 409 conflict, 422 invalid configuration
(nothing was changed), 500 the store could not save.  Documents are validated here, authoritatively,
whatever the client checked before sending.  The client is `mesh.api.client.ApiClient`.

Every POST is logged as `api <path> status=.. version=.. errors=.. ms=..` and, when given,
`on_request(path, status, version, errors, ms)` is called (from the request's thread) for metrics.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

from ca.errors import CAError
from controlplane import analysis
from controlplane.config.store import Result, Store, StoreError
from controlplane.translate.gatewayapi import route_statuses
from controlplane.translate.ingressstatus import gateway_statuses
from mesh.api.errors import ApiError, BadRequest, Conflict, NotFound, ValidationError
from mesh.api.kinds import DEFAULT_NAMESPACE, resolve_kind
from mesh.api.kinds_gateway import is_ingress
from mesh.api.kinds_routes import ROUTE_KINDS
from mesh.api.loader import documents_from_json
from mesh.api.validate import Document, Ref
from mesh.identity import IdentityError, SpiffeId
from mesh.serve.routes import Handler, Request, Response, Router, json_error
from mesh.serve.thread import ServerThread

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024


RequestHook = Callable[[str, int, "str | int", int, float], None]


class TokenMinter(Protocol):
    """What `/token` needs: `ca.auth.NodeTokenIssuer` is one."""

    def lifetime(self, requested: datetime.timedelta | None) -> datetime.timedelta: ...

    def mint_node_token(self, node: str, *, ttl: datetime.timedelta | None = None) -> str: ...

    def mint_workload_token(self, identity: SpiffeId, *, ttl: datetime.timedelta | None = None) -> str: ...


class CAAdmin(Protocol):
    """What `/ca/...` needs: `ca.server.CAServer` is one."""

    def token_key_status(self) -> dict[str, Any]: ...

    def rotate_token_key(self, overlap: datetime.timedelta) -> dict[str, Any]: ...

    def root_status(self) -> dict[str, Any]: ...

    def rotate_root(self, propagation: datetime.timedelta, overlap: datetime.timedelta) -> dict[str, Any]: ...


Endpoint = Callable[[dict[str, str], dict[str, Any]], dict[str, Any]]


class _Api:
    """The endpoints over the store (and the token minter): query and JSON body in, a JSON object out."""

    def __init__(self, store: Store, on_request: RequestHook | None, tokens: TokenMinter | None,
                 ca: CAAdmin | None = None) -> None:
        self.store = store
        self.on_request = on_request
        self.tokens = tokens
        self.ca = ca
        self._analysis: tuple[int, list[analysis.Message]] | None = None  # (store version, its messages)

    def router(self) -> Router:
        router = Router(error=json_error)
        router.add("/healthz", self._handler(self._healthz))
        router.add("/resources", self._handler(self._resources))
        router.add("/analyze", self._handler(self._analyze))
        router.add("/ca/token-key", self._handler(self._token_key))
        router.add("/ca/root", self._handler(self._root))
        for path, endpoint in (("/apply", self._apply), ("/delete", self._delete), ("/label", self._label),
                               ("/token", self._token), ("/ca/token-key/rotate", self._rotate_token_key),
                               ("/ca/root/rotate", self._rotate_root)):
            router.add(path, self._handler(endpoint), methods=("POST",))
        return router

    def _handler(self, endpoint: Endpoint) -> Handler:
        def handle(request: Request) -> Response:
            started = time.monotonic()
            try:
                body = _json_object(request) if request.method == "POST" else {}
                status, reply = HTTPStatus.OK, endpoint(dict(request.query), body)
            except ValidationError as exc:
                status, reply = HTTPStatus.UNPROCESSABLE_ENTITY, _error(exc, exc.lines())
            except BadRequest as exc:
                status, reply = HTTPStatus.BAD_REQUEST, _error(exc)
            except NotFound as exc:
                status, reply = HTTPStatus.NOT_FOUND, _error(exc)
            except Conflict as exc:
                status, reply = HTTPStatus.CONFLICT, _error(exc)
            except (StoreError, ApiError) as exc:
                status, reply = HTTPStatus.INTERNAL_SERVER_ERROR, _error(exc)
            except Exception as exc:  # a bug gets a JSON answer too
                log.exception("api %s %s failed", request.method, request.path)
                status, reply = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc}", "errors": []}
            if request.method == "POST":
                self._record(request.path, status, reply, (time.monotonic() - started) * 1000)
            return Response.json(reply, status)

        return handle

    def _record(self, path: str, status: int, reply: dict[str, Any], ms: float) -> None:
        version, n_errors = reply.get("version", "-"), len(reply.get("errors", []))
        log.info("api %s status=%d version=%s errors=%d ms=%.1f", path, status, version, n_errors, ms)
        if self.on_request is not None:
            try:
                self.on_request(path, int(status), version, n_errors, ms)
            except Exception:
                log.exception("api request hook failed")

    # ---- endpoints ------------------------------------------------------------------------------------

    def _healthz(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        return {"version": self.store.version}

    def _apply(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        docs = [Document(d.source, d.index, analysis.without_messages(d.body))
                for d in documents_from_json(body.get("documents"))]
        return self._warned(self.store.apply(docs, _namespace(body)))

    def _delete(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        ignore = bool(body.get("ignoreNotFound"))
        if "refs" in body:
            try:
                refs = [Ref.parse(str(r)) for r in body["refs"]]
            except (TypeError, ValueError) as exc:
                raise BadRequest(str(exc)) from exc
            return self.store.delete_refs(refs, ignore).to_json()
        docs = documents_from_json(body.get("documents"))
        return self.store.delete(docs, _namespace(body), ignore).to_json()

    def _resources(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        kind = None
        if query.get("kind"):
            info = resolve_kind(query["kind"])
            if info is None:
                raise BadRequest(f"unknown kind {query['kind']!r}")
            kind = info.kind
        snap_version = self.store.version
        items = self.store.select(kind, query.get("namespace") or None, query.get("name") or None)
        if any(item.get("kind") in ROUTE_KINDS for item in items):  # route status: the control plane's word
            statuses = route_statuses(self.store.snapshot())
            items = [{**item, "status": statuses.get(Ref.of(item), {"parents": []})}
                     if item.get("kind") in ROUTE_KINDS else item for item in items]
        if any(is_ingress(item) for item in items):  # an ingress Gateway's status: the control plane's word too
            gateways = gateway_statuses(self.store.snapshot())
            items = [{**item, "status": gateways.get(Ref.of(item), {})} if is_ingress(item) else item for item in items]
        return {"version": snap_version, "items": analysis.with_messages(items, self._messages())}

    def _label(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        try:
            ref = Ref.parse(str(body.get("ref")))
            set_labels = dict(body.get("set") or {})
            remove = [str(k) for k in body.get("remove") or []]
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"bad label request: {exc}") from exc
        return self._warned(self.store.label(ref, set_labels, remove))

    # ---- analysis (`controlplane.analysis`) ------------------------------------------------------------

    def _messages(self) -> list[analysis.Message]:
        """The analysis of the store's current state, made again only when the store has changed."""
        snapshot = self.store.snapshot()
        cached = self._analysis
        if cached is None or cached[0] != snapshot.version:
            cached = self._analysis = (snapshot.version, analysis.analyze(snapshot))
        return cached[1]

    def _warned(self, result: Result) -> dict[str, Any]:
        """The result, with the analysis' messages about what it wrote as `warnings` (as kubectl shows
        admission warnings)."""
        out = result.to_json()
        mine = analysis.about(self._messages(), [o.ref for o in result.outcomes])
        if mine:
            out["warnings"] = [m.warning() for m in mine]
        return out

    def _analyze(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        namespace = query.get("namespace") or None
        messages = [m for m in self._messages() if namespace is None or m.ref.namespace in ("", namespace)]
        if namespace is not None:  # a cluster-scoped object counts when it is that namespace
            messages = [m for m in messages if m.ref.namespace or m.ref.name == namespace]
        return {"version": self.store.version, "messages": [m.to_json() for m in messages]}

    def _token(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        tokens = self.tokens
        if tokens is None:
            raise NotFound("this API mints no tokens")
        node, identity = body.get("node"), body.get("identity")
        requested = body.get("expirationSeconds")
        if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
            raise BadRequest(f"expirationSeconds must be a positive number of seconds, not {requested!r}")
        ttl = tokens.lifetime(None if requested is None else datetime.timedelta(seconds=requested))
        now = datetime.datetime.now(datetime.UTC)
        if isinstance(node, str) and node and identity is None:
            token = tokens.mint_node_token(node, ttl=ttl)
        elif isinstance(identity, str) and node is None:
            try:
                token = tokens.mint_workload_token(SpiffeId.parse(identity), ttl=ttl)
            except IdentityError as exc:
                raise BadRequest(f"identity: {exc}") from exc
        else:
            raise BadRequest('a token request names either a "node" or an "identity" (a SPIFFE ID)')
        return {"token": token, "expirationTimestamp": (now + ttl).isoformat(timespec="seconds")}

    def _admin(self) -> CAAdmin:
        if self.ca is None:
            raise NotFound("this API has no CA to administer")
        return self.ca

    def _token_key(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        return self._admin().token_key_status()

    def _rotate_token_key(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        return self._admin().rotate_token_key(_seconds(body, "overlapSeconds"))

    def _root(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        return self._admin().root_status()

    def _rotate_root(self, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        propagation, overlap = _seconds(body, "propagationSeconds"), _seconds(body, "overlapSeconds")
        try:
            return self._admin().rotate_root(propagation, overlap)
        except CAError as exc:
            raise Conflict(str(exc)) from exc


def _seconds(body: dict[str, Any], key: str) -> datetime.timedelta:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 10 * 365 * 86400:
        raise BadRequest(f"{key} must be a number of seconds from 0 (not {value!r})")
    return datetime.timedelta(seconds=value)


def _namespace(body: dict[str, Any]) -> str:
    return str(body.get("namespace") or DEFAULT_NAMESPACE)


def _json_object(request: Request) -> dict[str, Any]:
    try:
        data = request.json()
    except ValueError as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def _error(exc: Exception, lines: list[str] | None = None) -> dict[str, Any]:
    return {"error": str(exc), "errors": lines if lines is not None else [str(exc)]}


class ApiServer(ServerThread):
    """Serves `store` (and `tokens`, when given) on the Unix socket `socket_path` (see the module docstring)."""

    def __init__(self, store: Store, socket_path: Path | str, on_request: RequestHook | None = None,
                 tokens: TokenMinter | None = None, ca: CAAdmin | None = None) -> None:
        super().__init__("apiserver")
        self.store = store
        self.socket_path = Path(socket_path)
        self.unix(_Api(store, on_request, tokens, ca).router(), self.socket_path, name="apply API",
                  max_body=MAX_BODY)
