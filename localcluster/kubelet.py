"""What a kubelet does with a pod template's container, for the local cluster: the process to start.

    container_run(workload, "nodeagent", pod, mounts, env_overrides=..., executables=...) -> ContainerRun

Pure.  Given a workload from the manifests (`localcluster.manifests`), the facts of the one pod the local
cluster runs for it (`PodFields`: name, namespace, node, address), and where each of the pod's volumes is
on this machine (`Mounts`), it computes:

- the environment: the container's `env` in order, a `value` expanded with the variables before it,
  `valueFrom.fieldRef` from the pod's fields (the downward API); other sources are refused;
- the command line: `command` + `args`, with `$(VAR)` expanded from that environment exactly as Kubernetes
  does (`$$` is a literal `$`, a variable the container lacks stays as written), the image's executable
  replaced by this machine's (`executables`, e.g. `python` -> the virtual environment's interpreter);
- paths: the processes see the host's file system, not the container's, so every argument and
  environment value that names a path under one of the container's `volumeMounts` is rewritten to where
  that volume is here (a directory, or for token and ConfigMap volumes the files the local cluster already
  keeps); the same rewriting a bind mount would do, done on the command line;
- the readiness probe (`httpGet` port and path, or `tcpSocket`), with a named port resolved.

Not applied: images (the processes run from this repository), securityContext, resources, and init
containers (each must be listed as skipped by the caller, with the reason, or the workload is refused).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from localcluster.manifests import Manifest, ManifestError

# Kubernetes' defaults for a probe's timing.
PROBE_PERIOD, PROBE_TIMEOUT, PROBE_FAILURES = 10, 1, 3


@dataclass(frozen=True)
class PodFields:
    """The pod the local cluster runs for a workload: what the downward API can tell about it."""

    name: str
    namespace: str
    node: str  # spec.nodeName ("" when the pod is on no node, like the control plane in the underlay)
    ip: str  # status.podIP
    host_ip: str = ""  # status.hostIP
    service_account: str = "default"
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    def field(self, path: str) -> str | None:
        """The value of a `fieldRef.fieldPath`; None for a path the local cluster does not provide."""
        simple = {"metadata.name": self.name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
                  "spec.nodeName": self.node, "spec.serviceAccountName": self.service_account,
                  "status.podIP": self.ip, "status.podIPs": self.ip, "status.hostIP": self.host_ip,
                  "status.hostIPs": self.host_ip}
        if path in simple:
            return simple[path]
        for prefix, values in (("metadata.labels", self.labels), ("metadata.annotations", self.annotations)):
            if path.startswith(prefix + "['") and path.endswith("']"):
                return values.get(path[len(prefix) + 2:-2], "")
        return None


@dataclass(frozen=True)
class HostDir:
    """A volume that is a directory here: `mountPath/x` is `path/x`."""

    path: Path
    create: bool = False  # made before the process starts (the local cluster's own: emptyDir, a node's directory)


@dataclass(frozen=True)
class HostFiles:
    """A volume of files kept elsewhere (a projected token, a ConfigMap): `mountPath/key` is `files[key]`."""

    files: Mapping[str, Path]


Place = HostDir | HostFiles


@dataclass(frozen=True)
class Mounts:
    """Where a pod's volumes are on this machine.  A volume not named in `volumes` is, by its source:
    hostPath -> the host's own path (the local cluster's nodes share the host's file system; never created
    here), emptyDir -> `pod_dir/<volume>` (created); any other source must be named."""

    volumes: Mapping[str, Place]
    pod_dir: Path


@dataclass(frozen=True)
class Probe:
    """A readiness probe: GET `path` on `port` (`http`), or a TCP connection (`tcp`), to the pod's address."""

    kind: str  # "http" | "tcp"
    port: int
    path: str = "/"
    host: str = ""  # empty: the pod's address
    period: int = PROBE_PERIOD
    timeout: int = PROBE_TIMEOUT
    failure_threshold: int = PROBE_FAILURES


@dataclass(frozen=True)
class ContainerRun:
    """What to start for one container: the command line, its environment (the container's own
    variables; the caller adds the base environment an image would give), its readiness probe, and the
    directories its volumes need."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    readiness: Probe | None
    make_dirs: tuple[Path, ...]


def container_run(workload: Manifest, container: str, pod: PodFields, mounts: Mounts, *,
                  env_overrides: Mapping[str, str] | None = None, executables: Mapping[str, str] | None = None,
                  skip_init: Collection[str] = ()) -> ContainerRun:
    c = workload.container(container)
    where = f"{workload.where}: container {container}"
    _check_init_containers(workload, skip_init)
    env = resolve_env(c, pod, where, env_overrides or {})
    command = _strings(c.get("command"), f"{where}: command")
    if not command:
        raise ManifestError(f"{where}: no command (the local cluster cannot know the image's entrypoint)")
    args = _strings(c.get("args"), f"{where}: args")
    argv = [expand(a, env) for a in command + args]
    places = mount_places(workload, c, mounts, where)
    mapped = [map_path(a, places, where) for a in argv]
    # The image's executable is replaced by this machine's after the mounts are mapped: it is a host path
    # already (a virtual environment under /tmp must not be taken for the container's /tmp volume).
    mapped[0] = (executables or {}).get(argv[0], mapped[0])
    return ContainerRun(
        argv=tuple(mapped),
        env=tuple((k, map_path(v, places, where)) for k, v in env.items()),
        readiness=readiness_probe(c, where),
        make_dirs=tuple(p.path for _, p in places if isinstance(p, HostDir) and p.create),
    )


# ---- $(VAR) and the environment ----------------------------------------------------------------------------


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' expansion of `$(VAR)` in command, args and env values: `$$` is a literal `$`, a
    reference to a variable not in `env` is left as written, any other `$` is itself."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "$" or i + 1 == len(text):
            out.append(ch)
            i += 1
        elif text[i + 1] == "$":
            out.append("$")
            i += 2
        elif text[i + 1] == "(":
            end = text.find(")", i + 2)
            if end < 0:
                out.append(text[i:])
                break
            name = text[i + 2:end]
            out.append(env[name] if name in env else text[i:end + 1])
            i = end + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def resolve_env(c: Mapping[str, Any], pod: PodFields, where: str, overrides: Mapping[str, str]) -> dict[str, str]:
    """The container's variables in order, each `value` expanded with those before it; `overrides` replace
    the value of a variable of that name (or add it at the end)."""
    if c.get("envFrom"):
        raise ManifestError(f"{where}: envFrom is not provided by the local cluster (name each variable in env)")
    entries = c.get("env") or []
    if not isinstance(entries, list):
        raise ManifestError(f"{where}: env must be a list")
    env: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ManifestError(f"{where}: env: every entry needs a name")
        name = entry["name"]
        if name in overrides:
            env[name] = overrides[name]
        elif "valueFrom" in entry:
            env[name] = _value_from(entry["valueFrom"], pod, f"{where}: env {name}")
        else:
            env[name] = expand(str(entry.get("value", "")), env)
    for name, value in overrides.items():
        env.setdefault(name, value)
    return env


def _value_from(source: Any, pod: PodFields, where: str) -> str:
    ref = source.get("fieldRef") if isinstance(source, dict) else None
    if not isinstance(ref, dict):
        kinds = ", ".join(sorted(source)) if isinstance(source, dict) else "?"
        raise ManifestError(f"{where}: valueFrom {kinds} is not provided by the local cluster (only fieldRef)")
    path = ref.get("fieldPath")
    value = pod.field(path) if isinstance(path, str) else None
    if value is None:
        raise ManifestError(f"{where}: fieldRef {path!r} is not one the local cluster provides (metadata.name, "
                            "metadata.namespace, metadata.uid, metadata.labels['...'], metadata.annotations['...'], "
                            "spec.nodeName, spec.serviceAccountName, status.podIP, status.hostIP)")
    return value


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) and not isinstance(v, bool)
                                              for v in value):
        raise ManifestError(f"{where}: must be a list of strings")
    return [str(v) for v in value]


def _check_init_containers(workload: Manifest, skip: Collection[str]) -> None:
    for init in workload.pod_spec().get("initContainers") or []:
        name = init.get("name") if isinstance(init, dict) else None
        if name not in skip:
            raise ManifestError(f"{workload.where}: init container {name!r} is not one the local cluster knows to "
                                "skip (it runs only the workload's main container; see localcluster/overlay.py)")


# ---- volumes -------------------------------------------------------------------------------------------------


def mount_places(workload: Manifest, c: Mapping[str, Any], mounts: Mounts, where: str) -> list[tuple[str, Place]]:
    """(mountPath, place) for each of the container's mounts, the longest mountPath first."""
    volumes = {v.get("name"): v for v in workload.pod_spec().get("volumes") or [] if isinstance(v, dict)}
    out: list[tuple[str, Place]] = []
    for mount in c.get("volumeMounts") or []:
        name, path = mount.get("name"), mount.get("mountPath")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ManifestError(f"{where}: volumeMounts: {name}: mountPath must be an absolute path")
        if name not in volumes:
            raise ManifestError(f"{where}: volumeMounts: {name}: the pod has no volume of that name")
        place = _place(name, volumes[name], mounts, where)
        sub = str(mount.get("subPath") or "")
        if sub and isinstance(place, HostDir):
            place = HostDir(place.path / sub, place.create)
        elif sub and isinstance(place, HostFiles):
            if sub not in place.files:
                raise ManifestError(f"{where}: volumeMounts: {name}: subPath {sub!r} is not one of its files")
            place = HostFiles({"": place.files[sub]})  # the mount is that one file
        out.append((path.rstrip("/") or "/", place))
    return sorted(out, key=lambda mp: len(mp[0]), reverse=True)


def _place(name: str, volume: Mapping[str, Any], mounts: Mounts, where: str) -> Place:
    if name in mounts.volumes:
        return mounts.volumes[name]
    if "hostPath" in volume:  # the host's own directory, left as the host has it
        return HostDir(Path(volume["hostPath"]["path"]))
    if "emptyDir" in volume:
        return HostDir(mounts.pod_dir / name, create=True)
    source = ", ".join(k for k in volume if k != "name") or "?"
    raise ManifestError(f"{where}: volume {name} ({source}) has no place in the local cluster "
                        "(name it in localcluster/overlay.py)")


def map_path(value: str, places: Iterable[tuple[str, Place]], where: str) -> str:
    """`value` (or the value of `--flag=value`) rewritten from the container's file system to the host's."""
    if value.startswith("-") and "=" in value:
        flag, _, rest = value.partition("=")
        return f"{flag}={map_path(rest, places, where)}"
    if not value.startswith("/"):
        return value
    for mount_path, place in places:
        if value != mount_path and not value.startswith(mount_path.rstrip("/") + "/"):
            continue
        rest = str(PurePosixPath(value).relative_to(mount_path)) if value != mount_path else ""
        rest = "" if rest == "." else rest
        if isinstance(place, HostDir):
            return str(place.path / rest) if rest else str(place.path)
        if rest not in place.files:
            have = ", ".join(sorted(k for k in place.files if k)) or "a single file"
            raise ManifestError(f"{where}: {value} is not provided here: the volume at {mount_path} holds "
                                f"{have}")
        return str(place.files[rest])
    return value


# ---- readiness ---------------------------------------------------------------------------------------------


def readiness_probe(c: Mapping[str, Any], where: str) -> Probe | None:
    probe = c.get("readinessProbe")
    if probe is None:
        return None
    if not isinstance(probe, dict):
        raise ManifestError(f"{where}: readinessProbe must be a mapping")
    period = int(probe.get("periodSeconds", PROBE_PERIOD))
    timeout = int(probe.get("timeoutSeconds", PROBE_TIMEOUT))
    failures = int(probe.get("failureThreshold", PROBE_FAILURES))
    if isinstance(probe.get("httpGet"), dict):
        get = probe["httpGet"]
        if str(get.get("scheme", "HTTP")).upper() != "HTTP":
            raise ManifestError(f"{where}: readinessProbe: only httpGet over HTTP is run by the local cluster")
        return Probe("http", _port(c, get.get("port"), where), str(get.get("path") or "/"),
                     str(get.get("host") or ""), period, timeout, failures)
    if isinstance(probe.get("tcpSocket"), dict):
        sock = probe["tcpSocket"]
        return Probe("tcp", _port(c, sock.get("port"), where), "", str(sock.get("host") or ""),
                     period, timeout, failures)
    raise ManifestError(f"{where}: readinessProbe: only httpGet and tcpSocket probes are run by the local cluster")


def _port(c: Mapping[str, Any], port: Any, where: str) -> int:
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for p in c.get("ports") or []:
        if isinstance(p, dict) and p.get("name") == port and isinstance(p.get("containerPort"), int):
            return int(p["containerPort"])
    raise ManifestError(f"{where}: readinessProbe: port {port!r} is neither a number nor a named container port")
