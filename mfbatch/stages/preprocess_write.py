"""What `mfbatch preprocess` writes: the dataset's tables and its identity, in one
transaction that replaces whatever the database held."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl

from mfbatch.config import Config
from mfbatch.data.base import PreparedData, PrepStats, RawData
from mfbatch.data.itemmeta import storable, with_metadata
from mfbatch.store import db
from mfbatch.version import __version__


@dataclass(frozen=True)
class Origin:
    """Where a dataset came from, as dataset_meta records it."""

    source: str
    source_sha256: str
    loader: str
    layout: str


def write_dataset(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    raw: RawData,
    prepared: PreparedData,
    config: Config,
    fingerprint: str,
    seconds: float,
    metadata: pl.DataFrame | None = None,
) -> None:
    """Replace the dataset tables in one transaction."""
    write_tables(
        con,
        path,
        Origin(raw.source, raw.source_sha256, raw.loader, raw.layout),
        prepared.users,
        prepared.items,
        [prepared.ratings],
        prepared.ratings.height,
        prepared.stats,
        config,
        fingerprint,
        seconds,
        metadata=metadata,
    )


def write_tables(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    origin: Origin,
    users: pl.DataFrame,
    items: pl.DataFrame,
    ratings: Iterable[pl.DataFrame],
    n_ratings: int,
    stats: PrepStats,
    config: Config,
    fingerprint: str,
    seconds: float,
    spool: Path | None = None,
    metadata: pl.DataFrame | None = None,
) -> None:
    """The dataset tables in one transaction; `ratings` arrive in (user, item) order, in
    one frame or several, each inserted as it comes (through a Parquet file in `spool`
    when given). `metadata` (--items-source) adds its attributes to items and is kept
    whole in item_metadata; without it, metadata a database held before is dropped."""
    con.register("staged_users", users.to_arrow())
    con.register("staged_items", items.to_arrow())
    try:
        with db.transaction(con, f"the dataset into {path}"):
            for table in (
                "ratings",
                "users",
                "items",
                "item_metadata",
                "dataset_meta",
                "dataset_versions",
            ):
                db.run(con, f"drop_{table}")
            for table in ("users", "items", "ratings", "dataset_meta", "dataset_versions"):
                db.run(con, f"create_{table}")
            db.run(con, "insert_users")
            db.run(con, "insert_items")
            if metadata is not None:
                describe_items(con, with_metadata(items, metadata), metadata)
            _insert_ratings(con, ratings, spool)
            _insert_meta(
                con,
                origin,
                users.height,
                items.height,
                n_ratings,
                stats,
                config,
                fingerprint,
                seconds,
            )
    finally:
        con.unregister("staged_users")
        con.unregister("staged_items")


def describe_items(
    con: duckdb.DuckDBPyConnection, described: pl.DataFrame, metadata: pl.DataFrame
) -> None:
    """Replace items by `described` (its own columns, then the metadata's attributes) and
    item_metadata by `metadata`, inside the caller's transaction."""
    con.register("staged_described_items", storable(described).to_arrow())
    con.register("staged_item_metadata", storable(metadata).to_arrow())
    try:
        for step in (
            "drop_items",
            "create_described_items",
            # NOT NULL first: DuckDB alters no table that an index depends on.
            "require_item_ids",
            "require_item_ratings",
            "require_item_train",
            "key_items",
            "unique_item_ids",
            "drop_item_metadata",
            "create_item_metadata",
            "key_item_metadata",
        ):
            db.run(con, step)
    finally:
        con.unregister("staged_described_items")
        con.unregister("staged_item_metadata")


def _insert_ratings(
    con: duckdb.DuckDBPyConnection, ratings: Iterable[pl.DataFrame], spool: Path | None
) -> None:
    """Each frame into `ratings` as it comes: through a Parquet file in `spool` when
    given, else registered with DuckDB as Arrow."""
    for part in ratings:
        if spool is not None:
            file = spool / "ratings-part.parquet"
            part.write_parquet(file, compression="lz4")
            del part
            db.run(con, "insert_ratings_from_parquet", path=str(file))
            file.unlink()
            continue
        con.register("staged_ratings", part.to_arrow())
        try:
            db.run(con, "insert_ratings")
        finally:
            con.unregister("staged_ratings")


def _insert_meta(
    con: duckdb.DuckDBPyConnection,
    origin: Origin,
    n_users: int,
    n_items: int,
    n_ratings: int,
    stats: PrepStats,
    config: Config,
    fingerprint: str,
    seconds: float,
) -> None:
    """The dataset_meta row and the lineage's base row in dataset_versions."""
    db.run(
        con,
        "insert_dataset_meta",
        dataset_sha256=fingerprint,
        source=origin.source,
        source_sha256=origin.source_sha256,
        loader=origin.loader,
        layout=origin.layout,
        rating_min=stats.rating_min,
        rating_max=stats.rating_max,
        rows_in=stats.rows_in,
        duplicates_dropped=stats.duplicates_dropped,
        n_users=n_users,
        n_items=n_items,
        n_ratings=n_ratings,
        n_train=stats.n_train,
        n_val=stats.n_val,
        n_val_cold_user=stats.n_val_cold_user,
        n_val_cold_item=stats.n_val_cold_item,
        split_kind=config.split.kind,
        val_fraction=config.split.val_fraction,
        split_seed=config.split.seed,
        time_cutoff=stats.time_cutoff,
        config=json.dumps(config.to_dict()),
        feedback="implicit" if stats.implicit else "explicit",
        mfbatch_version=__version__,
        seconds=seconds,
    )
    db.run(
        con,
        "insert_base_version",
        dataset_sha256=fingerprint,
        source=origin.source,
        rows_in=stats.rows_in,
        rows_added=n_ratings,
        new_users=n_users,
        new_items=n_items,
        # UTC like training_runs.started_at, which score compares it with.
        created_at=datetime.now(timezone.utc).replace(tzinfo=None),
    )
