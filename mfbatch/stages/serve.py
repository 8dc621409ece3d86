"""`mfbatch serve`: choose the run `score` serves (instead of the newest refit)."""

from __future__ import annotations

from pathlib import Path

from mfbatch.artifact.files import check_model
from mfbatch.store import db
from mfbatch.store.datasets import Dataset
from mfbatch.store.runs import Run, find_run


def promote(*, db_path: Path, run_id: str | None) -> Run | None:
    """Make `run_id` what `score` serves by default; None goes back to the newest refit."""
    db.check_writable(db_path)
    con = db.connect(db_path)
    try:
        dataset = Dataset.load(con, db_path)
        run = None
        if run_id is not None:
            run = find_run(con, db_path, dataset, run_id, role="any")
            run.require_dataset(dataset)
            check_model(run, dataset)
        with db.transaction(con, f"the serving choice into {db_path}"):
            db.run(con, "create_serving")
            db.run(con, "clear_serving")
            if run is not None:
                db.run(con, "insert_serving", run_id=run.run_id)
    finally:
        con.close()
    return run
