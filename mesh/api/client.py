"""The client of the control plane's apply API (served by `controlplane.config.apiserver` on a Unix socket).

    client = ApiClient(socket_path)
    client.apply(documents)                  # -> {"version", "outcomes": [...]}; ValidationError if refused
    client.delete(documents) / client.delete_refs(["Pod/default/x"])
    client.get("virtualservice", namespace="default", name="reviews")   # -> list of bodies
    client.label("Namespace//default", set_labels={...}, remove=[...])
    client.node_token("node-1") / client.workload_token(identity)   # tokens the control plane signs
    client.rotate_token_key(overlap_seconds=3600) / client.rotate_root(...)   # the CA's rotations

`register_cluster_objects(socket_path, bodies)` is what the local cluster calls at start to put its
namespaces, service accounts, pods and services into the store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from mesh import defaults
from mesh.api.errors import ApiError, Conflict, FieldError, NotFound, ValidationError
from mesh.api.loader import documents_to_json
from mesh.api.validate import Document
from mesh.identity import SpiffeId
from mesh.serve import client
from mesh.serve.errors import NoAnswer, Unreachable

SOCKET_NAME = defaults.API_SOCKET


class ControlPlaneUnavailable(ApiError):
    pass


class ApiClient:
    def __init__(self, socket_path: Path | str, timeout: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            answer = client.request(client.Endpoint.unix(self.socket_path), method, path, data, headers=headers,
                                    timeout=self.timeout)
        except Unreachable as exc:
            raise ControlPlaneUnavailable(
                f"cannot reach the control plane at {self.socket_path}: is the cluster up? ({exc.strerror})") from exc
        except NoAnswer as exc:
            raise ControlPlaneUnavailable(f"the control plane at {self.socket_path} did not answer: "
                                          f"{exc.__cause__}") from exc
        status = answer.status
        try:
            reply = answer.json()
        except ValueError as exc:
            raise ApiError(f"the control plane answered {status} with something that is not JSON: "
                           f"{answer.text.strip()[:200]}") from exc
        if status == 200:
            return dict(reply)
        message = reply.get("error") or f"request failed with status {status}"
        if status == 422:
            raise ValidationError([FieldError("", line) for line in reply.get("errors") or [message]])
        if status == 404:
            raise NotFound(message)
        if status == 409:
            raise Conflict(message)
        raise ApiError(message)

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/healthz")

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the API answers (after the control plane was started)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.health()
                return
            except ControlPlaneUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def apply(self, docs: Sequence[Document], namespace: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"documents": documents_to_json(docs)}
        if namespace:
            body["namespace"] = namespace
        return self.request("POST", "/apply", body)

    def delete(self, docs: Sequence[Document], namespace: str | None = None, ignore_not_found: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"documents": documents_to_json(docs), "ignoreNotFound": ignore_not_found}
        if namespace:
            body["namespace"] = namespace
        return self.request("POST", "/delete", body)

    def delete_refs(self, refs: Iterable[str], ignore_not_found: bool = False) -> dict[str, Any]:
        return self.request("POST", "/delete", {"refs": list(refs), "ignoreNotFound": ignore_not_found})

    def get(self, kind: str | None = None, namespace: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        query = urlencode({k: v for k, v in (("kind", kind), ("namespace", namespace), ("name", name)) if v})
        return list(self.request("GET", "/resources" + (f"?{query}" if query else ""))["items"])

    def label(self, ref: str, set_labels: dict[str, str] | None = None, remove: Iterable[str] = ()) -> dict[str, Any]:
        return self.request("POST", "/label", {"ref": ref, "set": set_labels or {}, "remove": list(remove)})

    def node_token(self, node: str, expiration_seconds: int | None = None) -> str:
        """A token for the node agent of `node`, signed by the control plane; it lives the control plane's
        token lifetime, or `expiration_seconds` if shorter."""
        return self._token({"node": node}, expiration_seconds)

    def workload_token(self, identity: SpiffeId, expiration_seconds: int | None = None) -> str:
        """A token for a workload (a waypoint) to ask for its own identity's certificate."""
        return self._token({"identity": identity.uri}, expiration_seconds)

    def _token(self, body: dict[str, Any], expiration_seconds: int | None) -> str:
        if expiration_seconds is not None:
            body["expirationSeconds"] = expiration_seconds
        return str(self.request("POST", "/token", body)["token"])

    def token_key_status(self) -> dict[str, Any]:
        """The token signing key (its `kid`) and the retiring keys still accepted, with until when."""
        return self.request("GET", "/ca/token-key")

    def rotate_token_key(self, overlap_seconds: float) -> dict[str, Any]:
        """A new token signing key; tokens of the old one are accepted `overlap_seconds` more."""
        return self.request("POST", "/ca/token-key/rotate", {"overlapSeconds": overlap_seconds})

    def root_status(self) -> dict[str, Any]:
        """The CA's roots and the phase of a root rotation ("idle" when none is under way)."""
        return self.request("GET", "/ca/root")

    def rotate_root(self, propagation_seconds: float, overlap_seconds: float) -> dict[str, Any]:
        """Start a root rotation: the new root is trusted now, signs after `propagation_seconds`, and the
        old one is dropped `overlap_seconds` later."""
        return self.request("POST", "/ca/root/rotate", {"propagationSeconds": propagation_seconds,
                                                        "overlapSeconds": overlap_seconds})


def register_cluster_objects(socket_path: Path | str, bodies: Iterable[dict[str, Any]],
                             source: str = "cluster", timeout: float = 10.0) -> dict[str, Any]:
    """Put the local cluster's Namespaces, ServiceAccounts, Pods and Services into the store in one
    all-or-nothing apply, after waiting up to `timeout` seconds for the control plane to answer.
    Namespaces and service accounts the pods need but the file does not list are added."""
    bodies = list(bodies)
    have = {(b.get("kind"), (b.get("metadata") or {}).get("namespace"), (b.get("metadata") or {}).get("name"))
            for b in bodies}
    extra: list[dict[str, Any]] = []
    for b in bodies:
        meta = b.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        if b.get("kind") in ("Pod", "Service", "ServiceAccount") and ("Namespace", None, ns) not in have:
            have.add(("Namespace", None, ns))
            extra.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        if b.get("kind") == "Pod":
            sa = (b.get("spec") or {}).get("serviceAccountName") or "default"
            if ("ServiceAccount", ns, sa) not in have:
                have.add(("ServiceAccount", ns, sa))
                extra.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}})
    docs = [Document(source, i, body) for i, body in enumerate(extra + bodies, start=1)]
    client = ApiClient(socket_path)
    client.wait_ready(timeout)
    return client.apply(docs)
