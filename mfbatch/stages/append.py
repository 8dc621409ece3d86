"""`mfbatch preprocess --append`: new ratings onto a prepared dataset, in one transaction.

The daily cycle's input grows: known users rate more, new users and items appear. An
append reads the file with the same loaders and column options as a preprocess, then:

- ids already mapped keep their user_idx / item_idx; new ids get the next free indices,
  in sorted order of the raw id (the preprocess rule), so the same appends in the same
  order always map the same way;
- a (user, item) already stored takes the appended rating (unless the stored one is newer
  by timestamp) and keeps its split; new pairs get split 'append', so 'train' and 'val'
  keep meaning the split models were trained and measured on;
- `dataset_sha256` stays the base's and a `dataset_versions` row records the append, so a
  model trained on any version of this lineage is still served (and folded in for what it
  has not seen), while a re-preprocess that remaps ids is refused as before;
- item metadata (`item_metadata`, from --items-source) is updated by the file this append
  names, if any, and joined onto items again, so new items take their stored attributes;
  with --items-source and no --source only the metadata is refreshed
  (mfbatch.stages.append_items).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from mfbatch.config import Config
from mfbatch.data import DataLoaderFactory
from mfbatch.data.base import RawData
from mfbatch.data.transforms import (
    drop_duplicates,
    infer_scale,
    map_ids,
    normalise,
    transform_weights,
)
from mfbatch.errors import ConfigError, DatabaseError, InputDataError
from mfbatch.stages.append_items import (
    Metadata,
    RefreshSummary,
    read_metadata,
    refresh,
    write_metadata,
)
from mfbatch.store import db
from mfbatch.store.datasets import Dataset


@dataclass(frozen=True)
class AppendSummary:
    db: Path
    source: str
    version: int
    rows_in: int
    duplicates_dropped: int
    rows_added: int
    replaced: int
    stale: int
    new_users: int
    new_items: int
    n_users: int
    n_items: int
    seconds: float
    # --items-source: the file and the catalogue items the stored metadata now describes.
    items_source: str | None = None
    items_described: int = 0
    ratings_changed: bool = True  # False: every rating was stored; only metadata changed

    def line(self) -> str:
        stale = f", {self.stale:,} older than the stored rating ignored" if self.stale else ""
        described = (
            f"; metadata from {self.items_source}: {self.items_described:,} of "
            f"{self.n_items:,} items described"
            if self.items_source
            else ""
        )
        if not self.ratings_changed:
            return (
                f"appended no ratings from {self.source} (all {self.rows_in:,} already stored)"
                f"{described} in {self.seconds:.2f} s -> {self.db}"
            )
        return (
            f"appended {self.rows_in:,} rows from {self.source} as version {self.version} "
            f"({self.duplicates_dropped:,} duplicate (user, item) dropped): "
            f"{self.rows_added:,} new ratings, {self.replaced:,} replaced{stale}, "
            f"{self.new_users:,} new users, {self.new_items:,} new items; now "
            f"{self.n_users:,} users, {self.n_items:,} items in {self.seconds:.2f} s -> "
            f"{self.db}{described}"
        )


def _version_sha(parent_sha: str, raw: RawData, config: Config) -> str:
    reading = {
        k: v for k, v in config.to_dict()["data"].items() if k not in ("source", "cache_dir")
    }
    identity = {"parent": parent_sha, "source_sha256": raw.source_sha256, "reading": reading}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class _Staged:
    """The appended ratings on the dataset's indices, and the ids they add."""

    ratings: pl.DataFrame  # user_idx, item_idx, rating, ts, rating_norm
    duplicates_dropped: int
    new_users: pl.DataFrame  # user_idx, user_id
    new_items: pl.DataFrame  # item_idx, item_id, title, genres


def append(*, config: Config) -> AppendSummary | RefreshSummary:
    """Add the source's ratings (and/or item metadata: without a source, a RefreshSummary)
    to config.db; raises MfbatchError, leaving the db as it was."""
    started = time.perf_counter()
    path = config.db
    ratings = config.data.source is not None
    if not ratings and config.preprocess.items_source is None:
        raise ConfigError(
            "--append: name the new ratings with --source FILE, or item metadata to refresh "
            "with --items-source FILE (or both)"
        )
    if not path.exists():
        raise DatabaseError(
            f"database {path} does not exist; run `mfbatch preprocess --db {path}` first, "
            "then --append to it"
        )
    # Open (and lock) first: a locked database should fail before the file is parsed.
    con = db.connect(path)
    try:
        dataset = Dataset.load(con, path)
        # The recorded reading names the ratings' item column: a metadata file's default id.
        config = _stored_reading(con, config, dataset)
        if not ratings:
            return refresh(con, config, started)
        scale = _stored_scale(config, dataset, path)
        _require_times(config, dataset, path)
        # The metadata file is checked before the ratings are read: a bad one fails fast.
        metadata = read_metadata(con, config)
        raw = _read_source(config)
        _check_feedback(raw, dataset, path)
        lo, hi = _append_scale(raw, scale, path)
        staged = _stage(con, raw, dataset, lo, hi, config)
        version, counts = _store(con, path, staged, raw, config, metadata)
    finally:
        con.close()
    new_users, new_items = staged.new_users.height, staged.new_items.height
    return AppendSummary(
        db=path,
        source=raw.source,
        version=version,
        rows_in=raw.ratings.height,
        duplicates_dropped=staged.duplicates_dropped,
        rows_added=int(counts["added"]),
        replaced=int(counts["replaced"]),
        stale=int(counts["stale"]),
        new_users=new_users,
        new_items=new_items,
        n_users=dataset.n_users + new_users,
        n_items=dataset.n_items + new_items,
        seconds=time.perf_counter() - started,
        items_source=metadata.fresh.source if metadata.fresh is not None else None,
        items_described=int(counts.get("described", 0)),
        ratings_changed=bool(counts["added"] or counts["replaced"] or new_items),
    )


def _require_times(config: Config, dataset: Dataset, path: Path) -> None:
    """A database split by time needs times on what is appended: one rating without a time
    would turn recency off for every user at the refit."""
    if dataset.split_kind in ("time", "user-time") and not config.data.time_col:
        raise ConfigError(
            f"--time-col '': {path} was split by time ({dataset.split_kind}); appended "
            "ratings need their time column (--time-col NAME); nothing was changed"
        )


def _append_scale(raw: RawData, scale: tuple[float, float], path: Path) -> tuple[float, float]:
    """The stored scale, checked against the appended ratings: append can't move the scale
    (every stored rating is normalised on it), so the advice is to fix the file."""
    try:
        return infer_scale(raw.ratings, origin=raw.source, declared=scale)
    except InputDataError:
        seen = raw.ratings.select(lo=pl.col("rating").min(), hi=pl.col("rating").max()).row(0)
        raise InputDataError(
            f"{raw.source}: ratings span [{seen[0]}, {seen[1]}] outside the scale "
            f"[{scale[0]}, {scale[1]}] of {path}, which an append keeps; fix or drop those "
            "rows, or re-preprocess everything with --rating-min/--rating-max that cover them"
        ) from None


# What an append reads as the preprocess did unless a flag says otherwise: the column
# mapping, separator and weight transform are in the dataset_meta config it recorded.
_READING = (
    "dataset",
    "user_col",
    "item_col",
    "rating_col",
    "time_col",
    "weight_col",
    "weight_transform",
    "separator",
)


def _stored_reading(con: duckdb.DuckDBPyConnection, config: Config, dataset: Dataset) -> Config:
    """`config` with the preprocess's reading options where no flag or file gave them, and
    its split when it was given by a column (appended rows land in the split they name)."""
    row = db.one(con, "append_stored_config")
    stored = json.loads(row[0]) if row and row[0] else {}
    data, given = stored.get("data", {}), config.data._given
    reading = {k: data[k] for k in _READING if k in data and k not in given}
    if dataset.feedback == "implicit" and "rating_col" in reading:
        reading["rating_col"] = None  # read without one, whatever the option held
    if reading:
        # '' is how the options say "no such column" (None would mean "not given").
        values = {k: ("" if v is None else v) for k, v in reading.items()}
        config = config.override("data", values, "the preprocess's dataset_meta config")
    split = stored.get("split", {})
    if split.get("kind") == "given" and config.split.kind != "given":
        config = config.override(
            "split", {"kind": "given", "split_col": split.get("split_col")}, "dataset_meta"
        )
    return config


def _check_feedback(raw: RawData, dataset: Dataset, path: Path) -> None:
    """Implicit interactions can't join explicit ratings, nor the other way round."""
    feedback = "implicit" if raw.implicit else "explicit"
    if feedback != dataset.feedback:
        raise InputDataError(
            f"{raw.source}: {feedback} feedback, but {path} holds {dataset.feedback} "
            "feedback; append a file read the same way (--rating-col)"
        )


def _stored_scale(config: Config, dataset: Dataset, path: Path) -> tuple[float, float]:
    """The dataset's rating scale, which a declared --rating-min/--rating-max must match."""
    declared = (config.data.rating_min, config.data.rating_max)
    scale = (dataset.rating_min, dataset.rating_max)
    if declared[0] is not None and declared != scale:
        raise ConfigError(
            f"--rating-min/--rating-max: the dataset in {path} is on the scale "
            f"[{scale[0]}, {scale[1]}]; appended ratings must use it (drop the flags)"
        )
    return scale


def _read_source(config: Config) -> RawData:
    raw = DataLoaderFactory.get_loader(config.data, config.split).load_data()
    if raw.ratings.height == 0:
        raise InputDataError(f"{raw.source}: no ratings found; check the file and --source")
    return raw


def _stage(
    con: duckdb.DuckDBPyConnection,
    raw: RawData,
    dataset: Dataset,
    lo: float,
    hi: float,
    config: Config,
) -> _Staged:
    """The source's ratings mapped onto the stored ids, deduplicated and normalised."""
    users = db.frame(con, "append_user_ids")
    items = db.frame(con, "append_item_ids")
    user_idx, new_users = map_ids(raw.ratings["user_id"], users, "user", dataset.n_users)
    item_idx, new_items = map_ids(raw.ratings["item_id"], items, "item", dataset.n_items)
    n_items = dataset.n_items + new_items.height
    frame = pl.DataFrame(
        {
            "user_idx": user_idx,
            "item_idx": item_idx,
            "rating": raw.ratings["rating"],
            "ts": raw.ratings["ts"],
            "weight": raw.ratings["weight"],
            # --split given: the split each row names; else new pairs go to 'append'.
            "held_out": raw.ratings["held_out"]
            if "held_out" in raw.ratings.columns
            else pl.Series([None] * raw.ratings.height, dtype=pl.Boolean),
        }
    )
    frame, dropped = drop_duplicates(frame, n_items, implicit=raw.implicit)
    frame = frame.with_columns(
        rating_norm=normalise(pl.col("rating"), lo, hi),
        weight=transform_weights(pl.col("weight"), config.data.weight_transform),
    )
    meta = (
        raw.items.select("item_id", "title", "genres").unique("item_id", keep="first")
        if raw.items is not None
        else pl.DataFrame(schema={"item_id": pl.String, "title": pl.String, "genres": pl.String})
    )
    new_items = new_items.join(meta, on="item_id", how="left", maintain_order="left")
    return _Staged(frame, dropped, new_users, new_items)


def _store(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    staged: _Staged,
    raw: RawData,
    config: Config,
    metadata: Metadata,
) -> tuple[int, dict[str, Any]]:
    """Write the staged append as the lineage's next version, in one transaction:
    (that version, the added / replaced / stale counts, and the items described)."""
    lineage = db.record(con, "append_lineage")
    assert lineage is not None  # an aggregate always returns a row
    parent = int(lineage["version"])
    tables = {
        "staged_append": staged.ratings,
        "staged_new_users": staged.new_users,
        "staged_new_items": staged.new_items,
    }
    for name, table in tables.items():
        con.register(name, table.to_arrow())
    try:
        counts = db.record(con, "append_counts")
        assert counts is not None
        news = counts["added"] or counts["replaced"] or staged.new_items.height
        if not news and metadata.fresh is None:
            raise InputDataError(
                f"{raw.source}: all {int(counts['unchanged']):,} ratings are already in {path} "
                "as they are (appended before?) or older than stored ones; nothing was changed"
            )
        with db.transaction(con, f"the appended ratings into {path}"):
            if news:
                _write_version(con, staged, raw, config, parent, str(lineage["sha256"]), counts)
            counts["described"] = write_metadata(con, metadata)
    finally:
        for name in tables:
            con.unregister(name)
    return (parent + 1 if news else parent), counts


def _write_version(
    con: duckdb.DuckDBPyConnection,
    staged: _Staged,
    raw: RawData,
    config: Config,
    parent: int,
    parent_sha: str,
    counts: dict[str, Any],
) -> None:
    """The appended ids and ratings, the recounts and the lineage's next version row."""
    version = parent + 1
    db.run(con, "append_insert_users")
    db.run(con, "append_insert_items")
    db.run(con, "append_replace_ratings", version=version)
    db.run(con, "append_insert_ratings", version=version)
    db.run(con, "append_recount_users")
    db.run(con, "append_recount_items")
    if "held_out" in raw.ratings.columns:
        for step in ("train_users", "train_items", "cold", "meta"):
            db.run(con, f"append_given_{step}")
    db.run(con, "append_update_meta")
    db.run(
        con,
        "append_insert_version",
        version=version,
        parent=parent,
        sha256=_version_sha(parent_sha, raw, config),
        source=raw.source,
        rows_in=raw.ratings.height,
        rows_added=int(counts["added"]),
        new_users=staged.new_users.height,
        new_items=staged.new_items.height,
        replaced=int(counts["replaced"]),
        # UTC like training_runs.started_at, which score compares it with.
        created_at=datetime.now(timezone.utc).replace(tzinfo=None),
    )
