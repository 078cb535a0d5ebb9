"""What the local cluster registers in the control plane: pods without addresses until their sandboxes are
wired by CNI, then with them, as a kubelet reports them; the mesh still knows from the start which pods
are in it (the node agent answers the plugin's ADD by that)."""

from __future__ import annotations

import copy
from pathlib import Path

from controlplane.config.source import Snapshot
from controlplane.translate.snapshot import translate_snapshot
from localcluster import plan, spec
from localcluster.registration import cluster_objects, wired_pods
from mesh.api.validate import Ref
from mesh.proto import discovery_pb2 as pb

BOOKINFO = Path(__file__).resolve().parents[3] / "examples" / "bookinfo" / "cluster.yaml"


def workloads(bodies: list[dict]) -> dict[str, pb.Workload]:
    """The workloads the control plane makes of `bodies`, with the bookinfo namespace in the mesh."""
    bodies = copy.deepcopy(bodies)
    for body in bodies:
        if body["kind"] == "Namespace" and body["metadata"]["name"] == "bookinfo":
            body["metadata"].setdefault("labels", {})["istio.io/dataplane-mode"] = "ambient"
    return dict(translate_snapshot(Snapshot(1, {Ref.of(b): b for b in bodies})).workloads)


def test_pods_are_registered_pending_without_addresses_then_running_with_them() -> None:
    s = spec.load(BOOKINFO)
    p = plan.make_plan(s)
    before = cluster_objects(s, p, wired=False)
    pods = [b for b in before if b["kind"] == "Pod"]
    assert pods and all(b["status"] == {"phase": "Pending", "hostIP": str(p.node(b["spec"]["nodeName"]).underlay_ip)}
                        for b in pods)
    known = workloads(before)
    sleep = known["bookinfo/sleep"]
    assert list(sleep.addresses) == [] and sleep.node == "node-1"
    assert sleep.tunnel_protocol == pb.HBONE  # in the mesh already: the agent enrolls it at its ADD

    after = wired_pods(s, p)
    assert {b["metadata"]["name"] for b in after} == {b["metadata"]["name"] for b in pods}
    planned = p.pod("bookinfo", "sleep")
    assert planned is not None
    body = next(b for b in after if b["metadata"]["name"] == "sleep" and b["metadata"]["namespace"] == "bookinfo")
    assert body["status"] == {"phase": "Running", "podIP": str(planned.ip), "hostIP": "172.30.0.10"}
    by_ref = {Ref.of(b): b for b in before} | {Ref.of(b): b for b in after}
    assert list(workloads(list(by_ref.values()))["bookinfo/sleep"].addresses) == [str(planned.ip)]
    # The default stays what Kubernetes shows of running pods (the agents' unit tests build on it).
    assert cluster_objects(s, p) == [by_ref[Ref.of(b)] for b in before]
