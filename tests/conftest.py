"""Shared fixtures and helpers: small files in each real GroupLens layout, the CLI runner
(`cli`, `ok`, `cli_ok`, `Run`), one-line error checks, database reads (`rows`, `tables`) and
snapshots. Test files import the plain helpers with `from conftest import ...` (this is the
only conftest.py under tests/, so the name is unambiguous) and reach the data through the
fixtures.

Every dataset here is written by the fixtures themselves, byte for byte in the layout the
real release uses (separators, encodings, line endings, folder inside the zip), so the
loaders are tested against the format rather than against a mock. The expected tables in
test_loaders.py are worked out by hand from these rows.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
from typer.testing import CliRunner

from mfbatch.cli import app

# --- ML-100K: u.data is tab-separated, u.item Latin-1 `|`-separated with 19 genre flags ----

U_DATA = (
    b"1\t1\t5\t874965758\n"
    b"1\t2\t3\t876893171\n"
    b"2\t1\t4\t888550871\n"
    b"10\t3\t1\t889751712\n"
    b"2\t3\t2\t875072484\n"
    b"10\t1\t4\t875071561\n"
    b"1\t2\t4\t876893200\n"  # re-rating of (1, 2), later: this one is kept
)

U_GENRE = (
    b"unknown|0\nAction|1\nAdventure|2\nAnimation|3\nChildren's|4\nComedy|5\nCrime|6\n"
    b"Documentary|7\nDrama|8\nFantasy|9\nFilm-Noir|10\nHorror|11\nMusical|12\nMystery|13\n"
    b"Romance|14\nSci-Fi|15\nThriller|16\nWar|17\nWestern|18\n\n"
)


def _flags(*on: int) -> bytes:
    return b"|".join(b"1" if i in on else b"0" for i in range(19))


U_ITEM = (
    b"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|"
    + _flags(3, 4, 5)
    + b"\n"
    b"2|GoldenEye (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?GoldenEye%20(1995)|"
    + _flags(1, 2, 16)
    + b"\n"
    b"3|Mis\xe9rables, Les (1995)|01-Jan-1995||http://us.imdb.com/Title?Mis%E9rables|"
    + _flags(8)
    + b"\n"
    b"4|Get Shorty (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Get%20Shorty|"
    + _flags(1, 5, 8)
    + b"\n"
)

ML_100K = {
    "ml-100k/u.data": U_DATA,
    "ml-100k/u.item": U_ITEM,
    "ml-100k/u.genre": U_GENRE,
    "ml-100k/u.user": b"1|24|M|technician|85711\n2|53|F|other|94043\n10|53|M|lawyer|90703\n",
    "ml-100k/u1.base": b"1\t1\t5\t874965758\n",
    "ml-100k/README": b"SUMMARY & USAGE LICENSE\n",
}

# --- ML-1M: `::`-separated, movies.dat in Latin-1 -------------------------------------------

RATINGS_DAT = (
    b"1::1193::5::978300760\n"
    b"1::661::3::978302109\n"
    b"1::914::3::978301968\n"
    b"2::1193::4::978298413\n"
    b"2::914::2::978299000\n"
    b"6040::661::1::978300000\n"
    b"6040::1193::5::978299500\n"
)

MOVIES_DAT = (
    b"661::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi\n"
    b"914::Caf\xe9 au Lait (M\xe9tisse) (1993)::Comedy\n"
    b"1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
    b"2000::Lethal Weapon (1987)::Action|Comedy|Crime|Drama\n"
)

ML_1M = {
    "ml-1m/ratings.dat": RATINGS_DAT,
    "ml-1m/movies.dat": MOVIES_DAT,
    "ml-1m/users.dat": b"1::F::1::10::48067\n2::M::56::16::70072\n6040::M::25::6::11106\n",
    "ml-1m/README": b"SUMMARY\n",
}

# --- ML-latest(-small): CSV with a header, half stars, quoted titles --------------------------

RATINGS_CSV = (
    b"userId,movieId,rating,timestamp\r\n"
    b"1,1,4.0,964982703\r\n"
    b"1,3,4.5,964981247\r\n"
    b"1,11,0.5,964982224\r\n"
    b"5,1,5.0,847434962\r\n"
    b"5,11,3.5,847435238\r\n"
    b"12,3,2.0,1100000000\r\n"
)

MOVIES_CSV = (
    "movieId,title,genres\r\n"
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\r\n"
    '3,"Amélie (Fabuleux destin d\'Amélie Poulain, Le) (2001)",Comedy|Romance\r\n'
    '11,"American President, The (1995)",Comedy|Drama|Romance\r\n'
    "99,Unrated (2000),(no genres listed)\r\n"
).encode()

ML_LATEST = {
    "ml-latest-small/ratings.csv": RATINGS_CSV,
    "ml-latest-small/movies.csv": MOVIES_CSV,
    "ml-latest-small/links.csv": b"movieId,imdbId,tmdbId\r\n1,0114709,862\r\n",
    "ml-latest-small/tags.csv": b"userId,movieId,tag,timestamp\r\n",
    "ml-latest-small/README.txt": b"Summary\r\n",
}


def write_zip(path: Path, members: Mapping[str, bytes]) -> Path:
    """A zip laid out like GroupLens' (a folder entry, then its files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        folders = sorted({name.split("/")[0] + "/" for name in members if "/" in name})
        for folder in folders:
            archive.writestr(folder, b"")
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def write_tree(root: Path, members: Mapping[str, bytes]) -> Path:
    """The same files extracted under `root`; returns the release folder (e.g. root/ml-1m)."""
    for name, data in members.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root / next(iter(members)).split("/")[0]


class Layouts:
    """The files above, for tests (reached through the `layouts` fixture)."""

    ML_100K = ML_100K
    ML_1M = ML_1M
    ML_LATEST = ML_LATEST
    write_zip = staticmethod(write_zip)
    write_tree = staticmethod(write_tree)


@pytest.fixture
def layouts() -> type[Layouts]:
    return Layouts


@pytest.fixture
def ml100k_zip(tmp_path: Path) -> Path:
    return write_zip(tmp_path / "ml-100k.zip", ML_100K)


@pytest.fixture
def ml1m_zip(tmp_path: Path) -> Path:
    return write_zip(tmp_path / "ml-1m.zip", ML_1M)


# --- Running the CLI ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One in-process CLI call: what every test reads of it."""

    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None
    output: str = ""  # stdout and stderr interleaved, as a terminal shows them

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def log_lines(self) -> list[str]:
        """stderr's progress and notes without their time; each line must carry one."""
        return unstamped(self.stderr)


STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")


def unstamped(log: str) -> list[str]:
    """The lines of a log written off a terminal, each checked for and cut of its ISO time."""
    lines = [line for line in log.splitlines() if line.strip()]
    for line in lines:
        assert STAMP.match(line), f"no ISO time at the start of {line!r}"
    return [STAMP.sub("", line, count=1) for line in lines]


def cli(*args: str | Path | float, allow_traceback: bool = False) -> Run:
    """`mfbatch ARGS...` in-process through Typer's CliRunner. No command may print a
    traceback, whether it succeeds or fails (allow_traceback: for Ray, whose workers log
    their own on shutdown)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if not allow_traceback:
        assert "Traceback" not in result.stdout + result.stderr, (result.stdout, result.stderr)
    return Run(result.exit_code, result.stdout, result.stderr, result.exception, result.output)


def ok(run: Run) -> Run:
    """`run`, after checking that it exited 0."""
    assert run.exit_code == 0, (run.stdout, run.stderr, run.exception)
    return run


def cli_ok(*args: str | Path | float, allow_traceback: bool = False) -> str:
    """`mfbatch ARGS...`, which must succeed; its stdout."""
    return ok(cli(*args, allow_traceback=allow_traceback)).stdout


Preprocess = Callable[..., Run]
UserError = Callable[..., str]
Query = Callable[..., list[tuple[Any, ...]]]
Snapshot = Callable[[Path], dict[str, list[tuple[Any, ...]]]]


@pytest.fixture
def preprocess_cli() -> Preprocess:
    """`mfbatch preprocess ARGS...` in-process through Typer's CliRunner."""

    def invoke(*args: str | Path | float) -> Run:
        return cli("preprocess", *args)

    return invoke


STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ )?[a-z-]+: .* \(\d+\.\d s\)$")


def assert_user_error(run: Run, exit_code: int, *fragments: str) -> str:
    """A one-line `error: ...` on stderr naming every fragment, no traceback, given exit."""
    assert run.exit_code == exit_code, (run.exit_code, run.stdout, run.stderr)
    # Typer's Exit surfaces as SystemExit; anything else is a crash, not a user error.
    assert isinstance(run.exception, SystemExit), repr(run.exception)
    assert "Traceback" not in run.stdout + run.stderr
    assert run.stdout == ""
    # Off a terminal, steps already done are logged one line each ("preprocess: reading
    # x.csv (0.0 s)"); the error itself is still exactly one line, and the last.
    lines = [line for line in run.error_lines if not STEP_LINE.match(line)]
    assert len(lines) == 1, run.error_lines
    assert run.error_lines[-1] == lines[0], run.error_lines
    message = lines[0]
    assert message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def assert_error_last(run: Run, exit_code: int, *fragments: str) -> str:
    """Like assert_user_error, for commands that log progress (stdout, stderr) before they
    fail: exactly one `error: ...` line, the last on stderr, naming every fragment."""
    assert run.exit_code == exit_code, (run.exit_code, run.stdout, run.stderr, run.exception)
    assert isinstance(run.exception, SystemExit), repr(run.exception)
    assert "Traceback" not in run.stdout + run.stderr
    lines = run.error_lines
    assert lines and lines[-1].startswith("error: "), lines
    assert sum(line.startswith("error: ") for line in lines) == 1
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


@pytest.fixture
def user_error() -> UserError:
    return assert_user_error


# --- Reading the database ----------------------------------------------------------------------

TABLES = ("users", "items", "ratings", "dataset_meta")


def rows(path: Path, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """The rows of one query, on a read-only connection closed before returning."""
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql, params or None).fetchall()


def tables(path: Path) -> set[str]:
    """The names of the tables (and views) in the database."""
    return {name for (name,) in rows(path, "SELECT table_name FROM information_schema.tables")}


def snapshot(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Which tables exist, and every row of the four dataset tables in a stable order."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        found = {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}
        found["tables"] = sorted(con.execute("SHOW TABLES").fetchall())
        return found
    finally:
        con.close()


@pytest.fixture
def query() -> Query:
    return rows


@pytest.fixture
def db_snapshot() -> Snapshot:
    return snapshot


@pytest.fixture(scope="session")
def _prepared_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prepared") / "good.duckdb"
    cli_ok(
        "preprocess",
        "--dataset",
        "synthetic",
        "--users",
        "40",
        "--items",
        "25",
        "--ratings-per-user",
        "6",
        "--db",
        str(path),
    )
    return path


@pytest.fixture
def good_db(_prepared_db: Path, tmp_path: Path) -> Path:
    """A fresh copy of a prepared database, to run bad input against."""
    path = tmp_path / "mfbatch.duckdb"
    shutil.copyfile(_prepared_db, path)
    return path


# --- test_score_cli*.py: one small dataset trained twice (a validated run, then a refit on
# all data) once per session; each test works on its own copy of that folder (`ws`). ---

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


@pytest.fixture(scope="session")
def score_trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    db = root / "mf.duckdb"
    # --split time: one global cutoff leaves cold users, whose popularity lists tests check.
    _preprocess(db, "--split", "time")
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
        ((path,),) = rows(self.db, sql, r=run_id)
        # Recorded relative to the database's folder (so any working directory works).
        assert not Path(path).is_absolute(), path
        return self.root / path

    def score(self, *args: str | Path) -> Run:
        return cli("score", "--db", self.db, *FAST, *args)

    def recommendations(self) -> list[tuple[Any, ...]]:
        return rows(
            self.db,
            "SELECT run_id, user_id, item_id, rank, score, predicted_rating, created_at, source "
            "FROM recommendations ORDER BY user_id, rank",
        )

    def write_ids(self, name: str, ids: list[str]) -> Path:
        path = self.root / name
        path.write_text("# ids, one per line\n\n" + "\n".join(ids) + "\n", encoding="utf-8")
        return path


@pytest.fixture
def ws(score_trained: Path, tmp_path: Path) -> Workspace:
    root = tmp_path / "w"
    shutil.copytree(score_trained, root)
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
    return dict(rows(db, f"SELECT {column}_idx, {column}_id FROM {table}"))


def _rated(db: Path, splits: tuple[str, ...]) -> dict[str, set[str]]:
    """Raw item ids each raw user id rated in the given splits."""
    rated: dict[str, set[str]] = defaultdict(set)
    for user, item in rows(
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


# --- test_loaders_*.py: reading back the four dataset tables, and their units ---


def utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc).replace(tzinfo=None)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def users(query: Query, db: Path) -> list[tuple[Any, ...]]:
    return query(db, "SELECT user_idx, user_id, n_ratings, n_train FROM users ORDER BY user_idx")


def items(query: Query, db: Path) -> list[tuple[Any, ...]]:
    return query(
        db, "SELECT item_idx, item_id, title, genres, n_ratings, n_train FROM items ORDER BY 1"
    )


def ratings(query: Query, db: Path) -> list[tuple[Any, ...]]:
    return query(
        db,
        "SELECT user_idx, item_idx, rating, rating_norm, ts, split, cold_user, cold_item "
        "FROM ratings ORDER BY user_idx, item_idx",
    )


def meta(query: Query, db: Path) -> dict[str, Any]:
    con_rows = query(db, "SELECT * FROM dataset_meta")
    names = [r[0] for r in query(db, "SELECT column_name FROM (DESCRIBE dataset_meta)")]
    assert len(con_rows) == 1
    return dict(zip(names, con_rows[0], strict=True))


def assert_norm(rows: list[tuple[Any, ...]], lo: float, hi: float) -> None:
    for row in rows:
        assert row[3] == pytest.approx((row[2] - lo) / (hi - lo), abs=1e-12)
        assert 0.0 <= row[3] <= 1.0


# --- test_bad_input_*.py: bad input against a copy of a prepared database ---

INPUT_ERROR, CONFIG_ERROR, DATABASE_ERROR = 3, 2, 4


@pytest.fixture
def against(
    good_db: Path, preprocess_cli: Preprocess, db_snapshot: Snapshot
) -> Iterator[Callable[..., Any]]:
    """Run preprocess on `good_db` with the given args; after the test, check it is unchanged."""
    before = db_snapshot(good_db)
    assert before["ratings"], "the prepared database should hold a dataset"

    def run(*args: str | Path | float) -> Any:
        return preprocess_cli(*args, "--db", good_db)

    yield run
    assert db_snapshot(good_db) == before
    assert not good_db.with_name(good_db.name + ".wal").exists()


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# --- test_inference_*.py ---


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for the graphs the tests write (module scoped, so hypothesis may use it)."""
    yield tmp_path_factory.mktemp("graphs")


# --- known answers for Recall@K --------------------------------------------------------


def recall_from_lists(path: Path, run_id: str, recommender: str, k: int) -> float:
    """Recall@K worked out in Python from the lists `evaluate` stored (evaluation_lists)
    and the val ratings, by the definition sql/evaluate.sql implements: hits in the top K /
    min(|relevant|, K), averaged over the users with a relevant item (every val rating is
    relevant; a user without a list counts with 0)."""
    relevant: dict[str, set[str]] = {}
    for user, item in rows(
        path,
        "SELECT u.user_id, i.item_id FROM ratings r JOIN users u USING (user_idx) "
        "JOIN items i USING (item_idx) WHERE r.split = 'val'",
    ):
        relevant.setdefault(user, set()).add(item)
    listed: dict[str, set[str]] = {}
    for user, item in rows(
        path,
        "SELECT user_id, item_id FROM evaluation_lists "
        "WHERE run_id = $run AND recommender = $rec AND k = $k AND rank <= $k",
        run=run_id,
        rec=recommender,
        k=k,
    ):
        listed.setdefault(user, set()).add(item)
    assert relevant, "no val ratings to measure against"
    per_user = [len(listed.get(u, set()) & rel) / min(len(rel), k) for u, rel in relevant.items()]
    return sum(per_user) / len(per_user)
