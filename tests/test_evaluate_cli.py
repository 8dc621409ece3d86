"""`mfbatch evaluate` and `mfbatch recommend` through the CLI: output formats, reruns, bad
input (on the hand-made case of tests/evaluate_case.py), and a real train-score-evaluate
pipeline checked against the torch model.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import UserError, cli, ok, rows, tables
from evaluate_case import (
    BASELINE_K3_MIN4,
    EVAL_K3,
    EVAL_K3_MIN4,
    RATING_K3,
    RUN_ID,
    TITLES,
    VAL_PREDICTIONS,
    K,
    evaluate,
    hand_db,
)

from mfbatch.artifact.files import ONNX_FILE, load_model

CONFIG_ERROR, DATABASE_ERROR, MODEL_ERROR = 2, 4, 5


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
        f"NDCG@3 {EVAL_K3['ndcg']:.4f}, RMSE {RATING_K3['rmse']:.4f}, "
        f"uncapped Recall@3 {EVAL_K3['recall_uncapped']:.4f} over 4 users"
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
