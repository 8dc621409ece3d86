"""Stage 1, `mfbatch preprocess`: source file -> prepared DuckDB tables.

Reads with the loader the config names, prepares (ids, scale, duplicates, split) and
replaces users / items / ratings / dataset_meta in one transaction, with the item metadata
of `--items-source` (mfbatch.data.itemmeta) joined onto items. With
`preprocess.memory_mb` (`--memory-mb`) a Parquet source is prepared out of core
(mfbatch.data.outofcore) into the same tables, its ratings written bucket by bucket
inside that one transaction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mfbatch.config import Config
from mfbatch.data import DataLoaderFactory, lazyscan, outofcore
from mfbatch.data.base import BaseDataLoader, PreparedData, PrepStats, RawData
from mfbatch.data.generic import ParquetLoader
from mfbatch.data.itemmeta import ItemMetadata, coverage, read_item_metadata
from mfbatch.data.tables import sha256_source
from mfbatch.errors import ConfigError
from mfbatch.progress import log_step
from mfbatch.stages.preprocess_write import Origin, write_dataset, write_tables
from mfbatch.store import db, workdirs

# Bumped when preprocessing changes what it writes for the same input, so dataset_sha256
# (which runs and models cite) changes with it.
PREPROCESS_VERSION = 3


@dataclass(frozen=True)
class PreprocessSummary:
    db: Path
    source: str
    layout: str
    rows_in: int
    duplicates_dropped: int
    n_users: int
    n_items: int
    n_train: int
    n_val: int
    n_val_cold_user: int
    n_val_cold_item: int
    dataset_sha256: str
    seconds: float

    feedback: str = "explicit"
    split_kind: str = "time"
    # --items-source: the file, the catalogue items it describes, and its rows for items
    # no rating names (kept in item_metadata, never served).
    items_source: str | None = None
    items_described: int = 0
    items_unrated: int = 0

    def line(self) -> str:
        # Implicit duplicates are merged (their weights add up), not dropped.
        implicit = self.feedback == "implicit"
        fate = "merged" if implicit else "dropped"
        kind = "implicit feedback, " if implicit else ""
        held = "test" if self.split_kind == "given" else "val"
        return (
            f"preprocessed {self.rows_in:,} rows from {self.layout} ({kind}"
            f"{self.duplicates_dropped:,} duplicate (user, item) {fate}): "
            f"{self.n_users:,} users, {self.n_items:,} items, "
            f"train {self.n_train:,} / {held} {self.n_val:,} "
            f"({held} with unseen user {self.n_val_cold_user:,}, unseen item "
            f"{self.n_val_cold_item:,}) in {self.seconds:.2f} s -> {self.db}{self._described()}"
        )

    def _described(self) -> str:
        if self.items_source is None:
            return ""
        return (
            f"; metadata from {self.items_source}: {self.items_described:,} of "
            f"{self.n_items:,} items described, {self.items_unrated:,} "
            f"row{'' if self.items_unrated == 1 else 's'} for unrated items kept aside"
        )


# Settings that can't change which ratings or ids a dataset holds: where the file was
# found, and where downloads are cached.
_NOT_IDENTITY = ("source", "cache_dir")
# The out-of-core path's work folder, beside the database (same disk as the spill).
WORK_PREFIX = ".mfbatch-preprocess-"


def dataset_fingerprint(raw: RawData, prepared: PreparedData, config: Config) -> str:
    """Everything that changes the ids or the ratings: a model cites it, `score` checks it.

    The column mapping and separator are in it, so re-reading the same file with
    --user-col/--item-col swapped makes every model trained before refused.
    """
    return _fingerprint(raw.source_sha256, raw.layout, prepared.stats, config)


def _fingerprint(source_sha256: str, layout: str, stats: PrepStats, config: Config) -> str:
    reading = {k: v for k, v in config.to_dict()["data"].items() if k not in _NOT_IDENTITY}
    identity = {
        "source_sha256": source_sha256,
        "layout": layout,
        "reading": reading,
        "scale": [stats.rating_min, stats.rating_max],
        "split": config.to_dict()["split"],
        "preprocess_version": PREPROCESS_VERSION,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]preprocess[/bold]"),
        # The description names files: text, never markup.
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        # Off when stderr is not a terminal (cron, CI, pipes): Rich would print a bare newline.
        disable=console is None or not console.is_terminal,
    )


def preprocess(
    *, config: Config, console: Console | None = None, bucket_rows: int | None = None
) -> PreprocessSummary:
    """Run the stage; raises MfbatchError subclasses on bad input, leaving the db as it was.

    `bucket_rows`: out of core, ratings per bucket instead of what `--memory-mb` allows
    (tests use a few hundred to cross many buckets on a small input).
    """
    started = time.perf_counter()
    path = config.db
    existed = path.exists()
    loader = DataLoaderFactory.get_loader(config.data, config.split)
    memory_mb = config.preprocess.memory_mb
    if memory_mb is not None and not isinstance(loader, ParquetLoader):
        raise ConfigError(
            f"--memory-mb: only a Parquet source (--dataset parquet, a file or a folder of "
            f"parts) is preprocessed out of core; --dataset {config.data.dataset} is read in "
            "memory, so drop --memory-mb"
        )
    # Open (and lock) the database first: a locked file should fail before minutes of parsing.
    con = db.connect(path)
    work: Path | None = None
    try:
        # The metadata file is checked before the ratings are read: a bad one fails fast.
        metadata = item_metadata(config, config.preprocess.items_id_col)
        if metadata is not None:
            # Recorded in dataset_meta.config: the column an --append's file is read by.
            config = config.override("preprocess", {"items_id_col": metadata.id_col})
        with _progress(console) as progress:
            if memory_mb is not None and isinstance(loader, ParquetLoader):
                # Buckets a killed run left beside this folder's databases go first.
                workdirs.remove_stale(path.parent, WORK_PREFIX)
                work = workdirs.make(path.parent, WORK_PREFIX)
                rows = bucket_rows or outofcore.bucket_rows(memory_mb)
                summary = _out_of_core(
                    con, loader, config, memory_mb, rows, work, console, started, metadata
                )
            else:
                summary = _in_memory(con, loader, config, console, progress, started, metadata)
    except BaseException:
        con.close()
        if not existed:
            # Leave no empty database behind for a run that wrote nothing.
            for leftover in (path, path.with_name(path.name + ".wal")):
                leftover.unlink(missing_ok=True)
        raise
    finally:
        if work is not None:
            con.close()  # DuckDB's spill files live in `work` until it lets go
            shutil.rmtree(work, ignore_errors=True)
    con.close()
    return dataclasses.replace(summary, seconds=time.perf_counter() - started)


def _in_memory(
    con: duckdb.DuckDBPyConnection,
    loader: BaseDataLoader,
    config: Config,
    console: Console | None,
    progress: Progress,
    started: float,
    metadata: ItemMetadata | None,
) -> PreprocessSummary:
    path = config.db
    what = config.data.source or config.data.dataset
    task = progress.add_task(f"reading {what}", total=3)
    log_step(console, "preprocess", f"reading {what}", started)
    raw = loader.load_data()
    progress.update(task, advance=1, description=f"preparing {raw.ratings.height:,} rows")
    log_step(console, "preprocess", f"preparing {raw.ratings.height:,} rows", started)
    prepared = loader.preprocess_data(raw)
    progress.update(task, advance=1, description=f"writing {path}")
    log_step(console, "preprocess", f"writing {path}", started)
    fingerprint = dataset_fingerprint(raw, prepared, config)
    seconds = time.perf_counter() - started
    frame = metadata.frame if metadata is not None else None
    write_dataset(con, path, raw, prepared, config, fingerprint, seconds, frame)
    progress.update(task, advance=1)
    origin = Origin(raw.source, raw.source_sha256, raw.loader, raw.layout)
    summary = _summary(
        path,
        origin,
        prepared.stats,
        prepared.users.height,
        prepared.items.height,
        fingerprint,
        config.split.kind,
    )
    return _with_coverage(summary, prepared.items, metadata)


def _out_of_core(
    con: duckdb.DuckDBPyConnection,
    loader: ParquetLoader,
    config: Config,
    memory_mb: int,
    bucket_rows: int,
    work: Path,
    console: Console | None,
    started: float,
    metadata: ItemMetadata | None,
) -> PreprocessSummary:
    """The Parquet source in buckets of users (mfbatch.data.outofcore), written in one
    transaction with DuckDB held to its share of the budget, spilling into `work`."""
    path = config.db

    def log(step: str) -> None:
        log_step(console, "preprocess", step, started)

    log(f"scanning {config.data.source} (out of core, --memory-mb {memory_mb})")
    scanned = lazyscan.scan(loader, config.split)
    data = config.data
    declared = (
        (data.rating_min, data.rating_max)
        if data.rating_min is not None and data.rating_max is not None
        else None
    )
    buckets = outofcore.prepare(
        scanned,
        split=config.split,
        rating_scale=declared,
        work=work,
        bucket_rows=bucket_rows,
        log=log,
        weight_transform=config.data.weight_transform,
    )
    origin = Origin(str(scanned.source), sha256_source(scanned.source), loader.name, loader.name)
    fingerprint = _fingerprint(origin.source_sha256, origin.layout, buckets.stats, config)
    seconds = time.perf_counter() - started
    log(f"writing {path}")
    db.run(con, "limit_memory", memory_limit=f"{outofcore.duckdb_mb(memory_mb)}MB")
    db.run(con, "spill_to", folder=str(work))
    write_tables(
        con,
        path,
        origin,
        buckets.users,
        buckets.items,
        buckets.ratings(),
        buckets.n_ratings,
        buckets.stats,
        config,
        fingerprint,
        seconds,
        spool=work,
        metadata=metadata.frame if metadata is not None else None,
    )
    summary = _summary(
        path,
        origin,
        buckets.stats,
        buckets.users.height,
        buckets.items.height,
        fingerprint,
        config.split.kind,
    )
    return _with_coverage(summary, buckets.items, metadata)


def item_metadata(
    config: Config, id_col: str | None, recorded: str | None = None
) -> ItemMetadata | None:
    """The --items-source file, read and checked (None without one); its id column is
    `id_col`, else the first it has of: the one `recorded` by an earlier read, the
    ratings' item column, item_id, id."""
    source = config.preprocess.items_source
    if source is None:
        return None
    names = (recorded, config.data.item_col, "item_id", "id")
    guesses = tuple(dict.fromkeys(n for n in names if n))
    return read_item_metadata(
        source, id_col=id_col, guesses=guesses, separator=config.preprocess.items_separator
    )


def _with_coverage(
    summary: PreprocessSummary, items: pl.DataFrame, metadata: ItemMetadata | None
) -> PreprocessSummary:
    if metadata is None:
        return summary
    described, unrated = coverage(items["item_id"], metadata.frame)
    return dataclasses.replace(
        summary, items_source=metadata.source, items_described=described, items_unrated=unrated
    )


def _summary(
    path: Path,
    origin: Origin,
    stats: PrepStats,
    n_users: int,
    n_items: int,
    fingerprint: str,
    split_kind: str,
) -> PreprocessSummary:
    return PreprocessSummary(
        db=path,
        source=origin.source,
        layout=origin.layout,
        rows_in=stats.rows_in,
        duplicates_dropped=stats.duplicates_dropped,
        n_users=n_users,
        n_items=n_items,
        n_train=stats.n_train,
        n_val=stats.n_val,
        n_val_cold_user=stats.n_val_cold_user,
        n_val_cold_item=stats.n_val_cold_item,
        dataset_sha256=fingerprint,
        seconds=0.0,
        feedback="implicit" if stats.implicit else "explicit",
        split_kind=split_kind,
    )
