"""The kustomize base of `daemonset/`, read without kubectl.

`load_base(directory)` reads `kustomization.yaml`, loads its `resources` (YAML files, or directories
holding a kustomization of their own) and applies the transformations the base may use, as kustomize does:

    namespace           set on every namespaced object
    images              name -> newName / newTag / digest, on every container of a pod template
    commonLabels        on every object, and on workloads' selectors and pod templates, Services' selectors
    commonAnnotations   on every object, and on workloads' pod templates

Anything else a kustomization can say (patches, generators, name prefixes, replicas, components, ...) is
refused with the file's name, rather than read wrongly: render such a base with `kubectl kustomize` to see
what it means.  Every object remembers the file and document it came from, so errors about it name them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mesh.errors import MeshError

REPOSITORY = Path(__file__).resolve().parents[1]
DAEMONSET_DIR = REPOSITORY / "daemonset"
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "commonLabels", "commonAnnotations"}
# Kinds that have no namespace (kustomize's `namespace` leaves them alone).
CLUSTER_SCOPED = {
    "Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "PriorityClass",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "StorageClass", "PersistentVolume",
    "Node", "APIService", "IngressClass", "RuntimeClass", "GatewayClass", "CSIDriver",
}
# Kinds whose pod template is at spec.template (CronJob's at spec.jobTemplate.spec.template).
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"}

Obj = dict[str, Any]


class ManifestError(MeshError):
    pass


def shown(path: Path) -> str:
    """A path as errors show it: relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(REPOSITORY))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Manifest:
    """One object of the base, after the kustomization's transformations, and where it was written."""

    body: Obj
    source: Path
    document: int  # 1-based, within `source`

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"].get("namespace") or "")

    @property
    def where(self) -> str:
        ref = f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"
        return f"{shown(self.source)}: document {self.document} ({ref})"

    def pod_spec(self) -> Obj:
        """The pod template's spec of a workload."""
        template = _get(self.body, "spec", "template")
        spec = template.get("spec") if isinstance(template, dict) else None
        if not isinstance(spec, dict):
            raise ManifestError(f"{self.where}: spec.template.spec is missing or not a mapping")
        return spec

    def container(self, name: str) -> Obj:
        containers = self.pod_spec().get("containers")
        if not isinstance(containers, list) or not all(isinstance(c, dict) for c in containers):
            raise ManifestError(f"{self.where}: spec.template.spec.containers must be a list of mappings")
        found = [c for c in containers if c.get("name") == name]
        if not found:
            have = ", ".join(str(c.get("name")) for c in containers) or "none"
            raise ManifestError(f"{self.where}: no container {name!r} (containers: {have})")
        return found[0]


@dataclass(frozen=True)
class Base:
    directory: Path
    objects: tuple[Manifest, ...]

    def find(self, kind: str, namespace: str, name: str) -> Manifest:
        for m in self.objects:
            if m.kind == kind and m.name == name and m.namespace == namespace:
                return m
        have = ", ".join(f"{m.namespace}/{m.name}" for m in self.objects if m.kind == kind) or "none"
        raise ManifestError(f"{shown(self.directory / KUSTOMIZATION_FILES[0])}: no {kind} {namespace}/{name} among "
                            f"its resources ({kind}s: {have})")


def load_base(directory: Path = DAEMONSET_DIR) -> Base:
    """The objects of the kustomization in `directory`, transformed as kustomize would."""
    return Base(directory, tuple(_load(directory, seen=())))


def _load(directory: Path, seen: tuple[Path, ...]) -> Iterator[Manifest]:
    path = next((directory / f for f in KUSTOMIZATION_FILES if (directory / f).is_file()), None)
    if path is None:
        raise ManifestError(f"{shown(directory)}: no kustomization.yaml")
    if directory.resolve() in seen:
        raise ManifestError(f"{shown(path)}: includes itself through its resources")
    try:
        k = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{shown(path)}: cannot read it: {exc}") from None
    if not isinstance(k, dict):
        raise ManifestError(f"{shown(path)}: a kustomization must be a mapping")
    unsupported = sorted(set(k) - SUPPORTED_FIELDS)
    if unsupported:
        raise ManifestError(f"{shown(path)}: {', '.join(unsupported)}: not read by the local cluster's reader "
                            f"(it reads {', '.join(sorted(SUPPORTED_FIELDS - {'apiVersion', 'kind'}))}); see what "
                            f"the base means with `kubectl kustomize {shown(directory)}`")
    resources = k.get("resources") or []
    if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
        raise ManifestError(f"{shown(path)}: resources must be a list of file or directory names")
    objects: list[Manifest] = []
    for entry in resources:
        target = directory / entry
        if target.is_dir():
            objects.extend(_load(target, (*seen, directory.resolve())))
        elif target.is_file():
            objects.extend(_read_file(target))
        else:
            raise ManifestError(f"{shown(path)}: resource {entry!r}: no such file or directory "
                                "(remote resources are not read)")
    transforms = _transforms(path, k)
    for m in objects:
        for transform in transforms:
            transform(m)
    yield from objects


def _read_file(path: Path) -> Iterator[Manifest]:
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{shown(path)}: not valid YAML: {exc}") from None
    for index, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        where = f"{shown(path)}: document {index}"
        if not isinstance(doc, dict):
            raise ManifestError(f"{where}: an object must be a mapping")
        for field in ("apiVersion", "kind"):
            if not isinstance(doc.get(field), str) or not doc[field]:
                raise ManifestError(f"{where}: {field} is missing")
        meta = doc.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
            raise ManifestError(f"{where}: metadata.name is missing")
        yield Manifest(doc, path, index)


# ---- the kustomization's transformations -------------------------------------------------------------------


def _transforms(path: Path, k: Obj) -> list[Any]:
    out: list[Any] = []
    namespace = k.get("namespace")
    if namespace is not None:
        if not isinstance(namespace, str) or not namespace:
            raise ManifestError(f"{shown(path)}: namespace must be a name")
        out.append(lambda m: _set_namespace(m, namespace))
    labels = _string_map(path, k, "commonLabels")
    if labels:
        out.append(lambda m: _add_labels(m, labels))
    annotations = _string_map(path, k, "commonAnnotations")
    if annotations:
        out.append(lambda m: _add_annotations(m, annotations))
    images = k.get("images") or []
    if not isinstance(images, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                               for i in images):
        raise ManifestError(f"{shown(path)}: images must be a list of mappings with a name")
    for image in images:
        unknown = sorted(set(image) - {"name", "newName", "newTag", "digest"})
        if unknown:
            raise ManifestError(f"{shown(path)}: images: {image['name']}: unknown field {', '.join(unknown)}")
    if images:
        out.append(lambda m: _set_images(m, images))
    return out


def _string_map(path: Path, k: Obj, field: str) -> dict[str, str]:
    value = k.get(field) or {}
    if not isinstance(value, dict):
        raise ManifestError(f"{shown(path)}: {field} must be a mapping of strings")
    return {str(key): str(v) for key, v in value.items()}


def _set_namespace(m: Manifest, namespace: str) -> None:
    if m.kind not in CLUSTER_SCOPED:
        m.body["metadata"]["namespace"] = namespace


def _template(m: Manifest) -> Obj | None:
    if m.kind in WORKLOADS:
        template = _get(m.body, "spec", "template")
    elif m.kind == "CronJob":
        template = _get(m.body, "spec", "jobTemplate", "spec", "template")
    elif m.kind == "Pod":
        return m.body
    else:
        return None
    return template if isinstance(template, dict) else None


def _add_labels(m: Manifest, labels: dict[str, str]) -> None:
    m.body["metadata"].setdefault("labels", {}).update(labels)
    template = _template(m)
    if template is not None and template is not m.body:
        template.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
        selector = _get(m.body, "spec", "selector")
        if isinstance(selector, dict):
            selector.setdefault("matchLabels", {}).update(labels)
    if m.kind == "Service" and isinstance(m.body.get("spec"), dict):
        m.body["spec"].setdefault("selector", {}).update(labels)


def _add_annotations(m: Manifest, annotations: dict[str, str]) -> None:
    m.body["metadata"].setdefault("annotations", {}).update(annotations)
    template = _template(m)
    if template is not None and template is not m.body:
        template.setdefault("metadata", {}).setdefault("annotations", {}).update(annotations)


def _set_images(m: Manifest, images: list[Obj]) -> None:
    template = _template(m)
    spec = template.get("spec") if template is not None else None
    if not isinstance(spec, dict):
        return
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            if isinstance(c, dict) and isinstance(c.get("image"), str):
                c["image"] = replace_image(c["image"], images)


def replace_image(image: str, images: list[Obj]) -> str:
    """kustomize's `images`: the first entry whose name is the image's name (without tag or digest)."""
    name, tag, digest = split_image(image)
    for entry in images:
        if entry["name"] != name:
            continue
        name = str(entry.get("newName") or name)
        if entry.get("digest"):
            return f"{name}@{entry['digest']}"
        if entry.get("newTag") is not None:
            return f"{name}:{entry['newTag']}"
        return name + (f"@{digest}" if digest else f":{tag}" if tag else "")
    return image


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference; a registry's port is not a tag."""
    rest, _, digest = image.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1:], digest
    return rest, "", digest


def _get(body: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(body, dict):
            return None
        body = body.get(key)
    return body


def snapshot(m: Manifest) -> Obj:
    """A copy of the object, safe to keep (the record stores it as the cluster ran it)."""
    return copy.deepcopy(m.body)
