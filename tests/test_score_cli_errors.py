"""`mfbatch score` and `mfbatch export` on bad input: one line, non-zero exit, nothing
changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import (
    FAST,
    N_ITEMS,
    Workspace,
    _ids,
    _preprocess,
    assert_user_error,
    cli,
    rows,
    unstamped,
)
from conftest import tables as _tables

import mfbatch.stages.score
import mfbatch.store.db
import mfbatch.store.workdirs
from mfbatch.serving.session import _gpu_present

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
    assert_user_error(ws.score("--users", ws.root / "absent.txt"), 3, "--users", "does not exist")
    empty = ws.root / "empty.txt"
    empty.write_text("# nothing\n\n")
    assert_user_error(ws.score("--users", empty), 3, "--users", "no ids")
    assert ws.recommendations() == before
    # A deny list naming an item that is gone is a warning: the nightly run goes on.
    known_items = sorted(_ids(ws.db, "items").values())[:1]
    deny = ws.write_ids("deny.txt", [*known_items, "no-such-item"])
    warned = ws.score("--top-k", "3", "--exclude-items", deny)
    assert warned.exit_code == 0, warned.stderr
    (warning,) = [line for line in unstamped(warned.stderr) if line.startswith("warning:")]
    assert "--exclude-items" in warning and "'no-such-item'" in warning and "1 excluded" in warning
    served = {i for (i,) in rows(ws.db, "SELECT DISTINCT item_id FROM recommendations")}
    assert known_items[0] not in served


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

    monkeypatch.setattr(mfbatch.store.workdirs.tempfile, "mkdtemp", read_only)
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
