"""The apply API over a real Unix socket."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.config.apiserver import ApiServer
from controlplane.config.store import Store
from mesh.api.client import ApiClient, ControlPlaneUnavailable, register_cluster_objects
from mesh.api.errors import Conflict, NotFound, ValidationError
from mesh.api.loader import parse_text

DR = ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\n"
      "spec: {host: reviews, subsets: [{name: v1}]}\n")
VS = ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\n"
      "spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1}}]}]}\n")


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[ApiClient, Store, Path]]:
    store = Store(tmp_path / "store")
    server = ApiServer(store, tmp_path / "api.sock")
    server.start()
    try:
        yield ApiClient(tmp_path / "api.sock", timeout=5), store, tmp_path / "api.sock"
    finally:
        server.stop()


def test_apply_get_delete(api: tuple[ApiClient, Store, Path]) -> None:
    client, store, _ = api
    result = client.apply(parse_text(DR + "---\n" + VS, "r.yaml"))
    assert [o["text"] for o in result["outcomes"]] == [
        "destinationrule.networking.istio.io/reviews in default created",
        "virtualservice.networking.istio.io/reviews in default created"]
    assert client.health() == {"version": 1}
    (vs,) = client.get("vs", "default", "reviews")
    assert vs["spec"]["hosts"] == ["reviews"]
    assert [b["kind"] for b in client.get()] == ["DestinationRule", "VirtualService"]
    with pytest.raises(Conflict, match="still used by VirtualService default/reviews"):
        client.delete_refs(["DestinationRule/default/reviews"])
    client.delete(parse_text(VS, "r.yaml"))
    client.delete_refs(["DestinationRule/default/reviews"])
    assert store.snapshot().resources == {}
    with pytest.raises(NotFound):
        client.get("vs", "default", "reviews")


def test_invalid_apply_lists_every_error_and_changes_nothing(api: tuple[ApiClient, Store, Path]) -> None:
    client, store, _ = api
    bad = VS.replace("subset: v1", "subset: v7") + "---\n" + DR.replace("subsets: [{name: v1}]}", "subsets: [{name: v1}], colour: red}")
    with pytest.raises(ValidationError) as info:
        client.apply(parse_text(bad, "b.yaml"))
    assert info.value.lines() == ["b.yaml:document 2:spec.colour: unknown field 'colour'"]
    with pytest.raises(ValidationError) as info:
        client.apply(parse_text(VS, "only-vs.yaml"))
    assert info.value.lines()[0].startswith("only-vs.yaml:document 1:spec.http[0].route[0].destination.subset: subset 'v1'")
    assert store.version == 0


def test_label_and_register_cluster_objects(api: tuple[ApiClient, Store, Path]) -> None:
    client, store, path = api
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shop", "labels": {"app": "p"}},
           "spec": {"nodeName": "n1", "serviceAccountName": "buyer", "containers": [{"name": "c", "command": ["sleep"]}]},
           "status": {"podIP": "10.244.1.5"}}
    result = register_cluster_objects(path, [pod], timeout=2)
    assert [o["ref"] for o in result["outcomes"]] == ["Namespace/shop", "ServiceAccount/shop/buyer", "Pod/shop/p"]
    client.label("Namespace/shop", {"istio.io/dataplane-mode": "ambient"})
    assert store.select("Namespace")[0]["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}
    with pytest.raises(ValidationError, match="istio.io/dataplane-mode must be one of"):
        client.label("Pod/shop/p", {"istio.io/dataplane-mode": "on"})


def test_malformed_requests(api: tuple[ApiClient, Store, Path]) -> None:
    client, _, path = api
    with pytest.raises(NotFound, match="no endpoint"):
        client.request("GET", "/nothing")
    with pytest.raises(ValidationError):
        client.request("POST", "/apply", {"documents": "not a list"})
    # Raw bytes that are not JSON get a 400 with a JSON body, on a kept-alive HTTP/1.1 connection.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(b"POST /apply HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n{x}")
        response = http.client.HTTPResponse(s)  # type: ignore[arg-type]
        response.begin()
        body = response.read()
    assert response.status == 400 and response.version == 11
    assert "not JSON" in json.loads(body)["error"]


def test_unreachable_control_plane(tmp_path: Path) -> None:
    with pytest.raises(ControlPlaneUnavailable, match="is the cluster up"):
        ApiClient(tmp_path / "none.sock").health()


def test_stop_removes_socket_and_restart_keeps_state(tmp_path: Path) -> None:
    server = ApiServer(Store(tmp_path / "store"), tmp_path / "api.sock")
    server.start()
    ApiClient(tmp_path / "api.sock").apply(parse_text(DR, "d.yaml"))
    server.stop()
    assert not (tmp_path / "api.sock").exists()
    with ApiServer(Store(tmp_path / "store"), tmp_path / "api.sock"):
        assert ApiClient(tmp_path / "api.sock").get("dr")[0]["metadata"]["name"] == "reviews"
