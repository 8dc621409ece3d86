"""`score` folds a new user in with the weights training gave their ratings (recency), and
the prior training put on a user's row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import cli_ok, rows

from mfbatch.config import load_config
from mfbatch.serving.foldin import fold_in_half_life, recency_weights
from mfbatch.stages.score_inputs import load_inputs


def test_score_weighs_a_folded_users_ratings_by_the_runs_recency(tmp_path: Path) -> None:
    db = tmp_path / "mf.duckdb"
    export = str(tmp_path / "export")
    for args in (
        ["preprocess", "--dataset", "synthetic", "--users", "80", "--items", "50",
         "--ratings-per-user", "12", "--split", "user-time"],
        ["train", "--embedding-dim", "8", "--epochs", "3", "--threads", "1",
         "--export-dir", export],
        ["train", "--on", "all", "--threads", "1", "--export-dir", export],
    ):  # fmt: skip
        cli_ok(*args, "--db", db)
    (config,) = rows(db, "SELECT config FROM training_runs WHERE data_seen = 'train+val'")[0]
    train = json.loads(config)["train"]
    # The half-life the run calibrated on its own users after the user solve (the default
    # on a user-time split), between the solve's and training's.
    half_life = fold_in_half_life(train)
    assert half_life == train["fold_in_half_life"]
    assert train["user_half_life"] <= half_life <= train["recency_half_life"]
    items = [i for (i,) in rows(db, "SELECT item_id FROM items ORDER BY item_idx LIMIT 6")]
    (lo, hi), *_ = rows(db, "SELECT rating_min, rating_max FROM dataset_meta")
    new = tmp_path / "new.csv"
    # A new user, six ratings a day apart, two of them at the same time (a shared weight).
    times = [0, 86_400, 172_800, 172_800, 259_200, 345_600]
    lines = [f"newcomer,{i},{hi},{1_000_000_000 + t}\n" for i, t in zip(items, times, strict=True)]
    new.write_text("user_id,item_id,rating,timestamp\n" + "".join(lines))
    cli_ok("preprocess", "--append", "--dataset", "csv", "--source", new, "--db", db,
           "--rating-min", lo, "--rating-max", hi)  # fmt: skip
    inputs = load_inputs(load_config(db=db))
    assert len(inputs.fold.users) == 1 and inputs.fold.weights is not None
    # The fold's rows are by item; the weights follow each rating's time, newest heaviest.
    by_item = dict(zip(items, times, strict=True))
    item_ids = inputs.item_ids.to_pylist()
    ts = np.array([by_item[item_ids[i]] for i in inputs.fold.rated.indices])
    expected = recency_weights(np.zeros(len(ts), dtype=np.int64), ts, half_life)
    np.testing.assert_allclose(inputs.fold.weights, expected, rtol=1e-6)
    assert inputs.fold.weights.max() / inputs.fold.weights.min() > 1.5
    # The prior: training's L2 on the user's row, weighed as the user solve weighed it.
    assert inputs.fold.frequency_l2 == train["l2"] > 0
    solve = recency_weights(np.zeros(len(ts), dtype=np.int64), ts, train["user_half_life"])
    assert inputs.fold.prior_weights is not None
    np.testing.assert_allclose(inputs.fold.prior_weights, solve, rtol=1e-6)
    cli_ok("score", "--db", db, "--threads", "1")
