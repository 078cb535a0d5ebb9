"""The node agent DaemonSet and its CNI plugin: the init container installs the plugin where the node's
runtime looks for it, pointing at the socket the agent listens on, and the agent takes its pods from it."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

import nodeagent.main
from nodeagent.cni import install
from tests.unit.daemonset.manifests import Obj, argv, container, one


def _host_path(workload: Obj, c: Obj, path: str) -> str:
    """The node's path behind `path` in container `c` (through its hostPath mounts)."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    for m in sorted(c["volumeMounts"], key=lambda m: len(m["mountPath"]), reverse=True):
        if path == m["mountPath"] or path.startswith(m["mountPath"] + "/"):
            host = volumes[m["name"]].get("hostPath")
            assert host is not None, f"{path} is not on a hostPath volume"
            return str(PurePosixPath(host["path"]) / PurePosixPath(path).relative_to(m["mountPath"]))
    raise AssertionError(f"{path} is on no volume of {c['name']}")


def test_install_cni_chains_the_plugin_to_the_agents_socket(base: list[Obj], monkeypatch: pytest.MonkeyPatch) -> None:
    ds = one(base, "DaemonSet", "ambient-nodeagent")
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    agent = container(ds, "nodeagent")
    assert init["name"] == "install-cni" and init["image"] == agent["image"]
    command, args = argv(init)
    assert command == ["python", "-m", "nodeagent.cni.install"]
    parsed = install.build_parser().parse_args(args)
    assert not parsed.uninstall
    assert _host_path(ds, init, str(parsed.cni_bin_dir)) == "/opt/cni/bin"
    assert _host_path(ds, init, str(parsed.cni_conf_dir)) == "/etc/cni/net.d"
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}

    monkeypatch.setattr("pathlib.Path.is_file", lambda self: True)  # the token and root certificate
    opts = nodeagent.main.parse_args(argv(agent)[1])
    assert opts.pod_source == "cni" and not opts.pod_netns
    # The plugin runs on the node: the socket it dials must be the agent's, seen through the same hostPath.
    assert parsed.agent_socket == opts.cni_socket
    assert _host_path(ds, agent, opts.cni_socket) == opts.cni_socket
    # The agent's own pod must start while no agent answers: its namespace is never handed over.
    excluded = parsed.exclude_namespaces.split(",")
    assert ds["metadata"]["namespace"] in excluded and "kube-system" in excluded
    # Namespaces a handed-over pod's record names (/var/run/netns/cni-...) are opened again after a restart.
    assert _host_path(ds, agent, "/var/run/netns") == "/var/run/netns"
    assert _host_path(ds, agent, str(opts.state_dir)).startswith("/var/run/ambient/")
