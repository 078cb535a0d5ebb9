"""The node agent's admin endpoint (loopback, 127.0.0.1:15000): what the agent knows, read-only.

    GET /              the list of endpoints
    GET /healthz       200 "ok" while the agent runs
    GET /workloads     JSON: every workload the agent knows, `local` for those on its node
    GET /policies      JSON: authorization policies, with the local workloads each applies to
    GET /certs         JSON: the certificates the agent holds for its pods (identity, state, expiry)
    GET /config_dump   JSON: all of the above plus services and the discovery versions
    GET /redirect      JSON: the capture mode and, per enrolled pod, what of its capture is in place
                       (iptables rules, or eBPF programs and map sizes)

Pure routing (`AdminView.handle`: a `Request` in, a `Response` out), tested without sockets; served,
like the agent's metrics (15020) and readiness (15021), by `mesh.serve`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from google.protobuf import json_format
from google.protobuf.message import Message

from mesh.proto import discovery_pb2 as pb
from mesh.serve.endpoints import admin_handler
from mesh.serve.routes import Request, Response, plain


class MeshView(Protocol):
    """The reads the admin endpoint needs from the agent's read model (`nodeagent.state.MeshState`)."""

    version: dict[str, str]

    def workloads(self) -> list[pb.Workload]: ...
    def services(self) -> list[pb.Service]: ...
    def policies(self) -> list[pb.Authorization]: ...
    def policies_for(self, workload: pb.Workload) -> list[pb.Authorization]: ...


def message_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


class AdminView:
    """The admin endpoints over the read model; reads only."""

    def __init__(
        self,
        state: MeshView,
        certs: Callable[[], Sequence[object]],
        *,
        node: str = "",
        capture_mode: str = "",
        enrollment: Callable[[], Mapping[str, object]] | None = None,
        capture: Callable[[], Mapping[str, object]] | None = None,
    ) -> None:
        self._state = state
        self._certs = certs
        self._node = node
        self._capture_mode = capture_mode
        self._enrollment = enrollment
        self._capture = capture
        title = "node agent admin" + (f" on {node}" if node else "")
        self._router = admin_handler(title, {
            "/workloads": lambda _: Response.json({"node": self._node, "workloads": self.workloads()}),
            "/policies": lambda _: Response.json({"node": self._node, "policies": self.policies()}),
            "/certs": lambda _: Response.json({"node": self._node, "certificates": self.certificates()}),
            "/config_dump": lambda _: Response.json(self.config_dump()),
            "/redirect": lambda _: Response.json({"node": self._node, **(self._capture() if self._capture else {})}),
        })

    def handle(self, request: Request) -> Response:
        return self._router(request)

    def workloads(self) -> list[dict[str, Any]]:
        enrollment = self._enrollment() if self._enrollment else {}
        out = []
        for w in sorted(self._state.workloads(), key=lambda w: (w.namespace, w.name, w.uid)):
            d = message_dict(w)
            d["local"] = bool(self._node) and w.node == self._node
            if w.uid in enrollment:
                d["enrollment"] = enrollment[w.uid]
                if enrollment[w.uid] == "enrolled" and self._capture_mode:
                    d["capture"] = self._capture_mode
            out.append(d)
        return out

    def policies(self) -> list[dict[str, Any]]:
        local = [w for w in self._state.workloads() if self._node and w.node == self._node]
        applies: dict[str, list[str]] = {}
        for w in sorted(local, key=lambda w: w.uid):
            for p in self._state.policies_for(w):
                applies.setdefault(f"{p.namespace}/{p.name}", []).append(w.uid)
        out = []
        for p in sorted(self._state.policies(), key=lambda p: (p.namespace, p.name)):
            d = message_dict(p)
            key = f"{p.namespace}/{p.name}"
            d["key"] = key
            d["applies_to"] = applies.get(key, [])
            out.append(d)
        return out

    def certificates(self) -> list[object]:
        return [plain(c) for c in self._certs()]

    def config_dump(self) -> dict[str, Any]:
        return {
            "node": self._node,
            "versions": dict(self._state.version),
            "workloads": self.workloads(),
            "services": [message_dict(s) for s in sorted(self._state.services(),
                                                          key=lambda s: (s.namespace, s.hostname))],
            "policies": self.policies(),
            "certificates": self.certificates(),
        }

