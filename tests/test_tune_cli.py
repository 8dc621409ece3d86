"""`mfbatch tune`: the search reads only the train split, resumes, and records failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from mfbatch.config import TuneConfig, l2_for
from mfbatch.config.train import L2_BASE, RECENCY_HALF_LIFE, USER_HALF_LIFE
from mfbatch.data.transforms import carve_inner, inner_share
from mfbatch.store import db
from tests.conftest import STAMP, assert_user_error, cli, cli_ok, ok, rows

TUNE = ["--trials", "3", "--epochs", "3", "--threads", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tune") / "t.duckdb"
    cli_ok(
        "preprocess",
        "--dataset",
        "synthetic",
        "--users",
        "60",
        "--items",
        "40",
        "--ratings-per-user",
        "12",
        "--split",
        "user-time",
        "--db",
        path,
    )
    return path


def _copy(prepared: Path, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    shutil.copyfile(prepared, path)
    return path


def _trials(path: Path) -> list[tuple[object, ...]]:
    return rows(path, "SELECT trial, params, value, state FROM tuning_trials ORDER BY trial")


def _chosen(path: Path) -> dict[str, object]:
    return json.loads(rows(path, "SELECT settings FROM tuned_settings")[0][0])


def _poison(path: Path, split: str) -> None:
    import duckdb

    with duckdb.connect(str(path)) as con:
        con.execute(
            # Half the rows become ten years older: read at all, they would move which
            # ratings count as a user's newest.
            "UPDATE ratings SET rating_norm = 1 - rating_norm, rating = 6 - rating, "
            "ts = ts - INTERVAL 3650 DAY WHERE split = ? AND item_idx % 2 = 0",
            [split],
        )


def test_the_outer_validation_split_is_never_read(prepared: Path, tmp_path: Path) -> None:
    clean = _copy(prepared, tmp_path, "clean.duckdb")
    poisoned = _copy(prepared, tmp_path, "poisoned.duckdb")
    control = _copy(prepared, tmp_path, "control.duckdb")
    _poison(poisoned, "val")
    # The control: the same change to the train rows does move the search, so the
    # comparison above it can fail.
    _poison(control, "train")
    for path in (clean, poisoned, control):
        ok(cli("tune", "--db", path, *TUNE))
    assert _trials(poisoned) == _trials(clean)
    assert _chosen(poisoned) == _chosen(clean)
    assert [t[2] for t in _trials(control)] != [t[2] for t in _trials(clean)]


def test_a_cut_off_search_resumes_without_rerunning_finished_trials(
    prepared: Path, tmp_path: Path
) -> None:
    path = _copy(prepared, tmp_path, "resume.duckdb")
    args = [sys.executable, "-m", "mfbatch", "tune", "--db", str(path), *TUNE]
    args[args.index("--trials") + 1] = "4"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if STAMP.sub("", line, count=1).startswith("trial 0 (1 of 4)"):
            proc.send_signal(signal.SIGKILL)  # cut off mid-search, as a lost machine would
            break
    proc.wait(timeout=60)
    before = {t[0]: t for t in _trials(path)}
    assert 1 <= len(before) < 4
    out = ok(cli(*args[3:])).stdout
    done = len([t for t in before.values() if t[3] in ("COMPLETE", "PRUNED")])
    assert f"of 4, {4 - done} run now" in " ".join(out.split())
    after = {t[0]: t for t in _trials(path)}
    # What had finished is kept as it was, not run again; four trials are finished now.
    for number, trial in before.items():
        if trial[3] in ("COMPLETE", "PRUNED"):
            assert after[number] == trial
    assert len([t for t in after.values() if t[3] in ("COMPLETE", "PRUNED")]) == 4
    # A trial the kill interrupted is recorded as failed, never as chosen.
    for trial in after.values():
        assert trial[3] != "RUNNING"


def test_a_failing_trial_is_recorded_and_skipped(prepared: Path, tmp_path: Path) -> None:
    path = _copy(prepared, tmp_path, "fail.duckdb")
    config = tmp_path / "tune.toml"
    # 5000 dimensions is refused by the train settings' own check: those trials fail.
    config.write_text("[tune]\nspace = { embedding_dim = [8, 5000] }\n")
    ok(cli("tune", "--db", path, "--config", config, *TUNE, "--trials", "6"))
    states = rows(path, "SELECT state, error FROM tuning_trials ORDER BY trial")
    failed = [error for state, error in states if state == "FAIL"]
    assert failed and all("--embedding-dim" in str(error) for error in failed)
    assert any(state == "COMPLETE" for state, _ in states)
    assert _chosen(path)["embedding_dim"] == 8


def _inner_train(path: Path) -> pl.DataFrame:
    """The rows tune trains its trials on: train less the inner split (tune's defaults: the
    outer split's own share)."""
    con = db.connect(path, read_only=True)
    try:
        frame = db.frame(con, "training_ratings", all_splits=False)
    finally:
        con.close()
    train = frame.filter(~pl.col("is_val"))
    share = inner_share(int(frame["is_val"].sum()), frame.height)
    held, _ = carve_inner(train, share, TuneConfig().seed)
    return train.filter(~pl.Series(held))


def test_train_applies_the_tuned_settings_below_its_flags(prepared: Path, tmp_path: Path) -> None:
    path = _copy(prepared, tmp_path, "apply.duckdb")
    ok(cli("tune", "--db", path, *TUNE))
    chosen = _chosen(path)
    # The first trial is what train would do untuned (its epochs capped by --epochs 3).
    first = json.loads(_trials(path)[0][1])
    # Trial 0 takes train's L2 rule on the inner split's own train rows (this sparse data
    # is above the base value).
    inner = _inner_train(path)
    per_item = inner.height / inner["item_idx"].n_unique()
    assert l2_for(per_item) > L2_BASE
    defaults = {"embedding_dim": 256, "epochs": 3, "lr": 0.005, "l2": l2_for(per_item)}
    untuned = {
        "temperature": 1.0,
        "user_exponent": 0.075,
        "recency_half_life": RECENCY_HALF_LIFE,
        "user_half_life": USER_HALF_LIFE,
    }
    assert first == {**defaults, **untuned}
    # Then its neighbours, one setting changed each, as many as leave the sampler one
    # trial (3 trials: one neighbour, the recency half-life a step shorter).
    shorter = {**first, "recency_half_life": RECENCY_HALF_LIFE * 0.75}
    assert json.loads(_trials(path)[1][1]) == pytest.approx(shorter)
    assert len(_trials(path)) == 3
    run = ok(cli("train", "--db", path, "--threads", "1", "--lr", "0.01", "--export-dir", tmp_path))
    # The first line of the log says where the settings came from.
    log = "\n".join(STAMP.sub("", line, count=1) for line in run.stderr.splitlines())
    first = " ".join(log.split("\nepoch")[0].split())
    assert first.startswith("training on") and "tuned settings of study 'default'" in first
    config = json.loads(rows(path, "SELECT config FROM training_runs")[0][0])["train"]
    assert config["lr"] == 0.01  # the flag wins
    assert config["embedding_dim"] == chosen["embedding_dim"]
    assert config["temperature"] == pytest.approx(chosen["temperature"])
    # A chosen trial at the data's default L2 (trial 0, or a neighbour that keeps it) leaves
    # the L2 to train's rule on its own rows, which differ from the inner split's.
    best = json.loads(_trials(path)[int(rows(path, "SELECT trial FROM tuned_settings")[0][0])][1])
    ((n, items),) = rows(
        path, "SELECT count(*), count(DISTINCT item_idx) FROM ratings WHERE split = 'train'"
    )
    if best["l2"] == defaults["l2"]:
        assert "l2" not in chosen
        assert config["l2"] == pytest.approx(l2_for(n / items)) != defaults["l2"]
    else:
        assert config["l2"] == chosen["l2"] == best["l2"]


def test_the_api_tunes_like_the_command(prepared: Path, tmp_path: Path) -> None:
    import mfbatch

    path = _copy(prepared, tmp_path, "api.duckdb")
    summary = mfbatch.tune(db=path, trials=2, epochs=2, threads=1, train={"embedding_dim": 16})
    assert summary.trials_finished == 2 and summary.best_trial is not None
    assert _chosen(path) == summary.settings
    assert len(_trials(path)) == 2


def test_a_sampled_search_also_tries_more_negatives(prepared: Path, tmp_path: Path) -> None:
    """Where train's defaults take the sampled softmax the search sets --negatives too:
    trial 0 at train's value, the first neighbour at 4x (the setting that measured better on
    a sampled set's inner split), the second at twice the epochs, every trial within the
    range; train takes the chosen value. A full-softmax search never sets it (the test
    above: trial 0 has no such key)."""
    import mfbatch

    path = _copy(prepared, tmp_path, "sampled.duckdb")
    # The search's fewest epochs are 10: train's 10 leaves room to double within 20.
    train = {"objective": "sampled", "embedding_dim": 32, "negatives": 300, "epochs": 10}
    summary = mfbatch.tune(db=path, trials=4, epochs=20, threads=1, train=train)
    trials = [json.loads(params) for _, params, _, _ in _trials(path)]
    assert [t["negatives"] for t in trials[:2]] == [300, 1200]
    assert trials[1] == {**trials[0], "negatives": 1200}
    # Then twice the epochs: the side of the sampled floor train gives up for time.
    assert trials[0]["epochs"] == 10 and trials[2] == {**trials[0], "epochs": 20}
    assert all(256 <= t["negatives"] <= 8192 for t in trials)
    assert summary.settings["negatives"] == trials[summary.best_trial]["negatives"]
    mfbatch.train(db=path, threads=1, export_dir=tmp_path, objective="sampled", embedding_dim=32)
    config = json.loads(rows(path, "SELECT config FROM training_runs")[0][0])["train"]
    assert config["negatives"] == summary.settings["negatives"]


@pytest.mark.parametrize("bounds", [[0, 100], [64.5, 100], [512, 256]])
def test_a_negatives_range_of_anything_but_whole_counts_is_refused(bounds: list[float]) -> None:
    from mfbatch.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\[tune\] space negatives"):
        TuneConfig(space={"negatives": bounds})


def test_the_log_says_when_the_negatives_are_searched(prepared: Path, tmp_path: Path) -> None:
    path = _copy(prepared, tmp_path, "says.duckdb")
    config = tmp_path / "mf.toml"
    config.write_text('[train]\nobjective = "sampled"\nembedding_dim = 32\n')
    args = ["--trials", "1", "--epochs", "1", "--threads", "1"]
    sampled = ok(cli("tune", "--db", path, "--config", config, *args)).stderr
    assert "tuning the sampled softmax (--negatives searched too) on an inner" in sampled
    full = ok(cli("tune", "--db", path, "--study", "full", *args)).stderr
    assert "tuning softmax on an inner" in full and "negatives" not in full


@pytest.mark.parametrize(
    ("n_val", "n_rows", "share"),
    [(11, 100, 0.11), (20, 100, 0.2), (1, 100, 0.05), (90, 100, 0.5), (0, 100, 0.2), (5, 5, 0.2)],
)
def test_the_inner_share_is_the_outer_splits_own_within_bounds(
    n_val: int, n_rows: int, share: float
) -> None:
    assert inner_share(n_val, n_rows) == pytest.approx(share)


def test_the_inner_split_mirrors_the_outer_share_and_a_resume_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "tenth.duckdb"
    cli_ok(
        "preprocess", "--dataset", "synthetic", "--users", "60", "--items", "40",
        "--ratings-per-user", "20", "--split", "user-time", "--val-fraction", "0.1", "--db", path,
    )  # fmt: skip
    args = ["--db", path, "--epochs", "1", "--threads", "1"]
    log = " ".join(ok(cli("tune", *args, "--trials", "1")).stderr.split())
    n_val, n_rows = rows(path, "SELECT sum((split = 'val')::INT), count(*) FROM ratings")[0]
    share = inner_share(n_val, n_rows)
    assert 0.09 < share < 0.12  # the outer split's 0.1 (duplicates dropped), not 0.2
    assert f"({share:g} of each user's: {_inner_train(path).height} train /" in log
    # Resumed with another share, the study's trials would not compare: refused, kept.
    before = _trials(path)
    run = cli("tune", *args, "--trials", "2", "--inner-fraction", "0.3")
    assert_user_error(run, 2, f"inner split of {share:g}", f"pass --inner-fraction {share:g}")
    assert _trials(path) == before
    ok(cli("tune", *args, "--trials", "2", "--inner-fraction", f"{share:g}"))
    assert len(_trials(path)) == 2
