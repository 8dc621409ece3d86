"""The softmax/sampled L2 default: 0.05, raised on sparse data from the interactions per
item (`mfbatch.config.l2_for`); resolved once by `train`, recorded, copied by the refit."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
import torch
from conftest import STAMP, cli, ok

from mfbatch.config import TrainConfig, l2_for
from mfbatch.config.train import L2_BASE, L2_DENSE, L2_MAX
from mfbatch.training.build import l2_strength
from mfbatch.training.tensors import Interactions

SMALL = ["--embedding-dim", "8", "--batch-size", "64", "--epochs", "2", "--threads", "1"]


def test_the_rule_keeps_dense_data_at_the_base_and_is_capped() -> None:
    assert l2_for(L2_DENSE) == L2_BASE
    assert l2_for(10 * L2_DENSE) == L2_BASE
    assert l2_for(L2_DENSE / 2) == pytest.approx(2 * L2_BASE)
    assert l2_for(0.5) == L2_MAX
    values = [l2_for(x) for x in (0.1, 1, 5, 10, 20, 30, 100)]
    assert values == sorted(values, reverse=True)  # sparser data, never less L2


def test_strength_counts_rows_per_item_not_their_weights() -> None:
    users = torch.tensor([0, 0, 1, 1, 2, 2])
    items = torch.tensor([0, 1, 0, 1, 0, 1])
    data = Interactions(users, items, torch.ones(6))
    assert l2_strength(data, TrainConfig()) == l2_for(3.0)
    # An explicit value is kept as given, even 0.
    assert l2_strength(data, TrainConfig(l2=0.0)) == 0.0
    assert l2_strength(data, TrainConfig(l2=0.07)) == 0.07
    # The rating objective has its own fixed default.
    assert TrainConfig(objective="rating").l2 == 0.03


def _synthetic(db: Path, users: int, items: int, per_user: int) -> Path:
    ok(
        cli(
            "preprocess", "--dataset", "synthetic", "--users", users, "--items", items,
            "--ratings-per-user", per_user, "--split", "random", "--val-fraction", "0.2",
            "--db", db,
        )
    )  # fmt: skip
    return db


def _per_item(db: Path) -> float:
    with duckdb.connect(str(db), read_only=True) as con:
        ((rows, items),) = con.sql(
            "SELECT count(*), count(DISTINCT item_idx) FROM ratings WHERE split = 'train'"
        ).fetchall()
    return rows / items


def _recorded_l2(db: Path) -> list[float]:
    with duckdb.connect(str(db), read_only=True) as con:
        configs = con.sql("SELECT config FROM training_runs ORDER BY finished_at").fetchall()
    return [json.loads(c)["train"]["l2"] for (c,) in configs]


@pytest.mark.parametrize(("users", "items", "per_user"), [(60, 40, 10), (200, 20, 12)])
def test_train_resolves_records_and_refits_with_the_same_l2(
    tmp_path: Path, users: int, items: int, per_user: int
) -> None:
    db = _synthetic(tmp_path / "mf.duckdb", users, items, per_user)
    expected = l2_for(_per_item(db))
    run = ok(cli("train", "--db", db, "--export-dir", tmp_path / "export", *SMALL))
    log = " ".join(STAMP.sub("", line, count=1) for line in run.stderr.splitlines())
    # Said only when the data moved it off the base value.
    assert ("note: L2" in log) == (expected != L2_BASE), log
    # The refit trains on train+val (more interactions per item) but copies the value.
    ok(cli("train", "--db", db, "--export-dir", tmp_path / "export", "--on", "all", *SMALL))
    assert _recorded_l2(db) == [pytest.approx(expected)] * 2


def test_an_explicit_l2_is_kept_and_not_noted(tmp_path: Path) -> None:
    db = _synthetic(tmp_path / "mf.duckdb", 60, 40, 10)
    assert l2_for(_per_item(db)) > L2_BASE  # sparse: the default would move
    run = ok(cli("train", "--db", db, "--export-dir", tmp_path / "e", *SMALL, "--l2", "0.01"))
    assert "note: L2" not in run.stderr
    assert _recorded_l2(db) == [0.01]
