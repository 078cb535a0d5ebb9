"""The Telemetry kind: strict validation, and its delivery to waypoints by the control plane's translation."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.config.store import Store
from controlplane.translate.snapshot import translate_snapshot
from mesh.api.kinds import resolve_kind
from mesh.api.loader import load_paths, parse_text
from mesh.api.validate import validate_documents
from mesh.proto import discovery_pb2 as pb

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "fixtures" / "istio"
TEL = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: default}\nspec:\n"


def errors_of(text: str) -> list[str]:
    _, errors = validate_documents(parse_text(text, "t.yaml"))
    return [str(e) for e in errors]


def test_the_kind_is_known_by_its_names() -> None:
    info = resolve_kind("telemetries")
    assert info is not None and info.kind == "Telemetry" and info.group == "telemetry.istio.io"
    assert resolve_kind("telemetry.telemetry.istio.io") is info and info.api_versions == (
        "telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1")


def test_good_telemetries_are_accepted() -> None:
    assert errors_of(TEL + "  tracing:\n  - randomSamplingPercentage: 12.5\n") == []
    assert errors_of(TEL + "  tracing:\n  - providers: [{name: otel}]\n    disableSpanReporting: true\n"
                     "    customTags:\n      a: {literal: {value: x}}\n      b: {header: {name: end-user, defaultValue: '-'}}\n"
                     "      c: {environment: {name: NODE_NAME}}\n") == []
    assert errors_of(TEL + "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n"
                     "  tracing: [{randomSamplingPercentage: 100}]\n") == []
    assert errors_of(ROOT.joinpath("examples/bookinfo/tracing.yaml").read_text()) == []
    assert errors_of(TEL + "  accessLogging: [{disabled: true}]\n") == []
    assert errors_of(TEL + "  accessLogging: [{providers: [{name: envoy}], disabled: false}]\n"
                     "  tracing: [{randomSamplingPercentage: 1}]\n") == []


@pytest.mark.parametrize(("spec", "path", "fragment"), [
    ("  tracing: [{randomSamplingPercentage: 101}]\n", "spec.tracing[0].randomSamplingPercentage", "between 0 and 100"),
    ("  tracing: [{randomSamplingPercentage: lots}]\n", "spec.tracing[0].randomSamplingPercentage", "must be a number"),
    ("  tracing: [{samplingPercentage: 10}]\n", "spec.tracing[0].samplingPercentage", "unknown field"),
    ("  tracing: [{randomSamplingPercentage: 1}, {randomSamplingPercentage: 2}]\n", "spec.tracing", "give one entry"),
    ("  tracing: [{match: {mode: CLIENT}}]\n", "spec.tracing[0].match", "unknown field"),
    ("  tracing: [{customTags: {a: {literal: {value: x}, header: {name: h}}}}]\n", "spec.tracing[0].customTags.a",
     "set only one of literal, environment, header"),
    ("  tracing: [{customTags: {a: {}}}]\n", "spec.tracing[0].customTags.a", "must set one of"),
    ("  metrics: [{providers: [{name: prometheus}]}]\n", "spec.metrics", "not supported by this mesh"),
    ("  accessLogging: [{disabled: true}, {providers: [{name: envoy}]}]\n", "spec.accessLogging", "give one entry"),
    ("  accessLogging: [{filter: {expression: 'response.code >= 400'}}]\n", "spec.accessLogging[0].filter",
     "CEL filter expressions are not supported"),
    ("  accessLogging: [{match: {mode: CLIENT}, disabled: true}]\n", "spec.accessLogging[0].match",
     "access log modes are not supported"),
    ("  accessLogging: [{disabled: sometimes}]\n", "spec.accessLogging[0].disabled", "must be"),
    ("  accessLogging: [{providers: [{}]}]\n", "spec.accessLogging[0].providers[0].name", "is required"),
    ("  accessLogging: {disabled: true}\n", "spec.accessLogging", "must be a list"),
    ("  targetRefs: [{kind: Service, name: reviews}]\n", "spec.targetRefs[0].kind", "targets a waypoint"),
    ("  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Gateway, name: w}]\n", "spec", "set only one of"),
])
def test_bad_telemetries_are_refused_with_their_path(spec: str, path: str, fragment: str) -> None:
    lines = errors_of(TEL + spec)
    assert any(line.startswith(f"t.yaml:document 1:{path}: ") and fragment in line for line in lines), lines


def test_translation_delivers_telemetry_to_the_waypoints_it_concerns() -> None:
    store = Store()
    store.apply(load_paths([str(FIXTURES / "bookinfo-platform.yaml"), str(FIXTURES / "waypoint.yaml")]))
    store.apply(parse_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp2, namespace: other}\n"
        "spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n---\n"
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n---\n"
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\n"
        "spec: {tracing: [{randomSamplingPercentage: 5}]}\n---\n"
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: ns, namespace: default}\n"
        "spec: {tracing: [{randomSamplingPercentage: 50}]}\n---\n"
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: own, namespace: other}\n"
        "spec: {targetRefs: [{kind: Gateway, name: wp2}], tracing: [{randomSamplingPercentage: 100}]}\n---\n"
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: sidecars, namespace: default}\n"
        "spec: {selector: {matchLabels: {app: reviews}}, tracing: [{randomSamplingPercentage: 100}]}\n", "t.yaml"))
    t = translate_snapshot(store.snapshot())
    mesh_default = t.l7["Telemetry/istio-system/mesh-default"]
    assert mesh_default.kind == pb.TELEMETRY and mesh_default.waypoints == ["default/waypoint", "other/wp2"]
    assert t.l7["Telemetry/default/ns"].waypoints == ["default/waypoint"]
    assert t.l7["Telemetry/other/own"].waypoints == ["other/wp2"]
    assert t.l7["Telemetry/default/sidecars"].waypoints == []
    assert any("sidecars: a selector picks workloads' sidecars" in p for p in t.problems)
