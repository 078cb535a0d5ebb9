"""Kubernetes objects as the API server returns them, for the tests of the Kubernetes code (imported by
name: this directory is on sys.path under pytest)."""

from __future__ import annotations

from typing import Any


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels)},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def pod(name: str, ns: str = "default", *, node: str = "node-1", ip: str = "10.244.1.5", sa: str = "sleep",
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A pod with the fields a real one has beside those the mesh reads (dnsPolicy, tolerations, ...)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name.split("-")[0]},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{name}-rs",
                                          "uid": "3b8a", "controller": True}],
                     "creationTimestamp": "2024-05-01T10:00:00Z",
                     "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}]},
        "spec": {
            "nodeName": node, "serviceAccountName": sa, "serviceAccount": sa, "dnsPolicy": "ClusterFirst",
            "restartPolicy": "Always", "schedulerName": "default-scheduler", "enableServiceLinks": True,
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}],
            "containers": [{"name": "app", "image": "curlimages/curl", "imagePullPolicy": "IfNotPresent",
                            "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                            "terminationMessagePath": "/dev/termination-log"}],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "172.18.0.2",
                   "qosClass": "BestEffort",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def service(name: str, ns: str = "default", *, vip: str = "10.96.0.10", port: int = 80,
            selector: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": selector or {"app": name}, "clusterIP": vip, "clusterIPs": [vip], "type": "ClusterIP",
                 "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
                 "sessionAffinity": "None", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                 "internalTrafficPolicy": "Cluster"},
        "status": {"loadBalancer": {}},
    }


def service_account(name: str, ns: str = "default") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}}


def node(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]}}


def endpoint_slice(service_name: str, ns: str = "default", ip: str = "10.244.1.5") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-abcde", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def virtual_service(name: str, ns: str = "default", *, timeout: str = "2s", host: str = "reviews") -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": ns,
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"}},
            "spec": {"hosts": [host], "http": [{"timeout": timeout, "route": [{"destination": {"host": host}}]}]}}


def waypoint(name: str = "waypoint", ns: str = "default", gateway_class: str = "istio-waypoint") -> dict[str, Any]:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": ns, "labels": {"istio.io/waypoint-for": "service"}},
            "spec": {"gatewayClassName": gateway_class,
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}
