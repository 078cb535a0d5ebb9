"""The per-pod DNS capture opt-out, Istio's `ambient.istio.io/dns-capture` pod annotation, along the path
the pod takes: the runtime gives the pod's annotations to the plugins that declare the capability (the
local cluster's CNI runtime, as containerd), the plugin forwards the one the agent acts on, the pod source
makes it the pod's `dns_capture`, and each redirector captures the pod's DNS or not.

The iptables case runs for real: the plugin as a process, the agent's handover server, pod source and
enroller, and the iptables redirector in real network namespaces (root).  The eBPF redirector is checked
around a stand-in for the loader, as its other unit tests are (the loader writes the flag into the pod's
settings map; it runs for real in the integration tests)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from test_cni_plugin import Handle, cni_env, config, plugin
from test_redirect_ebpf import StandIn

from localcluster import cni, network
from mesh.identity import SpiffeId
from mesh.proto import discovery_pb2 as pb
from nodeagent.cni import protocol, spec
from nodeagent.cni.protocol import (
    DNS_CAPTURE_ANNOTATION,
    RUNTIME_ANNOTATIONS,
    PodInfo,
    ProtocolError,
    Request,
)
from nodeagent.enroll import Enroller
from nodeagent.pods.cni import CniPodSource, dns_capture_of
from nodeagent.pods.handover import HandoverServer
from nodeagent.pods.source import PodRef
from nodeagent.redirect.ebpf import EbpfRedirector
from nodeagent.redirect.iptables import IptablesRedirector
from nodeagent.state import WORKLOAD, MeshState

pytestmark = pytest.mark.timeout(60)
NODE = "node-1"
OFF = {DNS_CAPTURE_ANNOTATION: "false"}


# ---- the annotation, as the agent reads it -------------------------------------------------------------


@pytest.mark.parametrize(("value", "captured"), [
    (None, None), ("false", False), ("False", False), ("true", True), (" TRUE ", True), ("off", None), ("", None),
])
def test_the_annotation_is_true_false_or_the_agents_default(value: str | None, captured: bool | None) -> None:
    info = PodInfo("shop", "web", annotations=() if value is None else ((DNS_CAPTURE_ANNOTATION, value),))
    found, problem = dns_capture_of(info)
    assert found is captured
    assert (problem != "") is (value is not None and captured is None)
    if problem:
        assert problem.startswith(f"pod shop/web: annotation {DNS_CAPTURE_ANNOTATION}={value!r} is neither")
    ref = PodRef("u", "shop", "web", "10.0.0.1", SpiffeId("cluster.local", "shop", "web"), "/x", dns_capture=found)
    assert ref.captures_dns(True) is (captured is not False)
    assert ref.captures_dns(False) is False  # no DNS proxy on the agent: nothing to send the queries to


def test_the_handover_message_carries_only_the_annotations_the_agent_acts_on() -> None:
    annotations = {**OFF, "kubectl.kubernetes.io/last-applied-configuration": "{...}"}
    info = PodInfo("shop", "web", uid="u1", annotations=protocol.forwarded(annotations))
    assert info.annotations == ((DNS_CAPTURE_ANNOTATION, "false"),)
    decoded = Request.decode(Request(protocol.ADD, info).encode()).pod
    assert decoded == info and decoded.annotation(DNS_CAPTURE_ANNOTATION) == "false"
    old = json.loads(Request(protocol.ADD, PodInfo("shop", "web")).encode())
    del old["pod"]["annotations"]  # a plugin of the release before: no annotations, the agent's default
    assert Request.decode(json.dumps(old).encode()).pod.annotations == ()
    for bad in ([DNS_CAPTURE_ANNOTATION], {DNS_CAPTURE_ANNOTATION: False}):
        msg = {**old, "pod": {**old["pod"], "annotations": bad}}
        with pytest.raises(ProtocolError, match="pod.annotations: expected an object of strings"):
            Request.decode(json.dumps(msg).encode())


def chained(**extra: Any) -> bytes:
    return json.dumps({**config("/x"), **extra}).encode()


def test_the_plugin_reads_the_annotations_from_the_runtime_config() -> None:
    conf = spec.read_config(chained(runtimeConfig={RUNTIME_ANNOTATIONS: {**OFF, "other": "x"}}), "ADD")
    assert conf.annotations == {**OFF, "other": "x"}
    assert spec.read_config(chained(), "ADD").annotations == {}
    for runtime, says in (("yes", "runtimeConfig must be an object"),
                          ({RUNTIME_ANNOTATIONS: {DNS_CAPTURE_ANNOTATION: False}},
                           f"runtimeConfig.{RUNTIME_ANNOTATIONS} must be an object of strings")):
        with pytest.raises(spec.CniError, match=says) as caught:
            spec.read_config(chained(runtimeConfig=runtime), "ADD")
        assert caught.value.code == spec.INVALID_CONFIG


# ---- the local cluster's runtime gives them as containerd does -------------------------------------------


RECORDER = f"""#!{sys.executable}
import json, os, sys
conf = json.load(sys.stdin)
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(conf) + "\\n")
result = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "interfaces": [], "ips": []}}
print(json.dumps(result))
"""


def test_the_runtime_gives_the_annotations_only_to_plugins_that_declare_the_capability(tmp_path: Path) -> None:
    bins = tmp_path / "bin"
    bins.mkdir()
    for name in ("plain", "asks"):
        (bins / name).write_text(RECORDER)
        (bins / name).chmod((bins / name).stat().st_mode | stat.S_IXUSR)
    runtime = cni.Runtime((bins,), tmp_path / "cache", env={"FAKE_LOG": str(tmp_path / "log"), "PATH": "/usr/bin:/bin"})
    net = cni.Conflist.parse({"cniVersion": "1.0.0", "name": "pods", "plugins": [
        {"type": "plain", "capabilities": {RUNTIME_ANNOTATIONS: False}},
        {"type": "asks", "capabilities": {RUNTIME_ANNOTATIONS: True}, "runtimeConfig": {"stale": 1}}]})
    att = cni.Attachment("c1", "/run/netns/pod-a", capabilities={RUNTIME_ANNOTATIONS: OFF})
    runtime.add(net, att)
    plain, asks = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert "runtimeConfig" not in plain
    assert asks["runtimeConfig"] == {RUNTIME_ANNOTATIONS: OFF}  # the runtime's, not what the file said
    (tmp_path / "log").unlink()
    cached = runtime.cached("pods", att)
    assert cached is not None and dict(cached.attachment.capabilities) == {RUNTIME_ANNOTATIONS: OFF}
    runtime.delete(net, att)  # DEL, in reverse order, with the same runtimeConfig
    asks, plain = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    assert asks["runtimeConfig"] == {RUNTIME_ANNOTATIONS: OFF} and "runtimeConfig" not in plain


def test_a_local_cluster_pod_offers_its_annotations(tmp_path: Path) -> None:
    from localcluster import plan as cluster_plan
    from localcluster import spec as cluster_spec

    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("""\
apiVersion: mesh.local/v1alpha1
kind: Cluster
metadata: {name: gap}
spec:
  nodes: [{name: node-1, podCIDR: 10.244.1.0/24}]
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, annotations: {ambient.istio.io/dns-capture: "false"}}
spec: {nodeName: node-1, containers: [{name: web, command: [sleep, "1"]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop}
spec: {nodeName: node-1, containers: [{name: db, command: [sleep, "1"]}]}
""")
    s = cluster_spec.load(cluster)
    p = cluster_plan.make_plan(s)
    web, db = p.pod("shop", "web"), p.pod("shop", "db")
    assert web is not None and db is not None
    assert dict(network.pod_attachment(web, "c1").capabilities) == {RUNTIME_ANNOTATIONS: OFF}
    assert dict(network.pod_attachment(db, "c2").capabilities) == {RUNTIME_ANNOTATIONS: {}}


# ---- the eBPF redirector: the pod's flag into the loader -------------------------------------------------


def test_ebpf_writes_each_pods_own_dns_setting() -> None:
    seen: list[bool] = []

    class Recording(StandIn):
        def attach_pod(self, *args: Any, dns_capture: bool = False, **kwargs: Any) -> Any:
            seen.append(dns_capture)
            return super().attach_pod(*args, dns_capture=dns_capture, **kwargs)

    with socket.socket() as inbound:
        for agent_default, pod_says in ((True, None), (True, False), (True, True), (False, True), (False, None)):
            pod = PodRef("u", "shop", "web", "10.244.1.5", SpiffeId("cluster.local", "shop", "web"), "/run/netns/x",
                         "/sys/fs/cgroup/unified/x", dns_capture=pod_says)
            EbpfRedirector(Recording(), dns_capture=agent_default).install(pod, {15006: inbound})  # type: ignore[arg-type]
    assert seen == [True, False, True, False, False]


# ---- iptables, for real: plugin -> agent -> rules in the pod's namespace -----------------------------------


@pytest.fixture
def namespaces() -> Any:
    if os.geteuid() != 0:
        pytest.skip("needs root to make network namespaces and iptables rules in them")
    names = [f"amb.gaptest.dns.{secrets.token_hex(3)}.{n}" for n in ("web", "quiet")]
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


def saved(name: str) -> str:
    return subprocess.run(["ip", "netns", "exec", name, "iptables-save"], check=True, capture_output=True,
                          text=True).stdout


def test_iptables_captures_dns_except_for_the_pod_that_opts_out(tmp_path: Path, namespaces: list[str],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    web_ns, quiet_ns = namespaces
    state = MeshState()
    state.apply(WORKLOAD, {f"uid-{n}": pb.Workload(uid=f"uid-{n}", name=n, namespace="shop", node=NODE,
                                                    service_account=n, tunnel_protocol=pb.HBONE)
                           for n in ("web", "quiet", "odd")}, ())
    pods = CniPodSource(state, NODE, state_dir=tmp_path / "state", netns_dirs=(), proc=str(tmp_path / "no-proc"))
    redirector = IptablesRedirector(dns_capture=True)
    events: list[str] = []

    async def start_pod(ref: PodRef) -> Handle:
        return Handle(ref.name, events)

    enroller = Enroller(pods, redirector, start_pod, resync_interval=60)
    path = tmp_path / "run" / "cni.sock"
    ran: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(enroller.run)
            await nursery.start(HandoverServer(str(path), pods, enroller, prune_interval=0.05).serve)
            for name, ns, annotations in (("web", web_ns, {}), ("quiet", quiet_ns, OFF)):
                conf = config(path, runtimeConfig={RUNTIME_ANNOTATIONS: annotations})
                ran[name] = await plugin(cni_env("ADD", pod=name, netns=f"/run/netns/{ns}"), conf)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        assert ran["web"].code == 0 and ran["quiet"].code == 0, ran
        web, quiet = saved(web_ns), saved(quiet_ns)
        assert "--dport 53" in web and "REDIRECT --to-ports 15053" in web
        assert "--dport 53" not in quiet and "REDIRECT --to-ports 15001" in quiet  # TCP still captured
        refs = {r.name: r for r in pods.on_node()}
        assert (refs["web"].dns_capture, refs["quiet"].dns_capture) == (None, False)
        # What the next agent finds: each pod's capture is exactly ours as that pod asked for it.
        assert redirector.verify(refs["web"]).exact and redirector.verify(refs["quiet"]).exact
        flipped = PodRef(**{**refs["quiet"].__dict__, "dns_capture": None})
        assert not redirector.verify(flipped).exact  # the other way round it would be redone
        # The record keeps the annotation for the agent's restart.
        record = json.loads((tmp_path / "state" / "cni" / "pods.json").read_text())
        assert {e["pod"]["name"]: e["pod"]["annotations"] for e in record} == {"web": {}, "quiet": OFF}
    finally:
        for ref in pods.on_node():
            redirector.remove(ref)
        pods.close()


def test_a_bad_value_is_logged_once_and_the_agents_default_applies(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    state = MeshState()
    state.apply(WORKLOAD, {"uid-odd": pb.Workload(uid="uid-odd", name="odd", namespace="shop", node=NODE,
                                                  service_account="odd", tunnel_protocol=pb.HBONE)}, ())
    pods = CniPodSource(state, NODE, state_dir=None, netns_dirs=(), proc=str(tmp_path / "no-proc"))
    info = PodInfo("shop", "odd", uid="uid-odd", ips=("10.244.1.9",),
                   annotations=((DNS_CAPTURE_ANNOTATION, "sometimes"),))
    try:
        with caplog.at_level(logging.WARNING, logger="nodeagent.pods.cni"):
            pods.hand_over(info, os.open("/proc/self/ns/net", os.O_RDONLY))
            assert pods.desired()["uid-odd"].dns_capture is None
            pods.desired()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [f"pod shop/odd: annotation {DNS_CAPTURE_ANNOTATION}='sometimes' is neither \"true\" nor "
                            "\"false\"; the agent's default DNS capture applies"]
    finally:
        pods.close()
