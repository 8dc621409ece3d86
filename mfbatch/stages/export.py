"""`mfbatch export`: rebuild a recorded run's model.onnx from its saved weights."""

from __future__ import annotations

from pathlib import Path

from mfbatch.artifact.files import export_model, load_model
from mfbatch.store import db
from mfbatch.store.datasets import Dataset
from mfbatch.store.runs import find_run


def export_run(*, db_path: Path, run_id: str = "latest") -> Path:
    """Re-export a recorded run's saved weights to its folder's model.onnx."""
    con = db.connect(db_path, read_only=True)
    try:
        dataset = Dataset.load(con, db_path)
        run = find_run(con, db_path, dataset, run_id, role="any")
    finally:
        con.close()
    model, manifest = load_model(run.export_path)
    return export_model(model, manifest, run.export_path)
