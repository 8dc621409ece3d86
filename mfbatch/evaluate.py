"""Stage 4, `mfbatch evaluate` (and `mfbatch recommend`): the pipeline measures itself.

Ranking metrics are SQL (sql/evaluate.sql) over `recommendations` and the validation split,
with a popularity baseline computed the same way. RMSE/MAE use the exported ONNX model's
own tables, so the figure describes what is served; the predictions are kept in
`val_predictions`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import onnx
import polars as pl
from onnx import numpy_helper

from mfbatch import db
from mfbatch.errors import ConfigError, DatabaseError, ModelError
from mfbatch.export import ONNX_FILE, read_metadata

RANKING = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage")
COUNTS = ("users_evaluated", "users_without_relevant")


@dataclass(frozen=True)
class Evaluation:
    run_id: str
    k: int
    min_rating: float | None
    model: dict[str, float | None]
    baseline: dict[str, float | None]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for metric, value in self.model.items():
            out.append(
                {
                    "run_id": self.run_id,
                    "metric": metric,
                    "k": None if metric in ("rmse", "mae") else self.k,
                    "value": value,
                    "baseline_value": self.baseline.get(metric),
                    "min_rating": self.min_rating,
                }
            )
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "run_id": self.run_id,
                "k": self.k,
                "min_rating": self.min_rating,
                "model": self.model,
                "popularity": self.baseline,
            },
            indent=2,
        )

    def line(self) -> str:
        k = self.k
        recall, base = self.model.get("recall"), self.baseline.get("recall")
        lift = f" ({recall / base:.2f}x popularity)" if recall and base else ""
        rmse = self.model.get("rmse")
        rating = f", RMSE {rmse:.4f}" if rmse is not None else ""
        return (
            f"evaluated run {self.run_id}: Recall@{k} {recall or 0:.4f}{lift}, "
            f"NDCG@{k} {self.model.get('ndcg') or 0:.4f}{rating} over "
            f"{int(self.model.get('users_evaluated') or 0):,} users"
        )


def onnx_predictions(path: Path, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """r_hat for each (user, item) pair from the exported graph's own tables."""
    proto = onnx.load_model(str(path))
    tables = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    u_aug, v_aug_t = tables["U_aug"], tables["V_aug_t"]
    out = np.empty(len(users), dtype=np.float64)
    for start in range(0, len(users), 1 << 18):
        sl = slice(start, start + (1 << 18))
        out[sl] = np.einsum("ij,ji->i", u_aug[users[sl]], v_aug_t[:, items[sl]])
    return out


def _run_row(con: duckdb.DuckDBPyConnection, path: Path, run_id: str) -> tuple[Any, ...]:
    if not db.table_exists(con, "recommendations"):
        raise DatabaseError(f"{path} has no recommendations; run `mfbatch score` first")
    scored = [r[0] for r in db.run(con, "recommended_runs").fetchall()]
    if run_id == "latest":
        if not scored:
            raise DatabaseError(f"{path}: recommendations is empty; run `mfbatch score` first")
        run_id = scored[0]
    elif run_id not in scored:
        raise ConfigError(
            f"--run-id: run {run_id!r} has no recommendations in {path}; "
            f"run `mfbatch score --run-id {run_id}` first"
        )
    row = db.one(con, "run_for_evaluation", run_id=run_id)
    if row is None:
        raise DatabaseError(f"{path}: run {run_id} is not in training_runs")
    if row[2] != "train":
        raise ModelError(
            f"run {run_id} was refit on train+val, so the validation split says nothing about it; "
            "evaluate the validated run it was refit from"
        )
    return row


def evaluate(
    *, db_path: Path, run_id: str = "latest", k: int = 20, min_rating: float | None = None
) -> Evaluation:
    if k < 1:
        raise ConfigError(f"--top-k: must be >= 1, got {k}")
    if not db_path.exists():  # a writable connect would create an empty file
        raise DatabaseError(
            f"database {db_path} does not exist; run `mfbatch preprocess --db {db_path}` first"
        )
    con = db.connect(db_path)
    try:
        db.require_tables(con, db_path, "ratings", "users", "items", "dataset_meta")
        run_id, export_path, _, run_sha, objective = _run_row(con, db_path, run_id)
        meta = db.one(con, "dataset_info")
        assert meta is not None
        if meta[0] != run_sha:
            raise ModelError(
                f"run {run_id} was trained on another dataset than {db_path} now holds; "
                "train and score again"
            )
        lo, hi = float(meta[3]), float(meta[4])
        threshold = lo if min_rating is None else float(min_rating)

        model_path = Path(export_path) / ONNX_FILE
        read_metadata(model_path)  # one-line error when the file is missing or unreadable
        pairs = db.frame(con, "val_pairs")
        predicted = onnx_predictions(
            model_path, pairs["user_idx"].to_numpy(), pairs["item_idx"].to_numpy()
        )
        staged = pairs.with_columns(
            run_id=pl.lit(run_id),
            predicted_rating=pl.Series(np.clip(predicted, 0.0, 1.0) * (hi - lo) + lo),
        )
        model: dict[str, float | None] = {}
        baseline: dict[str, float | None] = {}
        con.register("staged_predictions", staged.to_arrow())
        with db.transaction(con, f"evaluation of {run_id} into {db_path}"):
            db.run(con, "create_val_predictions")
            db.run(con, "delete_val_predictions", run_id=run_id)
            db.run(con, "insert_val_predictions")
            if objective == "rating":
                rmse, mae, _ = db.one(con, "rating_metrics", run_id=run_id) or (None, None, 0)
                model.update(rmse=rmse, mae=mae)
            db.run(con, "stage_model_recs", run_id=run_id, k=k)
            model.update(_ranking(con, k, threshold))
            db.run(con, "stage_popularity_recs", k=k)
            baseline.update(_ranking(con, k, threshold))
            result = Evaluation(run_id, k, min_rating, model, baseline)
            rows = pl.DataFrame(
                result.rows(),
                schema={
                    "run_id": pl.String,
                    "metric": pl.String,
                    "k": pl.Int32,
                    "value": pl.Float64,
                    "baseline_value": pl.Float64,
                    "min_rating": pl.Float64,
                },
            )
            con.register("staged_evaluations", rows.to_arrow())
            db.run(con, "create_evaluations")
            db.run(con, "delete_evaluations", run_id=run_id, k=k)
            db.run(con, "insert_evaluations")
    finally:
        con.close()
    return result


def _ranking(con: duckdb.DuckDBPyConnection, k: int, min_rating: float) -> dict[str, float | None]:
    row = db.one(con, "ranking_metrics", k=k, min_rating=min_rating)
    assert row is not None
    names = (*RANKING, *COUNTS)
    return {
        name: (None if v is None else int(v) if name in COUNTS else float(v))
        for name, v in zip(names, row, strict=True)
    }


@dataclass(frozen=True)
class UserReport:
    user_id: str
    n_ratings: int
    recommendations: list[tuple[Any, ...]]
    top_rated: list[tuple[Any, ...]]


def recommend(*, db_path: Path, user_id: str, limit: int = 20) -> UserReport:
    """One user's list beside their own best-rated items, for a human sanity check."""
    con = db.connect(db_path, read_only=True)
    try:
        db.require_tables(con, db_path, "users", "items", "ratings")
        if not db.table_exists(con, "recommendations"):
            raise DatabaseError(f"{db_path} has no recommendations; run `mfbatch score` first")
        user = db.one(con, "user_by_id", user_id=user_id)
        if user is None:
            raise ConfigError(f"--user: no user {user_id!r} in {db_path} (raw ids, as in users)")
        recs = db.run(con, "user_recommendations", user_id=user_id).fetchall()
        rated = db.run(con, "user_top_rated", user_idx=user[0], limit=limit).fetchall()
    finally:
        con.close()
    return UserReport(
        user_id=user_id, n_ratings=int(user[2]), recommendations=recs, top_rated=rated
    )
