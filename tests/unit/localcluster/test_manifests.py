"""The kustomize reader: daemonset/ read without kubectl, the kustomization's transformations, and errors
that name the file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from localcluster import manifests, overlay
from localcluster.manifests import ManifestError, load_base, replace_image, split_image

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      initContainers:
      - name: setup
        image: example.org/tools:1.0
      containers:
      - name: main
        image: example.org/web
        command: [python, -m, web]
"""


def write_base(tmp_path: Path, kustomization: dict, files: dict[str, str]) -> Path:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_daemonset_base_has_the_workloads_the_local_cluster_runs() -> None:
    base = load_base()
    for ref in overlay.WORKLOADS:
        m = base.find(ref.kind, ref.namespace, ref.name)
        assert m.container(ref.container)["command"][0] == "python"
        assert m.source.parent == manifests.DAEMONSET_DIR
    agent = base.find("DaemonSet", "istio-system", "ambient-nodeagent")
    assert agent.container("nodeagent")["image"] == "ghcr.io/ambient-mesh/ambient-mesh:0.1.0"  # images: newTag
    assert agent.where == "daemonset/nodeagent.yaml: document 2 (DaemonSet istio-system/ambient-nodeagent)"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_reader_agrees_with_kubectl_kustomize() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(manifests.DAEMONSET_DIR)], capture_output=True, text=True,
                          timeout=60, check=True)
    rendered = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
                for o in yaml.safe_load_all(done.stdout) if o}
    ours = {(m.kind, m.namespace, m.name): m.body for m in load_base().objects}
    assert set(ours) == set(rendered)
    for ref in overlay.WORKLOADS:
        key = (ref.kind, ref.namespace, ref.name)
        assert ours[key] == rendered[key]


def test_namespace_images_and_common_labels(tmp_path: Path) -> None:
    service = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n"
    ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"
    write_base(tmp_path, {"namespace": "shop", "commonLabels": {"team": "a"}, "commonAnnotations": {"note": "x"},
                          "images": [{"name": "example.org/web", "newName": "registry.local/web", "newTag": "2.0"},
                                     {"name": "example.org/tools", "digest": "sha256:abc"}],
                          "resources": ["ns.yaml", "web/deploy.yaml", "svc.yaml"]},
               {"ns.yaml": ns, "web/deploy.yaml": DEPLOYMENT, "svc.yaml": service})
    base = load_base(tmp_path)
    assert base.find("Namespace", "", "shop").body["metadata"] == {"name": "shop", "labels": {"team": "a"},
                                                                   "annotations": {"note": "x"}}
    web = base.find("Deployment", "shop", "web")
    assert web.container("main")["image"] == "registry.local/web:2.0"
    assert web.pod_spec()["initContainers"][0]["image"] == "example.org/tools@sha256:abc"
    assert web.body["spec"]["selector"]["matchLabels"] == {"app": "web", "team": "a"}
    assert web.body["spec"]["template"]["metadata"] == {"labels": {"app": "web", "team": "a"},
                                                        "annotations": {"note": "x"}}
    assert base.find("Service", "shop", "web").body["spec"]["selector"] == {"app": "web", "team": "a"}


def test_nested_kustomization(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    write_base(inner, {"resources": ["deploy.yaml"], "images": [{"name": "example.org/web", "newTag": "3"}]},
               {"deploy.yaml": DEPLOYMENT})
    write_base(tmp_path, {"namespace": "outer", "resources": ["inner"]}, {})
    web = load_base(tmp_path).find("Deployment", "outer", "web")
    assert web.container("main")["image"] == "example.org/web:3"


@pytest.mark.parametrize("image, parts", [
    ("example.org/web", ("example.org/web", "", "")),
    ("example.org:5000/web:1.2", ("example.org:5000/web", "1.2", "")),
    ("web@sha256:ff", ("web", "", "sha256:ff")),
])
def test_split_image(image: str, parts: tuple[str, str, str]) -> None:
    assert split_image(image) == parts


def test_image_without_override_keeps_its_tag() -> None:
    assert replace_image("a/b:1", [{"name": "a/b", "newName": "c/b"}]) == "c/b:1"
    assert replace_image("x/y:1", [{"name": "a/b", "newTag": "2"}]) == "x/y:1"


def test_missing_container_names_the_file(tmp_path: Path) -> None:
    write_base(tmp_path, {"resources": ["deploy.yaml"]}, {"deploy.yaml": DEPLOYMENT})
    web = load_base(tmp_path).find("Deployment", "", "web")
    with pytest.raises(ManifestError) as err:
        web.container("sidecar")
    assert str(err.value) == f"{tmp_path}/deploy.yaml: document 1 (Deployment web): no container 'sidecar' " \
                             "(containers: main)"


def test_missing_workload_names_the_kustomization(tmp_path: Path) -> None:
    write_base(tmp_path, {"resources": ["deploy.yaml"]}, {"deploy.yaml": DEPLOYMENT})
    with pytest.raises(ManifestError, match=r"kustomization.yaml: no DaemonSet istio-system/agent among its "
                                            r"resources \(DaemonSets: none\)"):
        load_base(tmp_path).find("DaemonSet", "istio-system", "agent")


@pytest.mark.parametrize("files, kustomization, message", [
    ({"a.yaml": "kind: [unclosed"}, {"resources": ["a.yaml"]}, r"a.yaml: not valid YAML"),
    ({"a.yaml": "- just\n- a list\n"}, {"resources": ["a.yaml"]}, r"a.yaml: document 1: an object must be a mapping"),
    ({"a.yaml": "apiVersion: v1\nkind: Service\nmetadata: {}\n"}, {"resources": ["a.yaml"]},
     r"a.yaml: document 1: metadata.name is missing"),
    ({"a.yaml": "apiVersion: v1\nkind: A\nmetadata: {name: a}\n---\napiVersion: v1\nmetadata: {name: x}\n"}, {"resources": ["a.yaml"]},
     r"a.yaml: document 2: kind is missing"),
    ({}, {"resources": ["gone.yaml"]}, r"kustomization.yaml: resource 'gone.yaml': no such file or directory"),
    ({}, {"resources": [], "patches": []}, r"kustomization.yaml: patches: not read by the local cluster's reader"),
    ({}, {"images": [{"name": "a", "newTage": "1"}]}, r"kustomization.yaml: images: a: unknown field newTage"),
])
def test_malformed_base_is_refused_naming_the_file(tmp_path: Path, files: dict[str, str], kustomization: dict,
                                                   message: str) -> None:
    write_base(tmp_path, kustomization, files)
    with pytest.raises(ManifestError, match=message):
        load_base(tmp_path)


def test_broken_pod_template_names_the_file(tmp_path: Path) -> None:
    write_base(tmp_path, {"resources": ["d.yaml"]},
               {"d.yaml": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {template: {}}\n"})
    with pytest.raises(ManifestError, match=r"d.yaml: document 1 \(Deployment d\): spec.template.spec is missing"):
        load_base(tmp_path).find("Deployment", "", "d").container("main")


def test_no_kustomization(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no kustomization.yaml"):
        load_base(tmp_path)
