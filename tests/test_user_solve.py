"""The user solve after training (`--user-half-life`): each user's vector fitted again
against the trained item tables, their ratings weighed by a sharper recency half-life."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, cli, cli_ok, rows, tables
from test_objectives import _drifting_users

from mfbatch.config import TrainConfig
from mfbatch.serving import calibrate
from mfbatch.serving.calibrate import calibrated_half_life, candidates
from mfbatch.serving.foldin import fold_in, fold_in_half_life, recency_weights
from mfbatch.training.build import plan_for
from mfbatch.training.epoch_data import EpochData
from mfbatch.training.loop import solve_users, solves_users, train_model
from mfbatch.training.model import MatrixFactorization, ModelShape
from mfbatch.training.objectives import UserBatch, full_softmax
from mfbatch.training.tensors import Interactions
from mfbatch.training.validation import rank_metrics

ITEM_PARAMS = ("item_emb.weight", "item_bias.weight", "global_bias")


def _config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {
        "device": "cpu",
        "embedding_dim": 8,
        "epochs": 40,
        "batch_size": 16,
        "lr": 0.05,
        "l2": 0.05,
        "recency_half_life": 0.3,
        "user_half_life": 0.0,
    }
    return TrainConfig(**{**values, **overrides})  # type: ignore[arg-type]


def _trained(config: TrainConfig, data: Interactions) -> MatrixFactorization:
    torch.manual_seed(0)
    model = MatrixFactorization(ModelShape(60, 20, 8, 0.0, False))
    train_model(model, data, None, config)
    return model


def _weighted_loss(model: MatrixFactorization, data: Interactions, half_life: float) -> float:
    """The whole objective the solve minimises (every user at once, without L2)."""
    epoch_data = EpochData.build(data, 60, 20, "mixed", half_life)
    users = epoch_data.active_users
    rows_, items = epoch_data.by_user.rows_of(users)
    weights = epoch_data.weights[epoch_data.by_user.positions_of(users)[1]]
    batch = UserBatch(users, rows_, items, weights=weights)
    with torch.no_grad():
        return float(full_softmax(model, batch, torch.arange(20), user_exponent=0.3))


@pytest.mark.parametrize(("objective", "sparse_users"), [
    ("softmax", False), ("sampled", False), ("softmax", True),
])  # fmt: skip
def test_the_solve_moves_user_rows_only_and_lowers_its_own_objective(
    objective: str, sparse_users: bool
) -> None:
    data, _ = _drifting_users()
    config = _config(objective=objective)
    model = _trained(config, data)
    if sparse_users:  # as make_optimizers sets big user tables: LazyAdam solves them
        model.user_emb.sparse = model.user_bias.sparse = True
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss_before = _weighted_loss(model, data, 0.05)
    solved = config.replace(user_half_life=0.05)
    loss = solve_users(model, data, solved, plan_for(model, data, solved))
    after = dict(model.named_parameters())
    for name in ITEM_PARAMS:
        assert torch.equal(after[name], before[name]), name  # bit for bit
    assert not torch.equal(after["user_emb.weight"], before["user_emb.weight"])
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again
    assert loss == pytest.approx(loss) and loss > 0  # a finite loss was returned
    assert _weighted_loss(model, data, 0.05) < loss_before


def test_a_sharp_user_solve_over_gentle_training_ranks_newer_taste_first() -> None:
    """Training at a gentle half-life leaves drifting users between their two blocks;
    solving their vectors at a sharp one, against the same items, moves them to block B."""
    data, val = _drifting_users()
    gentle = _config(recency_half_life=1.0)
    recall = {}
    for user_half_life in (0.0, 0.05):
        config = gentle.replace(user_half_life=user_half_life)
        recall[user_half_life] = rank_metrics(_trained(config, data), val, 5)[0]
    assert recall[0.05] > recall[0.0] + 0.1, recall


def test_train_model_reports_the_solved_models_validation() -> None:
    data, val = _drifting_users()
    torch.manual_seed(0)
    model = MatrixFactorization(ModelShape(60, 20, 8, 0.0, False))
    outcome = train_model(model, data, val, _config(epochs=5, user_half_life=0.05))
    assert outcome.solved is not None and outcome.solved.metrics is not None
    assert outcome.solved.metrics.recall == pytest.approx(rank_metrics(model, val, 20)[0])
    assert outcome.solved.epoch == outcome.best_epoch


def test_no_solve_without_a_half_life_a_time_or_a_softmax_objective() -> None:
    data, _ = _drifting_users()
    untimed = Interactions(data.users, data.items, data.ratings)
    assert solves_users(_config(user_half_life=0.05), data)
    assert not solves_users(_config(user_half_life=0.0), data)
    assert not solves_users(_config(user_half_life=0.05), untimed)
    assert not solves_users(_config(user_half_life=0.05, objective="rating"), data)


def test_fold_in_weighs_by_the_half_life_the_users_were_last_fitted_with() -> None:
    calibrated = {"recency_half_life": 0.3, "user_half_life": 0.05, "fold_in_half_life": 0.12}
    assert fold_in_half_life(calibrated) == 0.12
    assert fold_in_half_life({**calibrated, "fold_in_half_life": 0.0}) == 0.0  # given: off
    assert fold_in_half_life({"recency_half_life": 0.3, "user_half_life": 0.05}) == 0.05
    assert fold_in_half_life({"recency_half_life": 0.3, "user_half_life": 0.0}) == 0.3
    assert fold_in_half_life({"recency_half_life": 0.3}) == 0.3  # a run from before
    assert fold_in_half_life({"recency_half_life": 0.3, "objective": "rating"}) == 0.0


@pytest.mark.parametrize(("split", "flags", "expected"), [
    ("user-time", [], 0.05),
    ("user-time", ["--recency-half-life", "0"], 0.0),  # no recency at all: no solve either
    ("user-time", ["--objective", "rating"], 0.0),
    ("random", [], 0.0),
])  # fmt: skip
def test_the_default_follows_the_split_is_recorded_and_the_refit_copies_it(
    tmp_path: Path, split: str, flags: list[str], expected: float
) -> None:
    db = tmp_path / "mf.duckdb"
    cli_ok("preprocess", "--dataset", "synthetic", "--users", "40", "--items", "25",
           "--ratings-per-user", "8", "--split", split, "--db", db)  # fmt: skip
    log = cli("train", "--db", db, "--epochs", "2", "--embedding-dim", "4", "--threads", "1",
              "--export-dir", tmp_path / "export", *flags)  # fmt: skip
    assert log.exit_code == 0, log.stderr
    assert ("users solved again" in log.stderr) == bool(expected)
    cli_ok("train", "--db", db, "--on", "all", "--threads", "1",
           "--export-dir", tmp_path / "export")  # fmt: skip
    configs = rows(db, "SELECT config FROM training_runs ORDER BY finished_at")
    assert [json.loads(c)["train"]["user_half_life"] for (c,) in configs] == [expected] * 2


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--user-half-life", "-0.1"], "--user-half-life: must be >= 0"),
    (["--user-half-life", "nan"], "--user-half-life: must be >= 0"),
    (["--user-half-life", "0.1", "--batch-norm"], "--user-half-life 0 with --batch-norm"),
    (["--fold-in-half-life", "-1"], "--fold-in-half-life: must be >= 0"),
])  # fmt: skip
def test_bad_user_half_lives_are_refused_in_one_line(
    tmp_path: Path, flags: list[str], fragment: str
) -> None:
    db = tmp_path / "mf.duckdb"
    cli_ok("preprocess", "--dataset", "synthetic", "--users", "20", "--items", "10",
           "--ratings-per-user", "5", "--split", "user-time", "--db", db)  # fmt: skip
    assert_user_error(cli("train", "--db", db, *flags), 2, fragment)
    assert "training_runs" not in tables(db)  # refused before any run was started


def test_calibration_candidates_run_between_the_two_half_lives() -> None:
    assert candidates(0.05, 0.3) == pytest.approx([0.05, 0.0783, 0.1225, 0.1917, 0.3], abs=1e-4)
    assert candidates(0.3, 0.05) == candidates(0.05, 0.3)
    assert candidates(0.0, 0.3) == [0.3] and candidates(0.2, 0.2) == [0.2]


@pytest.mark.parametrize("block", [calibrate.SCORE_BLOCK, 7 * 300])  # one block; 7 users
def test_calibration_finds_the_half_life_the_users_were_fitted_at(
    block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Known answer: users whose vectors *are* the fold-in of their ratings at 0.12 fold
    back in to the same lists at 0.12 and to other lists elsewhere (ranked in one score
    block or in blocks of 7 users)."""
    monkeypatch.setattr(calibrate, "SCORE_BLOCK", block)
    rng = np.random.default_rng(3)
    n_users, n_items, d = 120, 300, 16
    items_aug_t = np.concatenate(
        [rng.normal(0, 1, (d, n_items)), rng.normal(0, 0.3, (1, n_items)), np.ones((1, n_items))]
    ).astype(np.float32)
    users = np.repeat(np.arange(n_users), 25)
    items = np.concatenate([rng.choice(n_items, 25, replace=False) for _ in range(n_users)])
    ts = np.tile(np.arange(25), n_users)
    order = np.lexsort((items, users))
    indptr = np.arange(0, users.size + 1, 25)
    truth = fold_in(indptr, items[order], np.ones(users.size, np.float32), items_aug_t,
                    weights=recency_weights(users[order], ts[order], 0.12))  # fmt: skip
    users_aug = np.concatenate([truth[:, : d + 1], np.zeros((n_users, 1))], axis=1)
    best, overlap = calibrated_half_life(
        users_aug, items_aug_t, (users, items, ts), [0.03, 0.12, 0.5, 1.0]
    )
    assert best == 0.12 and overlap[0.12] == pytest.approx(1.0)
    assert max(overlap[h] for h in (0.03, 0.5, 1.0)) < 0.95


def test_train_records_the_calibrated_fold_in_half_life_unless_given(tmp_path: Path) -> None:
    db = tmp_path / "mf.duckdb"
    cli_ok("preprocess", "--dataset", "synthetic", "--users", "60", "--items", "40",
           "--ratings-per-user", "10", "--split", "user-time", "--db", db)  # fmt: skip
    common = ("--db", db, "--epochs", "2", "--embedding-dim", "4", "--threads", "1",
              "--export-dir", tmp_path / "export")  # fmt: skip
    cli_ok("train", *common)
    cli_ok("train", *common, "--fold-in-half-life", "0.2")
    configs = rows(db, "SELECT config FROM training_runs ORDER BY finished_at")
    calibrated, given = (json.loads(c)["train"] for (c,) in configs)
    assert calibrated["fold_in_half_life"] in [round(h, 4) for h in candidates(0.05, 0.3)]
    assert given["fold_in_half_life"] == 0.2


def test_an_explicit_solve_without_timestamps_is_said_and_skipped(tmp_path: Path) -> None:
    source = tmp_path / "ratings.csv"
    lines = [f"{u},{i},{1 + (u * i) % 5}" for u in range(30) for i in range(u % 7, 40, 3)]
    source.write_text("user_id,item_id,rating\n" + "\n".join(lines) + "\n")
    db = tmp_path / "mf.duckdb"
    cli_ok("preprocess", "--dataset", "csv", "--source", source, "--split", "random",
           "--db", db)  # fmt: skip
    log = cli("train", "--db", db, "--epochs", "2", "--embedding-dim", "4", "--threads", "1",
              "--user-half-life", "0.1", "--export-dir", tmp_path / "export")  # fmt: skip
    assert log.exit_code == 0, log.stderr
    assert "users are not solved again" in log.stderr
    assert "users solved again" not in log.stderr
