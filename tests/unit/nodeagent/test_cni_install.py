"""Installing the CNI plugin on a node: the conflist edits (chained last, once; a .conf made a conflist;
removed again), the files copied into the bin directory, and that the installed copy runs on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cni import install, protocol

FLANNEL = {
    "name": "cbr0", "cniVersion": "0.3.1",
    "plugins": [{"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
                {"type": "portmap", "capabilities": {"portMappings": True}}],
}


def write(path: Path, conf: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(conf))
    return path


def types(path: Path) -> list[str]:
    return [p["type"] for p in json.loads(path.read_text())["plugins"]]


def test_the_plugin_is_chained_last_into_the_first_configuration_once(tmp_path: Path) -> None:
    first = write(tmp_path / "10-flannel.conflist", FLANNEL)
    later = write(tmp_path / "99-other.conflist", {**FLANNEL, "name": "other"})
    (tmp_path / "00-readme.txt").write_text("not a config")
    entry = install.plugin_entry("/run/ambient/cni.sock", 20)
    assert install.chain(tmp_path, entry) == first
    conf = json.loads(first.read_text())
    assert types(first) == ["flannel", "portmap", protocol.PLUGIN_TYPE]
    assert conf["plugins"][-1] == {"type": protocol.PLUGIN_TYPE, "agentSocket": "/run/ambient/cni.sock",
                                   "agentTimeout": 20, "excludeNamespaces": ["kube-system", "istio-system"],
                                   "failOpen": False, "capabilities": {protocol.RUNTIME_ANNOTATIONS: True}}
    assert (conf["name"], conf["cniVersion"]) == ("cbr0", "0.3.1")
    assert types(later) == ["flannel", "portmap"]  # the runtime reads the first file only

    mtime = first.stat().st_mtime_ns
    install.chain(tmp_path, entry)
    assert first.stat().st_mtime_ns == mtime  # already so: not rewritten
    install.chain(tmp_path, install.plugin_entry("/other.sock"))
    assert types(first) == ["flannel", "portmap", protocol.PLUGIN_TYPE]  # updated in place, still once
    assert json.loads(first.read_text())["plugins"][-1]["agentSocket"] == "/other.sock"

    assert install.unchain(tmp_path) == [first]
    assert json.loads(first.read_text()) == FLANNEL


def test_a_single_plugin_conf_becomes_a_conflist(tmp_path: Path) -> None:
    conf = write(tmp_path / "10-bridge.conf", {"cniVersion": "1.0.0", "name": "pods", "type": "bridge",
                                                "bridge": "cni0", "ipam": {"type": "host-local"}})
    written = install.chain(tmp_path, install.plugin_entry())
    assert written == tmp_path / "10-bridge.conflist" and not conf.exists()
    out = json.loads(written.read_text())
    assert out["name"] == "pods" and out["plugins"][0] == {"type": "bridge", "bridge": "cni0",
                                                           "ipam": {"type": "host-local"}}
    assert types(written)[-1] == protocol.PLUGIN_TYPE


@pytest.mark.parametrize(("files", "says"), [
    ({}, "no CNI network configuration"),
    ({"10-x.conflist": "{oops"}, "cannot read the CNI configuration"),
    ({"10-x.conflist": {"name": "x", "plugins": {"type": "bridge"}}}, "'plugins' is not a list"),
    ({"10-x.conflist": {"name": "x", "plugins": [{"type": protocol.PLUGIN_TYPE}]}}, "no plugin of its own"),
])
def test_what_cannot_be_chained_into_is_said(tmp_path: Path, files: dict[str, Any], says: str) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(install.InstallError, match=says):
        install.chain(tmp_path, install.plugin_entry())


def test_install_and_uninstall_as_the_daemonset_runs_them(tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    conflist = write(conf_dir / "10-flannel.conflist", FLANNEL)
    argv = ["--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(conf_dir), "--agent-socket", str(tmp_path / "a.sock")]
    assert install.main(argv) == 0
    wrapper = bin_dir / protocol.PLUGIN_TYPE
    assert os.access(wrapper, os.X_OK)
    assert sorted(str(p.relative_to(bin_dir / "ambient-cni.d")) for p in (bin_dir / "ambient-cni.d").rglob("*.py")) \
        == sorted(install.MODULES)
    assert types(conflist)[-1] == protocol.PLUGIN_TYPE

    # The installed copy runs from the bin directory alone: the node has no project, only a Python.
    done = subprocess.run([str(wrapper)], input=b'{"cniVersion": "1.0.0"}', capture_output=True, cwd="/",
                          env={"PATH": os.environ["PATH"], "CNI_COMMAND": "VERSION", "AMBIENT_CNI_PYTHON": sys.executable,
                               "PYTHONNOUSERSITE": "1"}, check=False)
    assert done.returncode == 0 and json.loads(done.stdout)["supportedVersions"][-1] == "1.0.0"
    # ... and it is the installed copy that runs (the wrapper puts ambient-cni.d first on the path).
    probe = subprocess.run([sys.executable, "-c", "import nodeagent.cni.plugin as p; print(p.__file__)"],
                           capture_output=True, text=True, cwd="/", check=True,
                           env={"PYTHONPATH": str(bin_dir / "ambient-cni.d")})
    assert probe.stdout.strip() == str(bin_dir / "ambient-cni.d" / "nodeagent" / "cni" / "plugin.py")

    assert install.main([*argv, "--uninstall"]) == 0
    assert json.loads(conflist.read_text()) == FLANNEL
    assert not wrapper.exists() and not (bin_dir / "ambient-cni.d").exists()


def test_the_wrapper_fails_in_cni_terms_without_a_python(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "AMBIENT_CNI_PYTHON": str(tmp_path / "no-python")}
    add = subprocess.run([str(install.WRAPPER)], capture_output=True, text=True, env={**env, "CNI_COMMAND": "ADD"},
                         check=False)
    assert add.returncode == 1 and json.loads(add.stdout)["code"] == 11
    delete = subprocess.run([str(install.WRAPPER)], capture_output=True, env={**env, "CNI_COMMAND": "DEL"}, check=False)
    assert (delete.returncode, delete.stdout) == (0, b"")


def test_the_plugin_modules_use_only_the_standard_library() -> None:
    # They are copied onto the node without the project's dependencies (nodeagent.cni's docstring).
    root = Path(install.__file__).resolve().parents[2]
    code = ("import json, sys; sys.path[:0] = [sys.argv[1]]; import nodeagent.cni.plugin; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(root)], capture_output=True, text=True, check=True,
                         cwd="/")
    assert not set(json.loads(out.stdout)) & {"mesh", "trio", "yaml", "grpc", "google", "cryptography", "bpf"}
