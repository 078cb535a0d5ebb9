"""Reading the rendered manifests of daemonset/: render with kubectl, find objects, rebuild a container's
command line as the kubelet would, and check custom resources against a CRD's schema the way the API
server reads it."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DAEMONSET = ROOT / "daemonset"
WAYPOINT = DAEMONSET / "waypoint"
ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"  # published in every namespace by the control plane (as istiod)
ROOT_CERT_KEY = "root-cert.pem"

Obj = dict[str, Any]


def render(directory: Path) -> list[Obj]:
    """`kubectl kustomize DIR`, offline, as a list of objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (scripts/setup-system.sh installs Debian's kubernetes-client)")
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def container(workload: Obj, name: str) -> Obj:
    found = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['kind']}/{workload['metadata']['name']} has no container {name}"
    return found[0]


# ---- the command line, as the kubelet expands it ----------------------------------------------------------

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# What the downward API would give, for the fields the manifests use.
FIELD_SAMPLES = {"spec.nodeName": "node-1", "metadata.name": "pod-1", "metadata.namespace": "ns-1"}


def env_values(c: Obj) -> dict[str, str]:
    values: dict[str, str] = {}
    for var in c.get("env") or []:
        if "value" in var:
            values[var["name"]] = str(var["value"])
        else:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            assert path in FIELD_SAMPLES, f"env {var['name']}: no sample for fieldRef {path}"
            values[var["name"]] = FIELD_SAMPLES[path]
    return values


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion; a reference to a variable the container lacks is a mistake here (the
    kubelet would pass it on literally)."""

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"{text!r} refers to $({m.group(1)}), which the container's env lacks"
        return env[m.group(1)]

    return _VAR.sub(sub, text)


def argv(c: Obj) -> tuple[list[str], list[str]]:
    """(command, args) with $(VAR) references expanded."""
    env = env_values(c)
    return [expand(a, env) for a in c["command"]], [expand(str(a), env) for a in c.get("args") or []]


def flag(args: list[str], name: str) -> list[str]:
    """Every value given to `name` (`--flag value` or `--flag=value`)."""
    out = []
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith(name + "="):
            out.append(a.split("=", 1)[1])
    return out


def provided_files(workload: Obj, c: Obj) -> set[str]:
    """The files the container sees through its volumes: projected tokens, and the root certificate
    ConfigMap's key."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes") or []}
    files: set[str] = set()
    for mount in c.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "serviceAccountToken" in source:
                files.add(f"{mount['mountPath']}/{source['serviceAccountToken']['path']}")
        if (volume.get("configMap") or {}).get("name") == ROOT_CERT_CONFIGMAP:
            files.add(f"{mount['mountPath']}/{ROOT_CERT_KEY}")
    return files


# ---- custom resources against a CRD, read as the API server reads it --------------------------------------


def to_json_schema(schema: Obj) -> Obj:
    """A CRD's structural OpenAPI v3 schema as JSON Schema, with Kubernetes' reading of it:
    x-kubernetes-int-or-string is an integer or a string; an object with properties refuses other fields
    (strict field validation, kubectl's default since 1.27) unless x-kubernetes-preserve-unknown-fields."""
    out: Obj = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("oneOf", "anyOf", "allOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        elif key == "x-kubernetes-int-or-string":
            if value:
                out["type"] = ["integer", "string"]
        elif key.startswith("x-kubernetes-") or key in ("description", "nullable", "format"):
            continue
        else:
            out[key] = value
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def as_api_object(body: Obj) -> Obj:
    """What the API server validates against the schema: JSON (map keys are strings), nulls dropped (it
    prunes null values of non-nullable fields), apiVersion, kind and metadata left to the server itself."""
    data = json.loads(json.dumps(body))
    return {k: _prune_nulls(v) for k, v in data.items() if k not in ("apiVersion", "kind", "metadata")}


def _prune_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune_nulls(v) for v in value]
    return value


def crd_errors(crd: Obj, body: Obj) -> list[str]:
    """What the CRD's schema (for the body's API version) says is wrong with a custom resource."""
    version = body["apiVersion"].split("/")[-1]
    served = {v["name"]: v for v in crd["spec"]["versions"] if v["served"]}
    if version not in served:
        return [f"{body['apiVersion']} is not served"]
    schema = to_json_schema(served[version]["schema"]["openAPIV3Schema"])
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(as_api_object(body))]


@functools.cache
def gen_crds() -> ModuleType:
    """daemonset/gen_crds.py, which is a script, not a package module."""
    spec = importlib.util.spec_from_file_location("gen_crds", DAEMONSET / "gen_crds.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
