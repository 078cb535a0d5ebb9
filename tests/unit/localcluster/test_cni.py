"""The local cluster's CNI runtime against fake plugins: small executables that record what they were given
(their CNI_* environment and the configuration on stdin) and answer in the CNI result format.

A fake adds an interface named after itself to `prevResult` (or starts a result), and fails a command when
its configuration says so (`"fail": {"ADD": {"code": 11, "msg": ...}}`, or `"garble"` for an answer that is
not JSON)."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from localcluster import cni
from localcluster.cni import Attachment, CniError, Conflist, Runtime

FAKE = f"""#!{sys.executable}
import json, os, sys, time
conf = json.load(sys.stdin)
me = os.path.basename(sys.argv[0])
command = os.environ["CNI_COMMAND"]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{"plugin": me, "env": {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}},
                          "conf": conf}}) + "\\n")
time.sleep(conf.get("sleep", {{}}).get(command, 0))
fail = conf.get("fail", {{}}).get(command)
if fail == "garble":
    print("panic: runtime error", file=sys.stderr)
    sys.exit(2)
if fail:
    print(json.dumps({{"cniVersion": conf["cniVersion"], **fail}}))
    sys.exit(1)
if command == "ADD":
    result = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "interfaces": [], "ips": []}}
    result["interfaces"].append({{"name": me, "sandbox": os.environ["CNI_NETNS"]}})
    if "ip" in conf:
        result["ips"].append({{"interface": len(result["interfaces"]) - 1, "address": conf["ip"]}})
    print(json.dumps(result))
"""

ATT = Attachment("c0ffee", "/run/netns/pod-a", "eth0", (("IgnoreUnknown", "1"), ("K8S_POD_NAME", "web"), ("IP", "10.1.0.5")))


@pytest.fixture
def bins(tmp_path: Path) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    for name in ("first", "second", "third"):
        path = directory / name
        path.write_text(FAKE)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return directory


@pytest.fixture
def runtime(tmp_path: Path, bins: Path) -> Runtime:
    return Runtime((tmp_path / "empty", bins), tmp_path / "cache", env={"FAKE_LOG": str(tmp_path / "log"), "PATH": "/usr/bin:/bin"})


def calls(tmp_path: Path) -> list[dict[str, Any]]:
    log = tmp_path / "log"
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return entries


def network(*plugins: dict[str, Any]) -> Conflist:
    return Conflist.parse({"cniVersion": "1.0.0", "name": "pods", "plugins": list(plugins)})


NET = network({"type": "first", "ip": "10.1.0.5/24"}, {"type": "second"}, {"type": "third", "key": 1})


def test_add_runs_the_plugins_in_order_each_with_the_previous_result(runtime: Runtime, tmp_path: Path) -> None:
    result = runtime.add(NET, ATT)
    seen = calls(tmp_path)
    assert [c["plugin"] for c in seen] == ["first", "second", "third"]
    for c in seen:
        assert c["env"] == {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/run/netns/pod-a",
                            "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web;IP=10.1.0.5",
                            "CNI_PATH": f"{tmp_path / 'empty'}:{tmp_path / 'bin'}"}
        # The list's version and name, the plugin's own keys.
        assert (c["conf"]["cniVersion"], c["conf"]["name"]) == ("1.0.0", "pods")
    assert "prevResult" not in seen[0]["conf"]
    assert [i["name"] for i in seen[1]["conf"]["prevResult"]["interfaces"]] == ["first"]
    assert [i["name"] for i in seen[2]["conf"]["prevResult"]["interfaces"]] == ["first", "second"]
    assert seen[2]["conf"]["key"] == 1
    # The last plugin's result is the ADD's, and it is cached with the configuration and arguments.
    assert [i["name"] for i in result["interfaces"]] == ["first", "second", "third"]
    assert result["ips"] == [{"interface": 0, "address": "10.1.0.5/24"}]
    (entry,) = runtime.attachments()
    assert (entry.attachment, entry.result, entry.network) == (ATT, result, NET)
    cache = json.loads(entry.path.read_text())
    assert cache["kind"] == "cniCacheV1" and cache["containerId"] == "c0ffee" and cache["networkName"] == "pods"


def test_del_runs_in_reverse_with_the_cached_result_and_again_without_error(runtime: Runtime, tmp_path: Path) -> None:
    result = runtime.add(NET, ATT)
    calls(tmp_path)
    runtime.delete(NET, ATT)
    seen = calls(tmp_path)
    assert [c["plugin"] for c in seen] == ["third", "second", "first"]
    assert all(c["env"]["CNI_COMMAND"] == "DEL" and c["conf"]["prevResult"] == result for c in seen)
    assert runtime.attachments() == []
    # Idempotent: a second DEL runs the plugins again (they clean what they find) with nothing cached.
    runtime.delete(NET, ATT)
    seen = calls(tmp_path)
    assert [c["plugin"] for c in seen] == ["third", "second", "first"]
    assert all("prevResult" not in c["conf"] for c in seen)


def test_del_removes_what_was_added_even_if_the_configuration_changed_since(runtime: Runtime, tmp_path: Path) -> None:
    runtime.add(NET, ATT)
    calls(tmp_path)
    runtime.delete(network({"type": "first"}), ATT)
    assert [c["plugin"] for c in calls(tmp_path)] == ["third", "second", "first"]


def test_an_error_result_is_surfaced_with_the_plugins_message_and_the_add_undone(runtime: Runtime, tmp_path: Path) -> None:
    net = network({"type": "first"}, {"type": "second", "fail": {"ADD": {
        "code": 11, "msg": "the node agent is not reachable at /x/cni.sock", "details": "is it running?"}}},
        {"type": "third"})
    with pytest.raises(CniError) as caught:
        runtime.add(net, ATT)
    err = caught.value
    assert (err.plugin, err.command, err.code) == ("second", "ADD", 11)
    assert err.msg == "the node agent is not reachable at /x/cni.sock" and err.details == "is it running?"
    assert str(err) == ("plugin second failed ADD (error 11): the node agent is not reachable at /x/cni.sock; "
                        "is it running?")
    # ADD stopped at the failing plugin, then the whole list was deleted in reverse; nothing stays cached.
    assert [(c["plugin"], c["env"]["CNI_COMMAND"]) for c in calls(tmp_path)] == [
        ("first", "ADD"), ("second", "ADD"), ("third", "DEL"), ("second", "DEL"), ("first", "DEL")]
    assert runtime.attachments() == []


def test_an_answer_that_is_not_a_result_says_what_the_plugin_said(runtime: Runtime) -> None:
    with pytest.raises(CniError, match="plugin first failed ADD without an error result: panic: runtime error"):
        runtime.add(network({"type": "first", "fail": {"ADD": "garble"}}), ATT)


def test_every_del_is_tried_and_the_first_error_raised(runtime: Runtime, tmp_path: Path) -> None:
    net = network({"type": "first", "fail": {"DEL": {"code": 5, "msg": "first"}}}, {"type": "second"},
                  {"type": "third", "fail": {"DEL": {"code": 5, "msg": "third"}}})
    runtime.add(net, ATT)
    calls(tmp_path)
    with pytest.raises(CniError, match="plugin third failed DEL"):
        runtime.delete(net, ATT)
    assert [c["plugin"] for c in calls(tmp_path)] == ["third", "second", "first"]
    assert len(runtime.attachments()) == 1  # kept for a later DEL


def test_a_plugin_not_on_the_path_is_named(runtime: Runtime, tmp_path: Path) -> None:
    with pytest.raises(CniError, match=r"CNI plugin 'bridge' is not in .*: run `make setup`"):
        runtime.add(network({"type": "first"}, {"type": "bridge"}), ATT)
    assert [(c["plugin"], c["env"]["CNI_COMMAND"]) for c in calls(tmp_path)] == [("first", "ADD"), ("first", "DEL")]


def test_a_plugin_that_hangs_is_stopped(tmp_path: Path, bins: Path) -> None:
    runtime = Runtime((bins,), tmp_path / "cache", env={"FAKE_LOG": str(tmp_path / "log")}, timeout=0.5)
    with pytest.raises(CniError, match="plugin first did not finish ADD within 0.5s"):
        runtime.add(network({"type": "first", "sleep": {"ADD": 30}}), ATT)


def test_add_again_answers_the_cached_result_and_check_runs_in_order(runtime: Runtime, tmp_path: Path) -> None:
    result = runtime.add(NET, ATT)
    calls(tmp_path)
    assert runtime.add(NET, ATT) == result and calls(tmp_path) == []
    runtime.check(NET, ATT)
    seen = calls(tmp_path)
    assert [c["plugin"] for c in seen] == ["first", "second", "third"]
    assert all(c["env"]["CNI_COMMAND"] == "CHECK" and c["conf"]["prevResult"] == result for c in seen)
    with pytest.raises(CniError, match="never added"):
        runtime.check(NET, Attachment("other", "/run/netns/pod-b"))


def test_an_add_that_never_finished_is_deleted_before_it_is_made_again(runtime: Runtime, tmp_path: Path) -> None:
    runtime._save(NET, ATT, None)  # what a runtime that died during ADD leaves
    (entry,) = runtime.attachments()
    assert entry.result is None
    runtime.add(NET, ATT)
    assert [(c["plugin"], c["env"]["CNI_COMMAND"]) for c in calls(tmp_path)] == [
        ("third", "DEL"), ("second", "DEL"), ("first", "DEL"), ("first", "ADD"), ("second", "ADD"), ("third", "ADD")]


@pytest.mark.parametrize("data, message", [
    ([], "is not a JSON object"),
    ({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}, "has no name"),
    ({"name": "n", "plugins": [{"type": "x"}]}, "has no cniVersion"),
    ({"name": "n", "cniVersion": "1.0.0", "plugins": []}, "plugins must be a non-empty list"),
    ({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "../../bin/sh"}]}, r"plugins\[0\] needs a type"),
])
def test_bad_configuration_lists_are_refused(data: Any, message: str) -> None:
    with pytest.raises(CniError, match=message):
        Conflist.parse(data)


def test_plugin_config_and_output_are_pure() -> None:
    conf = cni.plugin_config(NET, {"type": "x", "prevResult": {"stale": True}, "cniVersion": "0.3.1"}, None)
    assert conf == {"type": "x", "cniVersion": "1.0.0", "name": "pods"}
    assert cni.read_output("x", "DEL", 0, b"", b"") is None
    assert cni.read_output("x", "ADD", 0, b'{"cniVersion": "1.0.0"}', b"") == {"cniVersion": "1.0.0"}
    with pytest.raises(CniError, match="without a result"):
        cni.read_output("x", "ADD", 0, b"{}", b"")
    with pytest.raises(CniError) as caught:
        cni.read_output("x", "ADD", 1, b'{"code": 7, "msg": "bad config"}', b"")
    assert (caught.value.code, caught.value.msg, str(caught.value)) == (7, "bad config", "plugin x failed ADD (error 7): bad config")


def test_missing_names_plugins_and_ipam_plugins_not_on_the_path(bins: Path) -> None:
    net = network({"type": "first", "ipam": {"type": "host-local"}}, {"type": "loopback"}, {"type": "second"})
    assert cni.missing(net, (bins,)) == ["loopback", "host-local"]
