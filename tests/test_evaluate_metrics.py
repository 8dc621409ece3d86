"""`mfbatch evaluate`'s figures: every metric against numbers worked out by hand
(tests/evaluate_case.py defines them and builds the case), and the SQL against a numpy
reference on random data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pytest
from conftest import rows
from evaluate_case import (
    BASELINE_K3_MIN4,
    EVAL_K3,
    EVAL_K3_MIN4,
    IDCG1,
    IDCG2,
    IDCG3,
    L3,
    MODEL_LISTS_K3,
    RATING_K3,
    RECS,
    RUN_ID,
    USERS,
    VAL_PREDICTIONS,
    Dataset,
    K,
    build_db,
    evaluate,
    hand_dataset,
    hand_db,
)

from mfbatch.serving.csr import SeenItems
from mfbatch.serving.lists import popularity_top_k
from mfbatch.stages.evaluate import _ranking
from mfbatch.store import db

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
    """The popularity lists mfbatch.serving.lists builds, for every user, as raw ids."""
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
