"""Item 11: one bad document never freezes discovery.

- A nested null means "absent", as in Istio (a Kubernetes structural schema prunes it): `spec.action:
  null` is an ALLOW policy, and what the store keeps has no nulls in it.
- Translation is total: a resource it cannot translate is left out and reported (the log, and the
  `errors` of the translation that `proxy-status` shows), and every other resource is still served.
- A document saved by an older version that translation cannot handle does not stop the control plane
  from starting, nor discovery from following later changes.
- Fuzzing: for arbitrary JSON-ish mutations of Istio's sample documents (tests/fixtures/istio), the
  validator either refuses with field errors or the document translates without an error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from controlplane.app import ControlPlaneThread
from controlplane.config.source import Snapshot
from controlplane.config.store import STATE_FILE, Store
from controlplane.options import STORE_DIR, Options
from controlplane.translate.snapshot import translate_snapshot
from mesh.api.errors import FieldError, ValidationError
from mesh.api.loader import parse_text
from mesh.api.validate import Document, Ref, check_document
from mesh.proto import discovery_pb2 as pb
from meshctl.proxystatus import render
from tests.security.fuzzing import mutated

POLICY_WITH_NULL_ACTION = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-none, namespace: bookinfo}
spec:
  action: null
  rules: [{from: [{source: {namespaces: [bookinfo]}}]}]
"""

DENY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: bookinfo}
spec:
  action: DENY
  rules: [{}]
"""


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def test_a_nested_null_is_absent() -> None:
    store = Store()
    store.apply(parse_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: bookinfo}\n---\n" + POLICY_WITH_NULL_ACTION, "p.yaml"))  # the namespace must exist
    body = store.select("AuthorizationPolicy", "bookinfo", "deny-none")[0]
    assert "action" not in body["spec"]  # what the store keeps has no nulls
    translation = translate_snapshot(store.snapshot())
    assert translation.errors == ()
    assert translation.authorizations["bookinfo/deny-none"].action == pb.ALLOW


def test_translation_leaves_out_what_it_cannot_translate_and_reports_it() -> None:
    good = yaml.safe_load(DENY)
    bad = yaml.safe_load(POLICY_WITH_NULL_ACTION)  # as an older version saved it: never validated again
    bad["metadata"]["namespace"] = "bookinfo"
    broken_service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "bookinfo"},
                      "spec": {"ports": [{"name": "http"}]}}  # no port: not a document the validator passes
    snap = Snapshot(7, {Ref.of(b): b for b in (good, bad, broken_service)})
    translation = translate_snapshot(snap)
    assert "bookinfo/deny-all" in translation.authorizations  # the rest is served
    assert "bookinfo/deny-none" not in translation.authorizations
    assert any("AuthorizationPolicy bookinfo/deny-none" in e and "left out" in e for e in translation.errors)
    assert any("Service bookinfo/s" in e for e in translation.errors)


def _save_store(home: Path, bodies: list[dict[str, Any]]) -> None:
    store_dir = home / "controlplane" / STORE_DIR
    store_dir.mkdir(parents=True)
    for i, body in enumerate(bodies, start=1):
        body.setdefault("metadata", {})["resourceVersion"] = str(i)
    (store_dir / STATE_FILE).write_text(json.dumps({"format": 1, "version": len(bodies), "resources": bodies}))


def test_a_saved_document_translation_cannot_handle_does_not_stop_the_control_plane(tmp_path: Path) -> None:
    with_null = yaml.safe_load(POLICY_WITH_NULL_ACTION)  # saved by a version that kept nulls
    unknown_action = yaml.safe_load(POLICY_WITH_NULL_ACTION.replace("deny-none", "reject"))
    unknown_action["spec"]["action"] = "REJECT"  # saved by a version that knew another action
    _save_store(tmp_path, [with_null, unknown_action])
    cp = ControlPlaneThread(Options(state_dir=tmp_path, grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    running = cp.start()  # before: the first translation raised, and the control plane did not start
    try:
        authorizations = "type.googleapis.com/ambientmesh.discovery.v1.Authorization"
        served = cp.call(running.discovery.resources)[authorizations]
        assert "bookinfo/deny-none" in served and "bookinfo/reject" not in served
        running.extras["store"].apply(parse_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: bookinfo}\n---\n" + DENY, "deny.yaml"))
        # Discovery follows the change: the DENY is served although the bad document is still there.
        assert eventually(lambda: "bookinfo/deny-all" in cp.call(running.discovery.resources)[authorizations])
        table = cp.call(running.discovery.connections)
        assert [e for e in table["errors"] if "AuthorizationPolicy bookinfo/reject" in e and "KeyError" in e]
        assert "AuthorizationPolicy bookinfo/reject: cannot be translated" in render(table)  # proxy-status
    finally:
        cp.stop()


# ---- fuzzing -----------------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_validation_refuses_or_translation_succeeds(doc: dict[str, Any]) -> None:
    body, errors = check_document(doc)
    if errors:
        assert all(isinstance(e, FieldError) and e.message for e in errors)
        with pytest.raises(ValidationError):
            Store().apply([Document("fuzz.yaml", 1, doc)])
        return
    assert body is not None
    store = Store(check_references=False)  # checks across documents are not this test's business
    store.apply([Document("fuzz.yaml", 1, doc)])  # accepted: then it translates without an error
    translation = translate_snapshot(store.snapshot())
    assert translation.errors == (), translation.errors
