"""`mfbatch train` end to end through the CLI, on a real DuckDB file in a temp folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from conftest import STAMP, cli

from mfbatch.artifact.files import load_model

SMALL = ["--embedding-dim", "8", "--batch-size", "256", "--negatives", "32"]


def _invoke(*args: str) -> tuple[int, str]:
    run = cli(*args)
    return run.exit_code, run.output


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    db = tmp_path / "mf.duckdb"
    code, out = _invoke(
        "preprocess",
        "--dataset",
        "synthetic",
        "--users",
        "60",
        "--items",
        "40",
        "--ratings-per-user",
        "12",
        "--db",
        str(db),
    )
    assert code == 0, out
    return db


def _train(db: Path, *extra: str) -> tuple[int, str]:
    return _invoke(
        "train", "--db", str(db), "--export-dir", str(db.parent / "export"), *SMALL, *extra
    )


def test_train_records_the_run_and_saves_loadable_weights(dataset: Path) -> None:
    code, out = _train(dataset, "--epochs", "3", "--objective", "rating")
    assert code == 0, out
    assert "training on cpu" in out
    assert "trained " in out and "val RMSE" in out
    con = duckdb.connect(str(dataset), read_only=True)
    run = con.sql(
        "SELECT run_id, status, device, objective, epochs_run, best_epoch, val_rmse, val_mae, "
        "data_seen, dataset_sha256, export_path, config FROM training_runs"
    ).fetchall()
    assert len(run) == 1
    run_id, status, device, objective, epochs_run, best_epoch, rmse, mae, seen, sha, path, cfg = (
        run[0]
    )
    assert (device, objective, seen) == ("cpu", "rating", "train")
    assert 1 <= best_epoch <= epochs_run <= 3
    assert status in ("completed", "early_stopped")
    assert 0 < mae <= rmse < 4
    assert sha == con.sql("SELECT dataset_sha256 FROM dataset_meta").fetchall()[0][0]
    assert json.loads(cfg)["train"]["embedding_dim"] == 8
    epochs = con.sql(
        "SELECT epoch, val_rmse FROM training_epochs WHERE run_id = $r ORDER BY epoch",
        params={"r": run_id},
    ).fetchall()
    assert [e for e, _ in epochs] == list(range(1, epochs_run + 1))
    assert dict(epochs)[best_epoch] == pytest.approx(rmse)
    val = con.sql(
        "SELECT user_idx, item_idx, rating_norm FROM ratings WHERE split = 'val'"
    ).fetchnumpy()
    ((lo, hi),) = con.sql("SELECT rating_min, rating_max FROM dataset_meta").fetchall()
    con.close()

    model, manifest = load_model(dataset.parent / path)
    assert manifest["run_id"] == run_id and manifest["best_epoch"] == best_epoch
    assert manifest["shape"]["n_users"] == 60
    # The saved weights are the ones that scored the recorded figures (the best epoch's,
    # not the last epoch's or the initial ones): RMSE/MAE recomputed from model.pt on the
    # val split, in stars, equal what training_runs holds.
    with torch.no_grad():
        predicted = model(
            torch.from_numpy(val["user_idx"].astype("int64")),
            torch.from_numpy(val["item_idx"].astype("int64")),
        ).clamp(0.0, 1.0)
    error = (predicted.double() - torch.from_numpy(val["rating_norm"])) * (hi - lo)
    assert len(error) > 0
    assert float(error.pow(2).mean().sqrt()) == pytest.approx(rmse, rel=1e-5)
    assert float(error.abs().mean()) == pytest.approx(mae, rel=1e-5)


def _numpy_recall(db: Path, model: torch.nn.Module, k: int) -> float:
    """Recall@K = hits / min(|relevant|, K) over the users with a val rating, as serving
    lists them: train-rated and never-trained items are not offered; a user with no train
    rating gets the K most-rated train items (ties by index)."""
    with duckdb.connect(str(db), read_only=True) as con:
        train = con.sql("SELECT user_idx, item_idx FROM ratings WHERE split = 'train'").fetchall()
        val = con.sql("SELECT user_idx, item_idx FROM ratings WHERE split = 'val'").fetchall()
    n_users, n_items = model.shape.n_users, model.shape.n_items
    with torch.no_grad():
        scores = model.item_logits(torch.arange(n_users), torch.arange(n_items)).double().numpy()
    counts = np.bincount([i for _, i in train], minlength=n_items)
    popular = sorted(range(n_items), key=lambda i: (-counts[i], i))[:k]
    rated: dict[int, set[int]] = {}
    for u, i in train:
        rated.setdefault(u, set()).add(i)
    relevant: dict[int, set[int]] = {}
    for u, i in val:
        relevant.setdefault(u, set()).add(i)
    total = 0.0
    for user, rel in relevant.items():
        if user in rated:
            offer = [i for i in range(n_items) if counts[i] > 0 and i not in rated[user]]
            top = sorted(offer, key=lambda i: -scores[user, i])[:k]
        else:
            top = [i for i in popular if counts[i] > 0]
        total += len(set(top) & rel) / min(len(rel), k)
    return total / len(relevant)


def test_softmax_run_reports_recall_and_logs_one_line_per_epoch(dataset: Path) -> None:
    code, out = _train(dataset, "--epochs", "3", "--eval-every", "2")
    assert code == 0, out
    assert "Recall@20" in out
    # Not a terminal (as under cron): a plain line per epoch instead of progress bars,
    # with validation figures on the validated epochs (2, and the last).
    # Off a terminal each line starts with its time: "2026-12-07T02:15:03Z epoch 1/3 ...".
    lines = [STAMP.sub("", line) for line in out.splitlines() if STAMP.match(line)]
    lines = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"], out
    assert "Recall@20" not in lines[0] and "Recall@20" in lines[1] and "Recall@20" in lines[2]
    assert all("loss " in line and line.endswith(" s") for line in lines)
    with duckdb.connect(str(dataset), read_only=True) as con:
        recall, objective, path = con.sql(
            "SELECT val_recall, objective, export_path FROM training_runs"
        ).fetchall()[0]
        checked = con.sql(
            "SELECT epoch FROM training_epochs WHERE val_recall IS NOT NULL ORDER BY epoch"
        ).fetchall()
    assert objective == "softmax"
    # Recall@20 worked out again in numpy from the saved (best) weights: strictly between 0
    # and 1 here, so a recorded figure stuck at 0 or at 1 cannot pass.
    expected = _numpy_recall(dataset, load_model(dataset.parent / path)[0], 20)
    assert 0.05 < expected < 0.95, expected
    assert recall == pytest.approx(expected, rel=1e-6)
    assert [e for (e,) in checked] == [2, 3]


def test_the_loss_and_its_reason_come_before_training_and_are_recorded(dataset: Path) -> None:
    """The full-or-sampled choice is printed before the first epoch and recorded with the
    run; a time budget the full softmax's estimate does not fit switches to sampling."""
    for budget, path in (("600", "softmax"), ("1e-9", "sampled")):
        code, out = _train(dataset, "--epochs", "2", "--time-budget-s", budget)
        assert code == 0, out
        lines = [STAMP.sub("", line, count=1) for line in out.splitlines()]
        said = next(i for i, line in enumerate(lines) if line.startswith("loss: "))
        first_epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch "))
        assert said < first_epoch, out
        assert ("within --time-budget-s 600" if path == "softmax" else "over --time-budget-s") in (
            lines[said]
        )
        # The users with train ratings (of 60), the catalogue, the epoch budget, the dim.
        assert re.search(r" \d\d users x 40 items x 2 epochs at dim 8 ", lines[said]), lines[said]
        assert "epochs, the default" not in out  # --epochs given
    with duckdb.connect(str(dataset), read_only=True) as con:
        recorded = con.sql(
            "SELECT train_path, train_path_reason, validation_warning FROM training_runs "
            "ORDER BY started_at"
        ).fetchall()
    assert [r[0] for r in recorded] == ["softmax", "sampled"]
    assert "full softmax:" in recorded[0][1] and "sampled softmax (32 " in recorded[1][1]
    assert recorded[0][2] is None


def test_thread_counts_over_the_cores_are_capped_and_absurd_ones_refused(
    dataset: Path,
) -> None:
    cores = len(os.sched_getaffinity(0))
    code, out = _train(dataset, "--epochs", "1", "--threads", str(2 * cores))
    assert code == 0, out
    assert f"--threads {2 * cores}: capped at the {cores} cores" in out
    assert f"training on cpu ({cores} thread{'' if cores == 1 else 's'})" in out
    code, out = _train(dataset, "--epochs", "1", "--threads", "100000")
    assert code == 2 and "--threads: 100000 threads is more than 4x" in out, out


def test_refit_on_all_uses_the_validated_epoch_count(dataset: Path) -> None:
    assert _train(dataset, "--epochs", "3", "--objective", "rating")[0] == 0
    code, out = _train(dataset, "--on", "all")
    assert code == 0, out
    with duckdb.connect(str(dataset), read_only=True) as con:
        rows = con.sql(
            "SELECT run_id, parent_run_id, data_seen, epochs_run, best_epoch, objective, n_train, "
            "val_rmse FROM training_runs ORDER BY finished_at"
        ).fetchall()
        total = con.sql("SELECT count(*) FROM ratings").fetchall()[0][0]
    (parent, _, _, _, chosen, _, _, _), refit = rows
    assert refit[1] == parent
    assert refit[2] == "train+val"
    assert refit[3] == chosen  # exactly the validated run's best epoch count
    assert refit[5] == "rating"  # the validated run's config, not the CLI default
    assert refit[6] == total
    assert refit[7] is None


@pytest.mark.parametrize(
    ("split", "expected"), [("user-time", 0.3), ("time", 0.0), ("random", 0.0)]
)
def test_recency_default_follows_the_split_and_is_recorded(
    tmp_path: Path, split: str, expected: float
) -> None:
    db = tmp_path / "mf.duckdb"
    code, out = _invoke(
        "preprocess", "--dataset", "synthetic", "--users", "30", "--items", "20",
        "--ratings-per-user", "8", "--split", split, "--val-fraction", "0.2", "--db", str(db),
    )  # fmt: skip
    assert code == 0, out
    assert _train(db, "--epochs", "2")[0] == 0
    # The refit copies the validated run's resolved value, whatever the split says.
    code, out = _train(db, "--on", "all")
    assert code == 0, out
    with duckdb.connect(str(db), read_only=True) as con:
        configs = con.sql("SELECT config FROM training_runs ORDER BY finished_at").fetchall()
    assert [json.loads(c)["train"]["recency_half_life"] for (c,) in configs] == [expected] * 2


def test_toml_config_with_cli_override(dataset: Path, tmp_path: Path) -> None:
    toml = tmp_path / "mfbatch.toml"
    toml.write_text('[train]\nembedding_dim = 6\nepochs = 5\nobjective = "rating"\n')
    code, out = _invoke(
        "train",
        "--db",
        str(dataset),
        "--config",
        str(toml),
        "--epochs",
        "1",
        "--export-dir",
        str(tmp_path / "export"),
    )
    assert code == 0, out
    with duckdb.connect(str(dataset), read_only=True) as con:
        stored = json.loads(con.sql("SELECT config FROM training_runs").fetchall()[0][0])
    assert stored["train"]["embedding_dim"] == 6
    assert stored["train"]["epochs"] == 1
    assert stored["train"]["objective"] == "rating"


def _runs(db: Path) -> int:
    with duckdb.connect(str(db), read_only=True) as con:
        exists = con.sql(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'training_runs'"
        ).fetchall()[0][0]
        return con.sql("SELECT count(*) FROM training_runs").fetchall()[0][0] if exists else 0


def _one_line_error(code: int, out: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, out
    assert "Traceback" not in out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), out
    joined = " ".join(out.split())
    for needle in needles:
        assert needle in joined, out


def test_missing_database(tmp_path: Path) -> None:
    code, out = _train(tmp_path / "nope.duckdb")
    _one_line_error(code, out, 4, "nope.duckdb does not exist", "mfbatch preprocess")
    assert not (tmp_path / "nope.duckdb").exists()


def test_no_train_rows(dataset: Path) -> None:
    with duckdb.connect(str(dataset)) as con:
        con.execute("UPDATE ratings SET split = 'val'")
    _one_line_error(*_train(dataset), 4, "no train rows")
    assert _runs(dataset) == 0


def test_empty_val_split(dataset: Path) -> None:
    with duckdb.connect(str(dataset)) as con:
        con.execute("UPDATE ratings SET split = 'train'")
    _one_line_error(*_train(dataset), 4, "val split is empty", "--val-fraction")
    assert _runs(dataset) == 0


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--embedding-dim", "0", "--embedding-dim"),
        ("--lr", "-0.1", "--lr"),
        ("--lr", "nan", "--lr"),
        ("--dropout", "1.5", "--dropout"),
        ("--objective", "accuracy", "--objective"),
        ("--objective", "ranking", "--objective"),
        ("--threads", "0", "--threads"),
        ("--threads", "-3", "--threads"),
        ("--memory-mb", "0", "--memory-mb"),
        ("--time-budget-s", "0", "--time-budget-s"),
        ("--eval-every", "0", "--eval-every"),
        ("--sampler", "random", "--sampler"),
        ("--l2-mode", "ials", "--l2-mode"),
        ("--temperature", "0", "--temperature"),
        ("--recency-half-life", "-0.5", "--recency-half-life"),
        ("--recency-half-life", "inf", "--recency-half-life"),
    ],
)
def test_senseless_settings(dataset: Path, flag: str, value: str, needle: str) -> None:
    _one_line_error(*_train(dataset, flag, value), 2, needle)
    assert _runs(dataset) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_requested_but_absent(dataset: Path) -> None:
    _one_line_error(*_train(dataset, "--device", "cuda"), 2, "--device cuda", "--device cpu")
    assert _runs(dataset) == 0


def test_nan_loss_stops_reports_epoch_and_keeps_weights(dataset: Path) -> None:
    # A NaN that slipped into the table makes the loss NaN in the first epoch.
    with duckdb.connect(str(dataset)) as con:
        con.execute(
            "UPDATE ratings SET rating_norm = 'nan'::DOUBLE "
            "WHERE split = 'train' AND user_idx = 0 AND item_idx = "
            "(SELECT min(item_idx) FROM ratings WHERE user_idx = 0 AND split = 'train')"
        )
    code, out = _train(dataset, "--objective", "rating", "--epochs", "3")
    _one_line_error(code, out, 5, "diverged", "epoch 1", "--lr")
    with duckdb.connect(str(dataset), read_only=True) as con:
        status, path = con.sql("SELECT status, export_path FROM training_runs").fetchall()[0]
    assert status == "diverged"
    model, manifest = load_model(dataset.parent / path)
    assert manifest["status"] == "diverged"
    assert all(torch.isfinite(p).all() for p in model.parameters())
