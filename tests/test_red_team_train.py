"""Issue 20's red-team rows about training and spooling: a full disk and a stolen write
lock leave no model that no run names, and a full disk while spooling is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch
from conftest import assert_error_last, cli, ok, rows

import mfbatch.serving.spool

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--embedding-dim", "8", "--batch-size", "64", "--threads", "1")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "mf.duckdb"
    ok(
        cli(
            "preprocess", "--dataset", "synthetic", "--users", "80", "--items", "40",
            "--ratings-per-user", "10", "--db", path,
        )
    )  # fmt: skip
    return path


def _runs(path: Path) -> list[tuple[object, ...]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = {t for (t,) in con.execute("SHOW TABLES").fetchall()}
        if "training_runs" not in tables:
            return []
        return con.execute("SELECT run_id FROM training_runs").fetchall()
    finally:
        con.close()


def test_a_full_disk_while_saving_the_model_leaves_no_files_and_no_run(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export = tmp_path / "export"

    def full(*args: object, **kwargs: object) -> None:
        # What torch raises when the disk fills under torch.save.
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", full)
    result = cli("train", "--db", db, "--epochs", "2", "--export-dir", export, *SMALL)
    message = assert_error_last(result, 5, "could not save the model", "train again")
    assert "mfbatch export" not in message  # no run is recorded: exporting one can't help
    assert not export.exists() or not any(export.iterdir()), list(export.iterdir())
    assert _runs(db) == []


def test_a_write_lock_taken_while_training_leaves_no_orphan_model(db: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    train = subprocess.Popen(
        [sys.executable, "-m", "mfbatch", "train", "--db", str(db), "--epochs", "400",
         "--patience", "1000", "--eval-every", "1", "--export-dir", str(export), *SMALL],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert train.stderr is not None
    locker = None
    try:
        for line in train.stderr:
            if " epoch 1/" in f" {line}":
                # Another process opens the database for writing and holds it.
                locker = subprocess.Popen(
                    [sys.executable, "-c",
                     "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                     "print('locked', flush=True); time.sleep(120)", str(db)],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                assert locker.stdout is not None
                assert locker.stdout.readline().strip() == "locked"
                break
        rest = train.stderr.read()
        code = train.wait(timeout=300)
    finally:
        if locker is not None:
            locker.kill()
            locker.wait()
        train.kill()
    assert locker is not None, "training never started"
    assert code == 4, rest
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lock" in errors[0], rest
    assert "Traceback" not in rest
    assert not export.exists() or not any(export.iterdir()), list(export.iterdir())
    assert _runs(db) == []


def test_a_full_disk_while_spooling_is_one_line_without_a_thread_traceback(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(cli("train", "--db", db, "--epochs", "2", "--export-dir", tmp_path / "export", *SMALL))
    before = rows(db, "SELECT count(*) FROM training_runs")
    real = mfbatch.serving.spool.pa.ipc.new_file

    class FullWriter:
        """A spool file whose every write and close fails as a full disk does."""

        def __init__(self, *args: object) -> None:
            real(*args).close()

        def write_table(self, table: object) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(mfbatch.serving.spool.pa.ipc, "new_file", FullWriter)
    result = cli("score", "--db", db, "--threads", "1")
    assert_error_last(result, 4, "No space left on device", "unchanged")
    assert "Traceback" not in result.stderr and "Exception in thread" not in result.stderr
    assert rows(db, "SELECT count(*) FROM training_runs") == before
