"""`mfbatch evaluate` and `mfbatch recommend`: every metric against numbers worked out by hand.

The metrics, as sql/evaluate.sql computes them and as the hand arithmetic below follows:

- relevant(u) = u's validation ratings with rating >= min_rating (default: every one);
- users with no relevant item are left out of every average and counted
  (users_without_relevant); a user with relevant items but no list counts with zeros;
- a hit is a recommended item at rank <= K that is relevant;
- Precision@K = hits / K;  Recall@K = hits / min(|relevant|, K) (LensKit with a cutoff,
  the EASE / Mult-VAE papers);  recall_uncapped = hits / |relevant|;
- NDCG@K = sum over hits of 1/log2(rank + 1), divided by the ideal DCG of min(|relevant|, K)
  hits (1 + 1/log2(3) + ... for that many ranks);
- MAP@K = (sum over hits at rank r of hits-so-far / r) / min(|relevant|, K);
- HitRate@K = share of (evaluated) users with at least one hit;
- coverage = distinct items in anyone's top K / catalogue size;
- popularity baseline: for each user the K most-rated train items they did not rate in
  train, ties broken by item_idx (built in Python by mfbatch.lists, like every list).

`evaluate` never reads `recommendations`: it builds the validated run's lists itself and
keeps them in `evaluation_lists`, so the figures are checked here against those rows.

The hand-made databases are real DuckDB files built with the project's own create_* and
insert_* queries, so the SQL under test reads exactly the schema the pipeline writes.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import onnx
import polars as pl
import pytest
import torch
from conftest import UserError, cli, ok, rows, tables

from mfbatch import db
from mfbatch.config import load_config
from mfbatch.export import ONNX_FILE, build_graph, load_model
from mfbatch.history import publish
from mfbatch.inference import SeenItems
from mfbatch.lists import popularity_top_k
from mfbatch.stages.evaluate import Evaluation, _ranking
from mfbatch.stages.evaluate import evaluate as run_evaluate

CONFIG_ERROR, DATABASE_ERROR, MODEL_ERROR = 2, 4, 5
RUN_ID = "run-1"
SHA = "sha-of-the-hand-made-dataset"

# --- running the CLI -----------------------------------------------------------------------


def evaluate(
    *, db_path: Path, k: int = 20, min_rating: float | None = None, run_id: str = "latest"
) -> Evaluation:
    config = load_config(
        db=db_path,
        overrides={
            "evaluate": {"top_k": k, "min_rating": min_rating, "run_id": run_id},
            "score": {"provider": "cpu", "threads": 1},
        },
    )
    return run_evaluate(config=config)


# --- building a database by hand -----------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    users: Sequence[str]  # user_id by user_idx
    items: Sequence[str]  # item_id by item_idx
    ratings: Sequence[tuple[int, int, float, str]]  # (user_idx, item_idx, stars, split)
    titles: Sequence[str | None] | None = None
    rating_min: float = 1.0
    rating_max: float = 5.0


def build_db(
    path: Path,
    data: Dataset,
    recs: Mapping[str, Sequence[str]] | None,
    *,
    run: bool = True,
    data_seen: str = "train",
    objective: str = "rating",
    run_sha: str = SHA,
    item_bias: Sequence[float] | None = None,
) -> Path:
    """users/items/ratings/dataset_meta, one training run, its ONNX model and its lists.

    recs maps user_id -> item_ids in rank order (None: no recommendations table at all).
    The model's tables are U_aug[u] = [1, 0.5], V_aug[i] = [b_i, 1], so it predicts
    0.5 + b_i on the [0, 1] scale: 3 stars on 1..5 unless item_bias says otherwise.
    """
    n_users, n_items = len(data.users), len(data.items)
    start = datetime(2024, 1, 1)
    ratings = pl.DataFrame(
        {
            "user_idx": [r[0] for r in data.ratings],
            "item_idx": [r[1] for r in data.ratings],
            "rating": [float(r[2]) for r in data.ratings],
            # Later rows are later in time, so validation rows (listed last) are the newest.
            "ts": [start + timedelta(hours=n) for n in range(len(data.ratings))],
            "split": [r[3] for r in data.ratings],
        },
        schema={
            "user_idx": pl.Int32,
            "item_idx": pl.Int32,
            "rating": pl.Float64,
            "ts": pl.Datetime("us"),
            "split": pl.String,
        },
    )
    span = data.rating_max - data.rating_min
    train = ratings.filter(pl.col("split") == "train")
    ratings = ratings.with_columns(
        rating_norm=(pl.col("rating") - data.rating_min) / span,
        cold_user=(pl.col("split") == "val")
        & ~pl.col("user_idx").is_in(train["user_idx"].unique().to_list()),
        cold_item=(pl.col("split") == "val")
        & ~pl.col("item_idx").is_in(train["item_idx"].unique().to_list()),
    )

    def counts(column: str, n: int, ids: Sequence[str]) -> pl.DataFrame:
        every = ratings.group_by(column).len("n_ratings")
        trained = train.group_by(column).len("n_train")
        return (
            pl.DataFrame(
                {column: list(range(n)), "raw": list(ids)}, schema_overrides={column: pl.Int32}
            )
            .join(every, on=column, how="left")
            .join(trained, on=column, how="left")
            .with_columns(pl.col("n_ratings", "n_train").fill_null(0).cast(pl.Int32))
        )

    users = counts("user_idx", n_users, data.users).select(
        "user_idx", pl.col("raw").alias("user_id"), "n_ratings", "n_train"
    )
    items = counts("item_idx", n_items, data.items).select(
        "item_idx",
        pl.col("raw").alias("item_id"),
        pl.Series("title", list(data.titles) if data.titles else [None] * n_items, pl.String),
        pl.lit(None, pl.String).alias("genres"),
        "n_ratings",
        "n_train",
    )
    con = duckdb.connect(str(path))
    try:
        for table in ("users", "items", "ratings", "dataset_meta"):
            db.run(con, f"create_{table}")
        con.register("staged_users", users.to_arrow())
        con.register("staged_items", items.to_arrow())
        con.register("staged_ratings", ratings.to_arrow())
        for table in ("users", "items", "ratings"):
            db.run(con, f"insert_{table}")
        n_val = ratings.filter(pl.col("split") == "val").height
        db.run(
            con,
            "insert_dataset_meta",
            dataset_sha256=SHA,
            source="hand-made",
            source_sha256="-",
            loader="test",
            layout="test",
            rating_min=data.rating_min,
            rating_max=data.rating_max,
            rows_in=ratings.height,
            duplicates_dropped=0,
            n_users=n_users,
            n_items=n_items,
            n_ratings=ratings.height,
            n_train=train.height,
            n_val=n_val,
            n_val_cold_user=int(ratings["cold_user"].sum()),
            n_val_cold_item=int(ratings["cold_item"].sum()),
            split_kind="time",
            val_fraction=0.1,
            split_seed=0,
            time_cutoff=None,
            config="{}",
            mfbatch_version="test",
            seconds=0.0,
        )
        if run:
            folder = path.parent / "export" / RUN_ID
            folder.mkdir(parents=True, exist_ok=True)
            bias = np.zeros(n_items) if item_bias is None else np.asarray(item_bias)
            users_aug = np.tile(np.array([1.0, 0.5], dtype=np.float32), (n_users, 1))
            items_aug_t = np.stack([bias, np.ones(n_items)]).astype(np.float32)
            onnx.save_model(
                build_graph(
                    users_aug,
                    items_aug_t,
                    {
                        "run_id": RUN_ID,
                        "dataset_sha256": run_sha,
                        "n_users": n_users,
                        "n_items": n_items,
                    },
                ),
                str(folder / ONNX_FILE),
            )
            db.run(con, "create_training_runs")
            db.run(
                con,
                "insert_training_run",
                run_id=RUN_ID,
                parent_run_id=None,
                started_at=start,
                finished_at=start,
                status="completed",
                config="{}",
                dataset_sha256=run_sha,
                data_seen=data_seen,
                device="cpu",
                objective=objective,
                epochs_run=1,
                best_epoch=1,
                train_loss=0.0,
                val_rmse=None,
                val_mae=None,
                val_recall=None,
                val_ndcg=None,
                top_k=20,
                n_train=train.height,
                seconds=0.0,
                examples_per_second=0.0,
                export_path=str(folder.relative_to(path.parent)),
            )
        if recs is not None:
            spooled = pl.DataFrame(
                [
                    (user, item, rank, 1.0 / rank, 3.0, "model")
                    for user, listed in recs.items()
                    for rank, item in enumerate(listed, start=1)
                ],
                schema={
                    "user_id": pl.String,
                    "item_id": pl.String,
                    "rank": pl.Int32,
                    "score": pl.Float64,
                    "predicted_rating": pl.Float64,
                    "source": pl.String,
                },
                orient="row",
            )
            con.register("spooled_recommendations", spooled.to_arrow())
            publish(con, run_id=RUN_ID, created=start, partial=False, keep=1)
    finally:
        con.close()
    return path


# --- the hand-made case --------------------------------------------------------------------
#
# Ten items i1..i10 (item_idx 0..9), five users u1..u5 (user_idx 0..4), ratings 1..5 stars.
#
# train counts: i1 3 (u2 u3 u4), i4 3 (u1 u2 u4), i6 3 (u1 u3 u4), i10 2 (u1 u5),
#               i2 i3 i7 i8 1 each, i5 i9 none
# popularity order (count desc, then item_idx): i1 i4 i6 | i10 | i2 i3 i7 i8

USERS = ["u1", "u2", "u3", "u4", "u5"]
ITEMS = [f"i{n}" for n in range(1, 11)]
TITLES = ["Alpha", "Bravo", "Charlie", "Delta", "Echo"]
TITLES += ["Foxtrot", "Golf", "Hotel", "India", "Juliett"]
TRAIN = {
    "u1": {"i4": 3, "i6": 4, "i10": 1},
    "u2": {"i1": 4, "i4": 2, "i7": 5},
    "u3": {"i1": 3, "i6": 3, "i8": 4},
    "u4": {"i1": 5, "i4": 4, "i6": 2},
    "u5": {"i3": 3, "i2": 4, "i10": 2},
}
VAL = {
    "u1": {"i1": 5, "i2": 4, "i3": 2, "i9": 5},  # 4 relevant: more than K = 3
    "u2": {"i6": 3},  # 1 relevant: fewer than K
    # u3: no validation rating at all -> left out, counted
    "u4": {"i2": 1, "i8": 2},  # relevant, but no recommendations
    "u5": {"i5": 4, "i7": 3},
}
RECS = {
    "u1": ["i1", "i5", "i3", "i9"],  # i9 (relevant) at rank 4: beyond K = 3, no hit
    "u2": ["i3", "i6", "i5"],
    "u3": ["i2", "i3", "i4"],
    "u5": ["i1", "i4", "i7"],
}
K = 3
L3 = 1.0 / math.log2(3)  # the discount of rank 2
IDCG1, IDCG2, IDCG3 = 1.0, 1.0 + L3, 1.0 + L3 + 0.5

# Model lists at K = 3, all validation ratings relevant:
#   u1 hits at 1 (i1) and 3 (i3), |rel| 4: P 2/3, R 2/4, DCG 1 + 1/2, AP (1/1 + 2/3) / 3
#   u2 hit at 2 (i6), |rel| 1:             P 1/3, R 1/1, DCG L3,      AP (1/2) / 1
#   u4 no list, |rel| 2:                   all 0
#   u5 hit at 3 (i7), |rel| 2:             P 1/3, R 1/2, DCG 1/2,     AP (1/3) / 2
#   top-3 items: i1 i5 i3 | i3 i6 i5 | i2 i3 i4 | i1 i4 i7 -> 7 distinct of 10
MODEL_K3 = {
    "precision": (2 / 3 + 1 / 3 + 0 + 1 / 3) / 4,  # = 1/3
    "recall": (2 / 3 + 1 / 1 + 0 + 1 / 2) / 4,  # u1: 2 hits of min(4, K) = 3 -> 13/24
    "recall_uncapped": (2 / 4 + 1 / 1 + 0 + 1 / 2) / 4,  # = 1/2
    "ndcg": ((1 + 0.5) / IDCG3 + L3 / IDCG1 + 0 + 0.5 / IDCG2) / 4,
    "map": ((1 + 2 / 3) / 3 + (1 / 2) / 1 + 0 + (1 / 3) / 2) / 4,  # = 11/36
    "hit_rate": 3 / 4,
    "coverage": 7 / 10,
    "users_evaluated": 4,
    "users_without_relevant": 1,
}
# Popularity lists at K = 3 (the first K + 3 = 6 popular items are the candidates,
# 3 being the most train ratings of any user):
#   u1 (rated i4 i6 i10): i1 i2 i3    hits at 1, 2, 3, |rel| 4: P 1, R 3/4, NDCG 1, AP 3/3
#   u2 (rated i1 i4 i7):  i6 i10 i2   hit at 1, |rel| 1:        P 1/3, R 1, NDCG 1, AP 1
#   u3 (rated i1 i6 i8):  i4 i10 i2   (no relevant items)
#   u4 (rated i1 i4 i6):  i10 i2 i3   hit at 2 (i2), |rel| 2:   P 1/3, R 1/2, DCG L3, AP (1/2)/2
#   u5 (rated i3 i2 i10): i1 i4 i6    no hit, |rel| 2
#   items: i1 i2 i3 i4 i6 i10 -> 6 distinct of 10
POPULAR_K3 = {
    "u1": ["i1", "i2", "i3"],
    "u2": ["i6", "i10", "i2"],
    "u3": ["i4", "i10", "i2"],
    "u4": ["i10", "i2", "i3"],
    "u5": ["i1", "i4", "i6"],
}
BASELINE_K3 = {
    "precision": (3 / 3 + 1 / 3 + 1 / 3 + 0) / 4,  # = 5/12
    "recall": (3 / 3 + 1 / 1 + 1 / 2 + 0) / 4,  # = 5/8
    "recall_uncapped": (3 / 4 + 1 / 1 + 1 / 2 + 0) / 4,  # = 9/16
    "ndcg": (IDCG3 / IDCG3 + 1 / IDCG1 + L3 / IDCG2 + 0) / 4,
    "map": ((1 / 1 + 2 / 2 + 3 / 3) / 3 + 1 / 1 + (1 / 2) / 2 + 0) / 4,  # = 9/16
    "hit_rate": 3 / 4,
    "coverage": 6 / 10,
    "users_evaluated": 4,
    "users_without_relevant": 1,
}
# --min-rating 4: relevant u1 {i1, i2, i9}, u5 {i5}; u2 (a 3) and u4 (1, 2) join u3 among
# the users without relevant items.
#   model: u1 hit at 1 only, |rel| 3: P 1/3, R 1/3, DCG 1, AP 1/3;  u5 no hit
#   popularity: u1 i1 i2 i3 hits at 1, 2: P 2/3, R 2/3, DCG 1 + L3, AP (1 + 2/2)/3;  u5 none
MODEL_K3_MIN4 = {
    "precision": (1 / 3 + 0) / 2,
    "recall": (1 / 3 + 0) / 2,
    "recall_uncapped": (1 / 3 + 0) / 2,
    "ndcg": (1 / IDCG3 + 0) / 2,
    "map": ((1 / 1) / 3 + 0) / 2,
    "hit_rate": 1 / 2,
    "coverage": 7 / 10,
    "users_evaluated": 2,
    "users_without_relevant": 3,
}
BASELINE_K3_MIN4 = {
    "precision": (2 / 3 + 0) / 2,
    "recall": (2 / 3 + 0) / 2,
    "recall_uncapped": (2 / 3 + 0) / 2,
    "ndcg": ((1 + L3) / IDCG3 + 0) / 2,
    "map": ((1 / 1 + 2 / 2) / 3 + 0) / 2,
    "hit_rate": 1 / 2,
    "coverage": 6 / 10,
    "users_evaluated": 2,
    "users_without_relevant": 3,
}
# RMSE/MAE: the model predicts 0.5 + b_i, clipped to [0, 1], times 4 plus 1 (stars).
# b_i9 = +1 -> 1.5 -> clipped 1 -> 5 stars;  b_i8 = -1 -> -0.5 -> clipped 0 -> 1 star;
# every other item 0.5 -> 3 stars. Validation pairs (prediction - rating):
#   u1: i1 3-5=-2, i2 3-4=-1, i3 3-2=+1, i9 5-5=0;  u2: i6 3-3=0;
#   u4: i2 3-1=+2, i8 1-2=-1;  u5: i5 3-4=-1, i7 3-3=0
# squared: 4+1+1+0+0+4+1+1+0 = 12 over 9 pairs;  absolute: 2+1+1+0+0+2+1+1+0 = 8
ITEM_BIAS = [0.0] * 7 + [-1.0, 1.0, 0.0]  # i8 (idx 7) and i9 (idx 8)
RATING_K3 = {"rmse": math.sqrt(12 / 9), "mae": 8 / 9}
VAL_PREDICTIONS = [  # (user_idx, item_idx, rating, predicted_rating), in val_pairs order
    (0, 0, 5.0, 3.0),
    (0, 1, 4.0, 3.0),
    (0, 2, 2.0, 3.0),
    (0, 8, 5.0, 5.0),
    (1, 5, 3.0, 3.0),
    (3, 1, 1.0, 3.0),
    (3, 7, 2.0, 1.0),
    (4, 4, 4.0, 3.0),
    (4, 6, 3.0, 3.0),
]


def hand_dataset() -> Dataset:
    u_idx = {u: n for n, u in enumerate(USERS)}
    i_idx = {i: n for n, i in enumerate(ITEMS)}
    ratings = [
        (u_idx[user], i_idx[item], float(stars), split)
        for split, table in (("train", TRAIN), ("val", VAL))
        for user, rated in table.items()
        for item, stars in rated.items()
    ]
    return Dataset(USERS, ITEMS, ratings, TITLES)


def hand_db(tmp_path: Path, recs: Mapping[str, Sequence[str]] | None = RECS, **kw: Any) -> Path:
    return build_db(tmp_path / "hand.duckdb", hand_dataset(), recs, item_bias=ITEM_BIAS, **kw)


def stage(
    con: duckdb.DuckDBPyConnection,
    lists: Mapping[str, Sequence[str]],
    k: int,
    recommender: str = "model",
) -> None:
    """Put hand-made lists where `evaluate` keeps its own, and stage them for the metrics."""
    frame = pl.DataFrame(
        [
            (user, item, rank, 1.0 / rank, "model", recommender)
            for user, listed in lists.items()
            for rank, item in enumerate(listed, start=1)
        ],
        schema={
            "user_id": pl.String,
            "item_id": pl.String,
            "rank": pl.Int32,
            "score": pl.Float64,
            "source": pl.String,
            "recommender": pl.String,
        },
        orient="row",
    )
    con.register("staged_lists", frame.to_arrow())
    db.run(con, "create_evaluation_lists")
    db.run(con, "delete_evaluation_lists", run_id=RUN_ID, k=k)
    db.run(con, "insert_evaluation_lists", run_id=RUN_ID, k=k)
    db.run(con, "stage_eval_recs", run_id=RUN_ID, recommender=recommender, k=k)


def python_popularity(data: Dataset, k: int) -> dict[str, list[str]]:
    """The popularity lists mfbatch.lists builds, for every user, as raw ids."""
    train = [(u, i) for u, i, _, split in data.ratings if split == "train"]
    seen = SeenItems.from_pairs(
        np.array([u for u, _ in train]), np.array([i for _, i in train]), len(data.users)
    )
    counts = np.bincount([i for _, i in train], minlength=len(data.items))
    users = np.arange(len(data.users))
    mask = np.zeros(len(data.items), dtype=np.float32)
    items, scores = popularity_top_k(users, seen, mask, counts, k)
    return {
        data.users[u]: [data.items[i] for i, s in zip(items[u], scores[u], strict=True) if s > -1]
        for u in users
    }


def stored_lists(path: Path, recommender: str, k: int) -> dict[str, list[str]]:
    lists: dict[str, list[str]] = {}
    for user, item in rows(
        path,
        f"SELECT user_id, item_id FROM evaluation_lists WHERE recommender = '{recommender}' "
        f"AND k = {k} ORDER BY user_id, rank",
    ):
        lists.setdefault(user, []).append(item)
    return lists


def audit(path: Path, data: Dataset, k: int, min_rating: float = 1.0) -> dict[str, Any]:
    """The model's and the baseline's figures, recomputed in numpy from evaluation_lists."""
    relevant = np.zeros((len(data.users), len(data.items)), dtype=bool)
    for u, i, stars, split in data.ratings:
        relevant[u, i] = split == "val" and stars >= min_rating
    item_idx = {item: n for n, item in enumerate(data.items)}
    out = {}
    for name in ("model", "popularity"):
        lists = stored_lists(path, name, k)
        out[name] = reference_metrics(
            relevant, [[item_idx[i] for i in lists.get(u, [])] for u in data.users], k
        )
        # Lists are for users with validation ratings only, so coverage is over those.
    return out


def staged_lists(con: duckdb.DuckDBPyConnection) -> dict[str, list[str]]:
    lists: dict[str, list[str]] = {}
    for user, item, _ in con.execute(
        "SELECT user_id, item_id, rank FROM eval_recs ORDER BY user_id, rank"
    ).fetchall():
        lists.setdefault(user, []).append(item)
    return lists


def test_ranking_metrics_by_hand(tmp_path: Path) -> None:
    path = hand_db(tmp_path)
    with duckdb.connect(str(path)) as con:
        stage(con, RECS, K)
        # Only ranks <= K are judged: u1's i9 at rank 4 is gone.
        assert staged_lists(con) == {u: listed[:K] for u, listed in RECS.items()}
        model = _ranking(con, K, 1.0)
        stage(con, POPULAR_K3, K, "popularity")
        baseline = _ranking(con, K, 1.0)
    assert python_popularity(hand_dataset(), K) == POPULAR_K3
    assert model == pytest.approx(MODEL_K3, rel=1e-12)
    assert baseline == pytest.approx(BASELINE_K3, rel=1e-12)
    # The closed forms of the comments above.
    assert model["precision"] == pytest.approx(1 / 3)
    assert model["recall"] == pytest.approx(13 / 24)
    assert model["recall_uncapped"] == pytest.approx(1 / 2)
    assert model["map"] == pytest.approx(11 / 36)
    assert baseline["precision"] == pytest.approx(5 / 12)
    assert baseline["map"] == pytest.approx(9 / 16)


def test_min_rating_narrows_what_is_relevant(tmp_path: Path) -> None:
    path = hand_db(tmp_path)
    with duckdb.connect(str(path)) as con:
        stage(con, RECS, K)
        model = _ranking(con, K, 4.0)
        stage(con, POPULAR_K3, K, "popularity")
        baseline = _ranking(con, K, 4.0)
    assert model == pytest.approx(MODEL_K3_MIN4, rel=1e-12)
    assert baseline == pytest.approx(BASELINE_K3_MIN4, rel=1e-12)


def test_popularity_lists_by_hand_at_k5() -> None:
    """K = 5: the candidates are the first 5 + 3 = 8 popular items, every item with a train
    rating (i1 i4 i6 i10 i2 i3 i7 i8); each user's list skips what they rated in train."""
    assert python_popularity(hand_dataset(), 5) == {
        "u1": ["i1", "i2", "i3", "i7", "i8"],  # rated i4 i6 i10
        "u2": ["i6", "i10", "i2", "i3", "i8"],  # rated i1 i4 i7
        "u3": ["i4", "i10", "i2", "i3", "i7"],  # rated i1 i6 i8
        "u4": ["i10", "i2", "i3", "i7", "i8"],  # rated i1 i4 i6
        "u5": ["i1", "i4", "i6", "i7", "i8"],  # rated i3 i2 i10
    }


# What `evaluate` itself lists from the hand model: it predicts 0.5 + b_i for everyone,
# so every candidate ties at 0.5 except i8 (-0.5); ONNX TopK breaks ties by the lower
# index. Items with no train rating (i5, i9) are never offered; u3 has no validation
# rating and gets no list. Candidates in order: i1 i2 i3 i4 i6 i7 i10 | i8.
MODEL_LISTS_K3 = {
    "u1": ["i1", "i2", "i3"],  # rated i4 i6 i10; hits at 1, 2, 3 of |rel| 4
    "u2": ["i2", "i3", "i6"],  # rated i1 i4 i7; hit at 3 (i6) of |rel| 1
    "u4": ["i2", "i3", "i7"],  # rated i1 i4 i6; hit at 1 (i2) of |rel| 2
    "u5": ["i1", "i4", "i6"],  # rated i2 i3 i10; no hit of |rel| 2
}
EVAL_K3 = {
    "precision": (3 / 3 + 1 / 3 + 1 / 3 + 0) / 4,
    "recall": (3 / 3 + 1 / 1 + 1 / 2 + 0) / 4,
    "recall_uncapped": (3 / 4 + 1 / 1 + 1 / 2 + 0) / 4,
    "ndcg": (IDCG3 / IDCG3 + 0.5 / IDCG1 + 1 / IDCG2 + 0) / 4,
    "map": ((1 + 2 / 2 + 3 / 3) / 3 + (1 / 3) / 1 + (1 / 1) / 2 + 0) / 4,
    "hit_rate": 3 / 4,
    "coverage": 6 / 10,  # i1 i2 i3 i4 i6 i7
    "users_evaluated": 4,
    "users_without_relevant": 1,
}
# --min-rating 4: relevant u1 {i1, i2, i9}, u5 {i5}: u1 hits at 1 and 2 of 3; u5 none.
EVAL_K3_MIN4 = {
    "precision": (2 / 3 + 0) / 2,
    "recall": (2 / 3 + 0) / 2,
    "recall_uncapped": (2 / 3 + 0) / 2,
    "ndcg": ((1 + L3) / IDCG3 + 0) / 2,
    "map": ((1 / 1 + 2 / 2) / 3 + 0) / 2,
    "hit_rate": 1 / 2,
    "coverage": 6 / 10,
    "users_evaluated": 2,
    "users_without_relevant": 3,
}
POPULAR_EVALUATED_K3 = {u: listed for u, listed in POPULAR_K3.items() if u != "u3"}


def test_evaluate_whole_by_hand(tmp_path: Path) -> None:
    path = hand_db(tmp_path)
    result = evaluate(db_path=path, k=K)
    assert result.run_id == RUN_ID and result.k == K and result.min_rating is None
    assert stored_lists(path, "model", K) == MODEL_LISTS_K3
    assert stored_lists(path, "popularity", K) == POPULAR_EVALUATED_K3
    assert result.model == pytest.approx({**RATING_K3, **EVAL_K3}, rel=1e-12)
    assert result.baseline == pytest.approx(BASELINE_K3, rel=1e-12)
    # Every figure can be audited from the rows evaluate kept.
    audited = audit(path, hand_dataset(), K)
    assert audited["model"] == pytest.approx(EVAL_K3, rel=1e-12)
    assert audited["popularity"] == pytest.approx(BASELINE_K3, rel=1e-12)
    stored = rows(
        path,
        "SELECT run_id, user_idx, item_idx, rating, predicted_rating FROM val_predictions "
        "ORDER BY user_idx, item_idx",
    )
    assert [r[0] for r in stored] == [RUN_ID] * len(VAL_PREDICTIONS)
    assert [r[1:] for r in stored] == VAL_PREDICTIONS  # exact: 0.5, 1 and 0 are exact floats

    with_min = evaluate(db_path=path, k=K, min_rating=4.0)
    assert with_min.min_rating == 4.0
    assert with_min.model == pytest.approx({**RATING_K3, **EVAL_K3_MIN4}, rel=1e-12)
    assert with_min.baseline == pytest.approx(BASELINE_K3_MIN4, rel=1e-12)


def test_evaluate_never_reads_the_served_table(tmp_path: Path) -> None:
    """No recommendations at all, or served lists of another K and run: same figures."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    without = evaluate(db_path=hand_db(tmp_path / "a", recs=None), k=K)
    served = {u: ["i5", "i9", "i8", "i7", "i6"] for u in USERS}  # K=5, nothing like the model
    with_served = evaluate(db_path=hand_db(tmp_path / "b", recs=served), k=K)
    assert without.model == pytest.approx(with_served.model, rel=1e-12)
    assert without.model == pytest.approx({**RATING_K3, **EVAL_K3}, rel=1e-12)


def test_ranking_objective_reports_no_rating_metrics(tmp_path: Path) -> None:
    path = hand_db(tmp_path, objective="ranking")
    result = evaluate(db_path=path, k=K)
    assert "rmse" not in result.model and "mae" not in result.model
    assert result.model == pytest.approx(EVAL_K3, rel=1e-12)
    metrics = rows(path, "SELECT metric FROM evaluations")
    assert {m for (m,) in metrics} == set(EVAL_K3)


# --- the CLI on the hand-made case ---------------------------------------------------------


def evaluations(path: Path) -> list[tuple[Any, ...]]:
    return rows(
        path,
        "SELECT run_id, metric, k, value, baseline_value, min_rating FROM evaluations "
        "ORDER BY metric, k NULLS FIRST",
    )


def test_json_output_matches_the_table(tmp_path: Path) -> None:
    path = hand_db(tmp_path)
    out = ok(cli("evaluate", "--db", path, "--top-k", "3", "--min-rating", "4", "--json"))
    report = json.loads(out.stdout)
    assert report["run_id"] == RUN_ID and report["k"] == 3 and report["min_rating"] == 4.0
    assert report["model"] == pytest.approx({**RATING_K3, **EVAL_K3_MIN4}, rel=1e-12)
    assert report["popularity"] == pytest.approx(BASELINE_K3_MIN4, rel=1e-12)
    stored = evaluations(path)
    assert len(stored) == len(report["model"])
    for run_id, metric, k, value, baseline, min_rating in stored:
        assert run_id == RUN_ID and min_rating == 4.0
        assert k == (None if metric in ("rmse", "mae") else 3)
        assert value == pytest.approx(report["model"][metric], rel=1e-12)
        assert baseline == (
            None if metric in ("rmse", "mae") else pytest.approx(report["popularity"][metric])
        )


def test_table_output(tmp_path: Path) -> None:
    path = hand_db(tmp_path)
    out = ok(cli("evaluate", "--db", path, "--top-k", "3"))
    for name in ("rmse", "mae", "precision@3", "recall@3", "ndcg@3", "map@3", "hit_rate@3"):
        assert name in out.stdout, out.stdout
    assert "popularity" in out.stdout and f"run {RUN_ID}, K=3" in out.stdout
    # recall 5/8 against the baseline's 5/8: a lift of 1.00
    recall_line = next(line for line in out.stdout.splitlines() if "recall@3 " in line)
    assert recall_line.count("0.6250") == 2 and "1.00x" in recall_line
    assert out.stdout.rstrip().splitlines()[-1] == (
        f"evaluated run {RUN_ID}: Recall@3 0.6250 (1.00x popularity), "
        f"NDCG@3 {EVAL_K3['ndcg']:.4f}, RMSE {RATING_K3['rmse']:.4f} over 4 users"
    )


def test_rerunning_replaces_rows(tmp_path: Path) -> None:
    path = hand_db(tmp_path)
    first = evaluate(db_path=path, k=K)
    evaluate(db_path=path, k=K)
    stored = evaluations(path)
    assert len(stored) == len(first.rows()) == 2 + 9  # rmse, mae; 7 ranking metrics, 2 counts
    assert len({(metric, k) for _, metric, k, *_ in stored}) == len(stored)
    # approx: DuckDB's parallel avg() may sum in another order from one run to the next.
    assert {row[1]: row[3] for row in stored} == pytest.approx(first.model, rel=1e-12)
    assert {row[1]: row[4] for row in stored if row[4] is not None} == pytest.approx(
        first.baseline, rel=1e-12
    )

    # Another K adds its own rows; the rating metrics (no K) are replaced, not repeated.
    evaluate(db_path=path, k=5)
    ks = rows(path, "SELECT k, count(*) FROM evaluations GROUP BY k ORDER BY k NULLS FIRST")
    assert ks == [(None, 2), (3, 9), (5, 9)]
    # And a new threshold at the same K replaces that K's rows.
    evaluate(db_path=path, k=K, min_rating=4.0)
    assert rows(path, "SELECT count(*) FROM evaluations WHERE k = 3 AND min_rating = 4")[0][0] == 9
    assert rows(path, "SELECT count(*) FROM evaluations")[0][0] == 20
    # The lists behind each K are kept once per (run, K), beside their baseline's.
    listed = rows(
        path, "SELECT k, recommender, count(DISTINCT user_id) FROM evaluation_lists GROUP BY ALL"
    )
    assert sorted(listed) == [
        (3, "model", 4),
        (3, "popularity", 4),
        (5, "model", 4),
        (5, "popularity", 4),
    ]
    # val_predictions: one row per validation pair, however often it runs.
    assert rows(path, "SELECT count(*) FROM val_predictions")[0][0] == len(VAL_PREDICTIONS)


def test_recommend_prints_titles_and_top_rated(tmp_path: Path) -> None:
    path = hand_db(tmp_path)
    out = ok(cli("recommend", "--db", path, "--user", "u1"))
    recommended, _, rated = out.stdout.partition("their top-rated")
    assert "recommended for user u1" in recommended
    assert "(7 ratings)" in rated  # 3 train + 4 validation

    def order(text: str, names: Sequence[str]) -> list[str]:
        found = [n for n in names if n in text]
        return sorted(found, key=text.index)

    # u1's list in rank order: i1 i5 i3 i9
    assert order(recommended, TITLES) == ["Alpha", "Echo", "Charlie", "India"]
    # By rating, newest first on ties: 5 India (val, newer) and Alpha; 4 Bravo (val) and
    # Foxtrot (train); 3 Delta; 2 Charlie; 1 Juliett.
    assert order(rated, TITLES) == [
        "India",
        "Alpha",
        "Bravo",
        "Foxtrot",
        "Delta",
        "Charlie",
        "Juliett",
    ]


# --- bad input -----------------------------------------------------------------------------


def test_unknown_run_id(tmp_path: Path, user_error: UserError) -> None:
    path = hand_db(tmp_path)
    message = user_error(cli("evaluate", "--db", path, "--run-id", "nope"), CONFIG_ERROR, "'nope'")
    assert "--run-id" in message
    assert "evaluations" not in tables(path)


def test_top_k_must_be_positive(tmp_path: Path, user_error: UserError) -> None:
    path = hand_db(tmp_path)
    user_error(cli("evaluate", "--db", path, "--top-k", "0"), CONFIG_ERROR, "--top-k")


def test_missing_database(tmp_path: Path, user_error: UserError) -> None:
    path = tmp_path / "nope.duckdb"
    user_error(cli("evaluate", "--db", path), DATABASE_ERROR, "does not exist")
    assert not path.exists()


def test_missing_model_file(tmp_path: Path, user_error: UserError) -> None:
    path = hand_db(tmp_path)
    (tmp_path / "export" / RUN_ID / ONNX_FILE).unlink()
    user_error(cli("evaluate", "--db", path), MODEL_ERROR, ONNX_FILE, "does not exist")


def test_run_trained_on_other_data(tmp_path: Path, user_error: UserError) -> None:
    path = hand_db(tmp_path, run_sha="sha-of-some-other-dataset")
    user_error(cli("evaluate", "--db", path), MODEL_ERROR, "was trained on dataset", "train")


def test_recommend_unknown_user(tmp_path: Path, user_error: UserError) -> None:
    path = hand_db(tmp_path)
    user_error(cli("recommend", "--db", path, "--user", "nobody"), CONFIG_ERROR, "'nobody'")


def test_recommend_before_scoring(tmp_path: Path, user_error: UserError) -> None:
    path = hand_db(tmp_path, recs=None)
    user_error(cli("recommend", "--db", path, "--user", "u1"), DATABASE_ERROR, "`mfbatch score`")


def test_recommend_refuses_lists_of_a_run_on_other_data(
    tmp_path: Path, user_error: UserError
) -> None:
    path = hand_db(tmp_path, run_sha="sha-of-some-other-dataset")
    user_error(cli("recommend", "--db", path, "--user", "u1"), MODEL_ERROR, RUN_ID, "mfbatch score")


def test_evaluate_min_rating_must_be_a_number(tmp_path: Path, user_error: UserError) -> None:
    path = hand_db(tmp_path)
    for bad in ("nan", "inf"):
        user_error(cli("evaluate", "--db", path, "--min-rating", bad), CONFIG_ERROR, "--min-rating")
    assert "evaluations" not in tables(path)


# --- SQL against a numpy reference on random data ------------------------------------------


def reference_metrics(
    relevant: np.ndarray, lists: Sequence[Sequence[int]], k: int
) -> dict[str, float]:
    """The definitions at the top of this file, in numpy, over a users x items matrix."""
    n_users, n_items = relevant.shape
    hits = np.zeros((n_users, k))
    shown: set[int] = set()
    for user, listed in enumerate(lists):
        top = np.asarray(listed[:k], dtype=np.int64)
        shown.update(top.tolist())
        hits[user, : len(top)] = relevant[user, top]
    n = relevant.sum(axis=1)
    keep = n > 0
    hits, n = hits[keep], n[keep]
    depth = np.minimum(n, k)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discount)
    precision_at = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    return {
        "precision": float(np.mean(hits.sum(axis=1) / k)),
        "recall": float(np.mean(hits.sum(axis=1) / depth)),
        "recall_uncapped": float(np.mean(hits.sum(axis=1) / n)),
        "ndcg": float(np.mean((hits * discount).sum(axis=1) / ideal[depth - 1])),
        "map": float(np.mean((precision_at * hits).sum(axis=1) / depth)),
        "hit_rate": float(np.mean(hits.any(axis=1))),
        "coverage": len(shown) / n_items,
        "users_evaluated": int(keep.sum()),
        "users_without_relevant": int((~keep).sum()),
    }


def reference_popularity(train: np.ndarray, k: int) -> list[list[int]]:
    counts = train.sum(axis=0)
    order = sorted((i for i in range(train.shape[1]) if counts[i] > 0), key=lambda i: -counts[i])
    return [[i for i in order if not train[user, i]][:k] for user in range(train.shape[0])]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sql_matches_numpy_reference(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_items = 50, 30
    rated = rng.random((n_users, n_items)) < 0.3
    is_val = rng.random((n_users, n_items)) < 0.3
    is_val[:4] = False  # some users with nothing to find
    stars = rng.integers(2, 11, (n_users, n_items)) / 2  # 1.0 .. 5.0 in half stars
    train, val = rated & ~is_val, rated & is_val
    # Raw ids that sort differently from the dense indices.
    users = [f"user{(u * 13) % 97}" for u in range(n_users)]
    items = [f"item{(i * 7) % 31}" for i in range(n_items)]
    ratings = [
        (u, i, float(stars[u, i]), "val" if val[u, i] else "train")
        for u, i in zip(*np.nonzero(rated), strict=True)
    ]
    # Lists of 0..12 unrated items, leaning towards validation items so there are hits;
    # longer than K = 5 and K = 10 for some users, empty for others.
    lists: list[list[int]] = []
    for u in range(n_users):
        candidates = np.flatnonzero(~train[u])
        weight = 1.0 + 4.0 * val[u, candidates]
        size = min(int(rng.integers(0, 13)), len(candidates))
        lists.append(rng.choice(candidates, size, replace=False, p=weight / weight.sum()).tolist())
    lists[10] = []
    assert any(val[u].any() and not lists[u] for u in range(n_users))  # relevant, no list
    assert any(len(listed) > 10 for listed in lists)
    recs = {users[u]: [items[i] for i in listed] for u, listed in enumerate(lists) if listed}
    path = build_db(tmp_path / "random.duckdb", Dataset(users, items, ratings), None, run=False)
    item_idx = {item: i for i, item in enumerate(items)}

    data = Dataset(users, items, ratings)
    with duckdb.connect(str(path)) as con:
        for k in (5, 10):
            popular = reference_popularity(train, k)
            built = python_popularity(data, k)
            assert {u: [item_idx[i] for i in built[u]] for u in users} == dict(
                zip(users, popular, strict=True)
            )
            for threshold in (1.0, 3.5):
                relevant = val & (stars >= threshold)
                stage(con, recs, k)
                model = _ranking(con, k, threshold)
                expected = reference_metrics(relevant, lists, k)
                assert expected["users_without_relevant"] >= 4 and expected["recall"] > 0
                assert model == pytest.approx(expected, rel=1e-12, abs=1e-15)
                stage(con, built, k, "popularity")
                baseline = _ranking(con, k, threshold)
                assert baseline == pytest.approx(
                    reference_metrics(relevant, popular, k), rel=1e-12, abs=1e-15
                )


# --- a real pipeline: train (rating objective), score, evaluate ----------------------------

SMALL = ["--embedding-dim", "8", "--batch-size", "256", "--negatives", "32", "--epochs", "2"]


@pytest.fixture(scope="module")
def _scored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scored")
    path = folder / "mf.duckdb"
    synthetic = ["--users", "60", "--items", "40", "--ratings-per-user", "12"]
    ok(cli("preprocess", "--dataset", "synthetic", *synthetic, "--db", path))
    export = folder / "export"
    ok(cli("train", "--db", path, "--export-dir", export, *SMALL, "--objective", "rating"))
    ok(cli("score", "--db", path, "--top-k", "20"))
    return path


@pytest.fixture
def scored(_scored: Path, tmp_path: Path) -> Path:
    """A copy of the folder holding one trained and scored run, and its database."""
    shutil.copytree(_scored.parent, tmp_path / "copy")
    return tmp_path / "copy" / "mf.duckdb"


def test_rmse_and_mae_match_the_torch_model(scored: Path) -> None:
    report = json.loads(ok(cli("evaluate", "--db", scored, "--json")).stdout)
    (run_id, export_path, val_rmse), *_ = rows(
        scored, "SELECT run_id, export_path, val_rmse FROM training_runs"
    )
    (lo, hi), *_ = rows(scored, "SELECT rating_min, rating_max FROM dataset_meta")
    pairs = rows(
        scored,
        "SELECT user_idx, item_idx, rating FROM ratings WHERE split = 'val' "
        "ORDER BY user_idx, item_idx",
    )
    users, items, stars = (np.array(column) for column in zip(*pairs, strict=True))
    model, _ = load_model(scored.parent / export_path)
    with torch.no_grad():
        normalised = model(torch.from_numpy(users), torch.from_numpy(items)).double().numpy()
    predicted = np.clip(normalised, 0.0, 1.0) * (hi - lo) + lo
    assert report["run_id"] == run_id
    assert report["model"]["rmse"] == pytest.approx(
        math.sqrt(np.mean((predicted - stars) ** 2)), abs=1e-5
    )
    assert report["model"]["mae"] == pytest.approx(np.mean(np.abs(predicted - stars)), abs=1e-5)
    # The trainer's own validation RMSE tells the same story.
    assert report["model"]["rmse"] == pytest.approx(val_rmse, abs=1e-4)

    stored = rows(
        scored,
        "SELECT run_id, user_idx, item_idx, rating, predicted_rating FROM val_predictions "
        "ORDER BY user_idx, item_idx",
    )
    assert len(stored) == len(pairs)  # one row per validation pair
    assert [r[1:4] for r in stored] == pairs
    assert {r[0] for r in stored} == {run_id}
    assert np.array([r[4] for r in stored]) == pytest.approx(predicted, abs=1e-5)
    metrics = rows(scored, f"SELECT metric, value FROM evaluations WHERE run_id = '{run_id}'")
    assert dict(metrics)["rmse"] == report["model"]["rmse"]


def test_refit_run_is_refused_and_latest_means_the_validated_run(
    scored: Path, user_error: UserError
) -> None:
    (parent,), *_ = rows(scored, "SELECT run_id FROM training_runs")
    ok(cli("train", "--db", scored, "--export-dir", scored.parent / "export", "--on", "all"))
    (refit,), *_ = rows(scored, "SELECT run_id FROM training_runs WHERE data_seen = 'train+val'")
    user_error(
        cli("evaluate", "--db", scored, "--run-id", refit),
        MODEL_ERROR,
        "refit",
        "validated run",
        parent,
    )
    assert "evaluations" not in tables(scored)
    # 'latest' is the newest validated run, however recent the refit is.
    report = json.loads(ok(cli("evaluate", "--db", scored, "--json")).stdout)
    assert report["run_id"] == parent
