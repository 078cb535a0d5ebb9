"""daemonset/ renders offline, every object is valid for Kubernetes, the node agent DaemonSet has
ztunnel's shape, and the commands the manifests run parse with the processes' own flags."""

from __future__ import annotations

import pathlib
import tomllib
from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest
import yaml

import controlplane.main
import nodeagent.main
import waypoint.main
from mesh import defaults
from mesh.api.kinds_gateway import GATEWAY_NAME_LABEL, is_waypoint
from mesh.api.validate import check_document
from tests.unit.daemonset.manifests import (
    DAEMONSET,
    ROOT,
    WAYPOINT,
    Obj,
    argv,
    container,
    flag,
    gen_crds,
    one,
    provided_files,
)

# The newest Kubernetes whose schemas kubernetes-validate ships, and an older one still in support.
K8S_VERSIONS = (kubernetes_validate.latest_version(), "1.30")
IMAGE = "ghcr.io/ambient-mesh/ambient-mesh"
CONTROL_PLANE_SERVICE = "istiod"

# Flags the manifests pass that the processes do not have yet (another change adds them); until then the
# command line is checked without them.
PENDING_FLAGS = {"controlplane.main": {"--config-source": 1}}


def test_base_holds_the_mesh(base: list[Obj]) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in base if o["kind"] != "CustomResourceDefinition"}
    assert kinds == {
        ("Namespace", "istio-system"),
        ("ServiceAccount", "istiod"),
        ("ClusterRole", "ambient-istiod"),
        ("ClusterRoleBinding", "ambient-istiod"),
        ("Service", "istiod"),
        ("Deployment", "istiod"),
        ("ServiceAccount", "ambient-nodeagent"),
        ("DaemonSet", "ambient-nodeagent"),
        ("ValidatingWebhookConfiguration", "ambient-istiod-validator"),
    }
    crds = sorted((o for o in base if o["kind"] == "CustomResourceDefinition"), key=lambda o: o["metadata"]["name"])
    assert [o["metadata"]["name"] for o in crds] == sorted(f"{gen_crds().plural(k.kind)}.{k.group}"
                                                           for k in gen_crds().istio_kinds())
    assert crds == sorted(yaml.safe_load_all((DAEMONSET / "crds.yaml").read_text()), key=lambda o: o["metadata"]["name"])
    for o in base:
        if o["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                             "ValidatingWebhookConfiguration"):
            assert o["metadata"]["namespace"] == "istio-system", o["metadata"]["name"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid_kubernetes(base: list[Obj], waypoint_example: list[Obj], version: str) -> None:
    for o in base + waypoint_example:
        where = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "Gateway":  # the Gateway API's own CRD: checked with the mesh's validator
            assert check_document(o)[1] == [], where
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} is not valid for Kubernetes {version}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_one_image_tagged_with_the_project_version(base: list[Obj], waypoint_example: list[Obj]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for directory in (DAEMONSET, WAYPOINT):
        images = yaml.safe_load((directory / "kustomization.yaml").read_text())["images"]
        assert images == [{"name": IMAGE, "newTag": version}]
    for o in base + waypoint_example:
        if o["kind"] in ("Deployment", "DaemonSet"):
            for c in o["spec"]["template"]["spec"]["containers"]:
                assert c["image"] == f"{IMAGE}:{version}"


# ---- the node agent -------------------------------------------------------------------------------------


def test_node_agent_has_ztunnels_shape(base: list[Obj]) -> None:
    ds = one(base, "DaemonSet", "ambient-nodeagent")
    pod = ds["spec"]["template"]["spec"]
    c = container(ds, "nodeagent")
    assert not pod.get("hostNetwork", False)
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]  # every taint
    assert pod["terminationGracePeriodSeconds"] > 0
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}

    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["runAsUser"] == 0
    assert sorted(sc["capabilities"]["add"]) == ["BPF", "NET_ADMIN", "NET_RAW", "SETUID", "SYS_ADMIN"]
    drain = float(c["args"][c["args"].index("--drain-seconds") + 1])  # the old agent exits before it is killed
    assert 0 < drain < pod["terminationGracePeriodSeconds"]
    assert sc["capabilities"]["drop"] == ["ALL"]

    host_paths = {v["hostPath"]["path"]: v["name"] for v in pod["volumes"] if "hostPath" in v}
    assert {"/var/run/ambient", "/sys/fs/bpf", "/sys/fs/cgroup", "/opt/cni/bin", "/etc/cni/net.d",
            "/var/run/netns"} <= set(host_paths)
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts[host_paths["/var/run/netns"]]["mountPropagation"] == "HostToContainer"
    for path in ("/var/run/ambient", "/var/run/netns", "/sys/fs/bpf", "/sys/fs/cgroup"):
        # The CNI plugin on the host and the agent must name these the same.
        assert mounts[host_paths[path]]["mountPath"] == path

    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["REDIRECT_MODE"]["value"] == defaults.REDIRECT_MODE
    assert c["args"][c["args"].index("--redirect-mode") + 1] == "$(REDIRECT_MODE)"
    assert c["args"][c["args"].index("--node") + 1] == "$(NODE_NAME)"

    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": defaults.READINESS_PORT}
    assert {p["containerPort"] for p in c["ports"]} == {defaults.METRICS_PORT, defaults.READINESS_PORT}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    _scraped_on(ds, defaults.METRICS_PORT)
    _token_for_the_ca(ds, c)


def _scraped_on(workload: Obj, port: int) -> None:
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}


def _token_for_the_ca(workload: Obj, c: Obj) -> None:
    """The token file the command names is a projected service-account token for the CA's audience."""
    _, args = argv(c)
    token = flag(args, "--token-file")[0]
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in c["volumeMounts"] if token.startswith(m["mountPath"] + "/"))
    source = volumes[mount["name"]]["projected"]["sources"][0]["serviceAccountToken"]
    assert f"{mount['mountPath']}/{source['path']}" == token
    assert source["audience"] == "istio-ca"


def _parses(parse: Callable[[list[str]], Any], workload: Obj, c: Obj, module: str,
            monkeypatch: pytest.MonkeyPatch) -> Any:
    """The container's command line through the process's own argument parser; the files it names must
    come from the container's volumes (the parser checks they exist, so they are made to here)."""
    command, args = argv(c)
    assert command == ["python", "-m", module]
    files = provided_files(workload, c)
    for name in ("--root-cert", "--token-file"):
        assert set(flag(args, name)) <= files, f"{name} names a file no volume provides"
    real_is_file = pathlib.Path.is_file
    monkeypatch.setattr(pathlib.Path, "is_file", lambda self: str(self) in files or real_is_file(self))
    return parse(args)


def test_node_agent_command_parses(base: list[Obj], monkeypatch: pytest.MonkeyPatch) -> None:
    ds = one(base, "DaemonSet", "ambient-nodeagent")
    opts = _parses(nodeagent.main.parse_args, ds, container(ds, "nodeagent"), "nodeagent.main", monkeypatch)
    assert opts.node == "node-1"
    assert opts.redirect_mode == defaults.REDIRECT_MODE
    assert opts.metrics_listen.endswith(f":{defaults.METRICS_PORT}")
    assert opts.ready_listen.endswith(f":{defaults.READINESS_PORT}")
    assert opts.control_plane == f"{CONTROL_PLANE_SERVICE}.istio-system.svc:{defaults.CONTROLPLANE_GRPC_PORT}"
    state_mounts = [m["mountPath"] for m in container(ds, "nodeagent")["volumeMounts"]]
    assert any(str(opts.state_dir).startswith(p + "/") for p in state_mounts), "--state-dir must be on a volume"


# ---- the control plane ----------------------------------------------------------------------------------


def _without_pending(module: str, parser_flags: set[str], args: list[str]) -> list[str]:
    out, skip = [], 0
    for a in args:
        if skip:
            skip -= 1
            continue
        pending = PENDING_FLAGS.get(module, {})
        if a in pending and a not in parser_flags:
            skip = pending[a]
            continue
        out.append(a)
    return out


def test_control_plane_command_parses(base: list[Obj]) -> None:
    deploy = one(base, "Deployment", "istiod")
    c = container(deploy, "discovery")
    command, args = argv(c)
    assert command == ["python", "-m", "controlplane.main"]
    assert flag(args, "--config-source") == ["kubernetes"]
    parser = controlplane.main.build_parser()
    known = set(parser._option_string_actions)
    parsed = parser.parse_args(_without_pending("controlplane.main", known, args))
    assert parsed.grpc_listen.endswith(f":{defaults.CONTROLPLANE_GRPC_PORT}")
    assert parsed.metrics_listen.endswith(f":{defaults.CONTROLPLANE_METRICS_PORT}")
    assert any(str(parsed.state_dir) == m["mountPath"] for m in c["volumeMounts"]), "--state-dir must be a volume"
    # Clients dial the Service's name; the serving certificate must carry it.
    assert f"{CONTROL_PLANE_SERVICE}.istio-system.svc" in parsed.serving_host
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": defaults.CONTROLPLANE_METRICS_PORT}
    _scraped_on(deploy, defaults.CONTROLPLANE_METRICS_PORT)


def test_control_plane_service_reaches_its_ports(base: list[Obj]) -> None:
    service = one(base, "Service", CONTROL_PLANE_SERVICE)
    c = container(one(base, "Deployment", "istiod"), "discovery")
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    ports = {p["port"]: named[p["targetPort"]] for p in service["spec"]["ports"]}
    assert ports == {defaults.CONTROLPLANE_GRPC_PORT: defaults.CONTROLPLANE_GRPC_PORT,
                     defaults.CONTROLPLANE_METRICS_PORT: defaults.CONTROLPLANE_METRICS_PORT, 15017: 15017}
    labels = one(base, "Deployment", "istiod")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def _allows(role: Obj, group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in role["rules"])


def test_control_plane_may_read_what_it_needs(base: list[Obj]) -> None:
    role = one(base, "ClusterRole", "ambient-istiod")
    for resource in ("pods", "services", "namespaces", "serviceaccounts", "nodes"):
        for verb in ("get", "list", "watch"):
            assert _allows(role, "", resource, verb), f"{verb} {resource}"
    assert _allows(role, "discovery.k8s.io", "endpointslices", "watch")
    assert _allows(role, "gateway.networking.k8s.io", "gateways", "watch")
    assert _allows(role, "authentication.k8s.io", "tokenreviews", "create")
    assert _allows(role, "", "events", "create")
    # Secrets (ingress Gateways' certificates): read, never written.
    assert all(_allows(role, "", "secrets", verb) for verb in ("get", "list", "watch"))
    assert not any(_allows(role, "", "secrets", verb) for verb in ("create", "update", "patch", "delete"))
    for k in gen_crds().istio_kinds():
        plural = gen_crds().plural(k.kind)
        for verb in ("get", "list", "watch"):
            assert _allows(role, k.group, plural, verb), f"{verb} {plural}.{k.group}"
        assert _allows(role, k.group, f"{plural}/status", "update"), f"update {plural}/status"
    binding = one(base, "ClusterRoleBinding", "ambient-istiod")
    assert binding["roleRef"]["name"] == "ambient-istiod"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "istiod", "namespace": "istio-system"}]
    assert one(base, "Deployment", "istiod")["spec"]["template"]["spec"]["serviceAccountName"] == "istiod"


def test_webhook_sends_every_istio_kind_to_the_control_plane(base: list[Obj]) -> None:
    config = one(base, "ValidatingWebhookConfiguration", "ambient-istiod-validator")
    (hook,) = config["webhooks"]
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None" and hook["failurePolicy"] == "Fail"
    assert "caBundle" not in hook["clientConfig"]  # the operator's (or the control plane's) step
    service = hook["clientConfig"]["service"]
    assert (service["name"], service["namespace"], service["path"]) == (CONTROL_PLANE_SERVICE, "istio-system", "/validate")
    assert service["port"] in {p["port"] for p in one(base, "Service", CONTROL_PLANE_SERVICE)["spec"]["ports"]}
    covered = {(g, r) for rule in hook["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               if set(rule["operations"]) >= {"CREATE", "UPDATE"} and rule["apiVersions"] == ["*"]}
    assert covered == {(k.group, gen_crds().plural(k.kind)) for k in gen_crds().istio_kinds()}


# ---- the waypoint ---------------------------------------------------------------------------------------


def test_waypoint_command_parses(waypoint_example: list[Obj], monkeypatch: pytest.MonkeyPatch) -> None:
    (gateway,) = [o for o in waypoint_example if o["kind"] == "Gateway"]
    assert is_waypoint(gateway)
    name = gateway["metadata"]["name"]
    deploy = one(waypoint_example, "Deployment", name)
    opts = _parses(waypoint.main.parse_args, deploy, container(deploy, "waypoint"), "waypoint.main", monkeypatch)
    assert (opts.name, opts.namespace, opts.node) == (name, "ns-1", "node-1")  # namespace: the pod's own
    assert opts.service_account == deploy["spec"]["template"]["spec"]["serviceAccountName"] == name
    assert opts.listen.endswith(f":{defaults.HBONE_PORT}")
    assert opts.control_plane == f"{CONTROL_PLANE_SERVICE}.istio-system.svc:{defaults.CONTROLPLANE_GRPC_PORT}"
    assert deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > opts.drain_seconds
    assert deploy["spec"]["template"]["metadata"]["labels"][GATEWAY_NAME_LABEL] == name
    _scraped_on(deploy, defaults.METRICS_PORT)
    _token_for_the_ca(deploy, container(deploy, "waypoint"))

    service = one(waypoint_example, "Service", name)
    assert {p["port"] for p in service["spec"]["ports"]} == {defaults.HBONE_PORT, defaults.METRICS_PORT,
                                                              defaults.READINESS_PORT}
    assert service["spec"]["selector"] == {GATEWAY_NAME_LABEL: name}
