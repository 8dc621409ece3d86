"""An output never replaces what it did not write (issue 20, H1-H5 and M8).

Every refused case asserts the exit code, the one error line, and that every file that
existed before (the database, the trained runs, the user's own files) is byte for byte
as it was. The safe cases: a new path is created, an earlier output of the same kind is
replaced.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import polars as pl
import pytest
from conftest import assert_user_error, cli, ok, rows

from mfbatch.store import outputs
from mfbatch.store.history import LIST_SCHEMA

SMALL = ["--embedding-dim", "8", "--epochs", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def _pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    path = root / "db.duckdb"
    synthetic = ["--users", "30", "--items", "20", "--ratings-per-user", "8"]
    ok(cli("preprocess", "--dataset", "synthetic", *synthetic, "--db", path))
    ok(cli("train", "--db", path, "--export-dir", root / "export", *SMALL))
    ok(cli("evaluate", "--db", path, "--top-k", "5"))
    ok(cli("score", "--db", path, "--top-k", "5", "--provider", "cpu", "--threads", "1"))
    (root / "notes.txt").write_text("the user's own file\n")
    return path


@pytest.fixture
def db(_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(_pipeline.parent, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")  # `export` (the default --export-dir) is here
    return tmp_path / "w" / "db.duckdb"


def hashes(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones too), by relative path, with its sha256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def refused(root: Path, args: list[str | Path], *fragments: str, code: int = 2) -> str:
    """`mfbatch ARGS` is refused in one line and nothing under `root` changed."""
    before = hashes(root)
    message = assert_user_error(cli(*args), code, *fragments)
    assert hashes(root) == before
    return message


def test_h1_an_existing_folder_of_other_files_is_not_replaced(db: Path) -> None:
    mydir = db.parent / "mydir"
    mydir.mkdir()
    (mydir / "important.txt").write_text("x\n")
    message = refused(db.parent, ["export-lists", "--db", db, "--output", mydir], "--output")
    assert "existing folder mfbatch did not write" in message


def test_h2_the_folder_holding_the_database_is_refused(db: Path) -> None:
    refused(
        db.parent,
        ["export-lists", "--db", db, "--output", db.parent],
        "--output",
        "working directory",
    )
    # From elsewhere too: the folder holds the database.
    other = db.parent.parent / "elsewhere"
    other.mkdir()
    args = ["export-lists", "--db", db, "--output", db.parent]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(other)
        refused(db.parent, args, "holds the database")


def test_h3_score_into_the_export_folder_or_the_databases_folder_is_refused(db: Path) -> None:
    score = ["score", "--db", db, "--provider", "cpu", "--threads", "1"]
    publishes = rows(db, "SELECT count(DISTINCT publish_id) FROM recommendation_history")
    refused(db.parent, [*score, "--output", "export"], "--output", "export folder")
    refused(db.parent, [*score, "--output", db.parent / "export"], "export folder")
    run_folder = next((db.parent / "export").iterdir())
    refused(db.parent, [*score, "--output", run_folder], "export folder (trained runs)")
    refused(db.parent, [*score, "--parts-dir", "export", "--engine", "ray"], "--parts-dir")
    # Refused before the publish: no new publish happened.
    assert rows(db, "SELECT count(DISTINCT publish_id) FROM recommendation_history") == publishes


def test_h4_a_parent_of_the_working_directory_is_refused(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = db.parent / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    for out in ("..", "../..", str(db.parent.parent)):
        refused(db.parent, ["export-lists", "--db", db, "--output", out], "--output")


@pytest.mark.parametrize("out", [".", "..", ""])
def test_dot_dotdot_and_empty_are_refused_everywhere(db: Path, out: str) -> None:
    refused(db.parent, ["export-lists", "--db", db, "--output", out], "--output")
    refused(db.parent, ["report", "--db", db, "--out", out], "--out")
    score = ["score", "--db", db, "--provider", "cpu", "--threads", "1", "--output", out]
    refused(db.parent, score, "--output")


def test_h5_report_over_the_database_is_refused(db: Path) -> None:
    refused(db.parent, ["report", "--db", db, "--out", db], "--out", "is the database")
    wal = db.with_name(db.name + ".wal")
    refused(db.parent, ["report", "--db", db, "--out", wal], "is the database")
    refused(db.parent, ["report", "--db", db, "--out", "notes.txt"], "did not write")


def test_m8_export_over_the_database_is_refused(db: Path) -> None:
    lists = db.parent / "lists.parquet"
    shutil.copyfile(db, lists)  # a DuckDB file that happens to be named .parquet
    refused(db.parent, ["export-lists", "--db", lists, "--output", lists], "is the database")
    other = db.parent / "data.parquet"
    pl.DataFrame({"a": [1, 2]}).write_parquet(other)  # Parquet, not the list schema
    refused(db.parent, ["export-lists", "--db", db, "--output", other], "did not write")
    csv = db.parent / "people.csv"
    csv.write_text("name,age\nx,1\n")
    refused(db.parent, ["export-lists", "--db", db, "--output", csv], "did not write")


def test_a_new_path_is_created_and_an_earlier_output_replaced(db: Path) -> None:
    for name in ("out/lists.parquet", "out/lists.csv", "out/folder"):
        out = db.parent / name
        ok(cli("export-lists", "--db", db, "--output", out))
        first = hashes(out.parent)
        ok(cli("export-lists", "--db", db, "--output", out))  # replaced: ours
        assert set(hashes(out.parent)) == set(first)
    folder = pl.read_parquet(db.parent / "out/folder", hive_partitioning=True)
    assert folder.height == pl.read_parquet(db.parent / "out/lists.parquet").height
    assert not list((db.parent / "out").glob(".*partial")) + list((db.parent / "out").glob(".*old"))
    report = db.parent / "r.html"
    ok(cli("report", "--db", db, "--out", report))
    assert '<meta name="generator" content="mfbatch' in report.read_text()
    ok(cli("report", "--db", db, "--out", report))
    # score --output replaces an earlier export too, after publishing.
    ok(cli("score", "--db", db, "--provider", "cpu", "--threads", "1", "--output", name))


def test_an_empty_folder_is_filled_and_a_lists_folder_with_a_stray_file_refused(
    db: Path,
) -> None:
    empty = db.parent / "empty"
    empty.mkdir()
    ok(cli("export-lists", "--db", db, "--output", empty))
    assert list(empty.glob("run_id=*/*.parquet"))
    (empty / "README.txt").write_text("a user's note\n")
    refused(db.parent, ["export-lists", "--db", db, "--output", empty], "did not write")


def test_a_kind_never_replaces_another_kind(db: Path) -> None:
    report = db.parent / "r.html"
    ok(cli("report", "--db", db, "--out", report))
    lists = db.parent / "l.csv"
    ok(cli("export-lists", "--db", db, "--output", lists))
    refused(db.parent, ["report", "--db", db, "--out", lists], "did not write")
    folder = db.parent / "folder"
    ok(cli("export-lists", "--db", db, "--output", folder))
    refused(db.parent, ["report", "--db", db, "--out", folder], "existing folder")


@pytest.mark.parametrize(("name", "kind"), [("lists.csv", "lists-csv"), ("dir", "lists-folder")])
def test_a_failed_write_leaves_no_partial_and_the_earlier_output(
    db: Path, name: str, kind: outputs.Kind
) -> None:
    out = db.parent / "o" / name
    ok(cli("export-lists", "--db", db, "--output", out))
    before = hashes(db.parent)
    target = outputs.check(out, flag="--output", kind=kind, db_path=db)
    with pytest.raises(Exception, match="disk full"), outputs.staged(target) as staging:
        if target.folder:
            (staging / "part-0.parquet").write_bytes(b"half a part")
        else:
            staging.write_bytes(b"half a file")
        raise OSError(28, "disk full")
    assert hashes(db.parent) == before  # the earlier output, and nothing beside it


def test_a_parent_that_is_a_file_is_one_line(db: Path) -> None:
    refused(
        db.parent,
        ["export-lists", "--db", db, "--output", db.parent / "notes.txt" / "l.csv"],
        "--output",
        "notes.txt",
        code=4,
    )


def test_list_columns_match_the_schema() -> None:
    assert tuple(LIST_SCHEMA.names) == outputs.LIST_COLUMNS
