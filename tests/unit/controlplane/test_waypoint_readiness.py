"""A waypoint pod is sent traffic only once it is Ready (the cause of the resets while a waypoint started:
agents were pointed at a pod registered before its process listened)."""

from __future__ import annotations

from typing import Any

import yaml

from controlplane.config.store import Store
from controlplane.translate.snapshot import translate_snapshot
from mesh.api.validate import Document
from mesh.proto import discovery_pb2 as pb

PLATFORM = """
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {selector: {app: reviews}, clusterIP: 10.96.0.11, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: bookinfo, labels: {app: reviews}}
spec: {nodeName: node-1, containers: [{name: app, command: [app]}]}
status: {phase: Running, podIP: 10.244.1.5}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bookinfo}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"""


def pod(ready: bool | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "waypoint", "namespace": "bookinfo",
                     "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}},
        "spec": {"nodeName": "node-2", "serviceAccountName": "waypoint", "containers": [{"name": "w", "command": ["w"]}]},
        "status": {"phase": "Running", "podIP": "10.244.2.254"}}
    if ready is not None:
        body["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    return body


def reviews_waypoint(*extra: dict[str, Any]) -> pb.GatewayAddress:
    store = Store()
    docs = [d for d in yaml.safe_load_all(PLATFORM) if d] + list(extra)
    store.apply([Document("t", i, d) for i, d in enumerate(docs, start=1)])
    t = translate_snapshot(store.snapshot())
    return t.services["bookinfo/reviews.bookinfo.svc.cluster.local"].waypoint


def test_a_waypoint_pod_not_ready_is_not_its_address() -> None:
    # No pod yet, or one registered but not Ready: agents find no ready instance (and say so), rather
    # than dialling an address where nothing listens.
    for extra in ((), (pod(ready=False),)):
        gw = reviews_waypoint(*extra)
        assert gw.WhichOneof("destination") == "hostname"
        assert gw.hostname.hostname == "waypoint.bookinfo.svc.cluster.local"
    assert reviews_waypoint(pod(ready=True)).address.address == "10.244.2.254"
    assert reviews_waypoint(pod(ready=None)).address.address == "10.244.2.254"  # no conditions: as before


def test_a_pod_that_is_not_ready_is_an_unhealthy_workload() -> None:
    store = Store()
    docs = [d for d in yaml.safe_load_all(PLATFORM) if d]
    docs[2]["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    store.apply([Document("t", i, d) for i, d in enumerate(docs, start=1)])
    t = translate_snapshot(store.snapshot())
    w = next(w for w in t.workloads.values() if w.name == "reviews-v1")
    assert w.status == pb.UNHEALTHY
    assert not t.services["bookinfo/reviews.bookinfo.svc.cluster.local"].endpoints[0].healthy
