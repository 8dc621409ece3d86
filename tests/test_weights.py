"""Interaction weights (`--weight-col`, merged implicit duplicates): a weight of 2 is the
row twice, in every softmax loss and its L2; weights reach training from the database."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import cli, ok, rows

from mfbatch.training.model import MatrixFactorization, ModelShape
from mfbatch.training.objectives import (
    Samples,
    UserBatch,
    full_softmax,
    l2_penalty,
    sampled_softmax,
)


def _model() -> MatrixFactorization:
    torch.manual_seed(0)
    return MatrixFactorization(ModelShape(4, 9, 4, 0.0, False), init_std=0.8)


# User 0 rated items 1, 2, 5; user 1 rated 3; user 2 rated 2, 7.
USERS = torch.tensor([0, 1, 2])
ROWS = [0, 0, 0, 1, 2, 2]
ITEMS = [1, 2, 5, 3, 2, 7]
WEIGHTS = [2.0, 1.0, 3.0, 1.0, 1.0, 2.0]


def _weighted(recency: bool) -> UserBatch:
    rec = torch.linspace(0.5, 1.5, len(ITEMS)) if recency else None
    return UserBatch(USERS, torch.tensor(ROWS), torch.tensor(ITEMS), rec, torch.tensor(WEIGHTS))


def _duplicated(recency: bool) -> UserBatch:
    """The same interactions, each row repeated `weight` times."""
    rec = torch.linspace(0.5, 1.5, len(ITEMS)) if recency else None
    rows, items, recs = [], [], []
    for at, (row, item, weight) in enumerate(zip(ROWS, ITEMS, WEIGHTS, strict=True)):
        for _ in range(int(weight)):
            rows.append(row)
            items.append(item)
            recs.append(float(rec[at]) if rec is not None else 1.0)
    return UserBatch(
        USERS, torch.tensor(rows), torch.tensor(items), torch.tensor(recs) if recency else None
    )


@pytest.mark.parametrize("exponent", [0.0, 0.3])
@pytest.mark.parametrize("recency", [False, True])
def test_weight_two_is_the_row_twice(exponent: float, recency: bool) -> None:
    model = _model()
    all_items = torch.arange(9)
    weighted, twice = _weighted(recency), _duplicated(recency)
    assert torch.allclose(
        full_softmax(model, weighted, all_items, 1.0, exponent),
        full_softmax(model, twice, all_items, 1.0, exponent),
    )
    samples = Samples(torch.tensor([0, 2, 4, 8]), torch.log(torch.full((4,), 0.25 / 9)))
    assert torch.allclose(
        sampled_softmax(model, weighted, samples, 1.0, exponent, l2=0.01),
        sampled_softmax(model, twice, samples, 1.0, exponent, l2=0.01),
    )
    assert torch.allclose(
        l2_penalty(model, weighted, 0.01, "frequency"), l2_penalty(model, twice, 0.01, "frequency")
    )


def test_weights_change_the_loss() -> None:
    model = _model()
    plain = UserBatch(USERS, torch.tensor(ROWS), torch.tensor(ITEMS))
    ones = UserBatch(USERS, torch.tensor(ROWS), torch.tensor(ITEMS), None, torch.ones(6))
    all_items = torch.arange(9)
    assert torch.allclose(
        full_softmax(model, plain, all_items), full_softmax(model, ones, all_items)
    )
    assert not torch.allclose(
        full_softmax(model, plain, all_items), full_softmax(model, _weighted(False), all_items)
    )


def _plays(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 1_500
    frame = pl.DataFrame(
        {
            "user": rng.integers(0, 60, n),
            "item": rng.integers(0, 40, n),
            "plays": rng.geometric(0.05, n),
        }
    ).unique(["user", "item"], keep="first", maintain_order=True)
    split = np.where(rng.random(frame.height) < 0.2, "test", "train")
    source = tmp_path / "plays.parquet"
    frame.with_columns(split=pl.Series(split)).write_parquet(source)
    return source


def _train(db: Path, tmp_path: Path) -> str:
    out = ok(
        cli(
            "train",
            "--db",
            str(db),
            "--export-dir",
            str(tmp_path / "export"),
            "--epochs",
            "2",
            "--embedding-dim",
            "8",
            "--threads",
            "1",
            "--seed",
            "3",
        )
    ).stdout
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("weights")
    source = _plays(tmp)
    dbs = {}
    for name, extra in (("plain", []), ("weighted", ["--weight-col", "plays"])):
        db = tmp / f"{name}.duckdb"
        ok(
            cli(
                "preprocess",
                "--dataset",
                "parquet",
                "--source",
                str(source),
                "--user-col",
                "user",
                "--item-col",
                "item",
                "--time-col",
                "",
                "--split",
                "given",
                "--split-col",
                "split",
                *extra,
                "--db",
                str(db),
            )
        )
        (tmp / f"{name}.train.txt").write_text(_train(db, tmp / name))
        dbs[name] = db
    return dbs


def test_weighted_run_differs_and_stores_the_transform(trained: dict[str, Path]) -> None:
    plain, weighted = trained["plain"], trained["weighted"]
    assert rows(plain, "SELECT DISTINCT weight FROM ratings") == [(1.0,)]
    top = rows(weighted, "SELECT max(weight) FROM ratings")[0][0]
    assert top > 1.0
    loss = "SELECT train_loss FROM training_epochs ORDER BY epoch"
    assert rows(plain, loss) != rows(weighted, loss)


def test_ranking_run_on_implicit_data_records_no_rmse(trained: dict[str, Path]) -> None:
    db = trained["plain"]
    assert rows(db, "SELECT val_rmse, val_mae FROM training_runs") == [(None, None)]
    assert rows(db, "SELECT count(*) FROM training_epochs WHERE val_rmse IS NOT NULL") == [(0,)]
    assert rows(db, "SELECT count(*) FROM training_runs WHERE val_recall > 0") == [(1,)]
    assert not math.isnan(rows(db, "SELECT val_ndcg FROM training_runs")[0][0])


def test_ranking_run_on_implicit_data_prints_no_rmse(trained: dict[str, Path]) -> None:
    db = trained["plain"]
    out = (db.parent / "plain.train.txt").read_text()
    assert "Recall@20" in out and "RMSE" not in out and "MAE" not in out
    listing = ok(cli("runs", "--db", str(db))).stdout
    assert "RMSE" not in listing and "1 runs" in listing
    evaluated = ok(cli("evaluate", "--db", str(db), "--threads", "1")).stdout
    assert "uncapped Recall@20" in evaluated and "RMSE" not in evaluated
    metrics = {m for (m,) in rows(db, "SELECT DISTINCT metric FROM evaluations")}
    assert {"recall", "recall_uncapped", "ndcg"} <= metrics
    assert not metrics & {"rmse", "mae"}
    refused = cli("evaluate", "--db", str(db), "--min-rating", "1")
    assert refused.exit_code == 2 and "implicit feedback" in refused.stderr
