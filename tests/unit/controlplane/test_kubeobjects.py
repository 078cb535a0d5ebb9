"""Kubernetes objects as the mesh's documents (pure): what is kept, and that the result passes the validator."""

from __future__ import annotations

from kube_objects import node, pod, service, virtual_service, waypoint

from controlplane.config.kubeobjects import RESOURCES, resource_for, to_document
from mesh.api.kinds import kind_info
from mesh.api.validate import check_document


def doc(obj: dict) -> dict | None:
    resource = resource_for(obj["kind"])
    assert resource is not None
    return to_document(resource, obj)


def test_a_pod_keeps_what_translation_reads_and_passes_the_validator() -> None:
    mapped = doc(pod("sleep-1", node="node-a", ip="10.244.1.5", sa="sleep", labels={"app": "sleep"}))
    assert mapped == {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleep-1", "namespace": "default", "labels": {"app": "sleep"}},
        "spec": {"containers": [{"name": "app", "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}]}],
                 "nodeName": "node-a", "serviceAccountName": "sleep"},
        "status": {"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}], "hostIP": "172.18.0.2", "phase": "Running",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }
    assert check_document(mapped)[1] == []


def test_a_pending_pod_has_no_node_and_no_address() -> None:
    obj = pod("web-1")
    del obj["spec"]["nodeName"]
    obj["status"] = {"phase": "Pending"}
    mapped = doc(obj)
    assert mapped is not None and "nodeName" not in mapped["spec"] and mapped["status"] == {"phase": "Pending"}
    assert check_document(mapped)[1] == []


def test_a_service_keeps_the_fields_of_the_meshs_schema() -> None:
    obj = service("reviews", vip="None")
    obj["spec"].update(clusterIPs=["None"], externalTrafficPolicy="Cluster", allocateLoadBalancerNodePorts=True)
    mapped = doc(obj)
    assert mapped is not None
    assert set(mapped["spec"]) <= set(kind_info("Service").spec.fields)  # type: ignore[union-attr]
    assert mapped["spec"]["clusterIP"] == "None" and "clusterIPs" not in mapped["spec"]  # headless
    assert "status" not in mapped
    assert check_document(mapped)[1] == []


def test_istio_kinds_are_passed_as_written_without_kubectls_copy() -> None:
    obj = virtual_service("reviews")
    obj["metadata"]["annotations"]["istio.io/dry-run"] = "true"
    obj["status"] = {"conditions": []}
    mapped = doc(obj)
    assert mapped == {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                      "metadata": {"name": "reviews", "namespace": "default",
                                   "annotations": {"istio.io/dry-run": "true"}},
                      "spec": obj["spec"]}


def test_only_the_meshs_gateway_classes_and_documents_are_the_meshs() -> None:
    assert doc(waypoint())["spec"]["gatewayClassName"] == "istio-waypoint"  # type: ignore[index]
    assert doc(waypoint("ingress", gateway_class="istio"))["spec"]["gatewayClassName"] == "istio"  # type: ignore[index]
    assert doc(waypoint("other", gateway_class="example-lb")) is None
    assert doc(node("node-1")) is None
    assert {r.kind for r in RESOURCES if r.stored} <= set(_known_kinds())


def _known_kinds() -> list[str]:
    return [r.kind for r in RESOURCES if kind_info(r.kind) is not None]
