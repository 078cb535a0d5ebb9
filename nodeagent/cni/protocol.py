"""The handover between the CNI plugin and the node agent (in the shape of Istio's ZDS between istio-cni
and ztunnel): one request and one answer per connection on the agent's Unix socket.

The socket is SOCK_SEQPACKET, so each message arrives whole; a message is one JSON object.  An `add`
request carries the pod's network namespace as a file descriptor (SCM_RIGHTS), so the agent holds the
namespace itself, whatever the runtime named it:

    plugin -> agent   {"v": 1, "op": "add", "timeout": 30, "pod": {uid, namespace, name, containerId,
                       ips, netns, cgroup, annotations}}                          + the netns fd
    agent -> plugin   {"v": 1, "result": "enrolled" | "not-in-mesh" | "failed" | "unknown", "msg": ...}

`annotations` are the pod's annotations the agent acts on (`FORWARDED_ANNOTATIONS`), as the runtime gave them
to the plugin (containerd's `io.kubernetes.cri.pod-annotations` capability, `RUNTIME_ANNOTATIONS`).

`del` (the pod's sandbox is gone) is answered `gone`; `check` is answered like `add`, or `unknown` for a
pod never handed over.  The agent answers before `timeout` (seconds) runs out.

Standard library only: the plugin runs with the node's own Python (see `nodeagent.cni`).
"""

from __future__ import annotations

import array
import json
import socket
from dataclasses import dataclass, field
from typing import Any

VERSION = 1
DEFAULT_SOCKET = "/var/run/ambient/cni.sock"  # the agent's socket, on a hostPath the plugin sees too
PLUGIN_TYPE = "ambient-cni"  # the plugin's binary name, and `type` in the conflist
# Pods of these namespaces are never handed over: the node agent's own pod (and the control plane's)
# must start while no agent answers, as Istio's istio-cni excludes them.
EXCLUDED_NAMESPACES = ("kube-system", "istio-system")
DEFAULT_TIMEOUT = 30.0  # seconds the plugin waits for the agent's answer to an `add`
MAX_MESSAGE = 64 * 1024
# The pod's annotations reach the plugin as runtimeConfig of this capability (containerd's CRI passes them to
# plugins that declare it); of those, the plugin forwards only the ones the agent acts on.
RUNTIME_ANNOTATIONS = "io.kubernetes.cri.pod-annotations"
# Istio's per-pod switch of ambient DNS capture: "false" opts the pod out, "true" in (unset: the agent's default).
DNS_CAPTURE_ANNOTATION = "ambient.istio.io/dns-capture"
FORWARDED_ANNOTATIONS = (DNS_CAPTURE_ANNOTATION,)
MAX_FDS = 1

ADD, DEL, CHECK = "add", "del", "check"
OPS = (ADD, DEL, CHECK)

# Answers.
ENROLLED = "enrolled"  # the pod's listeners and capture are in place
NOT_IN_MESH = "not-in-mesh"  # discovery says the pod is not in the mesh: nothing to do
FAILED = "failed"  # the pod is in the mesh but could not be enrolled (msg says why)
UNKNOWN = "unknown"  # discovery does not know the pod yet (add), or it was never handed over (check)
GONE = "gone"  # del: the agent no longer holds the pod
RESULTS = (ENROLLED, NOT_IN_MESH, FAILED, UNKNOWN, GONE)


class ProtocolError(ValueError):
    """A message that is not what the other side should send."""


@dataclass(frozen=True)
class PodInfo:
    """Who a pod is, as the CNI plugin learns it from the runtime."""

    namespace: str
    name: str
    uid: str = ""  # K8S_POD_UID, when the runtime passes it
    container_id: str = ""  # CNI_CONTAINERID: the sandbox
    ips: tuple[str, ...] = ()  # from prevResult, without prefix lengths
    netns: str = ""  # CNI_NETNS as the runtime named it (for the agent's record)
    cgroup: str = ""  # the pod's cgroup v2 directory, where the plugin found it
    annotations: tuple[tuple[str, str], ...] = ()  # of FORWARDED_ANNOTATIONS, sorted

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "uid": self.uid,
                "containerId": self.container_id, "ips": list(self.ips), "netns": self.netns,
                "cgroup": self.cgroup, "annotations": dict(self.annotations)}

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)

    @classmethod
    def from_json(cls, data: Any) -> PodInfo:
        if not isinstance(data, dict):
            raise ProtocolError("pod: expected an object")
        ips = data.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise ProtocolError("pod.ips: expected a list of strings")
        annotations = data.get("annotations", {})
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise ProtocolError("pod.annotations: expected an object of strings")
        return cls(namespace=_text(data, "namespace", required=True), name=_text(data, "name", required=True),
                   uid=_text(data, "uid"), container_id=_text(data, "containerId"), ips=tuple(ips),
                   netns=_text(data, "netns"), cgroup=_text(data, "cgroup"),
                   annotations=forwarded(annotations))


def forwarded(annotations: Any) -> tuple[tuple[str, str], ...]:
    """Of a pod's annotations, the ones the agent acts on, in a stable order."""
    return tuple(sorted((k, v) for k, v in annotations.items() if k in FORWARDED_ANNOTATIONS))


@dataclass(frozen=True)
class Request:
    op: str
    pod: PodInfo
    timeout: float = DEFAULT_TIMEOUT

    def encode(self) -> bytes:
        return json.dumps({"v": VERSION, "op": self.op, "timeout": self.timeout, "pod": self.pod.to_json()}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Request:
        msg = _object(data)
        op = msg.get("op")
        if op not in OPS:
            raise ProtocolError(f"op: expected one of {', '.join(OPS)}, got {op!r}")
        timeout = msg.get("timeout", DEFAULT_TIMEOUT)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise ProtocolError("timeout: expected a positive number of seconds")
        return cls(op, PodInfo.from_json(msg.get("pod")), float(timeout))


@dataclass(frozen=True)
class Answer:
    result: str
    msg: str = ""

    def encode(self) -> bytes:
        return json.dumps({"v": VERSION, "result": self.result, "msg": self.msg}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Answer:
        msg = _object(data)
        result = msg.get("result")
        if result not in RESULTS:
            raise ProtocolError(f"result: expected one of {', '.join(RESULTS)}, got {result!r}")
        return cls(result, _text(msg, "msg"))


@dataclass
class Received:
    """One message as it came off the socket, with the descriptors it carried (the receiver owns them)."""

    data: bytes
    fds: list[int] = field(default_factory=list)
    truncated: bool = False


def _object(data: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from exc
    if not isinstance(msg, dict):
        raise ProtocolError("expected a JSON object")
    if msg.get("v") != VERSION:
        raise ProtocolError(f"protocol version {msg.get('v')!r}; this side speaks {VERSION} "
                            "(are the plugin and the agent from the same release?)")
    return msg


def _text(msg: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = msg.get(key, "")
    if not isinstance(value, str):
        raise ProtocolError(f"{key}: expected a string")
    if required and not value:
        raise ProtocolError(f"{key}: required")
    return value


# ---- the socket --------------------------------------------------------------------------------------------


def ancillary_space() -> int:
    return socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def unpack(data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> Received:
    """A message from `recvmsg`'s results: the descriptors it carried, and whether anything was cut off
    (a truncated message, or descriptors beyond the space given)."""
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fds.itemsize
            fds.frombytes(payload[:usable])
    truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
    return Received(data, list(fds), truncated)


def call(path: str, request: Request, fds: tuple[int, ...] = (), *, timeout: float) -> Answer:
    """The plugin's side: send `request` (with `fds`) to the agent at `path`, wait up to `timeout` for the
    answer.  OSError (including socket.timeout) when the agent cannot be reached or does not answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        if fds:
            socket.send_fds(sock, [request.encode()], list(fds))
        else:
            sock.sendall(request.encode())
        data = sock.recv(MAX_MESSAGE)
    if not data:
        raise ConnectionResetError(f"the node agent at {path} closed the connection without an answer")
    return Answer.decode(data)
