"""The command line as cron and a shell see it: logs off a terminal (one unwrapped line per
event, each with an ISO time), the same -q/--json everywhere, honest --help, completion,
and `recommend` for several users. Real processes writing to real files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import STAMP, cli, ok, rows, unstamped

from mfbatch.cli import app

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _mfbatch(log: Path, out: Path, *args: str | Path) -> None:
    """`python -m mfbatch ARGS` with stdout and stderr each a file, as under cron."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("COLUMNS", None)  # rich would take it as the width
    with out.open("a") as stdout, log.open("a") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "mfbatch", *map(str, args)],
            stdout=stdout,
            stderr=stderr,
            env=env,
            timeout=300,
            check=False,
        )
    assert done.returncode == 0, log.read_text() + out.read_text()


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    root = tmp_path_factory.mktemp("logs")
    path, log, out = root / "l.duckdb", root / "err.log", root / "out.log"
    _mfbatch(log, out, "preprocess", "--dataset", "synthetic", "--users", "40", "--items",
             "25", "--ratings-per-user", "8", "--db", path)  # fmt: skip
    _mfbatch(log, out, "train", "--db", path, "--export-dir", root / "export", "--epochs", "2",
             "--embedding-dim", "8", "--eval-every", "1", "--threads", "1")  # fmt: skip
    _mfbatch(log, out, "runs", "--db", path)
    return log.read_text(), out.read_text(), path


def test_every_log_line_off_a_terminal_starts_with_an_iso_time(
    logged: tuple[str, str, Path],
) -> None:
    log, _, _ = logged
    lines = unstamped(log)  # fails on any line without its time
    assert lines[0].startswith("preprocess: reading synthetic")
    assert any(line.startswith("training on cpu") for line in lines)
    assert sum(line.startswith("epoch ") for line in lines) == 2, lines


def test_nothing_is_wrapped_at_80_columns_off_a_terminal(logged: tuple[str, str, Path]) -> None:
    log, out, path = logged
    # The train announcement with its recency note is longer than 80 characters: one line.
    (announce,) = [line for line in unstamped(log) if line.startswith("training on cpu")]
    assert "recency half-life" in announce and len(announce) > 80, announce
    # The runs table: every header word whole, one line per run.
    header = next(line for line in out.splitlines() if "objective" in line)
    for word in ("run", "objective", "data", "status", "epochs", "Recall", "NDCG", "served"):
        assert re.search(rf"\b{word}\b", header), header
    (run_id,) = rows(path, "SELECT run_id FROM training_runs")[0]
    (row,) = [line for line in out.splitlines() if run_id in line and "trained" not in line]
    assert "softmax" in row and "train" in row, row
    # The summaries on stdout carry no time: they are the commands' results.
    assert not any(STAMP.match(line) for line in out.splitlines())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_quiet_and_json(command: str) -> None:
    text = ok(cli(command, "--help")).stdout
    assert "--quiet" in text and "-q" in text and "--json" in text, text


def test_help_shows_defaults_and_no_bool_placeholder() -> None:
    text = ok(cli("train", "--help")).stdout
    assert "<bool>" not in text
    flat = re.sub(r"[│\s]+", " ", text)  # the help table's cells, joined again
    defaults = (
        "2,160 steps of --batch-size",
        "default 0.005 softmax",
        "softmax/sampled 0.05, raised",
    )
    for default in defaults:
        assert default in flat, default  # --epochs, --lr, --l2
    assert "[default: off]" in flat  # --batch-norm


def test_shell_completion_is_offered() -> None:
    text = ok(cli("--help")).stdout
    assert "--install-completion" in text and "--show-completion" in text
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "mfbatch", "--show-completion", "bash"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "complete" in done.stdout and "_MFBATCH_COMPLETE" in done.stdout, done.stdout


def test_the_prompt_exit_keeps_the_exit_code_and_every_line(tmp_path: Path) -> None:
    """`main` ends the process without the interpreter's teardown: the command's exit code
    and its last lines (stdout and stderr, both pipes) still come out."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = tmp_path / "missing.duckdb"
    bad = subprocess.run(
        [sys.executable, "-m", "mfbatch", "score", "--db", str(missing)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert bad.returncode == 4, bad.stderr
    assert bad.stderr.startswith(f"error: database {missing} does not exist"), bad.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "mfbatch", "score", "--no-such-flag"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert usage.returncode == 2 and "--no-such-flag" in usage.stderr
    version = subprocess.run(
        [sys.executable, "-m", "mfbatch", "--version"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert version.returncode == 0 and version.stdout.startswith("mfbatch "), version
