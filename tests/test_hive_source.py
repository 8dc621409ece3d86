"""`preprocess --dataset parquet --source FOLDER`: a (hive-partitioned) folder of parts.

The same ratings as one Parquet file and as a folder of parts must give the same database
tables; a partition key taken from the folder names (`user_id=17/`) works as a column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, cli_ok


def _ratings() -> pa.Table:
    rng = np.random.default_rng(3)
    n = 3_000
    return pa.table(
        {
            "user_id": rng.integers(1, 120, n),
            "item_id": rng.integers(1, 80, n),
            "rating": rng.integers(1, 6, n).astype(np.float64),
            "timestamp": rng.integers(1_000_000_000, 1_100_000_000, n),
            "month": rng.integers(1, 4, n),
        }
    )


def _preprocess(source: Path, db: Path) -> None:
    cli_ok("preprocess", "--dataset", "parquet", "--source", source, "--db", db)


def _tables(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    with duckdb.connect(str(db), read_only=True) as con:
        return {
            "users": con.execute("SELECT * FROM users ORDER BY user_idx").fetchall(),
            "items": con.execute("SELECT * FROM items ORDER BY item_idx").fetchall(),
            "ratings": con.execute(
                "SELECT * EXCLUDE (version) FROM ratings ORDER BY user_idx, item_idx"
            ).fetchall(),
        }


@pytest.mark.parametrize("key", ["month", "user_id"])
def test_a_folder_of_parts_is_the_same_data_as_one_file(tmp_path: Path, key: str) -> None:
    table = _ratings()
    single = tmp_path / "ratings.parquet"
    pq.write_table(table, single)
    folder = tmp_path / "parts"
    # key=value folders; with user_id the column exists only in the folder names.
    pq.write_to_dataset(table, folder, partition_cols=[key])
    assert any(p.name.startswith(f"{key}=") for p in folder.iterdir())
    _preprocess(single, tmp_path / "one.duckdb")
    _preprocess(folder, tmp_path / "many.duckdb")
    one, many = _tables(tmp_path / "one.duckdb"), _tables(tmp_path / "many.duckdb")
    assert len(one["ratings"]) > 0
    assert many == one


def test_a_folder_without_parquet_parts_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = cli(
        "preprocess",
        "--dataset",
        "parquet",
        "--source",
        tmp_path / "empty",
        "--db",
        tmp_path / "x.duckdb",
    )
    assert result.exit_code != 0
    assert "no .parquet files under it" in result.stderr
