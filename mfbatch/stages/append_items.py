"""Item metadata under `mfbatch preprocess --append`: the file `--items-source` names, merged
into the stored metadata (mfbatch.data.itemmeta.merge), and the metadata-only refresh
(`--append --items-source FILE` without `--source`).

A refresh reads no ratings and writes no dataset version: models do not read metadata, so
the served run stays servable and nothing is folded in. It rewrites `items` (its own
columns, then the merged attributes) and `item_metadata` in one transaction, and records
the file in dataset_meta.config; a file that fails a check, or a merge that is refused,
changes nothing. Refreshing with what is already stored writes nothing at all.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

from mfbatch.config import Config
from mfbatch.data.itemmeta import TEXT_COLUMNS, ItemMetadata, coverage, merge, with_metadata
from mfbatch.stages.preprocess import item_metadata
from mfbatch.stages.preprocess_write import describe_items
from mfbatch.store import db


@dataclass(frozen=True)
class Metadata:
    """The item metadata an append writes: the new file (--items-source) if any, the stored
    metadata (None: none yet) and the two merged (None: the database has none, gets none)."""

    fresh: ItemMetadata | None
    stored: pl.DataFrame | None
    merged: pl.DataFrame | None
    config: str | None  # dataset_meta.config naming the new file (None: unchanged)

    @property
    def unchanged(self) -> bool:
        """The file says only what is stored, and dataset_meta already names it."""
        if self.merged is None or self.stored is None:
            return self.merged is None
        same = self.merged.sort("item_id").equals(self.stored.sort("item_id"))
        return same and self.config is None


def read_metadata(con: duckdb.DuckDBPyConnection, config: Config) -> Metadata:
    """The new metadata file (its id column: --items-id-col, else the one recorded, else
    the preprocess's guesses) merged into what item_metadata holds."""
    stored = db.frame(con, "item_metadata_rows") if db.table_exists(con, "item_metadata") else None
    if config.preprocess.items_source is None:
        return Metadata(None, stored, stored, None)
    row = db.one(con, "append_stored_config")
    recorded = json.loads(row[0]) if row and row[0] else {}
    before = recorded.get("preprocess", {})
    fresh = item_metadata(config, config.preprocess.items_id_col, before.get("items_id_col"))
    assert fresh is not None  # items_source is given
    # dataset_meta.config names the newest metadata file and its id column.
    now = {
        **before,
        "items_source": str(config.preprocess.items_source),
        "items_id_col": fresh.id_col,
        "items_separator": config.preprocess.items_separator,
    }
    named = None if now == before else json.dumps({**recorded, "preprocess": now})
    return Metadata(fresh, stored, merge(stored, fresh), named)


def write_metadata(con: duckdb.DuckDBPyConnection, metadata: Metadata) -> int:
    """items joined with the merged metadata again, item_metadata replaced and the file
    recorded, inside the caller's transaction: the catalogue items now described."""
    described = 0
    if metadata.merged is not None:
        own = db.frame(con, "items_own_columns")
        describe_items(con, with_metadata(own, metadata.merged), metadata.merged)
        described = coverage(own["item_id"], metadata.merged)[0]
    if metadata.config is not None:
        db.run(con, "append_record_items_source", config=metadata.config)
    return described


@dataclass(frozen=True)
class RefreshSummary:
    """`--append --items-source FILE` without `--source`: what the refresh changed."""

    db: Path
    items_source: str
    version: int  # the dataset version, kept: a refresh reads no ratings
    rows_in: int
    ids_updated: int  # the file's ids already stored: their attributes replaced
    ids_new: int
    columns_added: tuple[str, ...]  # attributes new to items
    items_described: int
    items_described_before: int
    n_items: int
    changed: bool
    seconds: float

    def line(self) -> str:
        described = f"{self.items_described:,} of {self.n_items:,} items described"
        if not self.changed:
            return (
                f"item metadata from {self.items_source}: all {self.rows_in:,} rows already "
                f"stored as they are, nothing changed ({described}, dataset version "
                f"{self.version}) in {self.seconds:.2f} s -> {self.db}"
            )
        columns = (
            f"columns added: {', '.join(self.columns_added)}"
            if self.columns_added
            else "no columns added"
        )
        return (
            f"refreshed item metadata from {self.items_source} (no ratings read, dataset "
            f"version {self.version} kept): {self.rows_in:,} rows, {self.ids_updated:,} ids "
            f"updated, {self.ids_new:,} new; {columns}; now {described} (was "
            f"{self.items_described_before:,}) in {self.seconds:.2f} s -> {self.db}"
        )


def refresh(con: duckdb.DuckDBPyConnection, config: Config, started: float) -> RefreshSummary:
    """The metadata-only append: every check (the file, the merge) before one transaction."""
    path = config.db
    metadata = read_metadata(con, config)
    fresh, stored = metadata.fresh, metadata.stored
    assert fresh is not None and metadata.merged is not None  # items_source is given
    lineage = db.record(con, "append_lineage")
    version = int(lineage["version"]) if lineage and lineage["version"] is not None else 0
    item_ids = db.frame(con, "append_item_ids")["item_id"]
    before = coverage(item_ids, stored)[0] if stored is not None else 0
    if metadata.unchanged:
        described = before
    else:
        with db.transaction(con, f"the item metadata into {path}"):
            described = write_metadata(con, metadata)
    updated = 0
    if stored is not None:
        updated = int(fresh.frame["item_id"].is_in(stored["item_id"].implode()).sum())
    # Columns new to items: title and genres are its own, whichever file fills them.
    had = {"item_id", *TEXT_COLUMNS, *(stored.columns if stored is not None else ())}
    return RefreshSummary(
        db=path,
        items_source=fresh.source,
        version=version,
        rows_in=fresh.frame.height,
        ids_updated=updated,
        ids_new=fresh.frame.height - updated,
        columns_added=tuple(c for c in fresh.frame.columns if c not in had),
        items_described=described,
        items_described_before=before,
        n_items=item_ids.len(),
        changed=not metadata.unchanged,
        seconds=time.perf_counter() - started,
    )
