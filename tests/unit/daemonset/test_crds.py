"""The CRDs in daemonset/crds.yaml are the mesh's own schemas: generated from them (and up to date),
structural, serving every API version the mesh accepts, accepting every Istio sample the mesh accepts and
refusing what is structurally wrong, as the mesh's validator does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from mesh.api.kinds import KINDS, resolve_kind
from mesh.api.loader import load_paths
from mesh.api.validate import check_document
from tests.unit.daemonset.manifests import DAEMONSET, ROOT, Obj, crd_errors, gen_crds, to_json_schema

FIXTURES = ROOT / "tests" / "fixtures" / "istio"
SAMPLE_FILES = sorted(FIXTURES.glob("*.yaml")) + sorted((ROOT / "examples").rglob("*.yaml"))


@pytest.fixture(scope="module")
def crds() -> dict[str, Obj]:
    """kind -> its CRD, from daemonset/crds.yaml (kustomize leaves CRDs as they are; test_manifests checks
    the base holds them)."""
    docs = yaml.safe_load_all((DAEMONSET / "crds.yaml").read_text())
    return {o["spec"]["names"]["kind"]: o for o in docs if o["kind"] == "CustomResourceDefinition"}


def test_crds_file_is_what_the_generator_writes() -> None:
    assert (DAEMONSET / "crds.yaml").read_text() == gen_crds().render(), \
        "daemonset/crds.yaml is out of date: run python daemonset/gen_crds.py"


def test_every_istio_kind_has_a_crd_serving_its_versions(crds: dict[str, Obj]) -> None:
    istio = {k for k, info in KINDS.items() if info.group.endswith(".istio.io")}
    assert istio and set(crds) == istio
    for kind, crd in crds.items():
        info = KINDS[kind]
        spec = crd["spec"]
        assert spec["group"] == info.group and spec["scope"] == "Namespaced"
        assert resolve_kind(spec["names"]["plural"]) is info, "the plural must be a name meshctl accepts too"
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{info.group}"
        assert [v["name"] for v in spec["versions"] if v["served"]] == list(info.versions)
        assert [v["name"] for v in spec["versions"] if v["storage"]] == ["v1"]
        assert all(v["subresources"] == {"status": {}} for v in spec["versions"])


def _structural_problems(schema: Any, path: str, in_junctor: bool = False) -> list[str]:
    """Kubernetes' structural-schema rules, the ones a generator could break: every node has a type
    (or preserves unknown fields, or is int-or-string); inside allOf/anyOf/oneOf/not only value checks
    (no types, properties or items); no properties beside additionalProperties."""
    problems = []
    if not isinstance(schema, dict):
        return [f"{path}: not a schema"]
    typed = {"type", "properties", "items", "additionalProperties"} & set(schema)
    if in_junctor:
        if typed:
            problems.append(f"{path}: {sorted(typed)} inside a junctor")
    elif "type" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields") \
            and not schema.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{path}: both properties and additionalProperties")
    for name, sub in (schema.get("properties") or {}).items():
        problems += _structural_problems(sub, f"{path}.{name}", in_junctor)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            problems += _structural_problems(schema[key], f"{path}[{key}]", in_junctor)
    for key in ("allOf", "anyOf", "oneOf"):
        for i, sub in enumerate(schema.get(key) or []):
            problems += _structural_problems(sub, f"{path}.{key}[{i}]", True)
    if "not" in schema:
        problems += _structural_problems(schema["not"], f"{path}.not", True)
    return problems


def test_crd_schemas_are_structural(crds: dict[str, Obj]) -> None:
    for kind, crd in crds.items():
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            assert schema["type"] == "object"
            assert _structural_problems(schema, f"{kind}/{version['name']}") == []


def _is_istio(body: Any) -> bool:
    info = KINDS.get(str(body.get("kind"))) if isinstance(body, dict) else None
    return info is not None and info.group.endswith(".istio.io")


def _samples() -> list[Any]:
    """Every document of an Istio kind in the samples, as a test parameter named file:document."""
    return [pytest.param(doc.body, id=f"{Path(doc.source).name}:{doc.index}")
            for path in SAMPLE_FILES for doc in load_paths([str(path)]) if _is_istio(doc.body)]


SAMPLES = _samples()


def test_there_are_samples_of_every_istio_kind() -> None:
    kinds = {p.values[0]["kind"] for p in SAMPLES}
    assert kinds == {k for k, info in KINDS.items() if info.group.endswith(".istio.io")}


@pytest.mark.parametrize("body", SAMPLES)
def test_istio_samples_are_accepted_by_their_crd(crds: dict[str, Obj], body: Obj) -> None:
    assert check_document(body)[1] == []
    assert crd_errors(crds[body["kind"]], body) == []


VS = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews"}}
DR = {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule", "metadata": {"name": "reviews"}}
AP = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "p"}}
PA = {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication", "metadata": {"name": "p"}}


def _vs_route(**extra: Any) -> Obj:
    route = {"route": [{"destination": {"host": "reviews"}}], **extra}
    return {**VS, "spec": {"hosts": ["reviews"], "http": [route]}}


def _weighted(weight: Any) -> Obj:
    return {**VS, "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"},
                                                                      "weight": weight}]}]}}


# Structurally wrong documents (types, enums, ranges, required fields, unknown fields, one-of groups):
# the mesh's validator and the CRD schema both refuse them.
STRUCTURAL = [
    pytest.param(_weighted("ten"), id="weight-type"),
    pytest.param(_weighted(120), id="weight-range"),
    pytest.param(_vs_route(colour="blue"), id="unknown-field"),
    pytest.param(_vs_route(match=[{"uri": {}}]), id="string-match-none-set"),
    pytest.param(_vs_route(match=[{"uri": {"exact": "/a", "prefix": "/"}}]), id="string-match-two-set"),
    pytest.param({**VS, "spec": {"http": []}}, id="hosts-required"),
    pytest.param({**VS, "spec": {"hosts": []}}, id="hosts-empty"),
    pytest.param(VS, id="spec-required"),
    pytest.param({**VS, "spec": {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r",
                                                                                      "port": {"number": 70000}}}]}]}},
                 id="port-range"),
    pytest.param({**DR, "spec": {"host": "r", "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": "many"}}}}},
                 id="pool-type"),
    pytest.param({**DR, "spec": {"host": "r", "subsets": [{"name": "v1", "labels": {"version": 1}}]}},
                 id="label-value-type"),
    pytest.param({**DR, "spec": {"host": "r", "trafficPolicy": {"loadBalancer": {
        "simple": "RANDOM", "consistentHash": {"useSourceIp": True}}}}}, id="lb-simple-and-hash"),
    pytest.param({**DR, "spec": {"host": ""}}, id="host-empty"),
    pytest.param({**AP, "spec": {"action": "PERMIT"}}, id="action-enum"),
    pytest.param({**AP, "spec": {"rules": [{"from": [{"source": {"principals": "a"}}]}]}}, id="principals-type"),
    pytest.param({**PA, "spec": {"mtls": {"mode": "STRICTER"}}}, id="mtls-enum"),
]


@pytest.mark.parametrize("body", STRUCTURAL)
def test_structurally_bad_documents_are_refused_by_both(crds: dict[str, Obj], body: Obj) -> None:
    assert check_document(body)[1] != [], "the mesh's validator should refuse this"
    assert crd_errors(crds[body["kind"]], body) != [], "the CRD should refuse this"


def test_the_emulation_reads_kubernetes_extensions() -> None:
    """The test's reading of x-kubernetes-int-or-string and x-kubernetes-preserve-unknown-fields."""
    schema = to_json_schema({"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "strict": {"type": "object", "properties": {"a": {"type": "string"}}}}})
    check = jsonschema.Draft202012Validator(schema).is_valid
    assert check({"port": 8080}) and check({"port": "http"}) and not check({"port": True})
    assert check({"free": {"anything": [1, {"x": None}]}})
    assert check({"strict": {"a": "x"}}) and not check({"strict": {"b": "x"}})
