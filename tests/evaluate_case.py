"""The hand-made case behind tests/test_evaluate_*.py: every metric worked out by hand.

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
  train, ties broken by item_idx (built in Python by mfbatch.serving.lists, like every list).

`evaluate` never reads `recommendations`: it builds the validated run's lists itself and
keeps them in `evaluation_lists`, so the figures are checked here against those rows.

The hand-made databases are real DuckDB files built with the project's own create_* and
insert_* queries, so the SQL under test reads exactly the schema the pipeline writes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import onnx
import polars as pl

from mfbatch.artifact.files import ONNX_FILE
from mfbatch.artifact.graph import build_graph
from mfbatch.config import load_config
from mfbatch.stages.evaluate import Evaluation
from mfbatch.stages.evaluate import evaluate as run_evaluate
from mfbatch.store import db
from mfbatch.store.history import Scale, publish_lists

RUN_ID = "run-1"


SHA = "sha-of-the-hand-made-dataset"


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
        weight=pl.lit(1.0),
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
        for table in ("users", "items", "ratings", "dataset_meta", "dataset_versions"):
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
            feedback="explicit",
        )
        db.run(
            con,
            "insert_base_version",
            dataset_sha256=SHA,
            source="hand-made",
            rows_in=ratings.height,
            rows_added=ratings.height,
            new_users=n_users,
            new_items=n_items,
            created_at=start,
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
    finally:
        con.close()
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
        publish_lists(
            path,
            spooled.to_arrow(),
            RUN_ID,
            start,
            scale=Scale("ranking", 1.0, 5.0),
            partial=False,
            keep=1,
        )
    return path


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
