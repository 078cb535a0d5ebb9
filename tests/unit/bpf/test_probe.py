"""What the loader says when this machine cannot do eBPF redirection, and the input it refuses,
before anything reaches the kernel."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bpf import compiler
from bpf import loader as loader_module
from bpf.errors import IPTABLES_HINT, EbpfUnavailable, PodTargetError
from bpf.loader import Loader
from bpf.pods import Settings


@pytest.fixture
def cgroup2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader_module, "cgroup2_mounted", lambda: True)


@pytest.mark.usefixtures("cgroup2")
def test_a_missing_pin_directory_is_named_and_iptables_suggested(tmp_path: Path) -> None:
    with pytest.raises(EbpfUnavailable, match="does-not-exist does not exist") as err:
        Loader(bpffs=tmp_path / "does-not-exist").probe()
    assert IPTABLES_HINT in str(err.value)


@pytest.mark.usefixtures("cgroup2")
def test_no_bpf_file_system_without_permission_to_mount_one(tmp_path: Path) -> None:
    with pytest.raises(EbpfUnavailable, match=f"no BPF file system is mounted at {tmp_path}"):
        Loader(bpffs=tmp_path, mount_bpffs=False).probe()


def test_no_cgroup_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader_module, "cgroup2_mounted", lambda: False)
    with pytest.raises(EbpfUnavailable, match="no cgroup v2 file system is mounted"):
        Loader(bpffs=tmp_path).probe()


def test_no_bcc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bcc", None)
    with pytest.raises(EbpfUnavailable, match="python3-bpfcc"):
        compiler._bcc()


@pytest.mark.parametrize("prefix", ["", "a/b", "with.dot"])
def test_a_prefix_must_be_one_plain_directory_name(prefix: str) -> None:
    with pytest.raises(ValueError, match="bad pin prefix"):
        Loader(prefix=prefix)


def test_settings_are_checked_before_anything_is_touched() -> None:
    assert Settings.of("10.0.0.1", [8081, 8081, 9000]).skip_ports == (8081, 9000)
    assert Settings.of(None, []).pod_ip4 == 0
    with pytest.raises(PodTargetError, match="not an IPv4 address"):
        Settings.of("10.0.0", [])
    with pytest.raises(PodTargetError, match="ports to skip"):
        Settings.of(None, [70000])
    with pytest.raises(PodTargetError, match="ports to skip"):
        Settings.of(None, range(1, 100))
