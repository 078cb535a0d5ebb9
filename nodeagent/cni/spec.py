"""What the CNI specification (1.0, and the 0.3/0.4 versions it still meets) asks of a chained plugin:
the environment the runtime sets, the network configuration on stdin with `prevResult`, the error
result, and this plugin's own configuration keys.  Pure: values in, values (or `CniError`) out.

    {"type": "ambient-cni",
     "agentSocket": "/var/run/ambient/cni.sock",        the node agent's handover socket
     "agentTimeout": 30,                                 seconds to wait for the agent's answer to ADD
     "excludeNamespaces": ["kube-system", "istio-system"],   never handed over
     "failOpen": false,                                  true: start a pod uncaptured when no agent answers
     "cgroupFormat": ""}                                 a pod's cgroup path, with {namespace} {name} {uid}

Standard library only: the plugin runs with the node's own Python (see `nodeagent.cni`).  `CniError` is
therefore not a `MeshError`: it is the spec's error result, code and all.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nodeagent.cni import protocol

CNI_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")

# Error codes (CNI spec, 'Error'); 100 and above are the plugin's own.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11  # the node agent did not answer, or cannot enroll the pod yet: the runtime retries
NOT_ENROLLED = 100  # CHECK: the pod is in the mesh but not captured


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def result(self, cni_version: str = CNI_VERSION) -> dict[str, Any]:
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}


# ---- the environment ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    """The CNI_* variables of one call."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)  # CNI_ARGS
    path: str = ""

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def pod_uid(self) -> str:
        return self.args.get("K8S_POD_UID", "")

    @property
    def is_pod(self) -> bool:
        """Whether the runtime said which Kubernetes pod this is (kubelet's runtimes do)."""
        return bool(self.pod_namespace and self.pod_name)


# What each command needs (the spec: DEL may come without a netns, once the sandbox is gone).
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID",),
    "VERSION": (),
}


def read_env(env: Mapping[str, str]) -> Invocation:
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(INVALID_ENV, "CNI_COMMAND is not set", "this program is a CNI plugin: a container "
                       "runtime runs it with CNI_COMMAND=ADD|DEL|CHECK|VERSION and the network config on stdin")
    if command not in COMMANDS:
        raise CniError(INVALID_ENV, f"CNI_COMMAND={command!r} is not a CNI command", f"one of {', '.join(COMMANDS)}")
    missing = [name for name in REQUIRED_ENV[command] if not env.get(name)]
    if missing:
        raise CniError(INVALID_ENV, f"{command} needs {', '.join(missing)}, which the runtime did not set")
    return Invocation(command, env.get("CNI_CONTAINERID", ""), env.get("CNI_NETNS", ""), env.get("CNI_IFNAME", ""),
                      parse_args(env.get("CNI_ARGS", "")), env.get("CNI_PATH", ""))


def parse_args(text: str) -> dict[str, str]:
    """CNI_ARGS: `K=V;K=V` (`IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;...`)."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise CniError(INVALID_ENV, f"CNI_ARGS: {part!r} is not KEY=VALUE", f"CNI_ARGS={text!r}")
        out[key.strip()] = value.strip()
    return out


# ---- the network configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginConfig:
    cni_version: str
    name: str
    agent_socket: str = protocol.DEFAULT_SOCKET
    agent_timeout: float = protocol.DEFAULT_TIMEOUT
    exclude_namespaces: tuple[str, ...] = protocol.EXCLUDED_NAMESPACES
    fail_open: bool = False
    cgroup_format: str = ""
    prev_result: Mapping[str, Any] | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)  # runtimeConfig: the pod's, from the runtime


def version_of(data: bytes) -> str:
    """The config's cniVersion if it can be read at all (for the error result), else ours."""
    try:
        version = json.loads(data).get("cniVersion")
    except (ValueError, AttributeError):
        return CNI_VERSION
    return version if isinstance(version, str) and version else CNI_VERSION


def read_config(data: bytes, command: str) -> PluginConfig:
    try:
        conf = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CniError(DECODE_FAILURE, "the network configuration on stdin is not JSON", str(exc)) from exc
    if not isinstance(conf, dict):
        raise CniError(DECODE_FAILURE, "the network configuration on stdin is not a JSON object")
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "the network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    if command == "VERSION":
        return PluginConfig(version, str(conf.get("name", "")))
    for key in ("name", "type"):
        if not isinstance(conf.get(key), str) or not conf[key]:
            raise CniError(INVALID_CONFIG, f"the network configuration has no {key!r}")
    prev = conf.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "prevResult must be an object")
    if command == "ADD" and prev is None:
        raise CniError(INVALID_CONFIG, f"{protocol.PLUGIN_TYPE} must be chained after the plugins that give the "
                       "pod its interface and address (no prevResult)",
                       f"add it as the last entry of the 'plugins' list of network {conf['name']!r}")
    return PluginConfig(
        cni_version=version, name=conf["name"],
        agent_socket=_string(conf, "agentSocket", protocol.DEFAULT_SOCKET),
        agent_timeout=_seconds(conf, "agentTimeout", protocol.DEFAULT_TIMEOUT),
        exclude_namespaces=_strings(conf, "excludeNamespaces", protocol.EXCLUDED_NAMESPACES),
        fail_open=_flag(conf, "failOpen"),
        cgroup_format=_string(conf, "cgroupFormat", ""),
        prev_result=prev,
        annotations=_annotations(conf),
    )


def _annotations(conf: Mapping[str, Any]) -> dict[str, str]:
    """The pod's annotations, where the runtime passed them (the capability the plugin's entry declares)."""
    runtime = conf.get("runtimeConfig", {})
    if not isinstance(runtime, dict):
        raise CniError(INVALID_CONFIG, f"runtimeConfig must be an object, not {runtime!r}")
    value = runtime.get(protocol.RUNTIME_ANNOTATIONS, {})
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CniError(INVALID_CONFIG, f"runtimeConfig.{protocol.RUNTIME_ANNOTATIONS} must be an object of strings "
                       f"(the pod's annotations), not {value!r}")
    return dict(value)


def _string(conf: Mapping[str, Any], key: str, default: str) -> str:
    value = conf.get(key, default)
    if not isinstance(value, str) or (key == "agentSocket" and not value):
        raise CniError(INVALID_CONFIG, f"{key} must be a non-empty string, not {value!r}")
    return value


def _seconds(conf: Mapping[str, Any], key: str, default: float) -> float:
    value = conf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise CniError(INVALID_CONFIG, f"{key} must be a positive number of seconds, not {value!r}")
    return float(value)


def _strings(conf: Mapping[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = conf.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CniError(INVALID_CONFIG, f"{key} must be a list of namespace names, not {value!r}")
    return tuple(value)


def _flag(conf: Mapping[str, Any], key: str) -> bool:
    value = conf.get(key, False)
    if not isinstance(value, bool):
        raise CniError(INVALID_CONFIG, f"{key} must be true or false, not {value!r}")
    return value


# ---- results -----------------------------------------------------------------------------------------------


def result_ips(result: Mapping[str, Any]) -> tuple[str, ...]:
    """The pod's addresses in a result (`ips[].address`, "10.244.1.5/24"), IPv4 first, without prefixes."""
    ips = result.get("ips") or []
    if not isinstance(ips, list):
        raise CniError(INVALID_CONFIG, "prevResult.ips must be a list")
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for entry in ips:
        address = entry.get("address") if isinstance(entry, dict) else None
        try:
            out.append(ipaddress.ip_interface(str(address)).ip)
        except ValueError as exc:
            raise CniError(INVALID_CONFIG, f"prevResult.ips: {address!r} is not an address with a prefix") from exc
    return tuple(str(ip) for ip in sorted(out, key=lambda ip: ip.version))


def as_output(result: Mapping[str, Any], cni_version: str) -> dict[str, Any]:
    """`prevResult` as this plugin's own result: unchanged, in the config's version."""
    return {**result, "cniVersion": cni_version}


def version_result(cni_version: str = CNI_VERSION) -> dict[str, Any]:
    return {"cniVersion": cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}
