"""A run's folder: weights and manifest (`save_model` / `load_model`), and its model.onnx
(`export_model`, `read_metadata`, `check_model`).

torch is imported inside the functions that need it, so scoring (which reads only the
graph) never loads it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mfbatch.artifact.parts import mark_complete, remove_parts, serving_parts, write_parts
from mfbatch.errors import ModelError, first_line
from mfbatch.store.datasets import Dataset
from mfbatch.store.runs import MANIFEST_FILE, ONNX_FILE, STATE_FILE, Run
from mfbatch.version import __version__

if TYPE_CHECKING:  # scoring reads the graph without torch; only export needs the module
    from mfbatch.training.model import MatrixFactorization

__all__ = ["MANIFEST_FILE", "ONNX_FILE", "STATE_FILE"]


def export_model(model: MatrixFactorization, manifest: dict[str, Any], folder: Path) -> Path:
    """Write folder/model.onnx (atomically) with the run's identity in its metadata, and
    the parts serving reads (`mfbatch.artifact.parts`), cut from the same tables.

    Written as bytes (mfbatch.artifact.wire): importing onnx to write them cost more than
    the rest of the export.
    """
    from mfbatch.artifact import wire
    from mfbatch.artifact.graph import OPSET, U_AUG, V_AUG_T, augmented_tables, model_bytes

    users_aug, items_aug_t = augmented_tables(model)
    metadata = {
        "run_id": manifest["run_id"],
        "dataset_sha256": manifest["dataset_sha256"],
        "data_seen": manifest["data_seen"],
        "n_users": model.shape.n_users,
        "n_items": model.shape.n_items,
        "embedding_dim": model.shape.dim,
        "rating_min": manifest["rating_min"],
        "rating_max": manifest["rating_max"],
        "objective": manifest["objective"],
        "opset": OPSET,
        "mfbatch_version": __version__,
    }
    tables = (wire.tensor(U_AUG, users_aug), wire.tensor(V_AUG_T, items_aug_t))
    target = folder / ONNX_FILE
    partial = folder / (ONNX_FILE + ".part")
    try:
        # Parts first, model.onnx, then serving.json marking the set complete: a crash
        # anywhere leaves either the new set or a model.onnx served as an older export.
        (folder / "serving.json").unlink(missing_ok=True)
        parts = write_parts(tables, items_aug_t, folder)
        partial.write_bytes(model_bytes(tables, items_aug_t.shape[1], metadata))
        for part in parts:
            part.replace(part.with_name(part.name.removesuffix(".part")))
        partial.replace(target)
        non_finite = {
            name: int((~np.isfinite(table)).sum())
            for name, table in ((U_AUG, users_aug), (V_AUG_T, items_aug_t))
        }
        mark_complete(metadata, non_finite, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        remove_parts(folder)
        raise ModelError(
            f"could not write {target} ({exc}); free space and run `mfbatch export`"
        ) from None
    return target


def save_model(
    model: MatrixFactorization, path: Path, *, manifest: dict[str, Any]
) -> dict[str, Any]:
    """Write weights + manifest to a temporary folder, then rename: never a half-saved run."""
    import torch

    staging = path.with_name(f".{path.name}.tmp")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, staging / STATE_FILE)
        manifest = {**manifest, "files": {"state_dict": STATE_FILE}}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(staging, path)
        return manifest
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as RuntimeError
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelError(
            f"could not save the model to {path} ({first_line(exc)}); free space or pass "
            "--export-dir"
        ) from None


def load_model(path: Path) -> tuple[MatrixFactorization, dict[str, Any]]:
    """Rebuild a saved run from export/<run_id>/ (weights loaded with weights_only=True)."""
    import torch

    from mfbatch.training.model import MatrixFactorization, ModelShape

    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ModelError(
            f"{path}: no {MANIFEST_FILE}; pass an export/<run_id> folder of mfbatch train"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        model = MatrixFactorization(ModelShape(**manifest["shape"]))
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # torch.load/json raise assorted IO, pickle and zip errors
        first = first_line(exc)
        raise ModelError(
            f"{path}: the saved model can't be loaded ({first}); train again"
        ) from None
    model.eval()
    return model, manifest


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata export_model stored, without loading the weights into a session."""
    if not path.is_file():
        raise ModelError(
            f"{path} does not exist; run `mfbatch export --run-id <id>` (or `mfbatch train`)"
        )
    parts = serving_parts(path)
    if parts is not None:
        return parts.metadata
    from mfbatch.artifact.graph import load_graph  # an older export: parse model.onnx

    try:
        proto = load_graph(path)
    except Exception as exc:  # onnx raises assorted protobuf/IO errors
        raise ModelError(
            f"{path} is not a readable ONNX model ({exc}); re-run `mfbatch export`"
        ) from None
    return {p.key: json.loads(p.value) for p in proto.metadata_props}


def check_model(run: Run, dataset: Dataset) -> dict[str, Any]:
    """The exported graph's metadata, after checking it is this run's, for this data."""
    run.require_dataset(dataset)
    metadata = read_metadata(run.model_path)
    if metadata.get("run_id") != run.run_id:
        raise ModelError(
            f"{run.model_path} belongs to run {metadata.get('run_id')!r}, not "
            f"{run.run_id!r}; run `mfbatch export --run-id {run.run_id}` to rebuild it"
        )
    if metadata.get("dataset_sha256") != dataset.sha256:
        raise ModelError(
            f"{run.model_path} was exported for dataset "
            f"{str(metadata.get('dataset_sha256'))[:12]}, but {dataset.path} holds "
            f"{dataset.sha256[:12]}; train again on this database"
        )
    shape = (int(metadata.get("n_users", -1)), int(metadata.get("n_items", -1)))
    # `preprocess --append` only adds ids after the ones a model knows, so a database
    # that has grown since is served (new users folded in); one with fewer ids is not
    # the data the model was trained on.
    if not (0 < shape[0] <= dataset.n_users and 0 < shape[1] <= dataset.n_items):
        raise ModelError(
            f"{run.model_path} covers {shape[0]} users x {shape[1]} items but "
            f"{dataset.path} has {dataset.n_users} x {dataset.n_items}; train again"
        )
    return metadata
