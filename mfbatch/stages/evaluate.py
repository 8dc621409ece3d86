"""Stage 4, `mfbatch evaluate` (measuring): the validated run judged by its own lists.

Measuring and serving are different roles. `evaluate` never reads `recommendations`: it
builds top-K lists from the *validated* run (trained on train, early-stopped on val)
through the same list builder `score` uses, masking only what that run trained on, with
its own K, and keeps them in `evaluation_lists` beside a popularity baseline built the
same way, so every figure can be audited from rows. The ranking metrics are SQL over
those rows (sql/evaluate.sql); RMSE/MAE use the exported graph's own tables, kept in
`val_predictions`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
from onnx import numpy_helper
from rich.console import Console

from mfbatch.artifact.files import check_model
from mfbatch.artifact.graph import U_AUG, item_table, load_graph
from mfbatch.config import Config
from mfbatch.errors import ConfigError
from mfbatch.progress import log_step
from mfbatch.serving.csr import SeenItems
from mfbatch.serving.lists import MODEL, POPULARITY, ListPlan, build_lists, fitted_counts, to_arrow
from mfbatch.serving.session import Scorer
from mfbatch.store import db
from mfbatch.store.datasets import Dataset
from mfbatch.store.runs import Run, find_run

RANKING = ("precision", "recall", "recall_uncapped", "ndcg", "map", "hit_rate", "coverage")
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
            }
        )

    def line(self) -> str:
        k = self.k
        recall, base = self.model.get("recall"), self.baseline.get("recall")
        lift = f" ({recall / base:.2f}x popularity)" if recall and base else ""
        rmse = self.model.get("rmse")
        rating = f", RMSE {rmse:.4f}" if rmse is not None else ""
        # hits / |relevant|: what the published implicit-feedback tables call recall.
        uncapped = self.model.get("recall_uncapped")
        field = f", uncapped Recall@{k} {uncapped:.4f}" if uncapped is not None else ""
        return (
            f"evaluated run {self.run_id}: Recall@{k} {recall or 0:.4f}{lift}, "
            f"NDCG@{k} {self.model.get('ndcg') or 0:.4f}{rating}{field} over "
            f"{int(self.model.get('users_evaluated') or 0):,} users"
        )


def onnx_predictions(path: Path, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """r_hat for each (user, item) pair from the exported graph's own tables."""
    tables = {t.name: t for t in load_graph(path).graph.initializer}
    u_aug, v_aug_t = numpy_helper.to_array(tables[U_AUG]), item_table(load_graph(path))
    out = np.empty(len(users), dtype=np.float64)
    for start in range(0, len(users), 1 << 18):
        sl = slice(start, start + (1 << 18))
        out[sl] = np.einsum("ij,ji->i", u_aug[users[sl]], v_aug_t[:, items[sl]])
    return out


@dataclass(frozen=True)
class _Stored:
    dataset: Dataset
    run: Run
    seen: pl.DataFrame  # train pairs: what the measuring lists mask
    trained: dict[str, np.ndarray]
    user_ids: pa.Array
    item_ids: pa.Array
    pairs: pl.DataFrame  # the validation ratings


def _read(config: Config) -> _Stored:
    settings = config.evaluate
    con = db.connect(config.db, read_only=True)
    try:
        dataset = Dataset.load(con, config.db)
        run = find_run(con, config.db, dataset, settings.run_id, role="measure")
        check_model(run, dataset)
        if settings.min_rating is not None and dataset.feedback == "implicit":
            raise ConfigError(
                f"--min-rating: {config.db} holds implicit feedback (no ratings), where every "
                "held-out interaction is relevant; drop --min-rating"
            )
        if settings.top_k > dataset.n_items:
            raise ConfigError(
                f"--top-k: {settings.top_k} is more than the catalogue's {dataset.n_items:,} items"
            )
        return _Stored(
            dataset=dataset,
            run=run,
            seen=db.frame(con, "seen_train"),
            trained=db.arrays(con, "trained_counts", all_splits=False),
            user_ids=db.frame(con, "user_ids")["user_id"].to_arrow(),
            item_ids=db.frame(con, "item_ids")["item_id"].to_arrow(),
            pairs=db.frame(con, "val_pairs"),
        )
    finally:
        con.close()


def _lists(config: Config, stored: _Stored) -> pa.Table:
    """The run's and popularity's top-K for every user with a validation rating."""
    settings, dataset = config.evaluate, stored.dataset
    user_counts, item_counts = fitted_counts(stored.trained, dataset.n_users, dataset.n_items)
    item_mask = np.where(item_counts > 0, 0.0, -np.inf).astype(np.float32)
    seen = SeenItems.from_pairs(
        stored.seen["user_idx"].to_numpy(), stored.seen["item_idx"].to_numpy(), dataset.n_users
    )
    # Only users with a validation rating can be judged; their lists are what is measured.
    users = np.unique(stored.pairs["user_idx"].to_numpy()).astype(np.int64)
    cold_all = np.ones(dataset.n_users, dtype=bool)
    plans = {
        MODEL: ListPlan(users, seen, item_mask, user_counts == 0, item_counts, settings.top_k),
        POPULARITY: ListPlan(users, seen, item_mask, cold_all, item_counts, settings.top_k),
    }
    scorer = Scorer(stored.run.model_path, provider=settings.provider, threads=settings.threads)
    batch = scorer.auto_batch_size(dataset.n_items, settings.memory_mb)
    return pa.concat_tables(
        to_arrow(lists, stored.user_ids, stored.item_ids).append_column(
            "recommender", pa.array([name] * int(np.isfinite(lists.scores).sum()), pa.string())
        )
        for name, plan in plans.items()
        for lists in build_lists(scorer, plan, batch)
    )


def _record(
    config: Config, stored: _Stored, staged_lists: pa.Table, staged: pl.DataFrame
) -> Evaluation:
    """Write the lists and predictions, measure them in SQL, record the figures."""
    settings, run, k = config.evaluate, stored.run, config.evaluate.top_k
    lo = stored.dataset.rating_min
    threshold = lo if settings.min_rating is None else float(settings.min_rating)
    model: dict[str, float | None] = {}
    baseline: dict[str, float | None] = {}
    con = db.connect(config.db)
    try:
        con.register("staged_predictions", staged.to_arrow())
        con.register("staged_lists", staged_lists)
        with db.transaction(con, f"evaluation of {run.run_id} into {config.db}"):
            db.run(con, "create_val_predictions")
            db.run(con, "delete_val_predictions", run_id=run.run_id)
            db.run(con, "insert_val_predictions")
            db.run(con, "create_evaluation_lists")
            db.run(con, "delete_evaluation_lists", run_id=run.run_id, k=k)
            db.run(con, "insert_evaluation_lists", run_id=run.run_id, k=k)
            # RMSE/MAE only where scores are ratings: the rating objective on explicit data.
            if run.objective == "rating" and stored.dataset.feedback == "explicit":
                row = db.record(con, "rating_metrics", run_id=run.run_id) or {}
                model.update(rmse=row.get("rmse"), mae=row.get("mae"))
            for name, figures in ((MODEL, model), (POPULARITY, baseline)):
                db.run(con, "stage_eval_recs", run_id=run.run_id, recommender=name, k=k)
                figures.update(_ranking(con, k, threshold))
            result = Evaluation(run.run_id, k, settings.min_rating, model, baseline)
            con.register("staged_evaluations", pl.DataFrame(result.rows(), schema=_ROWS).to_arrow())
            db.run(con, "create_evaluations")
            db.run(con, "delete_evaluations", run_id=run.run_id, k=k)
            db.run(con, "insert_evaluations")
    finally:
        con.close()
    return result


_ROWS = {
    "run_id": pl.String,
    "metric": pl.String,
    "k": pl.Int32,
    "value": pl.Float64,
    "baseline_value": pl.Float64,
    "min_rating": pl.Float64,
}


def evaluate(*, config: Config, console: Console | None = None) -> Evaluation:
    """Build the validated run's lists and the baseline's, measure both, record them."""
    db.check_writable(config.db)
    stored = _read(config)
    run, pairs = stored.run, stored.pairs
    started = time.perf_counter()
    users = pairs["user_idx"].n_unique()
    log_step(console, "evaluate", f"listing {users:,} users with run {run.run_id}", started)
    staged_lists = _lists(config, stored)
    log_step(console, "evaluate", f"measuring {staged_lists.num_rows:,} listed items", started)
    predicted = onnx_predictions(
        run.model_path, pairs["user_idx"].to_numpy(), pairs["item_idx"].to_numpy()
    )
    lo, hi = stored.dataset.rating_min, stored.dataset.rating_max
    staged = pairs.with_columns(
        run_id=pl.lit(run.run_id),
        predicted_rating=pl.Series(np.clip(predicted, 0.0, 1.0) * (hi - lo) + lo),
    )
    return _record(config, stored, staged_lists, staged)


def _ranking(con: duckdb.DuckDBPyConnection, k: int, min_rating: float) -> dict[str, float | None]:
    row = db.one(con, "ranking_metrics", k=k, min_rating=min_rating)
    assert row is not None
    names = (*RANKING, *COUNTS)
    return {
        name: (None if v is None else int(v) if name in COUNTS else float(v))
        for name, v in zip(names, row, strict=True)
    }
