"""Install the mesh's CNI plugin on a node, or remove it: what the node agent DaemonSet's init container runs.

    python -m nodeagent.cni.install [--cni-bin-dir /host/opt/cni/bin] [--cni-conf-dir /host/etc/cni/net.d]
        [--agent-socket /var/run/ambient/cni.sock] [--wait SECONDS] [--uninstall]

Install copies the `ambient-cni` wrapper into the CNI bin directory with the plugin's modules beside it
(`ambient-cni.d/`), then chains the plugin into the network configuration the runtime uses (the first
file of the conf directory in name order, as libcni picks it): appended as the last plugin of that
conflist, or replacing an earlier entry of ours with the current settings.  A single-plugin `.conf` is
turned into a `.conflist` of the same name.  Each file is written atomically.  Uninstall removes our entry
from every conflist of the directory and the files from the bin directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mesh import files, logs
from mesh.errors import MeshError
from nodeagent.cni import protocol

log = logging.getLogger("nodeagent.cni.install")

HERE = Path(__file__).resolve().parent
WRAPPER = HERE / protocol.PLUGIN_TYPE
MODULES_DIR = f"{protocol.PLUGIN_TYPE}.d"
# What the plugin runs on the node: the standard-library-only modules of nodeagent.cni (see its __init__).
MODULES = ("nodeagent/__init__.py", "nodeagent/cni/__init__.py", "nodeagent/cni/plugin.py",
           "nodeagent/cni/spec.py", "nodeagent/cni/protocol.py", "nodeagent/cni/podcgroup.py")
CONFIG_SUFFIXES = (".conf", ".conflist", ".json")  # what libcni reads, in name order
BIN_DIR = "/host/opt/cni/bin"  # the node's /opt/cni/bin, as the DaemonSet mounts it
CONF_DIR = "/host/etc/cni/net.d"


class InstallError(MeshError):
    pass


def plugin_entry(agent_socket: str = protocol.DEFAULT_SOCKET, agent_timeout: float = protocol.DEFAULT_TIMEOUT,
                 exclude_namespaces: Sequence[str] = protocol.EXCLUDED_NAMESPACES) -> dict[str, Any]:
    return {"type": protocol.PLUGIN_TYPE, "agentSocket": agent_socket, "agentTimeout": agent_timeout,
            "excludeNamespaces": list(exclude_namespaces), "failOpen": False,
            "capabilities": {protocol.RUNTIME_ANNOTATIONS: True}}  # the runtime passes the pod's annotations


# ---- configurations (pure) ---------------------------------------------------------------------------------


def is_ours(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == protocol.PLUGIN_TYPE


def as_conflist(conf: dict[str, Any]) -> dict[str, Any]:
    """A network configuration as a conflist (a single-plugin `.conf` becomes a list of one)."""
    if "plugins" in conf:
        if not isinstance(conf["plugins"], list):
            raise InstallError("'plugins' is not a list")
        return conf
    if not isinstance(conf.get("type"), str):
        raise InstallError("neither a conflist ('plugins') nor a plugin configuration ('type')")
    plugin = {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
    return {"cniVersion": conf.get("cniVersion", "1.0.0"), "name": conf.get("name", "k8s-pod-network"),
            "plugins": [plugin]}


def chained(conflist: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The conflist with our plugin last, once, as `entry` says."""
    others = [p for p in conflist["plugins"] if not is_ours(p)]
    if not others:
        raise InstallError("the network configuration has no plugin of its own to chain after")
    return {**conflist, "plugins": [*others, entry]}


def unchained(conflist: dict[str, Any]) -> dict[str, Any]:
    return {**conflist, "plugins": [p for p in conflist["plugins"] if not is_ours(p)]}


# ---- files -------------------------------------------------------------------------------------------------


def config_files(conf_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in conf_dir.iterdir() if p.suffix in CONFIG_SUFFIXES and p.is_file())
    except FileNotFoundError:
        return []


def read(path: Path) -> dict[str, Any]:
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InstallError(f"cannot read the CNI configuration {path}: {exc}") from exc
    if not isinstance(conf, dict):
        raise InstallError(f"{path}: not a JSON object")
    return conf


def write(path: Path, conf: dict[str, Any]) -> None:
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    files.write_atomic(path, (json.dumps(conf, indent=2) + "\n").encode(), mode=mode)


def chain(conf_dir: Path, entry: dict[str, Any], *, wait: float = 0.0) -> Path:
    """Chain the plugin into the configuration the runtime uses; the file written (or left as it was)."""
    deadline = time.monotonic() + wait
    while not (found := config_files(conf_dir)):
        if time.monotonic() >= deadline:
            raise InstallError(f"no CNI network configuration in {conf_dir} to chain the plugin into: is the "
                               "cluster's network plugin installed?")
        time.sleep(1.0)
    path = found[0]
    try:
        current = as_conflist(read(path))
        wanted = chained(current, entry)
    except InstallError as exc:
        raise InstallError(f"{path}: {exc}") from exc
    target = path if path.suffix == ".conflist" else path.with_suffix(".conflist")
    if wanted != current or target != path:
        write(target, wanted)
        if target != path:
            path.unlink()
        log.info("chained %s into %s", protocol.PLUGIN_TYPE, target)
    return target


def unchain(conf_dir: Path) -> list[Path]:
    changed = []
    for path in config_files(conf_dir):
        try:
            conf = read(path)
        except InstallError:
            continue
        if isinstance(conf.get("plugins"), list) and any(is_ours(p) for p in conf["plugins"]):
            write(path, unchained(conf))
            changed.append(path)
    return changed


def install_binary(bin_dir: Path) -> Path:
    """The wrapper and the plugin's modules, each file written atomically (the wrapper last)."""
    root = HERE.parent.parent
    for module in MODULES:
        files.write_atomic(bin_dir / MODULES_DIR / module, (root / module).read_bytes(), mode=0o644)
    target = bin_dir / protocol.PLUGIN_TYPE
    files.write_atomic(target, WRAPPER.read_bytes(), mode=0o755)
    return target


def remove_binary(bin_dir: Path) -> None:
    (bin_dir / protocol.PLUGIN_TYPE).unlink(missing_ok=True)
    shutil.rmtree(bin_dir / MODULES_DIR, ignore_errors=True)  # ours alone (with the .pyc files of its runs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nodeagent.cni.install", description="Install (or remove) the mesh's chained "
                                "CNI plugin on this node.")
    p.add_argument("--cni-bin-dir", type=Path, default=Path(BIN_DIR), help="the node's CNI bin directory (default %(default)s)")
    p.add_argument("--cni-conf-dir", type=Path, default=Path(CONF_DIR),
                   help="the node's CNI configuration directory (default %(default)s)")
    p.add_argument("--agent-socket", default=protocol.DEFAULT_SOCKET, help="the node agent's --cni-socket, as the node "
                   "sees it (default %(default)s)")
    p.add_argument("--agent-timeout", type=float, default=protocol.DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="how long a pod's creation waits for the agent (default %(default)s)")
    p.add_argument("--exclude-namespaces", default=",".join(protocol.EXCLUDED_NAMESPACES), metavar="NS,NS",
                   help="namespaces whose pods are never handed over (default %(default)s); the agent's own must be one")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for the cluster's network configuration to appear (default %(default)s)")
    p.add_argument("--uninstall", action="store_true", help="remove the plugin and its entry instead")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("info")
    try:
        if args.uninstall:
            changed = unchain(args.cni_conf_dir)
            remove_binary(args.cni_bin_dir)
            print(f"removed {protocol.PLUGIN_TYPE} from {args.cni_bin_dir} and from "
                  f"{', '.join(map(str, changed)) or 'no configuration'}")
            return 0
        binary = install_binary(args.cni_bin_dir)
        excluded = [ns.strip() for ns in args.exclude_namespaces.split(",") if ns.strip()]
        conf = chain(args.cni_conf_dir, plugin_entry(args.agent_socket, args.agent_timeout, excluded), wait=args.wait)
        print(f"installed {binary}, chained into {conf}")
        return 0
    except (InstallError, OSError) as exc:
        print(f"nodeagent.cni.install: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
