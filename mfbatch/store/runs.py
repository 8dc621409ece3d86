"""Runs and dataset identity: the one typed layer every stage asks "which run", "does this
model belong to this database" and "where are its files".

Two roles, never mixed up:
- a *validated* run (data_seen 'train') was fitted on the train split and early-stopped on
  val: it is what `evaluate` measures;
- a *serving* run is preferably a refit on all ratings (data_seen 'train+val') copying a
  validated run's settings and epoch count: it is what `score` serves by default.

Export folders are recorded relative to the database's folder when they live under it
(else absolute), so `score` / `evaluate` / `export` work from any working directory (cron
starts in the home folder).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import duckdb

from mfbatch.errors import ConfigError, DatabaseError, ModelError
from mfbatch.store import db
from mfbatch.store.datasets import Dataset

Role = Literal["measure", "serve", "any"]
# What a run folder (export/<run_id>/) holds: mfbatch.artifact.files writes them.
ONNX_FILE = "model.onnx"
STATE_FILE = "model.pt"
MANIFEST_FILE = "manifest.json"
VALIDATED = "train"
REFIT = "train+val"


@dataclass(frozen=True)
class Run:
    """One row of `training_runs`, with its export folder resolved to a usable path."""

    run_id: str
    parent_run_id: str | None
    status: str
    data_seen: str
    dataset_sha256: str
    objective: str
    best_epoch: int
    epochs_run: int
    top_k: int
    export_path: Path
    config: dict[str, Any]
    finished_at: datetime

    @property
    def validated(self) -> bool:
        return self.data_seen == VALIDATED

    @property
    def model_path(self) -> Path:
        return self.export_path / ONNX_FILE

    def require_dataset(self, dataset: Dataset) -> None:
        """The run must have been trained on the data the database holds now, or on an
        earlier version of it: `preprocess --append` keeps dataset_sha256 (the id mapping
        and split), a re-preprocess that remaps ids does not."""
        if self.dataset_sha256 != dataset.sha256:
            raise ModelError(
                f"run {self.run_id} was trained on dataset {self.dataset_sha256[:12]}, but "
                f"{dataset.path} now holds {dataset.sha256[:12]} (re-preprocessed since); "
                "train again on this database or pass the --db it was trained on"
            )


def stored_export_path(folder: Path, db_path: Path) -> str:
    """How a run's folder is recorded: relative to the database's folder when under it."""
    absolute = Path(os.path.abspath(folder))
    base = Path(os.path.abspath(db_path)).parent
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return str(absolute)


def resolve_export_path(stored: str, db_path: Path) -> Path:
    path = Path(stored)
    if path.is_absolute():
        return path
    return Path(os.path.abspath(db_path)).parent / path


def _run(row: dict[str, Any], db_path: Path) -> Run:
    return Run(
        run_id=str(row["run_id"]),
        parent_run_id=row["parent_run_id"],
        status=str(row["status"]),
        data_seen=str(row["data_seen"]),
        dataset_sha256=str(row["dataset_sha256"]),
        objective=str(row["objective"]),
        best_epoch=int(row["best_epoch"]),
        epochs_run=int(row["epochs_run"]),
        top_k=int(row["top_k"]),
        export_path=resolve_export_path(str(row["export_path"]), db_path),
        config=json.loads(row["config"]) if isinstance(row["config"], str) else row["config"],
        finished_at=row["finished_at"],
    )


def find_run(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    dataset: Dataset,
    run_id: str = "latest",
    *,
    role: Role,
) -> Run:
    """The run a command works with.

    'latest' means, by role: `measure`, the newest validated run on the current data;
    `serve`, the newest refit on the current data, else the newest validated run;
    `any`, the newest usable run.
    """
    if not db.table_exists(con, "training_runs"):
        raise DatabaseError(f"{path} has no training runs; run `mfbatch train` first")
    if run_id != "latest":
        row = db.record(con, "run_by_id", run_id=run_id)
        if row is None:
            raise ConfigError(f"--run-id: no run {run_id!r} in {path}; see `training_runs`")
        run = _run(row, path)
        if run.status == "diverged":
            raise ModelError(f"run {run_id} diverged in training; train again")
        if role == "measure" and not run.validated:
            parent = f" ({run.parent_run_id})" if run.parent_run_id else ""
            raise ModelError(
                f"run {run_id} was refit on train+val, so the validation split says nothing "
                f"about it; evaluate the validated run it was refit from{parent}"
            )
        return run
    if role == "serve" and db.table_exists(con, "serving"):
        chosen = db.record(con, "promoted_run")
        if chosen is not None:
            # Someone chose what is served (`mfbatch serve`): that, or a clear refusal.
            run = find_run(con, path, dataset, str(chosen["run_id"]), role="any")
            if run.dataset_sha256 != dataset.sha256:
                # Training again would not help: the promotion still names the old run.
                raise ModelError(
                    f"run {run.run_id}, promoted with `mfbatch serve`, was trained on other "
                    f"data than {path} holds now (re-preprocessed since); run `mfbatch serve "
                    f"--clear --db {path}` to serve the newest refit, or promote a run "
                    "trained on this data"
                )
            return run
    every = [_run(r, path) for r in db.records(con, "newest_runs")]
    runs = every if role == "any" else [r for r in every if r.dataset_sha256 == dataset.sha256]
    if every and not runs:
        every[0].require_dataset(dataset)  # says the data changed, and what to do
    if role == "measure":
        runs = [r for r in runs if r.validated]
    elif role == "serve":
        runs = sorted(runs, key=lambda r: r.validated)  # refits first, newest first within
    if not runs:
        what = "validated " if role == "measure" else ""
        raise DatabaseError(
            f"{path} has no usable {what}training run on its current data; "
            "run `mfbatch train` first"
        )
    return runs[0]


@dataclass(frozen=True)
class RunListing:
    """One line of `mfbatch runs`."""

    run_id: str
    parent_run_id: str | None
    status: str
    data_seen: str
    objective: str
    best_epoch: int
    epochs_run: int
    top_k: int
    val_recall: float | None
    val_ndcg: float | None
    val_rmse: float | None
    n_train: int
    seconds: float
    finished_at: datetime
    current_data: bool  # trained on the data the database holds now
    promoted: bool  # chosen with `mfbatch serve`
    served_users: int  # rows of `recommendations` it made, in users


def list_runs(*, db_path: Path) -> list[RunListing]:
    """Every recorded run, newest first, with what it is and whether it is served."""
    con = db.connect(db_path, read_only=True)
    try:
        dataset = Dataset.load(con, db_path)
        if not db.table_exists(con, "training_runs"):
            return []
        promoted = db.record(con, "promoted_run") if db.table_exists(con, "serving") else None
        served = (
            {r["run_id"]: int(r["users"]) for r in db.records(con, "served_runs")}
            if db.table_exists(con, "recommendations")
            else {}
        )
        rows = db.records(con, "run_listing")
    finally:
        con.close()
    chosen = promoted["run_id"] if promoted else None
    return [
        RunListing(
            run_id=r["run_id"],
            parent_run_id=r["parent_run_id"],
            status=r["status"],
            data_seen=r["data_seen"],
            objective=r["objective"],
            best_epoch=int(r["best_epoch"]),
            epochs_run=int(r["epochs_run"]),
            top_k=int(r["top_k"]),
            val_recall=r["val_recall"],
            val_ndcg=r["val_ndcg"],
            val_rmse=r["val_rmse"],
            n_train=int(r["n_train"]),
            seconds=float(r["seconds"]),
            finished_at=r["finished_at"],
            current_data=r["dataset_sha256"] == dataset.sha256,
            promoted=r["run_id"] == chosen,
            served_users=served.get(r["run_id"], 0),
        )
        for r in rows
    ]
