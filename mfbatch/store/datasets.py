"""Dataset identity: what `dataset_meta` says the database holds (sha256, shape, scale, split)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb

from mfbatch.errors import DatabaseError
from mfbatch.store import db


@dataclass(frozen=True)
class Dataset:
    """The prepared dataset a database holds, as `dataset_meta` records it."""

    path: Path
    sha256: str
    n_users: int
    n_items: int
    rating_min: float
    rating_max: float
    n_train: int
    n_val: int
    split_kind: str  # time | user-time | random | given: what the validation split holds out
    feedback: str = "explicit"  # implicit: no rating column, every row one positive

    @staticmethod
    def load(con: duckdb.DuckDBPyConnection, path: Path) -> Dataset:
        db.require_tables(con, path, "ratings", "users", "items", "dataset_meta")
        if not db.table_exists(con, "dataset_versions"):
            raise DatabaseError(
                f"{path} was preprocessed by an older mfbatch (no dataset_versions table); run "
                "`mfbatch preprocess` again with the same options, then train"
            )
        columns = db.record(con, "dataset_feedback") or {}
        if not (columns.get("has_weight") and columns.get("has_feedback")):
            raise DatabaseError(
                f"{path} was preprocessed by an older mfbatch (ratings has no weight column); "
                "run `mfbatch preprocess` again with the same options, then train"
            )
        row = db.record(con, "dataset_identity")
        if row is None:
            raise DatabaseError(f"{path}: dataset_meta is empty; run `mfbatch preprocess` again")
        return Dataset(
            path=path,
            sha256=str(row["dataset_sha256"]),
            n_users=int(row["n_users"]),
            n_items=int(row["n_items"]),
            rating_min=float(row["rating_min"]),
            rating_max=float(row["rating_max"]),
            n_train=int(row["n_train"]),
            n_val=int(row["n_val"]),
            split_kind=str(row["split_kind"]),
            feedback=str((db.one(con, "dataset_feedback_value") or ("explicit",))[0]),
        )
