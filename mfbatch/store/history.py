"""Served lists over time, and in the formats a warehouse reads.

Every publish (a full `score` or a `--users` update) is kept whole, numbered, for the
last `--keep-history` publishes: one `publishes` row and its lists in integers
(`publish_lists`). The views `recommendation_history` (raw ids, every kept publish) and
`recommendations` (the newest) are what readers read (schema: docs/schema.md). `diff`
says what changed between two nights; `export_lists` writes the lists as Parquet (a file,
or a folder partitioned by run) or CSV.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from mfbatch.errors import ConfigError, DatabaseError, ModelError
from mfbatch.store import db, outputs
from mfbatch.store.datasets import Dataset

if TYPE_CHECKING:  # imported where used: `score` never needs Polars
    import polars as pl

# Column types of every list export, documented in the README ("Outputs").
LIST_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("rank", pa.int32()),
        ("score", pa.float64()),
        ("predicted_rating", pa.float64()),  # null unless a rating model's own prediction
        ("source", pa.string()),  # model | popularity (| fold-in)
        ("created_at", pa.timestamp("us")),
    ]
)


@dataclass(frozen=True)
class Scale:
    """What predicted_rating is derived from: a rating model's objective and the dataset's
    star range (the view computes it from the stored score, as the scorer once stored it)."""

    objective: str
    rating_min: float
    rating_max: float


def _refuse_0_1_0(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    layout = (db.record(con, "history_layout") or {}).get("layout")
    if layout == "table":
        raise DatabaseError(
            f"{path} holds `recommendations` as a table from mfbatch 0.1.0, which this version "
            f"can't carry over; drop it (duckdb {path} 'DROP TABLE recommendations') and run "
            "`mfbatch score` again"
        )


def open_for_publish(path: Path) -> duckdb.DuckDBPyConnection:
    """A write connection to a database whose served lists can be published to; refuses,
    before any scoring, one that is missing, locked by another process, read-only, or
    served by 0.1.0.

    The score reads its inputs through this one connection (DuckDB's write lock, held
    while they are read and released before scoring): opening the file a second time
    measured ~0.1 s of a score's start-up.
    """
    if not path.exists():
        db.check_writable(path)  # the one-line "run preprocess first"
    con = db.connect(path)
    try:
        _refuse_0_1_0(con, path)
    except BaseException:
        con.close()
        raise
    return con


def _migrate(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Bring the served lists to the lean layout, once, inside the publishing transaction.

    The one-table history (raw ids on every row) is rewritten into `publishes` and
    `publish_lists` and dropped; the views take its name. A 0.1.0 `recommendations` table
    (no history) is refused: nothing recorded which run or scale made it.
    """
    _refuse_0_1_0(con, path)
    layout = (db.record(con, "history_layout") or {}).get("layout")
    db.run(con, "create_publishes")
    db.run(con, "create_publish_lists")
    db.run(con, "create_list_users")
    db.run(con, "create_list_items")
    if layout == "rows":
        db.run(con, "drop_served_view")
        db.run(con, "migrate_rename_rows")
        db.run(con, "migrate_publishes")
        db.run(con, "migrate_list_users")
        db.run(con, "migrate_list_items")
        db.run(con, "migrate_publish_lists")
        db.run(con, "migrate_drop_rows")


def _write_publish(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    *,
    lean: bool,
    run_id: str,
    created: datetime,
    scale: Scale,
    partial: bool,
    keep: int,
) -> int:
    """The registered `spooled_recommendations` as the next publish; returns its id.

    Runs inside the publishing transaction. The lists are written once, in integers, and
    `recommendations` is a view of the newest publish: the served table and its history
    can't disagree, and a night's lists aren't copied a second time. `partial`
    (`--users`): everyone else keeps the previous list.
    """
    _migrate(con, path)
    mapping = int((db.record(con, "current_mapping") or {"mapping": 1})["mapping"])
    db.run(con, "extend_list_users", mapping=mapping)
    db.run(con, "extend_list_items", mapping=mapping)
    row = db.record(con, "next_publish_id")
    publish_id = int(row["publish_id"]) if row else 1
    publish_id = max(publish_id, 1)
    db.run(con, "insert_publish" if lean else "insert_publish_raw", publish_id=publish_id)
    if partial and publish_id > 1:
        db.run(
            con, "carry_over_users", publish_id=publish_id, previous=publish_id - 1, mapping=mapping
        )
    db.run(
        con,
        "insert_publish_row",
        publish_id=publish_id,
        run_id=run_id,
        created_at=created,
        mapping=mapping,
        partial=partial,
        objective=scale.objective,
        rating_min=scale.rating_min,
        rating_max=scale.rating_max,
    )
    db.run(con, "create_history_view")
    db.run(con, "serve_newest_publish")
    db.run(con, "prune_history", publish_id=publish_id, keep=keep)
    db.run(con, "mark_pruned")
    if int((db.record(con, "mappings_in_use") or {"n": 0})["n"]) > 1:
        db.run(con, "prune_list_users")
        db.run(con, "prune_list_items")
    return publish_id


def publish_lists(
    path: Path,
    lists: object,
    run_id: str,
    created: datetime,
    *,
    scale: Scale,
    partial: bool,
    keep: int,
) -> int:
    """`lists` into the history as the next publish, in one transaction; returns its id.

    `lists` is an Arrow table or a pyarrow dataset that DuckDB scans: in integers
    (user_idx, item_idx, rank, score, source code: the in-process spool) or with raw ids
    (user_id, item_id, ..., source names: the Ray engine's Parquet parts).
    """
    lean = "user_idx" in lists.schema.names  # type: ignore[attr-defined]
    con = db.connect(path)
    try:
        con.register("spooled_recommendations", lists)
        # Row order carries no meaning here (rank is a column), so DuckDB may write in
        # parallel.
        db.run(con, "unordered_inserts")
        # The copy from the spool is inside the transaction: a failure while writing it
        # (disk full, a truncated part) is rolled back like the rest and reported in one line.
        with db.transaction(con, f"recommendations into {path}"):
            return _write_publish(
                con,
                path,
                lean=lean,
                run_id=run_id,
                created=created,
                scale=scale,
                partial=partial,
                keep=keep,
            )
    finally:
        con.close()


@dataclass(frozen=True)
class Diff:
    before: int
    after: int
    users_compared: int
    users_changed: int
    users_added: int
    users_removed: int
    mean_overlap: float | None
    items_entered: list[str]
    items_left: list[str]

    def line(self) -> str:
        overlap = f"{self.mean_overlap:.1%}" if self.mean_overlap is not None else "-"
        return (
            f"publish {self.before} -> {self.after}: {self.users_changed:,} of "
            f"{self.users_compared:,} users' top-K changed (mean overlap {overlap}), "
            f"{self.users_added:,} users added, {self.users_removed:,} removed; "
            f"{len(self.items_entered):,} items entered the lists, {len(self.items_left):,} left"
        )


def _publish_ids(con: duckdb.DuckDBPyConnection, path: Path) -> list[int]:
    layout = (db.record(con, "history_layout") or {}).get("layout")
    if layout not in ("lean", "rows"):
        raise DatabaseError(f"{path} has no history of served lists; run `mfbatch score` first")
    # A database the previous layout served is read as it is until the next publish
    # migrates it (readers open it read-only).
    query = "publishes" if layout == "lean" else "publishes_rows"
    return [int(r["publish_id"]) for r in db.records(con, query)]


def diff(*, db_path: Path, before: int | None = None, after: int | None = None) -> Diff:
    """What changed between two publishes (default: the last two)."""
    con = db.connect(db_path, read_only=True)
    try:
        ids = _publish_ids(con, db_path)
        after = ids[0] if after is None and ids else after
        before = ids[1] if before is None and len(ids) > 1 else before
        if after is None or before is None:
            raise DatabaseError(
                f"{db_path} holds {len(ids)} publish(es); a diff needs two (run `mfbatch score`"
                " again tomorrow, or pass --before/--after)"
            )
        for flag, value in (("--before", before), ("--after", after)):
            if value not in ids:
                raise ConfigError(
                    f"{flag}: no publish {value} kept in {db_path}; kept: "
                    f"{', '.join(map(str, sorted(ids)))}"
                )
        users = db.record(con, "diff_users", before=before, after=after) or {}
        items = db.records(con, "diff_items", before=before, after=after)
    finally:
        con.close()
    return Diff(
        before=before,
        after=after,
        users_compared=int(users.get("users_compared") or 0),
        users_changed=int(users.get("users_changed") or 0),
        users_added=int(users.get("users_added") or 0),
        users_removed=int(users.get("users_removed") or 0),
        mean_overlap=users.get("mean_overlap"),
        items_entered=[r["item_id"] for r in items if r["change"] == "entered"],
        items_left=[r["item_id"] for r in items if r["change"] == "left"],
    )


def read_lists(*, db_path: Path, publish: int | None = None) -> pl.DataFrame:
    """The served lists (or a kept publish) as a Polars frame with raw ids."""
    con = db.connect(db_path, read_only=True)
    try:
        if publish is None:
            if not db.table_exists(con, "recommendations"):
                raise DatabaseError(f"{db_path} has no recommendations; run `mfbatch score` first")
            frame = db.frame(con, "served_lists")
        else:
            if publish not in _publish_ids(con, db_path):
                raise ConfigError(f"--publish: no publish {publish} kept in {db_path}")
            frame = db.frame(con, "published_lists", publish_id=publish)
    finally:
        con.close()
    import polars as pl

    return pl.from_arrow(frame.to_arrow().cast(LIST_SCHEMA))  # type: ignore[return-value]


def list_target(
    out: Path, *, db_path: Path, flag: str = "--output", export_dir: Path | None = None
) -> outputs.Target:
    """`out` checked as a list export (refused before any work: `mfbatch.store.outputs`)."""
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".csv", ""):
        raise ConfigError(
            f"{flag}: {out} must end in .parquet or .csv, or name a folder for a Parquet "
            "dataset partitioned by run_id"
        )
    kind: outputs.Kind = {".parquet": "lists-parquet", ".csv": "lists-csv"}.get(  # type: ignore[assignment]
        suffix, "lists-folder"
    )
    return outputs.check(out, flag=flag, kind=kind, db_path=db_path, export_dir=export_dir)


def _require_current(db_path: Path, run_ids: list[str]) -> None:
    """The served lists must come from runs of the data the database holds now, as
    `recommend` requires: after a re-preprocess the same raw ids may name other users."""
    con = db.connect(db_path, read_only=True)
    try:
        dataset = Dataset.load(con, db_path)
        for run_id in run_ids:
            origin = db.record(con, "run_dataset", run_id=run_id)
            if origin is None or origin["dataset_sha256"] != dataset.sha256:
                raise ModelError(
                    f"the lists in {db_path} were made by run {run_id}, trained on other data "
                    "than the database holds now; run `mfbatch score` again (or pass "
                    "--publish N to export a kept publish as it was)"
                )
    finally:
        con.close()


def export_lists(
    *,
    db_path: Path,
    out: Path | outputs.Target,
    publish: int | None = None,
    export_dir: Path | None = None,
) -> tuple[Path, int]:
    """Write the lists to `out`: .parquet or .csv file, else a folder of Parquet by run_id.

    Written beside the target and renamed into place: a reader never sees half a file.
    """
    target = (
        out
        if isinstance(out, outputs.Target)
        else list_target(out, db_path=db_path, export_dir=export_dir)
    )
    frame = read_lists(db_path=db_path, publish=publish)
    if publish is None:
        _require_current(db_path, frame["run_id"].unique().to_list())
    with outputs.staged(target) as staging:
        if target.kind == "lists-parquet":
            frame.write_parquet(staging)
        elif target.kind == "lists-csv":
            frame.write_csv(staging)
        else:
            # Imported here: pyarrow.dataset pulls in pandas (~0.2 s), which every
            # `mfbatch score` would otherwise pay at start-up for a rarely used format.
            import pyarrow.dataset as ds

            ds.write_dataset(
                frame.to_arrow(),
                staging,
                format="parquet",
                partitioning=["run_id"],
                partitioning_flavor="hive",
                existing_data_behavior="overwrite_or_ignore",
            )
    return target.path, frame.height
