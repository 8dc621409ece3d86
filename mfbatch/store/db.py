"""DuckDB access: connections, transactions and the named queries in `sql/`.

Queries live in `sql/*.sql` as named blocks (`-- name: <query_name>`), with DuckDB's
`$name` bind parameters. They are parsed once, when first used: a duplicate name, an
empty block or a syntax error fails loudly at load, not halfway through a run.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

if TYPE_CHECKING:  # at run time DuckDB imports what .pl()/.fetchnumpy() need, when called
    import numpy as np
    import polars as pl
    import pyarrow as pa

from mfbatch.errors import DatabaseError, first_line

_NAME_RE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_NAME_LIKE_RE = re.compile(r"^--\s*name\s*:.*$", re.MULTILINE | re.IGNORECASE)
_PARAM_RE = re.compile(r"(?<![\w$])\$([a-z_][a-z0-9_]*)")
_LOCK_PID_RE = re.compile(r"\(PID (\d+)\)")


@dataclass(frozen=True)
class Query:
    name: str
    sql: str
    params: frozenset[str]
    origin: str


def _sql_dir() -> Path:
    # Installed wheel: sql/ is packed into the package. Editable install / source tree:
    # it sits at the repository root beside the package.
    packaged = resources.files("mfbatch") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "sql"


def parse_queries(text: str, origin: str) -> dict[str, Query]:
    """Split one .sql file into named queries and check each parses as one statement."""
    matches = list(_NAME_RE.finditer(text))
    if not matches:
        raise DatabaseError(f"{origin}: no '-- name: ...' blocks found")
    # A name line the pattern refuses would otherwise read as a comment, its SQL silently
    # joining the previous block or vanishing.
    for like in _NAME_LIKE_RE.finditer(text):
        if not _NAME_RE.fullmatch(like.group(0)):
            line = text.count("\n", 0, like.start()) + 1
            raise DatabaseError(
                f"{origin} line {line}: {like.group(0).strip()!r} is not a valid query name; "
                "use lower_snake_case"
            )
    before = _code(text[: matches[0].start()])
    if before:
        line = text.count("\n", 0, text.index(before.splitlines()[0])) + 1
        raise DatabaseError(f"{origin} line {line}: SQL before the first '-- name: ...' line")
    queries: dict[str, Query] = {}
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        name = match.group(1)
        code = _code(text[match.end() : following.start() if following else len(text)])
        if not code:
            raise DatabaseError(f"{origin}: query {name!r} is empty")
        if name in queries:
            raise DatabaseError(f"{origin}: query {name!r} is defined twice")
        try:
            statements = duckdb.extract_statements(code)
        except duckdb.Error as exc:
            raise DatabaseError(
                f"{origin}: query {name!r} does not parse: {first_line(exc)}"
            ) from None
        if len(statements) != 1:
            raise DatabaseError(
                f"{origin}: query {name!r} holds {len(statements)} statements; one per name"
            )
        queries[name] = Query(name, code, frozenset(_PARAM_RE.findall(code)), origin)
    return queries


def _code(block: str) -> str:
    """The block without its comment lines."""
    lines = block.strip().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("--")).strip()


@functools.cache
def queries() -> Mapping[str, Query]:
    """All named queries from every file in sql/, checked once per process."""
    directory = _sql_dir()
    files = sorted(directory.glob("*.sql"))
    if not files:
        raise DatabaseError(f"{directory}: no .sql files; the mfbatch install is incomplete")
    found: dict[str, Query] = {}
    for path in files:
        for name, query in parse_queries(path.read_text(encoding="utf-8"), path.name).items():
            if name in found:
                raise DatabaseError(
                    f"query {name!r} is defined in both {found[name].origin} and {path.name}"
                )
            found[name] = query
    return found


def _checked(name: str, params: Mapping[str, Any]) -> Query:
    query = queries()[name]
    if set(params) != query.params:
        raise TypeError(
            f"query {name!r} takes parameters {sorted(query.params)}, got {sorted(params)}"
        )
    return query


def run(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> duckdb.DuckDBPyConnection:
    """Execute the named query with exactly the bind parameters it declares."""
    return con.execute(_checked(name, params).sql, params or None)


def one(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> tuple[Any, ...] | None:
    """The first row of the named query (fetching all, so no result is left open)."""
    rows = run(con, name, **params).fetchall()
    return rows[0] if rows else None


def frame(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> pl.DataFrame:
    """The named query's result as a Polars frame, handed over through Arrow."""
    return con.sql(_checked(name, params).sql, params=params or None).pl()


def arrays(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> dict[str, np.ndarray]:
    """The named query's columns as numpy arrays (strings as object arrays).

    What `score` reads with: no Polars (~0.1 s to import) and no pandas on that path.
    """
    # Through a relation: a cursor's fetchnumpy() measured 4x slower on 9M rows.
    return con.sql(_checked(name, params).sql, params=params or None).fetchnumpy()


def arrow(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> pa.Table:
    """The named query's result as an Arrow table."""
    return con.sql(_checked(name, params).sql, params=params or None).to_arrow_table()


def records(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> list[dict[str, Any]]:
    """The named query's rows as dicts keyed by column name: callers never unpack by position."""
    cursor = run(con, name, **params)
    columns = [d[0] for d in cursor.description or ()]
    return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def record(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> dict[str, Any] | None:
    rows = records(con, name, **params)
    return rows[0] if rows else None


def connect(path: Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the database, turning lock and missing-file failures into one-line errors."""
    if read_only and not path.exists():
        raise DatabaseError(
            f"database {path} does not exist; run `mfbatch preprocess --db {path}` first"
        )
    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as exc:
        message = str(exc)
        if "lock" in message.lower() and "permission" not in message.lower():
            pid = _LOCK_PID_RE.search(message)
            holder = f" (PID {pid.group(1)})" if pid else ""
            raise DatabaseError(
                f"database {path} is locked by another process{holder}; "
                "close that process or pass a different --db"
            ) from None
        raise DatabaseError(f"database {path} could not be opened: {first_line(exc)}") from None
    except duckdb.Error as exc:
        raise DatabaseError(f"database {path} could not be opened: {first_line(exc)}") from None


def check_writable(path: Path) -> None:
    """Fail now, before minutes of work, if the results could not be written at the end.

    Opening for writing takes DuckDB's file lock, so this catches another process holding
    the database as well as a file or folder that can't be written; the lock is released
    again at once.
    """
    if not path.exists():
        raise DatabaseError(
            f"database {path} does not exist; run `mfbatch preprocess --db {path}` first"
        )
    connect(path).close()


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection, what: str) -> Iterator[None]:
    """All-or-nothing: on any failure the database keeps what it had before."""
    con.begin()
    try:
        yield
        con.commit()
    except BaseException as exc:
        # DuckDB may have aborted the transaction itself (a full disk at commit): a second
        # rollback then raises, and must not hide the error that caused it.
        with suppress(duckdb.Error):
            con.rollback()
        if isinstance(exc, duckdb.Error):
            raise DatabaseError(
                f"writing {what} failed and was rolled back, nothing changed: {first_line(exc)}"
            ) from None
        raise


def table_exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    row = one(con, "table_exists", table=table)
    return bool(row and row[0])


def require_tables(con: duckdb.DuckDBPyConnection, path: Path, *tables: str) -> None:
    missing = [t for t in tables if not table_exists(con, t)]
    if missing:
        raise DatabaseError(
            f"database {path} has no {', '.join(missing)} table; "
            f"run `mfbatch preprocess --db {path}` first"
        )
