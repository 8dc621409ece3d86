"""`mfbatch preprocess` as a user runs it: the summary line, re-runs, config files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import Preprocess, Query, Snapshot, unstamped

SUMMARY = re.compile(
    r"preprocessed (?P<rows>[\d,]+) rows from (?P<layout>\S+) "
    r"\((?P<dups>[\d,]+) duplicate \(user, item\) dropped\): "
    r"(?P<users>[\d,]+) users, (?P<items>[\d,]+) items, "
    r"train (?P<train>[\d,]+) / val (?P<val>[\d,]+) "
    r"\(val with unseen user (?P<cold_user>[\d,]+), unseen item (?P<cold_item>[\d,]+)\) "
    r"in \d+\.\d\d s -> (?P<db>.+)"
)


def summary(run: Any) -> dict[str, str]:
    assert run.exit_code == 0, (run.stdout, run.stderr)
    # Off a terminal (as here) stderr holds one line per step and nothing else.
    steps = ("preprocess: reading ", "preprocess: preparing ", "preprocess: writing ")
    assert [line[: len(step)] for line, step in zip(run.log_lines, steps, strict=True)] == list(
        steps
    )
    lines = run.stdout.splitlines()
    assert len(lines) == 1, lines
    match = SUMMARY.fullmatch(lines[0])
    assert match, lines[0]
    return match.groupdict()


def test_summary_line(ml1m_zip: Path, tmp_path: Path, preprocess_cli: Preprocess) -> None:
    db = tmp_path / "mf.duckdb"
    # --split time: one global cutoff gives this 7-rating file a validation row.
    assert summary(preprocess_cli("--source", ml1m_zip, "--db", db, "--split", "time")) == {
        "rows": "7",
        "layout": "ml-1m",
        "dups": "0",
        "users": "3",
        "items": "3",
        "train": "6",
        "val": "1",
        "cold_user": "0",
        "cold_item": "0",
        "db": str(db),
    }


def test_summary_agrees_with_dataset_meta(
    tmp_path: Path, preprocess_cli: Preprocess, query: Query
) -> None:
    db = tmp_path / "mf.duckdb"
    args = ("--dataset", "synthetic", "--users", "300", "--items", "120", "--db", db)
    line = summary(preprocess_cli(*args, "--split", "random", "--val-fraction", "0.3"))
    cols = "rows_in, duplicates_dropped, n_users, n_items, n_train, n_val, n_val_cold_user"
    (row,) = query(db, f"SELECT {cols}, n_val_cold_item FROM dataset_meta")
    as_ints = [int(line[k].replace(",", "")) for k in ("rows", "dups", "users", "items")]
    as_ints += [int(line[k].replace(",", "")) for k in ("train", "val", "cold_user", "cold_item")]
    assert as_ints == list(row)
    assert row[0] > 1000 and "," in line["rows"]  # thousands separators
    (counts,) = query(
        db,
        "SELECT count(*), count(*) FILTER (split = 'val'), count(*) FILTER (cold_user), "
        "count(*) FILTER (cold_item) FROM ratings",
    )
    assert list(counts) == [row[4] + row[5], row[5], row[6], row[7]]
    assert row[5] == round(0.3 * (row[4] + row[5]))


def test_rerun_replaces_the_dataset(
    ml1m_zip: Path,
    ml100k_zip: Path,
    tmp_path: Path,
    preprocess_cli: Preprocess,
    db_snapshot: Snapshot,
    query: Query,
) -> None:
    db, fresh = tmp_path / "mf.duckdb", tmp_path / "fresh.duckdb"
    summary(preprocess_cli("--source", ml1m_zip, "--db", db))
    assert summary(preprocess_cli("--source", ml100k_zip, "--db", db))["layout"] == "ml-100k"
    summary(preprocess_cli("--source", ml100k_zip, "--db", fresh))
    replaced, expected = db_snapshot(db), db_snapshot(fresh)
    for table in ("users", "items", "ratings", "tables"):
        assert replaced[table] == expected[table], table
    (meta,) = query(db, "SELECT count(*), any_value(layout), any_value(source) FROM dataset_meta")
    assert meta == (1, "ml-100k", str(ml100k_zip))
    # No ML-1M id survived the swap.
    assert query(db, "SELECT count(*) FROM items WHERE item_id IN ('661', '914', '1193')") == [(0,)]


def test_rerun_of_the_same_input_is_identical(
    ml1m_zip: Path, tmp_path: Path, preprocess_cli: Preprocess, db_snapshot: Snapshot, query: Query
) -> None:
    db = tmp_path / "mf.duckdb"
    summary(preprocess_cli("--source", ml1m_zip, "--db", db))
    first, (sha1,) = db_snapshot(db), query(db, "SELECT dataset_sha256 FROM dataset_meta")
    summary(preprocess_cli("--source", ml1m_zip, "--db", db))
    second, (sha2,) = db_snapshot(db), query(db, "SELECT dataset_sha256 FROM dataset_meta")
    for table in ("users", "items", "ratings", "tables"):
        assert first[table] == second[table]
    assert sha1 == sha2
    # A different split is a different dataset.
    summary(preprocess_cli("--source", ml1m_zip, "--db", db, "--split", "random"))
    (sha3,) = query(db, "SELECT dataset_sha256 FROM dataset_meta")
    assert sha3 != sha1


def test_config_file_and_flag_overrides(
    ml1m_zip: Path, tmp_path: Path, preprocess_cli: Preprocess, query: Query
) -> None:
    db = tmp_path / "from-config.duckdb"
    config = tmp_path / "mfbatch.toml"
    config.write_text(
        f'db = "{db}"\n'
        f'[data]\ndataset = "ml-1m"\nsource = "{ml1m_zip}"\n'
        '[split]\nkind = "user-time"\nval_fraction = 0.5\nseed = 7\n',
        encoding="utf-8",
    )
    line = summary(preprocess_cli("--config", config))
    assert line["db"] == str(db)
    (row,) = query(db, "SELECT split_kind, val_fraction, split_seed, config FROM dataset_meta")
    assert row[:3] == ("user-time", 0.5, 7)
    recorded = json.loads(row[3])
    assert recorded["split"] == {
        "kind": "user-time",
        "val_fraction": 0.5,
        "seed": 7,
        "split_col": None,
    }
    assert recorded["data"]["source"] == str(ml1m_zip)
    # Users with 3, 2, 2 ratings keep round(0.5 * n) of them, at most n - 1, for validation.
    assert (line["train"], line["val"]) == ("3", "4")

    other = tmp_path / "flags.duckdb"
    line = summary(preprocess_cli("--config", config, "--split", "time", "--db", other))
    assert line["db"] == str(other)
    (row,) = query(other, "SELECT split_kind, val_fraction FROM dataset_meta")
    assert row == ("time", 0.5)  # the flag wins, the file fills in the rest


def test_as_a_real_process(ml1m_zip: Path, tmp_path: Path) -> None:
    """`python -m mfbatch`, with stdout/stderr pipes: what cron or CI sees."""
    db = tmp_path / "mf.duckdb"
    command = [sys.executable, "-m", "mfbatch", "preprocess", "--source", str(ml1m_zip)]
    done = subprocess.run(
        [*command, "--db", str(db)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    # A line per step, as cron keeps it, and the summary as the only stdout line.
    assert [line.split(" ")[1] for line in unstamped(done.stderr)] == [
        "reading",
        "preparing",
        "writing",
    ]
    assert SUMMARY.fullmatch(done.stdout.rstrip("\n"))

    bad = subprocess.run(
        [*command, "--db", str(db), "--val-fraction", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr == "error: --val-fraction: must be strictly between 0 and 1, got 2.0\n"


def test_help_lists_the_options(preprocess_cli: Preprocess) -> None:
    run = preprocess_cli("--help")
    assert run.exit_code == 0
    for option in ("--dataset", "--source", "--db", "--split", "--val-fraction", "--time-col"):
        assert option in run.stdout
