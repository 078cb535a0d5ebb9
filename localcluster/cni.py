"""A small CNI runtime: runs a network's plugins for one container as the CNI specification (1.0) asks of a
runtime, in the order libcni (the library containerd and CRI-O use) runs them.

    runtime = Runtime(bin_dirs, cache_dir, netns="amb.c.node.node-1", env={"PATH": ...})
    net = Conflist.parse(json.loads(conflist_text))
    att = Attachment(container_id, "/run/netns/amb.c.pod.shop.web", "eth0", (("K8S_POD_NAME", "web"), ...))
    result = runtime.add(net, att)           # the last plugin's result
    runtime.delete(net, att)                 # idempotent

- ADD runs the list's plugins in order; each gets the list's `cniVersion` and `name`, its own keys, and the
  previous plugin's result as `prevResult`.  The last result is cached (with the configuration and the
  arguments, as libcni's `cniCacheV1` keeps them) under `cache_dir`: DEL and CHECK need it, and `cluster
  down` finds every attachment there.  An ADD that fails part-way is undone with a DEL of the whole list
  before the error is raised, so a failed ADD leaves nothing behind.  An ADD of an attachment that is
  already cached answers the cached result and runs nothing; one whose earlier ADD never finished (the
  runtime died) is deleted first.
- DEL runs the plugins in reverse order, each with the cached result as `prevResult` (none when there is
  no cache: plugins must then clean what they find), the cached configuration winning over the one given
  (what was added is what is removed).  Every plugin is run even when one fails; the cache goes only when
  all succeeded, and the first error is raised.  DEL of what is not there succeeds: the plugins' DEL is
  idempotent by the spec, and so is the cache's removal.
- CHECK runs the plugins in order with the cached result.

A plugin runs with the spec's environment (`CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
`CNI_ARGS`, `CNI_PATH`) plus the runtime's `env`, its configuration on stdin, inside the network namespace
`netns` when one is given (the node's: there the bridge and the host ends of the veths are made, as by a
runtime on that node; `CNI_NETNS` is the container's).  Its error result (a non-zero exit with
`{"code", "msg", "details"}` on stdout) becomes a `CniError` carrying the plugin's code and message.

Capabilities: a plugin that declares one the attachment carries (`Attachment.capabilities`, as containerd
passes a pod's annotations as `io.kubernetes.cri.pod-annotations`) gets it in its `runtimeConfig`, as libcni
injects it; the others get none.

Not done: other capabilities (port mappings, bandwidth), GC and STATUS (CNI 1.1), converting
results between CNI versions (every plugin here speaks the list's version).

The decisions are pure (`plugin_config`, `plugin_env`, `read_output`, `Conflist.parse`); `Runtime._exec`
is the one place that starts a plugin.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh import netns as mnetns
from mesh.errors import MeshError
from mesh.files import write_atomic

ADD, DEL, CHECK = "ADD", "DEL", "CHECK"
DEFAULT_TIMEOUT = 60.0  # seconds one plugin may take (a chained plugin may wait for its agent: 30 s by default)
CACHE_KIND = "cniCacheV1"
PLUGIN_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a file name in CNI_PATH, never a path


class CniError(MeshError):
    """A plugin failed, or a configuration cannot be run; `code` and `msg` are the plugin's when it said."""

    def __init__(self, message: str, *, plugin: str = "", command: str = "", code: int | None = None,
                 msg: str = "", details: str = "") -> None:
        super().__init__(message)
        self.plugin = plugin
        self.command = command
        self.code = code
        self.msg = msg or message
        self.details = details


@dataclass(frozen=True)
class Conflist:
    """A network configuration list (`*.conflist`): the network's name, its CNI version, its plugins."""

    name: str
    cni_version: str
    plugins: tuple[Mapping[str, Any], ...]

    @classmethod
    def parse(cls, data: Any, where: str = "the network configuration") -> Conflist:
        if not isinstance(data, Mapping):
            raise CniError(f"{where} is not a JSON object")
        name, version, plugins = data.get("name"), data.get("cniVersion"), data.get("plugins")
        if not isinstance(name, str) or not name:
            raise CniError(f"{where} has no name")
        if not isinstance(version, str) or not version:
            raise CniError(f"{where} has no cniVersion")
        if not isinstance(plugins, list) or not plugins:
            raise CniError(f"{where}: plugins must be a non-empty list")
        for i, plugin in enumerate(plugins):
            kind = plugin.get("type") if isinstance(plugin, Mapping) else None
            if not isinstance(kind, str) or not PLUGIN_TYPE.match(kind):
                raise CniError(f"{where}: plugins[{i}] needs a type naming a plugin file (not {kind!r})")
        return cls(name, version, tuple(dict(p) for p in plugins))

    def to_json(self) -> dict[str, Any]:
        return {"cniVersion": self.cni_version, "name": self.name, "plugins": [dict(p) for p in self.plugins]}


@dataclass(frozen=True)
class Attachment:
    """One container's interface on one network: what the runtime tells every plugin about it."""

    container_id: str
    netns: str  # the path of the container's network namespace (CNI_NETNS)
    ifname: str = "eth0"
    args: tuple[tuple[str, str], ...] = ()  # CNI_ARGS, in order
    # capability -> value, given as runtimeConfig to the plugins that declare the capability
    capabilities: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def cni_args(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.args)

    def cache_name(self, network: str) -> str:
        return f"{network}-{self.container_id}-{self.ifname}.json"


@dataclass(frozen=True)
class Cached:
    """An attachment as ADD left it in the cache (`result` is None while its ADD runs)."""

    network: Conflist
    attachment: Attachment
    result: Mapping[str, Any] | None
    path: Path


# ---- what each plugin is given and what it answers (pure) -----------------------------------------------


def plugin_config(net: Conflist, plugin: Mapping[str, Any], prev: Mapping[str, Any] | None,
                  capabilities: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One plugin's network configuration: the list's version and name, its own keys, `runtimeConfig` with
    those of `capabilities` it declares (none: no `runtimeConfig`), `prevResult`."""
    conf = {k: v for k, v in plugin.items() if k not in ("prevResult", "runtimeConfig")}
    conf["cniVersion"] = net.cni_version
    conf["name"] = net.name
    declared = plugin.get("capabilities")
    declared = declared if isinstance(declared, dict) else {}
    runtime = {k: v for k, v in (capabilities or {}).items() if declared.get(k) is True}
    if runtime:
        conf["runtimeConfig"] = runtime
    if prev is not None:
        conf["prevResult"] = dict(prev)
    return conf


def plugin_env(command: str, att: Attachment, cni_path: Sequence[Path], base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    env.update({"CNI_COMMAND": command, "CNI_CONTAINERID": att.container_id, "CNI_NETNS": att.netns,
                "CNI_IFNAME": att.ifname, "CNI_ARGS": att.cni_args, "CNI_PATH": ":".join(str(p) for p in cni_path)})
    return env


def read_output(plugin: str, command: str, returncode: int, stdout: bytes, stderr: bytes) -> dict[str, Any] | None:
    """A plugin's answer: ADD's result, None for DEL and CHECK; CniError for an error result."""
    text = stdout.decode(errors="replace").strip()
    if returncode != 0:
        try:
            error = json.loads(text)
        except ValueError:
            error = None
        if isinstance(error, dict) and isinstance(error.get("msg"), str):
            code = error.get("code")
            code = code if isinstance(code, int) and not isinstance(code, bool) else None
            details = str(error.get("details") or "")
            raise CniError(f"plugin {plugin} failed {command}" + (f" (error {code})" if code is not None else "")
                           + f": {error['msg']}" + (f"; {details}" if details else ""),
                           plugin=plugin, command=command, code=code, msg=error["msg"], details=details)
        said = stderr.decode(errors="replace").strip() or text or f"exit status {returncode}"
        raise CniError(f"plugin {plugin} failed {command} without an error result: {said[-500:]}",
                       plugin=plugin, command=command, msg=said[-500:])
    if command != ADD:
        return None
    try:
        result = json.loads(text)
    except ValueError as exc:
        raise CniError(f"plugin {plugin} answered ADD with something that is not JSON: {text[:200]!r}",
                       plugin=plugin, command=command) from exc
    if not isinstance(result, dict) or not isinstance(result.get("cniVersion"), str):
        raise CniError(f"plugin {plugin} answered ADD without a result (no cniVersion): {text[:200]!r}",
                       plugin=plugin, command=command)
    return result


def missing(net: Conflist, bin_dirs: Sequence[Path]) -> list[str]:
    """The plugins `net` runs (its IPAM plugins too) that are in none of `bin_dirs`."""
    kinds = [str(p["type"]) for p in net.plugins]
    kinds += [str(p["ipam"]["type"]) for p in net.plugins if isinstance(p.get("ipam"), Mapping) and "type" in p["ipam"]]
    return [k for k in dict.fromkeys(kinds) if not any((d / k).is_file() for d in bin_dirs)]


# ---- the runtime ------------------------------------------------------------------------------------------


class Runtime:
    def __init__(self, bin_dirs: Sequence[Path], cache_dir: Path, *, netns: str = "",
                 env: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.bin_dirs = tuple(bin_dirs)  # CNI_PATH, searched in order
        self.cache_dir = cache_dir
        self.netns = netns  # where plugins run: a name under /run/netns or a path; "" for this process's
        self.env = dict(env or {})
        self.timeout = timeout

    def add(self, net: Conflist, att: Attachment) -> dict[str, Any]:
        cached = self.cached(net.name, att)
        if cached is not None and cached.result is not None:
            return dict(cached.result)
        if cached is not None:  # an ADD that never finished (the runtime died): undo it first
            self._run_del(cached.network, att, None)
        self._save(net, att, None)  # before anything is made: a crash leaves an entry that DEL can undo
        result: dict[str, Any] | None = None
        try:
            for plugin in net.plugins:
                answer = self._exec(ADD, plugin, plugin_config(net, plugin, result, att.capabilities), att)
                assert answer is not None  # read_output insists on a result for ADD
                result = answer
        except CniError:
            try:
                self._run_del(net, att, None)
            except CniError:
                pass  # the ADD's error is the one to report; the cache entry stays for a later DEL
            else:
                self._forget(net.name, att)
            raise
        assert result is not None
        self._save(net, att, result)
        return result

    def check(self, net: Conflist, att: Attachment) -> None:
        cached = self.cached(net.name, att)
        if cached is None or cached.result is None:
            raise CniError(f"CHECK of container {att.container_id}: it was never added to network {net.name}",
                           command=CHECK)
        for plugin in cached.network.plugins:
            self._exec(CHECK, plugin, plugin_config(cached.network, plugin, cached.result, att.capabilities), att)

    def delete(self, net: Conflist, att: Attachment) -> None:
        cached = self.cached(net.name, att)
        self._run_del(cached.network if cached else net, att, cached.result if cached else None)
        self._forget(net.name, att)

    def attachments(self) -> list[Cached]:
        """Everything the cache holds: what was added (or is being added) and not deleted."""
        try:
            paths = sorted(self.cache_dir.glob("*.json"))
        except OSError:
            return []
        out = []
        for path in paths:
            entry = _load(path)
            if entry is not None:
                out.append(entry)
        return out

    def cached(self, network: str, att: Attachment) -> Cached | None:
        return _load(self.cache_dir / att.cache_name(network))

    # ---- inside ----------------------------------------------------------------------------------------

    def _run_del(self, net: Conflist, att: Attachment, result: Mapping[str, Any] | None) -> None:
        first: CniError | None = None
        for plugin in reversed(net.plugins):
            try:
                self._exec(DEL, plugin, plugin_config(net, plugin, result, att.capabilities), att)
            except CniError as exc:
                first = first or exc
        if first is not None:
            raise first

    def _save(self, net: Conflist, att: Attachment, result: Mapping[str, Any] | None) -> None:
        entry = {"kind": CACHE_KIND, "containerId": att.container_id, "ifName": att.ifname, "networkName": net.name,
                 "netns": att.netns, "cniArgs": [list(kv) for kv in att.args], "config": net.to_json(),
                 "capabilityArgs": dict(att.capabilities),
                 "result": dict(result) if result is not None else None}
        write_atomic(self.cache_dir / att.cache_name(net.name), json.dumps(entry, indent=1).encode(), mode=0o600)

    def _forget(self, network: str, att: Attachment) -> None:
        (self.cache_dir / att.cache_name(network)).unlink(missing_ok=True)

    def _binary(self, plugin: str, command: str) -> Path:
        for directory in self.bin_dirs:
            path = directory / plugin
            if path.is_file():
                return path
        raise CniError(f"CNI plugin {plugin!r} is not in {':'.join(str(d) for d in self.bin_dirs)} (Debian's "
                       "containernetworking-plugins provides bridge, host-local and loopback: run `make setup`)",
                       plugin=plugin, command=command)

    def _exec(self, command: str, plugin: Mapping[str, Any], conf: Mapping[str, Any],
              att: Attachment) -> dict[str, Any] | None:
        kind = str(plugin["type"])
        argv = [str(self._binary(kind, command))]
        if self.netns:
            path = self.netns if self.netns.startswith("/") else str(mnetns.netns_path(self.netns))
            argv = ["nsenter", f"--net={path}", "--", *argv]
        try:
            done = subprocess.run(argv, input=json.dumps(conf).encode(), capture_output=True, check=False,
                                  env=plugin_env(command, att, self.bin_dirs, self.env), timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:
            raise CniError(f"plugin {kind} did not finish {command} within {self.timeout:g}s",
                           plugin=kind, command=command) from exc
        except OSError as exc:
            raise CniError(f"plugin {kind} could not be started for {command}: {exc}", plugin=kind,
                           command=command) from exc
        return read_output(kind, command, done.returncode, done.stdout, done.stderr)


def _load(path: Path) -> Cached | None:
    try:
        entry = json.loads(path.read_text())
        net = Conflist.parse(entry["config"], str(path))
        att = Attachment(str(entry["containerId"]), str(entry["netns"]), str(entry["ifName"]),
                         tuple((str(k), str(v)) for k, v in entry.get("cniArgs") or []),
                         dict(entry.get("capabilityArgs") or {}))
        result = entry.get("result")
    except (OSError, ValueError, KeyError, TypeError, CniError):
        return None
    return Cached(net, att, result if isinstance(result, dict) else None, path)
