"""Serving and measuring as two roles, and the refusals that keep both honest.

Real CLI runs on real DuckDB files and ONNX graphs: a small synthetic set on the default
`time` split (so some users have no train rating at all), a validated run and its refit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import onnx
import polars as pl
import pytest
from conftest import assert_error_last, cli, ok, rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from mfbatch.artifact.files import read_metadata
from mfbatch.artifact.graph import build_graph
from mfbatch.errors import DatabaseError
from mfbatch.serving.csr import SeenItems
from mfbatch.serving.lists import ListPlan, build_lists, popularity_top_k
from mfbatch.serving.spool import SPOOL_PREFIX
from mfbatch.store import db

SMALL = ["--embedding-dim", "8", "--batch-size", "256", "--negatives", "32", "--epochs", "3"]
CONFIG_ERROR, INPUT_ERROR, DATABASE_ERROR, MODEL_ERROR = 2, 3, 4, 5


def table_rows(path: Path, table: str) -> list[tuple[Any, ...]]:
    if table not in {t for (t,) in rows(path, "SHOW TABLES")}:
        return []
    return sorted(rows(path, f"SELECT * FROM {table}"), key=repr)


@pytest.fixture(scope="module")
def _trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serving")
    path = root / "mf.duckdb"
    synthetic = ["--users", "60", "--items", "40", "--ratings-per-user", "12"]
    # --split time: cold users, whom both roles must serve from popularity.
    ok(cli("preprocess", "--dataset", "synthetic", *synthetic, "--db", path, "--split", "time"))
    ok(cli("train", "--db", path, "--export-dir", root / "export", *SMALL))
    ok(cli("train", "--db", path, "--export-dir", root / "export", "--on", "all"))
    return path


@pytest.fixture
def trained(_trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(_trained.parent, tmp_path / "w")
    return tmp_path / "w" / "mf.duckdb"


def runs(path: Path) -> dict[str, str]:
    return dict(rows(path, "SELECT data_seen, run_id FROM training_runs"))


# --- the two roles -----------------------------------------------------------------------


def test_trainer_validation_figures_equal_evaluate(trained: Path) -> None:
    """Same run, same K: the trainer's Recall/NDCG are evaluate's, cold users included."""
    validated = runs(trained)["train"]
    (recall, ndcg, top_k), *_ = rows(
        trained,
        f"SELECT val_recall, val_ndcg, top_k FROM training_runs WHERE run_id = '{validated}'",
    )
    cold = rows(
        trained,
        "SELECT count(DISTINCT user_idx) FROM ratings WHERE split = 'val' AND cold_user",
    )[0][0]
    assert cold > 0  # the time split leaves users with no train rating: they get popularity
    report = ok(cli("evaluate", "--db", trained, "--top-k", str(top_k), "--json")).stdout
    import json

    figures = json.loads(report)
    assert figures["run_id"] == validated
    assert figures["model"]["recall"] == pytest.approx(recall, abs=1e-6)
    assert figures["model"]["ndcg"] == pytest.approx(ndcg, abs=1e-6)
    sources = dict(
        rows(
            trained,
            "SELECT source, count(DISTINCT user_id) FROM evaluation_lists "
            "WHERE recommender = 'model' GROUP BY source",
        )
    )
    assert sources["popularity"] == cold


def test_untrained_rows_are_zero_in_the_export(trained: Path) -> None:
    validated = runs(trained)["train"]
    proto = onnx.load_model(str(trained.parent / "export" / validated / "model.onnx"))
    tables = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    untrained_users = [u for (u,) in rows(trained, "SELECT user_idx FROM users WHERE n_train = 0")]
    untrained_items = [i for (i,) in rows(trained, "SELECT item_idx FROM items WHERE n_train = 0")]
    assert untrained_users
    dim = int(read_metadata(trained.parent / "export" / validated / "model.onnx")["embedding_dim"])
    assert not tables["U_aug"][untrained_users, :dim].any()
    assert not tables["V_aug_t"][:dim, untrained_items].any()
    assert not tables["V_aug_t"][dim, untrained_items].any()  # b_i


def test_score_evaluate_and_export_from_another_working_directory(
    trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    ok(cli("score", "--db", trained, "--provider", "cpu"))
    ok(cli("evaluate", "--db", trained, "--provider", "cpu"))
    ok(cli("export", "--db", trained))
    assert rows(trained, "SELECT count(*) FROM recommendations")[0][0] > 0


def test_refit_anneals_over_the_validated_runs_schedule(trained: Path) -> None:
    import json

    (config,), *_ = rows(trained, "SELECT config FROM training_runs WHERE data_seen = 'train'")
    (refit_config, epochs, best), *_ = rows(
        trained,
        "SELECT r.config, r.epochs_run, v.best_epoch FROM training_runs r "
        "JOIN training_runs v ON v.run_id = r.parent_run_id",
    )
    assert epochs == best
    # Same settings (schedule length included): the refit only differs in its data.
    validated, refit = json.loads(config)["train"], json.loads(refit_config)["train"]
    assert {k: v for k, v in refit.items() if k != "on"} == {
        k: v for k, v in validated.items() if k != "on"
    }


# --- refusals: one line, non-zero, nothing changed -----------------------------------------


def test_swapped_columns_make_the_old_model_refused(tmp_path: Path) -> None:
    source = tmp_path / "r.csv"
    rng = np.random.default_rng(0)
    lines = ["a,b,rating,timestamp"]
    lines += [
        f"{u},{100 + int(i)},{int(rng.integers(1, 6))},{1_600_000_000 + n}"
        for n, (u, i) in enumerate((u, i) for u in range(30) for i in rng.choice(20, 6, False))
    ]
    source.write_text("\n".join(lines) + "\n")
    path = tmp_path / "c.duckdb"
    columns = ["--dataset", "csv", "--source", source, "--rating-col", "rating"]
    ok(cli("preprocess", *columns, "--user-col", "a", "--item-col", "b", "--db", path))
    ok(cli("train", "--db", path, "--export-dir", tmp_path / "export", *SMALL))
    ok(cli("score", "--db", path))
    before = table_rows(path, "recommendations")
    ok(cli("preprocess", *columns, "--user-col", "b", "--item-col", "a", "--db", path))
    assert_error_last(
        cli("score", "--db", path), MODEL_ERROR, "was trained on dataset", "train again"
    )
    assert table_rows(path, "recommendations") == before


def test_empty_lists_are_refused(trained: Path, tmp_path: Path) -> None:
    ok(cli("score", "--db", trained))
    before = table_rows(trained, "recommendations")
    (item,), *_ = rows(
        trained,
        "SELECT i.item_id FROM items i JOIN ratings r USING (item_idx) "
        "GROUP BY i.item_id ORDER BY count(*) DESC LIMIT 1",
    )
    allow = tmp_path / "allow.txt"
    allow.write_text(f"{item}\n")
    message = assert_error_last(
        cli("score", "--db", trained, "--include-items", allow), CONFIG_ERROR, "empty list"
    )
    assert "nothing was published" in message
    assert table_rows(trained, "recommendations") == before


def test_model_tables_with_nan_are_refused(trained: Path) -> None:
    ok(cli("score", "--db", trained))
    before = table_rows(trained, "recommendations")
    refit = runs(trained)["train+val"]
    path = trained.parent / "export" / refit / "model.onnx"
    proto = onnx.load_model(str(path))
    tables = {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}
    tables["U_aug"][3, 0] = np.nan
    metadata = read_metadata(path)
    onnx.save_model(build_graph(tables["U_aug"], tables["V_aug_t"], metadata), str(path))
    assert_error_last(cli("score", "--db", trained), MODEL_ERROR, "NaN/inf", "train again")
    assert table_rows(trained, "recommendations") == before


def test_users_file_that_is_not_utf8(trained: Path, tmp_path: Path) -> None:
    ok(cli("score", "--db", trained))
    before = table_rows(trained, "recommendations")
    users = tmp_path / "users.txt"
    users.write_bytes(b"1\n2\n\xff\xfe3\n")
    assert_error_last(
        cli("score", "--db", trained, "--users", users), INPUT_ERROR, "--users", "line 3", "UTF-8"
    )
    assert table_rows(trained, "recommendations") == before


def test_absurd_thread_counts_are_refused(trained: Path) -> None:
    assert_error_last(
        cli("score", "--db", trained, "--threads", "100000"), CONFIG_ERROR, "--threads"
    )
    assert_error_last(
        cli("evaluate", "--db", trained, "--threads", "100000"), CONFIG_ERROR, "--threads"
    )


def test_stale_spools_are_removed_and_live_ones_kept(trained: Path) -> None:
    dead = trained.parent / f"{SPOOL_PREFIX}dead"
    dead.mkdir()
    (dead / "recommendations.arrow").write_bytes(b"half a spool")
    (dead / "owner.pid").write_text("999999999")
    orphan = trained.parent / f"{SPOOL_PREFIX}orphan"  # killed before it wrote its owner
    orphan.mkdir()
    os.utime(orphan, (1_000_000_000, 1_000_000_000))
    fresh = trained.parent / f"{SPOOL_PREFIX}fresh"  # another score's, owner not written yet
    fresh.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = trained.parent / f"{SPOOL_PREFIX}live"
        live.mkdir()
        (live / "owner.pid").write_text(str(sleeper.pid))
        ok(cli("score", "--db", trained))
        assert not dead.exists() and not orphan.exists()
        assert live.exists()  # another score still at work
        assert fresh.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
        fresh.rmdir()


@pytest.fixture
def held(trained: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the database open for writing (DuckDB's file lock)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, duckdb\n"
            "con = duckdb.connect(sys.argv[1])\n"
            "print('holding', flush=True)\n"
            "time.sleep(120)\n",
            str(trained),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60, holder.kill)
    watchdog.start()
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        watchdog.cancel()
        yield holder
    finally:
        watchdog.cancel()
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.parametrize("command", ["train", "score", "evaluate"])
def test_locked_database_is_refused_before_the_work(
    trained: Path, held: subprocess.Popen[str], command: str
) -> None:
    extra = ["--export-dir", trained.parent / "export", *SMALL] if command == "train" else []
    message = assert_error_last(
        cli(command, "--db", trained, *extra), DATABASE_ERROR, "locked by another process"
    )
    assert f"PID {held.pid}" in message
    # Nothing started: no new run folder, no spool.
    assert len(list((trained.parent / "export").iterdir())) == 2
    assert not list(trained.parent.glob(SPOOL_PREFIX + "*"))


@pytest.fixture
def immutable(trained: Path) -> Iterator[Path]:
    """A database file nobody may write, root included (ext4's immutable flag)."""
    ok(cli("score", "--db", trained))
    flagged = subprocess.run(["chattr", "+i", str(trained)], capture_output=True, check=False)
    if flagged.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {flagged.stderr!r}")
    try:
        yield trained
    finally:
        subprocess.run(["chattr", "-i", str(trained)], check=True)


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
@pytest.mark.parametrize("command", ["train", "score", "evaluate"])
def test_read_only_database_is_refused_before_the_work(immutable: Path, command: str) -> None:
    before = table_rows(immutable, "recommendations")
    extra = ["--export-dir", immutable.parent / "export", *SMALL] if command == "train" else []
    assert_error_last(
        cli(command, "--db", immutable, *extra), DATABASE_ERROR, "could not be opened"
    )
    assert len(list((immutable.parent / "export").iterdir())) == 2
    assert table_rows(immutable, "recommendations") == before


def test_a_commit_duckdb_aborted_itself_is_one_error(tmp_path: Path) -> None:
    """DuckDB rolls a failed commit back itself; our rollback must not raise over it."""
    con = duckdb.connect(str(tmp_path / "t.duckdb"))
    con.execute("CREATE TABLE t (a INTEGER PRIMARY KEY)")
    first, second = con.cursor(), con.cursor()
    first.begin()
    first.execute("INSERT INTO t VALUES (1)")
    with (
        pytest.raises(DatabaseError, match="rolled back, nothing changed"),
        db.transaction(second, "t"),
    ):
        second.execute("INSERT INTO t VALUES (1)")
        first.commit()  # the conflict shows only when `second` commits
    assert con.execute("SELECT a FROM t").fetchall() == [(1,)]
    con.close()


# --- config: typed once, at load ----------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("train = 5\n", "train must be a table"),
        ('[train]\nbatch_norm = "false"\n', "batch_norm: expected true or false"),
        ('[train]\nepochs = "3"\n', "epochs: expected a whole number"),
        ("db = 5\n", "db: expected a path"),
        ("[train]\nexport_dir = 7\n", "export_dir: expected a path"),
        ("[score]\ntop_k = 2.5\n", "top_k: expected a whole number"),
        ('[evaluate]\nmin_rating = "high"\n', "min_rating: expected a number"),
    ],
)
@pytest.mark.parametrize("command", ["train", "score", "evaluate"])
def test_wrong_types_in_the_config_are_refused_before_any_work(
    trained: Path, tmp_path: Path, toml: str, needle: str, command: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    before = {t: table_rows(trained, t) for t in ("training_runs", "recommendations")}
    assert_error_last(
        cli(command, "--db", trained, "--config", config), CONFIG_ERROR, str(config), needle
    )
    assert {t: table_rows(trained, t) for t in before} == before


# --- preprocess: values that are not what they claim ---------------------------------------


@pytest.mark.parametrize(
    ("timestamps", "outcome"),
    [
        (["hello", "world", "again"], "'hello' is not a timestamp"),
        (["1", "2", "99999999999999"], "outside 1900-2100"),
        (["1700000000000000000", "1700000000000000001", "1700000000000000002"], None),
        (["1700000000000", "1700000000001", "1700000000002"], None),
    ],
    ids=["words", "far-future", "nanoseconds", "milliseconds"],
)
def test_timestamps_are_read_or_refused(
    tmp_path: Path, timestamps: list[str], outcome: str | None
) -> None:
    source = tmp_path / "r.csv"
    body = "".join(
        f"{u},{i},4,{t}\n" for (u, i), t in zip([(1, 1), (2, 1), (1, 2)], timestamps, strict=True)
    )
    source.write_text("user_id,item_id,rating,timestamp\n" + body)
    path = tmp_path / "t.duckdb"
    args = ["preprocess", "--dataset", "csv", "--source", source, "--db", path]
    args += ["--split", "random", "--rating-min", "1", "--rating-max", "5"]
    if outcome is None:
        ok(cli(*args))
        years = {row[0].year for row in rows(path, "SELECT ts FROM ratings")}
        assert years == {2023}
    else:
        assert_error_last(cli(*args), INPUT_ERROR, str(source), "column timestamp", outcome)
        assert not path.exists()


def test_strings_in_a_parquet_time_column(tmp_path: Path) -> None:
    source = tmp_path / "r.parquet"
    pl.DataFrame(
        {
            "user_id": [1, 2, 1],
            "item_id": [1, 1, 2],
            "rating": [5.0, 3.0, 4.0],
            "ts": ["a", "b", "c"],
        }
    ).write_parquet(source)
    assert_error_last(
        cli(
            "preprocess", "--dataset", "parquet", "--source", source, "--time-col", "ts",
            "--db", tmp_path / "p.duckdb",
        ),
        INPUT_ERROR,
        "row 0, column ts",
        "'a' is not a timestamp",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--rating-min", "nan", "--rating-max", "5"], "--rating-min: must be a finite"),
        (["--rating-min", "1", "--rating-max", "inf"], "--rating-max: must be a finite"),
        (["--rating-min", "-1e308", "--rating-max", "1e308"], "too wide"),
        ([], "too wide to scale"),  # inferred from ratings of +-1e308
    ],
)
def test_rating_scales_that_are_not_finite(tmp_path: Path, flags: list[str], needle: str) -> None:
    source = tmp_path / "r.csv"
    source.write_text("user_id,item_id,rating,timestamp\n1,1,1e308,1\n2,1,-1e308,2\n1,2,4,3\n")
    args = ["preprocess", "--dataset", "csv", "--source", source, "--db", tmp_path / "s.duckdb"]
    code = CONFIG_ERROR if flags else INPUT_ERROR
    assert_error_last(cli(*args, *flags), code, needle)
    assert not (tmp_path / "s.duckdb").exists()


# --- the list builder against an oracle ----------------------------------------------------


PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(data=st.data())
def test_popularity_lists_equal_a_sorted_oracle(data: st.DataObject) -> None:
    n_users = data.draw(st.integers(1, 6))
    n_items = data.draw(st.integers(1, 15))
    counts = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n_items, max_size=n_items)))
    per_user = [
        sorted(data.draw(st.sets(st.integers(0, n_items - 1), max_size=n_items)))
        for _ in range(n_users)
    ]
    allowed = data.draw(st.lists(st.booleans(), min_size=n_items, max_size=n_items))
    k = data.draw(st.integers(1, n_items))
    users = np.arange(n_users)
    seen = SeenItems.from_pairs(
        np.array([u for u, items in enumerate(per_user) for _ in items], dtype=np.int64),
        np.array([i for items in per_user for i in items], dtype=np.int64),
        n_users,
    )
    mask = np.where(allowed, 0.0, -np.inf).astype(np.float32)
    items, scores = popularity_top_k(users, seen, mask, counts, k)
    for u in users:
        expected = sorted(
            (i for i in range(n_items) if counts[i] > 0 and allowed[i] and i not in per_user[u]),
            key=lambda i: (-counts[i], i),
        )[:k]
        got = [int(i) for i, s in zip(items[u], scores[u], strict=True) if np.isfinite(s)]
        assert got == expected
        assert [float(s) for s in scores[u][: len(got)]] == [float(counts[i]) for i in got]


def test_cold_users_go_to_popularity_and_the_rest_to_the_graph(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n_users, n_items, k = 8, 12, 4
    users_aug = rng.normal(size=(n_users, 3)).astype(np.float32)
    items_t = rng.normal(size=(3, n_items)).astype(np.float32)
    path = tmp_path / "g.onnx"
    onnx.save_model(build_graph(users_aug, items_t, {}), str(path))
    from mfbatch.serving.session import Scorer

    scorer = Scorer(path, provider="cpu", threads=1)
    seen = SeenItems.from_pairs(np.array([0, 0, 5]), np.array([1, 2, 3]), n_users)
    cold = np.zeros(n_users, dtype=bool)
    cold[[2, 5]] = True
    counts = np.arange(n_items)[::-1].copy()  # item 0 most popular
    plan = ListPlan(np.arange(n_users), seen, np.zeros(n_items, np.float32), cold, counts, k)
    batches = list(build_lists(scorer, plan, batch_size=3))
    from_model = np.concatenate([b.from_model for b in batches])
    items = np.concatenate([b.items for b in batches])
    assert (from_model == ~cold).all()
    assert items[2].tolist() == [0, 1, 2, 3]
    assert items[5].tolist() == [0, 1, 2, 4]  # 3 was rated
    full = users_aug.astype(np.float64) @ items_t.astype(np.float64)
    full[0, [1, 2]] = -np.inf
    for u in np.flatnonzero(~cold):
        assert items[u].tolist() == np.argsort(-full[u], kind="stable")[:k].tolist()
    assert os.path.exists(path)
