"""`make all`: preprocess -> train -> evaluate -> refit -> score, end to end, as a user runs it.

The Makefile runs the `mfbatch` of the environment this test runs in (BIN=) and installs
nothing (INSTALL_STAMP= drops the `make install` prerequisite); everything it writes goes
to a temp folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from conftest import recall_from_lists

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # not resolved: a venv's python is a symlink out of it


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.skipif(not (BIN / "mfbatch").exists(), reason="mfbatch is not installed in BIN")
def test_make_all_synthetic(tmp_path: Path) -> None:
    path, export = tmp_path / "m.duckdb", tmp_path / "export"
    # A parent make (`make test`) exports its own flags and level; start from a clean slate.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT),
            "all",
            "DATASET=synthetic",
            f"DB={path}",
            f"EXPORT_DIR={export}",
            "PREPROCESS_FLAGS=--users 80 --items 50 --ratings-per-user 10",
            "TRAIN_FLAGS=--epochs 2 --embedding-dim 8",
            f"BIN={BIN}",
            "INSTALL_STAMP=",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "pip install" not in output and "-m venv" not in output
    for stage in ("preprocess", "train", "evaluate", "score"):
        assert f"{BIN}/mfbatch {stage} " in result.stdout, result.stdout
    assert "--on all" in result.stdout

    with duckdb.connect(str(path), read_only=True) as con:
        runs = dict(con.sql("SELECT data_seen, run_id FROM training_runs").fetchall())
        served = con.sql("SELECT DISTINCT run_id FROM recommendations").fetchall()
        users, per_user = con.sql(
            "SELECT count(DISTINCT user_id), max(rank) FROM recommendations"
        ).fetchall()[0]
        already_rated = con.sql(
            "SELECT count(*) FROM recommendations r JOIN users u USING (user_id) "
            "JOIN items i USING (item_id) JOIN ratings x "
            "ON x.user_idx = u.user_idx AND x.item_idx = i.item_idx"
        ).fetchall()[0][0]
        evaluated = con.sql("SELECT run_id, metric, k, value FROM evaluations").fetchall()
    # Serving is the refit; measuring is the validated run it copies.
    assert served == [(runs["train+val"],)]
    assert already_rated == 0
    assert users == 80 and per_user == 20  # TOPK defaults to 20
    assert (export / runs["train+val"] / "model.onnx").is_file()
    metrics = {metric: (k, value) for rid, metric, k, value in evaluated if rid == runs["train"]}
    # Recall@20 against the same figure worked out from the stored lists; strictly between
    # 0 and 1 here, so a metric stuck at 0 or at 1 cannot pass.
    expected = recall_from_lists(path, runs["train"], "model", 20)
    assert 0.05 < expected < 0.95, expected
    assert metrics["recall"][0] == 20
    assert metrics["recall"][1] == pytest.approx(expected, rel=1e-9)
    assert {"precision", "ndcg", "map", "hit_rate", "coverage"} <= set(metrics)

    # The evaluation table and its summary, then the serving summary, close the output.
    lines = result.stdout.rstrip().splitlines()
    assert lines[-1].startswith(
        f"scored 80 users with run {runs['train+val']} (refit on train+val)"
    ), lines[-1]
    summary = next(i for i, line in enumerate(lines) if line.startswith("evaluated run "))
    assert lines[summary].startswith(f"evaluated run {runs['train']}: Recall@20 ")
    table = "\n".join(lines[summary - 20 : summary])
    assert f"run {runs['train']}, K=20" in table
    for name in ("metric", "popularity", "recall@20", "ndcg@20", "users_evaluated"):
        assert name in table, table


def _make(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(env_extra or {})
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.skipif(not (BIN / "mfbatch").exists(), reason="mfbatch is not installed in BIN")
def test_make_preprocess_offline_falls_back_to_synthetic(tmp_path: Path) -> None:
    # No DATASET=/SOURCE=: ML-1M is wanted, not cached, and the download is refused.
    path = tmp_path / "m.duckdb"
    offline = {
        "MFBATCH_CACHE": str(tmp_path / "cache"),
        "MFBATCH_MOVIELENS_URL": "http://127.0.0.1:9/movielens",
        "PYTHONPATH": str(ROOT),
    }
    result = _make(
        "preprocess",
        f"DB={path}",
        "FALLBACK_FLAGS=--users 60 --items 40 --ratings-per-user 8",
        f"BIN={BIN}",
        "INSTALL_STAMP=",
        env_extra=offline,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("make: ")]
    assert len(notes) == 1, result.stdout
    assert notes[0].startswith("make: ml-1m unavailable (could not download "), notes[0]
    assert "synthetic" in notes[0] and "SOURCE=path/to/ml-1m.zip" in notes[0]
    with duckdb.connect(str(path), read_only=True) as con:
        users = con.sql("SELECT count(*) FROM users").fetchall()[0][0]
    assert 40 < users <= 60  # FALLBACK_FLAGS' shape, not ML-1M's 6,040

    # Asked for by name, ML-1M offline is an error, not a silent substitute.
    named = _make(
        "preprocess",
        "DATASET=ml-1m",
        f"DB={tmp_path / 'n.duckdb'}",
        f"BIN={BIN}",
        "INSTALL_STAMP=",
        env_extra=offline,
    )
    assert named.returncode != 0, named.stdout + named.stderr
    assert "could not download" in named.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_follows_the_extras_asked_for(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    # A plain install's stamp, newer than pyproject.toml.
    (venv / "bin" / ".installed-dev").touch()
    plain = _make("-n", "install", f"VENV={venv}")
    assert "pip install" not in plain.stdout, plain.stdout
    ray = _make("-n", "install", f"VENV={venv}", "EXTRAS=ray")
    assert "-e '.[dev,ray]'" in ray.stdout, ray.stdout
