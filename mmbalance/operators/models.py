"""The fitted models of a run under OUT/models/, in one format: ``<name>.npy`` (the float32 array:
centroids, prompt embeddings, principal components) and ``<name>.json`` (what made it, with its
``kind`` and ``name``), written and read through the run store (atomic, checksummed, on any
filesystem). Each model class says how it maps to the two files (``files`` / ``from_files``);
``MODEL_KINDS`` says which class reads a kind, imported only when a run holds one (the solve reads
the principal components without faiss).
"""

from __future__ import annotations

import importlib
import io
from typing import Any, Protocol

import numpy as np

DIRECTORY = "models"

# kind -> "module:class" of the model it loads
MODEL_KINDS = {
    "cluster": "mmbalance.operators.cluster.kmeans:KMeansModel",
    "subclass": "mmbalance.operators.cluster.sbcl:SubclassModel",
    "zero_shot": "mmbalance.operators.zero_shot:ClassEmbeddings",
    "pca": "mmbalance.operators.pca:PcaBasis",
}


class Model(Protocol):
    kind: str

    def files(self) -> tuple[np.ndarray, dict[str, Any]]: ...

    @classmethod
    def from_files(cls, array: np.ndarray, meta: dict[str, Any]) -> "Model": ...


def model_class(kind: str) -> type:
    try:
        module, name = MODEL_KINDS[kind].split(":")
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r} (known: {sorted(MODEL_KINDS)})") from None
    return getattr(importlib.import_module(module), name)


def save_model(store, name: str, model: Model) -> dict[str, Any]:
    """Write ``name``'s two files; returns the metadata written."""
    array, meta = model.files()
    meta = {**meta, "name": name}
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    store.write_bytes(DIRECTORY, f"{name}.npy", data=buf.getvalue())
    store.write_json(DIRECTORY, f"{name}.json", obj=meta)
    return meta


def load_models(store, kinds: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Every model of the run (or of ``kinds``) by name."""
    models = {}
    for name in store.list_files(DIRECTORY, suffix=".json"):
        meta = store.read_json(DIRECTORY, name)
        if kinds is not None and meta.get("kind") not in kinds:
            continue
        array = np.load(io.BytesIO(store.read_bytes(DIRECTORY, name.replace(".json", ".npy"))))
        models[meta["name"]] = model_class(meta["kind"]).from_files(array, meta)
    return models
