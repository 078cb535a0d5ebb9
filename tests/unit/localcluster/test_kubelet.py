"""The kubelet's part: a container's env (values, $(VAR), fieldRef), command line, paths under volumes and
readiness probe, as Kubernetes reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from localcluster.kubelet import HostDir, HostFiles, Mounts, PodFields, Probe, container_run, expand
from localcluster.manifests import Manifest, ManifestError

POD = PodFields(name="agent-node-1", namespace="mesh", node="node-1", ip="10.0.0.5", host_ip="10.0.0.1",
                service_account="agent", uid="u-1", labels={"app": "agent"})
HERE = Path("/cluster")


def workload(container: dict, volumes: list | None = None, init: list | None = None) -> Manifest:
    spec: dict = {"containers": [container], "volumes": volumes or []}
    if init:
        spec["initContainers"] = init
    body = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent", "namespace": "mesh"},
            "spec": {"template": {"spec": spec}}}
    return Manifest(body, Path("/base/agent.yaml"), 1)


def run(container: dict, volumes: list | None = None, mounts: Mounts | None = None, **kw):  # type: ignore[no-untyped-def]
    return container_run(workload(container, volumes), container["name"], POD,
                         mounts or Mounts({}, HERE / "pods" / POD.name), **kw)


@pytest.mark.parametrize("text, expected", [
    ("--node=$(NODE)", "--node=node-1"),
    ("$(NODE)$(NODE)", "node-1node-1"),
    ("$$(NODE)", "$(NODE)"),  # escaped
    ("$$$(NODE)", "$node-1"),
    ("$(MISSING)", "$(MISSING)"),  # left as written
    ("$(NODE", "$(NODE"),  # unterminated
    ("cost: $5", "cost: $5"),
    ("ends with $", "ends with $"),
    ("$()", "$()"),
])
def test_expand_as_kubernetes_does(text: str, expected: str) -> None:
    assert expand(text, {"NODE": "node-1"}) == expected


def test_env_values_field_refs_and_args() -> None:
    c = {"name": "main", "command": ["python", "-m", "agent"],
         "args": ["--node", "$(NODE_NAME)", "--id", "$(POD_NAMESPACE)/$(POD_NAME)", "--ip=$(POD_IP)", "--n", 3,
                  "--mode", "$(MODE)", "--literal", "$$(NODE_NAME)"],
         "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                 {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                 {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                 {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
                 {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                 {"name": "GREETING", "value": "on $(NODE_NAME) before $(LATER)"},
                 {"name": "LATER", "value": "x"},
                 {"name": "MODE", "value": "iptables"}]}
    r = run(c, env_overrides={"MODE": "ebpf", "EXTRA": "1"}, executables={"python": "/venv/bin/python"})
    assert r.argv == ("/venv/bin/python", "-m", "agent", "--node", "node-1", "--id", "mesh/agent-node-1",
                      "--ip=10.0.0.5", "--n", "3", "--mode", "ebpf", "--literal", "$(NODE_NAME)")
    # A value sees only the variables defined before it, as in Kubernetes.
    assert dict(r.env) == {"NODE_NAME": "node-1", "POD_NAME": "agent-node-1", "POD_NAMESPACE": "mesh",
                           "POD_IP": "10.0.0.5", "APP": "agent", "GREETING": "on node-1 before $(LATER)",
                           "LATER": "x", "MODE": "ebpf", "EXTRA": "1"}
    assert r.readiness is None


def test_the_machines_executable_is_not_taken_for_a_path_under_a_volume() -> None:
    """A virtual environment under /tmp, with an emptyDir at the container's /tmp: the interpreter is the
    host's path, while the arguments under /tmp are the volume's."""
    c = {"name": "main", "command": ["python", "-m", "agent"], "args": ["--scratch", "/tmp/x"],
         "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    r = run(c, [{"name": "tmp", "emptyDir": {}}], executables={"python": "/tmp/clone/.venv/bin/python"})
    assert r.argv == ("/tmp/clone/.venv/bin/python", "-m", "agent", "--scratch", str(HERE / "pods" / POD.name / "tmp" / "x"))


@pytest.mark.parametrize("env, message", [
    ([{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.hostname"}}}],
     r"env X: fieldRef 'spec.hostname' is not one the local cluster provides"),
    ([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
     r"env X: valueFrom secretKeyRef is not provided by the local cluster"),
    ([{"value": "nameless"}], r"env: every entry needs a name"),
])
def test_env_the_local_cluster_cannot_give_is_refused(env: list, message: str) -> None:
    with pytest.raises(ManifestError, match=r"/base/agent.yaml: document 1 \(DaemonSet mesh/agent\): "
                                            r"container main: " + message):
        run({"name": "main", "command": ["x"], "env": env})


def test_no_command_is_refused() -> None:
    with pytest.raises(ManifestError, match=r"container main: no command"):
        run({"name": "main", "args": ["--x"]})


def test_paths_under_volumes_are_the_hosts() -> None:
    c = {"name": "main", "command": ["agent"],
         "args": ["--state", "/var/run/ambient/agent", "--token=/var/run/secrets/tokens/istio-token",
                  "--root", "/var/run/secrets/istio/root-cert.pem", "--bpf", "/sys/fs/bpf", "--scratch", "/tmp/x",
                  "--config", "/etc/agent/conf.yaml", "--relative", "var/run/ambient", "--other", "/var/run/ambientx"],
         "env": [{"name": "SOCKET", "value": "/var/run/ambient/cni.sock"}],
         "volumeMounts": [{"name": "ambient", "mountPath": "/var/run/ambient"},
                          {"name": "token", "mountPath": "/var/run/secrets/tokens"},
                          {"name": "ca", "mountPath": "/var/run/secrets/istio"},
                          {"name": "bpf", "mountPath": "/sys/fs/bpf"},
                          {"name": "tmp", "mountPath": "/tmp"},
                          {"name": "conf", "mountPath": "/etc/agent/conf.yaml", "subPath": "agent.yaml"}]}
    volumes = [{"name": "ambient", "hostPath": {"path": "/var/run/ambient", "type": "DirectoryOrCreate"}},
               {"name": "token", "projected": {"sources": [{"serviceAccountToken": {"path": "istio-token"}}]}},
               {"name": "ca", "configMap": {"name": "istio-ca-root-cert"}},
               {"name": "bpf", "hostPath": {"path": "/sys/fs/bpf", "type": "Directory"}},
               {"name": "tmp", "emptyDir": {}},
               {"name": "conf", "configMap": {"name": "agent"}}]
    mounts = Mounts({"ambient": HostDir(HERE / "nodes/node-1", create=True),
                     "token": HostFiles({"istio-token": HERE / "nodes/node-1/token"}),
                     "ca": HostFiles({"root-cert.pem": HERE / "ca/root-cert.pem"}),
                     "conf": HostFiles({"agent.yaml": HERE / "agent.yaml"})}, HERE / "pods/p")
    r = run(c, volumes, mounts)
    assert r.argv[1:] == ("--state", "/cluster/nodes/node-1/agent", "--token=/cluster/nodes/node-1/token",
                          "--root", "/cluster/ca/root-cert.pem", "--bpf", "/sys/fs/bpf", "--scratch",
                          "/cluster/pods/p/tmp/x", "--config", "/cluster/agent.yaml", "--relative", "var/run/ambient",
                          "--other", "/var/run/ambientx")
    assert dict(r.env) == {"SOCKET": "/cluster/nodes/node-1/cni.sock"}
    # The local cluster makes its own directories, never the host's.
    assert set(r.make_dirs) == {HERE / "pods/p/tmp", HERE / "nodes/node-1"}


def test_file_not_in_a_files_volume_is_refused() -> None:
    c = {"name": "main", "command": ["agent"], "args": ["--token", "/tokens/other"],
         "volumeMounts": [{"name": "token", "mountPath": "/tokens"}]}
    volumes = [{"name": "token", "projected": {"sources": []}}]
    with pytest.raises(ManifestError, match=r"/tokens/other is not provided here: the volume at /tokens holds "
                                            r"istio-token"):
        run(c, volumes, Mounts({"token": HostFiles({"istio-token": HERE / "t"})}, HERE))


def test_volume_without_a_place_is_refused() -> None:
    c = {"name": "main", "command": ["agent"], "volumeMounts": [{"name": "creds", "mountPath": "/creds"}]}
    with pytest.raises(ManifestError, match=r"volume creds \(secret\) has no place in the local cluster"):
        run(c, [{"name": "creds", "secret": {"secretName": "s"}}])


def test_readiness_probe_with_a_named_port() -> None:
    c = {"name": "main", "command": ["agent"], "ports": [{"name": "http-ready", "containerPort": 15021}],
         "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": "http-ready"}, "periodSeconds": 5,
                            "timeoutSeconds": 2}}
    assert run(c).readiness == Probe("http", 15021, "/healthz/ready", "", period=5, timeout=2, failure_threshold=3)
    c["readinessProbe"] = {"tcpSocket": {"port": 80}}
    assert run(c).readiness == Probe("tcp", 80, "", "", period=10, timeout=1, failure_threshold=3)
    c["readinessProbe"] = {"exec": {"command": ["true"]}}
    with pytest.raises(ManifestError, match="only httpGet and tcpSocket probes"):
        run(c)


def test_init_containers_must_be_known_to_be_skipped() -> None:
    w = workload({"name": "main", "command": ["agent"]}, init=[{"name": "install", "command": ["i"]}])
    assert container_run(w, "main", POD, Mounts({}, HERE), skip_init={"install"}).argv == ("agent",)
    with pytest.raises(ManifestError, match="init container 'install' is not one the local cluster knows to skip"):
        container_run(w, "main", POD, Mounts({}, HERE))
