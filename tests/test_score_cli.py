"""`mfbatch score` and `mfbatch export` end to end through the CLI, on real DuckDB files.

One small dataset is preprocessed and trained twice per module (a validated run, then a
refit on all data); each test works on its own copy of that folder.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import onnx
import pytest
import torch
from conftest import Run, assert_user_error, cli
from conftest import rows as _rows
from conftest import tables as _tables

import mfbatch.db
import mfbatch.stages.score
import mfbatch.workdirs
from mfbatch.export import load_model, read_metadata
from mfbatch.inference import _gpu_present

N_USERS, N_ITEMS = 60, 40
SMALL = ["--embedding-dim", "8", "--batch-size", "256", "--negatives", "32"]
FAST = ["--provider", "cpu", "--threads", "1"]


def _preprocess(db: Path, *extra: str) -> None:
    result = cli(
        "preprocess",
        "--dataset",
        "synthetic",
        "--users",
        str(N_USERS),
        "--items",
        str(N_ITEMS),
        "--ratings-per-user",
        "12",
        "--db",
        db,
        *extra,
    )
    assert result.exit_code == 0, result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    db = root / "mf.duckdb"
    _preprocess(db)
    for extra in (["--objective", "rating", "--epochs", "2"], ["--on", "all"]):
        result = cli(
            "train", "--db", db, "--export-dir", root / "export", *SMALL, "--seed", "3", *extra
        )
        assert result.exit_code == 0, result.stderr
    return root


@dataclass(frozen=True)
class Workspace:
    db: Path
    validated: str  # run trained on the train split
    refit: str  # the refit on train+val: the latest run
    root: Path

    def export_path(self, run_id: str) -> Path:
        sql = "SELECT export_path FROM training_runs WHERE run_id = $r"
        ((path,),) = _rows(self.db, sql, r=run_id)
        # Recorded relative to the database's folder (so any working directory works).
        assert not Path(path).is_absolute(), path
        return self.root / path

    def score(self, *args: str | Path) -> Run:
        return cli("score", "--db", self.db, *FAST, *args)

    def recommendations(self) -> list[tuple[Any, ...]]:
        return _rows(
            self.db,
            "SELECT run_id, user_id, item_id, rank, score, predicted_rating, created_at, source "
            "FROM recommendations ORDER BY user_id, rank",
        )

    def write_ids(self, name: str, ids: list[str]) -> Path:
        path = self.root / name
        path.write_text("# ids, one per line\n\n" + "\n".join(ids) + "\n", encoding="utf-8")
        return path


@pytest.fixture
def ws(trained: Path, tmp_path: Path) -> Workspace:
    root = tmp_path / "w"
    shutil.copytree(trained, root)
    db = root / "mf.duckdb"
    con = duckdb.connect(str(db))
    try:
        (validated,), (refit,) = con.execute(
            "SELECT run_id FROM training_runs ORDER BY data_seen = 'train+val'"
        ).fetchall()
    finally:
        con.close()
    return Workspace(db, validated, refit, root)


def _ids(db: Path, table: str) -> dict[int, str]:
    column = "user" if table == "users" else "item"
    return dict(_rows(db, f"SELECT {column}_idx, {column}_id FROM {table}"))


def _rated(db: Path, splits: tuple[str, ...]) -> dict[str, set[str]]:
    """Raw item ids each raw user id rated in the given splits."""
    rated: dict[str, set[str]] = defaultdict(set)
    for user, item in _rows(
        db,
        "SELECT u.user_id, i.item_id FROM ratings r JOIN users u USING (user_idx) "
        "JOIN items i USING (item_idx) WHERE list_contains($splits, r.split)",
        splits=list(splits),
    ):
        rated[user].add(item)
    return rated


def _by_user(rows: list[tuple[Any, ...]]) -> dict[str, list[tuple[Any, ...]]]:
    grouped: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in rows:
        grouped[row[1]].append(row)
    return grouped


def _check_lists(
    ws: Workspace,
    *,
    run_id: str,
    k: int,
    excluded: dict[str, set[str]],
    allowed: set[str] | None = None,
    users: set[str] | None = None,
) -> dict[str, list[tuple[Any, ...]]]:
    """Every expected user has min(k, candidates) rows: ranked 1.., best first, valid ids."""
    user_ids = set(_ids(ws.db, "users").values())
    item_ids = set(_ids(ws.db, "items").values())
    allowed = item_ids if allowed is None else allowed
    grouped = _by_user(ws.recommendations())
    assert set(grouped) == (user_ids if users is None else users)
    for user, rows in grouped.items():
        assert user in user_ids
        candidates = allowed - excluded.get(user, set())
        items = [r[2] for r in rows]
        assert len(rows) == min(k, len(candidates)), user
        assert set(items) <= candidates, (user, set(items) - candidates)
        assert len(set(items)) == len(items)
        assert [r[3] for r in rows] == list(range(1, len(rows) + 1))
        scores = [r[4] for r in rows]
        assert all(np.isfinite(scores)) and scores == sorted(scores, reverse=True)
        assert {r[0] for r in rows} == {run_id}
    return grouped


# --- What a successful run writes --------------------------------------------------------------


def test_score_writes_the_top_k_unrated_items_of_every_user(ws: Workspace) -> None:
    k = 30  # more than some users have left, fewer than others
    result = ws.score("--top-k", str(k), "--batch-size", "7")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(
        f"scored {N_USERS} users with run {ws.refit} (refit on train+val) on cpu"
    )
    assert "popularity" not in result.stdout  # a refit trained every user
    assert "(recommendations replaced, publish 1)" in result.stdout
    assert "Traceback" not in result.stderr

    rated = _rated(ws.db, ("train", "val"))
    grouped = _check_lists(ws, run_id=ws.refit, k=k, excluded=rated)
    counts = {len(rows) for rows in grouped.values()}
    assert k in counts and min(counts) < k  # both cases really occur
    total = sum(len(rows) for rows in grouped.values())
    assert f"{total:,} recommendations" in result.stdout
    assert "recommendations_staging" not in _tables(ws.db)
    assert not list(ws.root.glob(".mfbatch-score-*"))

    # The scores are the saved torch model's predictions, and nothing better was left out.
    model, manifest = load_model(ws.export_path(ws.refit))
    users = {v: k for k, v in _ids(ws.db, "users").items()}
    items = {v: k for k, v in _ids(ws.db, "items").items()}
    with torch.no_grad():
        truth = (
            model(
                torch.arange(N_USERS).repeat_interleave(N_ITEMS),
                torch.arange(N_ITEMS).repeat(N_USERS),
            )
            .reshape(N_USERS, N_ITEMS)
            .double()
            .numpy()
        )
    lo, hi = manifest["rating_min"], manifest["rating_max"]
    for user, rows in grouped.items():
        u = users[user]
        assert {r[7] for r in rows} == {"model"}
        for _, _, item, _, score, predicted, _, _ in rows:
            assert score == pytest.approx(truth[u, items[item]], abs=1e-5)
            assert predicted == pytest.approx(min(max(score, 0.0), 1.0) * (hi - lo) + lo)
            assert lo <= predicted <= hi
        unrated = set(items) - rated[user] - {r[2] for r in rows}
        if unrated:
            assert max(truth[u, items[i]] for i in unrated) <= rows[-1][4] + 1e-5
    assert len({r[6] for r in ws.recommendations()}) == 1  # one created_at per run


def test_rescoring_replaces_the_table(ws: Workspace) -> None:
    assert ws.score("--top-k", "5").exit_code == 0
    result = ws.score("--top-k", "3", "--run-id", ws.validated)
    assert result.exit_code == 0, result.stderr
    rows = ws.recommendations()
    assert {r[0] for r in rows} == {ws.validated}
    assert max(r[3] for r in rows) == 3
    assert _tables(ws.db) >= {"recommendations"} and "recommendations_staging" not in _tables(ws.db)


def test_users_file_updates_only_those_users(ws: Workspace) -> None:
    assert ws.score("--top-k", "5").exit_code == 0
    before = _by_user(ws.recommendations())
    chosen = sorted(_ids(ws.db, "users").values())[5:8]
    result = ws.score(
        "--top-k", "4", "--run-id", ws.validated, "--users", ws.write_ids("users.txt", chosen)
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("scored 3 users")
    assert "updated for these users" in result.stdout
    after = _by_user(ws.recommendations())
    # Everyone else's list is exactly as it was; the chosen users have new ones.
    assert set(after) == set(before)
    for user, rows in after.items():
        if user in chosen:
            assert len(rows) == 4 and {r[0] for r in rows} == {ws.validated}
        else:
            assert rows == before[user]
    rated = _rated(ws.db, ("train", "val"))
    assert not any(r[2] in rated[r[1]] for r in ws.recommendations())


def test_a_table_an_older_version_served_from_becomes_the_view(ws: Workspace) -> None:
    """Databases scored before `recommendations` was a view hold it as a table (no source
    column, no history): a `--users` update keeps everyone else's rows from that table."""
    assert ws.score("--top-k", "5").exit_code == 0
    before = _by_user(ws.recommendations())
    con = duckdb.connect(str(ws.db))
    con.execute(
        "CREATE TABLE old AS SELECT run_id, user_id, item_id, rank, score, predicted_rating, "
        "created_at FROM recommendations"
    )
    con.execute("DROP VIEW recommendations")
    con.execute("DROP TABLE recommendation_history")
    con.execute("ALTER TABLE old RENAME TO recommendations")
    con.close()
    chosen = sorted(_ids(ws.db, "users").values())[:2]
    result = ws.score("--top-k", "3", "--users", ws.write_ids("users.txt", chosen))
    assert result.exit_code == 0, result.stderr
    kinds = _rows(
        ws.db,
        "SELECT table_type FROM information_schema.tables WHERE table_name = 'recommendations'",
    )
    assert kinds == [("VIEW",)]
    after = _by_user(ws.recommendations())
    assert set(after) == set(before)
    for user, rows in after.items():
        if user in chosen:
            assert len(rows) == 3
        else:  # the old table had no source column: its lists were the model's
            assert rows == before[user]
    history = _rows(ws.db, "SELECT DISTINCT publish_id FROM recommendation_history")
    assert history == [(1,)]


def test_include_and_exclude_items(ws: Workspace) -> None:
    item_ids = sorted(_ids(ws.db, "items").values())
    rated = _rated(ws.db, ("train", "val"))

    excluded = item_ids[::3]
    result = ws.score("--top-k", "35", "--exclude-items", ws.write_ids("deny.txt", excluded))
    assert result.exit_code == 0, result.stderr
    _check_lists(ws, run_id=ws.refit, k=35, excluded=rated, allowed=set(item_ids) - set(excluded))

    included = item_ids[:9]
    result = ws.score("--top-k", "5", "--include-items", ws.write_ids("allow.txt", included))
    assert result.exit_code == 0, result.stderr
    grouped = _check_lists(ws, run_id=ws.refit, k=5, excluded=rated, allowed=set(included))
    assert any(len(rows) < 5 for rows in grouped.values())  # the allow list ran short

    allow = ws.write_ids("allow.txt", included)
    deny = ws.write_ids("deny.txt", included[:2])
    result = ws.score("--top-k", "5", "--include-items", allow, "--exclude-items", deny)
    assert result.exit_code == 0, result.stderr
    _check_lists(ws, run_id=ws.refit, k=5, excluded=rated, allowed=set(included[2:]))


def test_every_served_run_excludes_every_rated_item(ws: Workspace) -> None:
    """Whatever run is served, no list holds an item the user rated in any split; users the
    run never trained get the popularity list, items it never trained are not offered."""
    k = N_ITEMS
    rated = _rated(ws.db, ("train", "val"))
    assert ws.score("--top-k", str(k)).exit_code == 0
    _check_lists(ws, run_id=ws.refit, k=k, excluded=rated)

    result = ws.score("--top-k", str(k), "--run-id", ws.validated)
    assert result.exit_code == 0, result.stderr
    assert "(validated on train)" in result.stdout
    train_users = {u for (u,) in _rows(ws.db, "SELECT user_id FROM users WHERE n_train > 0")}
    untrained_items = {i for (i,) in _rows(ws.db, "SELECT item_id FROM items WHERE n_train = 0")}
    cold = set(_ids(ws.db, "users").values()) - train_users
    assert cold, "the default time split leaves some users without train ratings"
    assert f"{len(cold)} of them from popularity" in result.stdout
    excluded = {u: rated[u] | untrained_items for u in _ids(ws.db, "users").values()}
    grouped = _check_lists(ws, run_id=ws.validated, k=k, excluded=excluded)
    popularity = dict(_rows(ws.db, "SELECT item_id, n_ratings FROM items WHERE n_train > 0"))
    for user, rows in grouped.items():
        assert {r[7] for r in rows} == {"popularity" if user in cold else "model"}, user
        if user in cold:
            # Most rated first (over every split), and the score says how often.
            assert [r[4] for r in rows] == [float(popularity[r[2]]) for r in rows]
            assert all(r[5] is None for r in rows)


def test_export_rewrites_model_onnx(ws: Workspace) -> None:
    path = ws.export_path(ws.validated) / "model.onnx"
    original = path.read_bytes()
    path.write_bytes(b"overwritten by something else")
    result = cli("export", "--db", ws.db, "--run-id", ws.validated)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"exported {path}"
    onnx.checker.check_model(str(path), full_check=True)
    assert read_metadata(path)["run_id"] == ws.validated
    assert onnx.load_model(str(path)).graph == onnx.load_model_from_string(original).graph
    assert not list(path.parent.glob("*.part"))

    path.unlink()  # a lost file comes back too, and scores again
    assert cli("export", "--db", ws.db, "--run-id", ws.validated).exit_code == 0
    assert path.is_file()
    assert ws.score("--top-k", "3", "--run-id", ws.validated).exit_code == 0

    latest = ws.export_path(ws.refit) / "model.onnx"
    latest.unlink()
    result = cli("export", "--db", ws.db)
    assert result.exit_code == 0 and result.stdout.strip() == f"exported {latest}"
    assert read_metadata(latest)["run_id"] == ws.refit


# --- Staging and swap: a failed run leaves the previous table as it was --------------------


def _fail_on_second_batch(
    monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> Callable[[], int]:
    real = mfbatch.stages.score.to_arrow
    calls = 0

    def faulty(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(mfbatch.stages.score, "to_arrow", faulty)
    return lambda: calls


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (OSError(28, "No space left on device"), 4, "error: writing recommendations beside"),
        (KeyboardInterrupt(), 130, "interrupted: nothing was changed"),
    ],
)
def test_a_run_failing_half_way_changes_nothing(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, error: BaseException, code: int, line: str
) -> None:
    assert ws.score("--top-k", "5").exit_code == 0
    before = ws.recommendations()
    tables = _tables(ws.db)

    calls = _fail_on_second_batch(monkeypatch, error)
    result = ws.score("--top-k", "3", "--run-id", ws.validated, "--batch-size", "10")
    assert calls() == 2  # it did fail half-way, after a batch had been spooled
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    lines = [s for s in result.stderr.splitlines() if s.strip()]
    assert lines[0].startswith(f"serving run {ws.validated} (validated on train"), lines
    # Progress lines of the batch that got through, then the one error line.
    assert all(s.startswith("score: ") for s in lines[1:-1]), lines
    assert lines[-1].startswith(line), lines
    assert result.stdout == ""

    assert ws.recommendations() == before
    assert _tables(ws.db) == tables
    assert not list(ws.root.glob(".mfbatch-score-*"))


def test_a_failure_while_publishing_is_rolled_back(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ws.score("--top-k", "5").exit_code == 0
    before = ws.recommendations()
    tables = _tables(ws.db)
    real = mfbatch.db.run

    def faulty(con: Any, name: str, **params: Any) -> Any:
        if name == "serve_newest_publish":  # after the lists were written
            raise duckdb.IOException("IO Error: could not write file: No space left on device")
        return real(con, name, **params)

    monkeypatch.setattr(mfbatch.db, "run", faulty)
    result = ws.score("--top-k", "3", "--run-id", ws.validated)
    monkeypatch.undo()
    assert result.exit_code == 4, (result.stderr, result.exception)
    last = [s for s in result.stderr.splitlines() if s.strip()][-1]
    assert last.startswith("error: writing recommendations into") and "rolled back" in last
    assert ws.recommendations() == before
    assert not list(ws.root.glob(".mfbatch-score-*"))
    assert _tables(ws.db) == tables  # no recommendations_staging left behind
    assert ws.score("--top-k", "2").exit_code == 0
    assert max(r[3] for r in ws.recommendations()) == 2


def test_a_failure_while_staging_is_a_one_line_error(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ws.score("--top-k", "5").exit_code == 0
    before = ws.recommendations()
    tables = _tables(ws.db)
    real = mfbatch.db.run

    def faulty(con: Any, name: str, **params: Any) -> Any:
        if name == "insert_publish":  # e.g. the disk fills while copying
            raise duckdb.IOException("IO Error: could not write file: No space left on device")
        return real(con, name, **params)

    monkeypatch.setattr(mfbatch.db, "run", faulty)
    result = ws.score("--top-k", "3")
    monkeypatch.undo()
    assert result.exit_code == 4, (result.stderr, result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    last = [s for s in result.stderr.splitlines() if s.strip()][-1]
    assert last.startswith("error: writing recommendations into") and "rolled back" in last
    assert ws.recommendations() == before
    assert _tables(ws.db) == tables
    assert not list(ws.root.glob(".mfbatch-score-*"))


def test_a_stale_staging_table_is_dropped_by_the_next_run(ws: Workspace) -> None:
    con = duckdb.connect(str(ws.db))
    con.execute("CREATE TABLE recommendations_staging AS SELECT 1 AS junk")
    con.close()
    result = ws.score("--top-k", "4")
    assert result.exit_code == 0, result.stderr
    assert "recommendations_staging" not in _tables(ws.db)
    _check_lists(ws, run_id=ws.refit, k=4, excluded=_rated(ws.db, ("train", "val")))


# --- Bad input: one line, non-zero exit, nothing changed ------------------------------------


@pytest.fixture
def scored(ws: Workspace) -> tuple[Workspace, list[tuple[Any, ...]]]:
    """A workspace whose recommendations table is already filled, and its rows."""
    assert ws.score("--top-k", "5").exit_code == 0
    return ws, ws.recommendations()


@pytest.mark.parametrize(
    "change",
    [["--split", "random", "--seed", "7"], ["--data-seed", "99"]],
    ids=["other-split", "other-data"],
)
def test_model_of_another_dataset(
    scored: tuple[Workspace, list[tuple[Any, ...]]], change: list[str]
) -> None:
    ws, before = scored
    _preprocess(ws.db, *change)
    message = assert_user_error(
        ws.score("--top-k", "5"), 5, "was trained on dataset", "train again"
    )
    assert str(ws.db) in message
    assert ws.recommendations() == before


def test_top_k_larger_than_the_catalogue(scored: tuple[Workspace, list[tuple[Any, ...]]]) -> None:
    ws, before = scored
    assert_user_error(ws.score("--top-k", str(N_ITEMS + 1)), 2, "--top-k", f"{N_ITEMS}")
    assert_user_error(ws.score("--top-k", "0"), 2, "--top-k")
    assert ws.recommendations() == before


def test_unknown_ids_in_files(scored: tuple[Workspace, list[tuple[Any, ...]]]) -> None:
    ws, before = scored
    known = sorted(_ids(ws.db, "users").values())[:2]
    users = ws.write_ids("users.txt", [*known, "no-such-user", "ghost"])
    assert_user_error(ws.score("--users", users), 3, "--users", "2 id(s)", "'no-such-user'")
    items = ws.write_ids("items.txt", ["no-such-item"])
    assert_user_error(ws.score("--include-items", items), 3, "--include-items", "'no-such-item'")
    assert_user_error(ws.score("--exclude-items", items), 3, "--exclude-items", "'no-such-item'")
    assert_user_error(ws.score("--users", ws.root / "absent.txt"), 3, "--users", "does not exist")
    empty = ws.root / "empty.txt"
    empty.write_text("# nothing\n\n")
    assert_user_error(ws.score("--users", empty), 3, "--users", "no ids")
    assert ws.recommendations() == before


def test_missing_or_corrupt_model_file(scored: tuple[Workspace, list[tuple[Any, ...]]]) -> None:
    ws, before = scored
    path = ws.export_path(ws.refit) / "model.onnx"
    path.unlink()
    assert_user_error(ws.score(), 5, str(path), "does not exist", "mfbatch export")
    path.write_bytes(b"\x08\x07 truncated")
    assert_user_error(ws.score(), 5, str(path))
    assert ws.recommendations() == before


def test_unknown_run_id(scored: tuple[Workspace, list[tuple[Any, ...]]]) -> None:
    ws, before = scored
    assert_user_error(ws.score("--run-id", "19990101-000000-000000"), 2, "--run-id", "19990101")
    assert_user_error(
        cli("export", "--db", ws.db, "--run-id", "19990101-000000-000000"), 2, "--run-id"
    )
    assert ws.recommendations() == before


def test_no_training_runs(tmp_path: Path) -> None:
    db = tmp_path / "fresh.duckdb"
    _preprocess(db)
    before = _tables(db)
    assert_user_error(cli("score", "--db", db, *FAST), 4, "no training runs", "mfbatch train")
    assert_user_error(cli("export", "--db", db), 4, "no training runs", "mfbatch train")
    assert _tables(db) == before
    assert not list(tmp_path.glob(".mfbatch-score-*"))


def test_missing_database(tmp_path: Path) -> None:
    assert_user_error(cli("score", "--db", tmp_path / "nope.duckdb"), 4, "does not exist")
    assert not (tmp_path / "nope.duckdb").exists()


@pytest.mark.skipif(_gpu_present(), reason="checks the message on a machine without a GPU")
def test_cuda_provider_on_a_cpu_only_machine(
    scored: tuple[Workspace, list[tuple[Any, ...]]],
) -> None:
    ws, before = scored
    result = cli("score", "--db", ws.db, "--provider", "cuda")
    assert_user_error(result, 2, "--provider cuda", "--provider cpu")
    assert_user_error(cli("score", "--db", ws.db, "--provider", "tpu"), 2, "--provider")
    assert ws.recommendations() == before


def test_no_room_for_the_spool(
    scored: tuple[Workspace, list[tuple[Any, ...]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, before = scored

    def read_only(*args: Any, **kwargs: Any) -> str:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(mfbatch.workdirs.tempfile, "mkdtemp", read_only)
    result = ws.score("--top-k", "3")
    monkeypatch.undo()
    assert result.exit_code == 4, (result.stderr, result.exception)
    last = [s for s in result.stderr.splitlines() if s.strip()][-1]
    assert last.startswith("error: ") and "Read-only file system" in last, result.stderr
    assert ws.recommendations() == before


def test_runs_table_without_a_usable_run(
    scored: tuple[Workspace, list[tuple[Any, ...]]],
) -> None:
    ws, before = scored
    con = duckdb.connect(str(ws.db))
    con.execute("UPDATE training_runs SET status = 'diverged'")
    con.close()
    assert_user_error(ws.score(), 4, "no usable training run", "mfbatch train")
    assert ws.recommendations() == before


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_export_without_readable_weights(ws: Workspace, damage: str) -> None:
    weights = ws.export_path(ws.validated) / "model.pt"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(b"PK\x03\x04 not a torch archive")
    onnx_file = weights.parent / "model.onnx"
    original = onnx_file.read_bytes()
    result = cli("export", "--db", ws.db, "--run-id", ws.validated)
    assert_user_error(result, 5, str(weights.parent))
    assert onnx_file.read_bytes() == original
