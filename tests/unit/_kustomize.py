"""Render a kustomization (deploy/k8s) without the kustomize binary, for offline tests.

Supports exactly what deploy/k8s uses, and refuses anything else (so it cannot quietly differ
from `kubectl kustomize`): `resources` (files, or directories with a kustomization.yaml),
`namespace`, `labels` (metadata labels only), `images` (newName/newTag), `replicas`, and
`patches` given by `path` as strategic merge patches matched by kind and name. The merge is
kustomize's for these manifests: maps merge key by key, lists of maps whose items all have a
`name` (containers, env, volumes, volumeMounts) merge item by item on it, other lists are
replaced.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KNOWN = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "replicas",
         "patches"}  # fmt: skip
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def build(directory: Path) -> list[dict[str, Any]]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KNOWN
    if unknown:
        raise ValueError(f"{directory}: kustomization keys this renderer does not do: {unknown}")
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = directory / res
        if path.is_dir():
            docs += build(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            raise ValueError(f"{directory}: only `patches: - path:` is supported, got {patch}")
        for doc in yaml.safe_load_all((directory / patch["path"]).read_text()):
            target = find(docs, doc["kind"], doc["metadata"]["name"])
            merged = merge(target, doc)
            target.clear()
            target.update(merged)
    for rep in k.get("replicas", []):
        find(docs, "Deployment", rep["name"])["spec"]["replicas"] = rep["count"]
    for image in k.get("images", []):
        for doc in docs:
            for c in containers(doc):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    for label in k.get("labels", []):
        if set(label) != {"pairs"}:
            raise ValueError(f"{directory}: only `labels: - pairs:` is supported")
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    if "namespace" in k:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = k["namespace"]
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(hits) != 1:
        raise ValueError(f"{len(hits)} resources {kind}/{name}")
    return hits[0]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        if "$patch" in patch:
            raise ValueError("$patch directives are not supported")
        out = copy.deepcopy(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if _named(base) and _named(patch):
        out = copy.deepcopy(base)
        for item in patch:
            at = next((i for i, b in enumerate(out) if b["name"] == item["name"]), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = merge(out[at], item)
        return out
    return copy.deepcopy(patch)


def _named(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, dict) and "name" in v for v in value)
    )
