"""`mfbatch score`: staging and swap, so a run that fails half way leaves the previous
lists as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import duckdb
import pytest
from conftest import Workspace, unstamped
from conftest import tables as _tables

import mfbatch.serving.engines
import mfbatch.store.db
import mfbatch.store.workdirs

# --- Staging and swap: a failed run leaves the previous table as it was --------------------


def _fail_on_second_batch(
    monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> Callable[[], int]:
    real = mfbatch.serving.engines.to_lean_arrow
    calls = 0

    def faulty(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(mfbatch.serving.engines, "to_lean_arrow", faulty)
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
    *logged, last = [s for s in result.stderr.splitlines() if s.strip()]
    lines = [*unstamped("\n".join(logged)), last]  # progress carries its time, the error not
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
    real = mfbatch.store.db.run

    def faulty(con: Any, name: str, **params: Any) -> Any:
        if name == "serve_newest_publish":  # after the lists were written
            raise duckdb.IOException("IO Error: could not write file: No space left on device")
        return real(con, name, **params)

    monkeypatch.setattr(mfbatch.store.db, "run", faulty)
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
    real = mfbatch.store.db.run

    def faulty(con: Any, name: str, **params: Any) -> Any:
        if name == "insert_publish":  # e.g. the disk fills while copying
            raise duckdb.IOException("IO Error: could not write file: No space left on device")
        return real(con, name, **params)

    monkeypatch.setattr(mfbatch.store.db, "run", faulty)
    result = ws.score("--top-k", "3")
    monkeypatch.undo()
    assert result.exit_code == 4, (result.stderr, result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    last = [s for s in result.stderr.splitlines() if s.strip()][-1]
    assert last.startswith("error: writing recommendations into") and "rolled back" in last
    assert ws.recommendations() == before
    assert _tables(ws.db) == tables
    assert not list(ws.root.glob(".mfbatch-score-*"))
