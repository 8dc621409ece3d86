"""`mfbatch score --engine ray`: real Ray in local mode, real actors, real Parquet parts.

Skipped where Ray is not installed (it is the optional extra `mfbatch[ray]`; CI installs
it). The cluster is started once per module with two CPUs, as on CI's machine.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import conftest
import duckdb
import pyarrow.dataset as pads
import pytest

from mfbatch.serving.ray_engine import shards
from mfbatch.store.history import Scale, publish_lists

ray = pytest.importorskip("ray")
# Ray's actors log tracebacks of their own when the cluster winds down.
cli = functools.partial(conftest.cli, allow_traceback=True)
cli_ok = functools.partial(conftest.cli_ok, allow_traceback=True)
LIST_COLUMNS = "user_id, item_id, rank, score, predicted_rating, source"


def _lists(db: Path) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(
            f"SELECT {LIST_COLUMNS} FROM recommendations ORDER BY user_id, rank"
        ).fetchall()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database with a rating-objective run (so predicted_rating is filled), users with
    no train rating (popularity lists) and an exclude list."""
    folder = tmp_path_factory.mktemp("ray")
    db = folder / "mf.duckdb"
    cli_ok(
        "preprocess",
        "--dataset",
        "synthetic",
        "--users",
        "300",
        "--items",
        "120",
        "--ratings-per-user",
        "15",
        "--split",
        "time",  # one global cutoff: users with no train rating, served from popularity
        "--db",
        db,
        "--quiet",
    )
    cli_ok(
        "train",
        "--db",
        db,
        "--export-dir",
        folder / "export",
        "--objective",
        "rating",
        "--embedding-dim",
        "8",
        "--epochs",
        "3",
        "--quiet",
    )
    (folder / "deny.txt").write_text("\n".join(str(i) for i in range(1, 120, 7)) + "\n")
    return db


def _score(db: Path, *extra: str | Path) -> list[tuple[Any, ...]]:
    deny = db.parent / "deny.txt"
    cli_ok("score", "--db", db, "--exclude-items", deny, "--batch-size", "16", *extra)
    return _lists(db)


@pytest.mark.slow
def test_ray_lists_are_the_default_engines(local_ray: None, served: Path) -> None:
    default = _score(served)
    # Small batches and several shards per actor: the split and the merge both matter.
    on_ray = _score(served, "--engine", "ray", "--workers", "2")
    assert len(on_ray) == len(default) > 0
    assert on_ray == default
    # The case really has what it claims to: popularity lists, denied items left out.
    sources = {row[5] for row in default}
    assert sources == {"model", "popularity"}
    denied = {str(i) for i in range(1, 120, 7)}
    assert not denied & {row[1] for row in on_ray}
    with duckdb.connect(str(served), read_only=True) as con:
        seen = set(
            con.execute(
                "SELECT u.user_id, i.item_id FROM ratings r JOIN users u USING (user_idx) "
                "JOIN items i USING (item_idx)"
            ).fetchall()
        )
    assert not seen & {(row[0], row[1]) for row in on_ray}


@pytest.mark.slow
def test_no_publish_leaves_the_parquet_parts_as_the_output(
    local_ray: None, served: Path, tmp_path: Path
) -> None:
    published = _score(served)
    parts = tmp_path / "parts"
    _score(served, "--engine", "ray", "--parts-dir", parts, "--no-publish")
    # The database is untouched; the parts hold the same lists as the default engine.
    assert _lists(served) == published
    files = sorted(p.name for p in parts.iterdir())
    assert len(files) == len(shards(300, 2)) and all(f.endswith(".parquet") for f in files)
    with duckdb.connect() as con:
        from_parts = con.execute(
            f"SELECT {LIST_COLUMNS} FROM read_parquet('{parts}/*.parquet') ORDER BY user_id, rank"
        ).fetchall()
    assert from_parts == published


@pytest.mark.slow
def test_publish_from_parts_is_all_or_nothing(
    local_ray: None, served: Path, tmp_path: Path
) -> None:
    before = _score(served)
    parts = tmp_path / "parts"
    _score(served, "--engine", "ray", "--parts-dir", parts, "--no-publish")
    with duckdb.connect(str(served), read_only=True) as con:
        history = con.execute("SELECT count(*) FROM recommendation_history").fetchone()
    # Injected failure: a truncated part, last in the dataset, so the staging insert has
    # read the good parts before the scan fails mid-transaction.
    good = sorted(parts.glob("part-*.parquet"))
    broken = parts / "part-99999.parquet"
    broken.write_bytes(good[0].read_bytes()[:-200])
    dataset = pads.dataset([str(p) for p in [*good, broken]], format="parquet")
    with pytest.raises(Exception) as failure:
        publish_lists(
            served,
            dataset,
            "run-x",
            datetime(2026, 1, 1),
            scale=Scale("rating", 1.0, 5.0),
            partial=False,
            keep=7,
        )
    assert "Traceback" not in str(failure.value)
    assert _lists(served) == before
    with duckdb.connect(str(served), read_only=True) as con:
        tables = {t for (t,) in con.execute("SHOW TABLES").fetchall()}
        after = con.execute("SELECT count(*) FROM recommendation_history").fetchone()
    assert "recommendations_staging" not in tables
    assert after == history


def test_ray_only_flags_need_the_ray_engine(tmp_path: Path) -> None:
    result = cli("score", "--db", tmp_path / "x.duckdb", "--workers", "2")
    assert result.exit_code == 2
    assert "--workers: only with --engine ray" in result.stderr


def test_shards_cover_every_user_once() -> None:
    for users, workers in [(1, 4), (7, 2), (300, 2), (1_000_003, 3)]:
        ranges = shards(users, workers)
        assert ranges[0][0] == 0 and ranges[-1][1] == users
        assert all(a < b for a, b in ranges)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))


@pytest.mark.slow
def test_ray_users_update_merges_like_the_default_engine(
    local_ray: None, served: Path, tmp_path: Path
) -> None:
    # --users: only those users' rows are replaced, on either engine, from the same start.
    wanted = tmp_path / "users.txt"
    wanted.write_text("3\n17\n250\n")
    cli_ok("score", "--db", served, "--top-k", "5")
    default = _score(served, "--users", wanted)
    cli_ok("score", "--db", served, "--top-k", "5")
    on_ray = _score(served, "--users", wanted, "--engine", "ray")
    assert on_ray == default
    ks = {}
    for row in default:
        ks[row[0]] = max(ks.get(row[0], 0), row[2])
    # The three users got full 20-item lists; everyone else kept the 5-item ones.
    assert {u for u, k in ks.items() if k == 20} == {"3", "17", "250"}
    assert len(ks) > 3 and all(k == 5 for u, k in ks.items() if u not in {"3", "17", "250"})
