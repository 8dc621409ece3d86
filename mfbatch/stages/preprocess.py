"""Stage 1, `mfbatch preprocess`: source file -> prepared DuckDB tables.

Reads with the loader the config names, prepares (ids, scale, duplicates, split) and
replaces users / items / ratings / dataset_meta in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mfbatch import __version__, db
from mfbatch.config import Config
from mfbatch.data import DataLoaderFactory
from mfbatch.data.base import PreparedData, RawData
from mfbatch.progress import log_step

# Bumped when preprocessing changes what it writes for the same input, so dataset_sha256
# (which runs and models cite) changes with it.
PREPROCESS_VERSION = 2


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

    def line(self) -> str:
        return (
            f"preprocessed {self.rows_in:,} rows from {self.layout} "
            f"({self.duplicates_dropped:,} duplicate (user, item) dropped): "
            f"{self.n_users:,} users, {self.n_items:,} items, "
            f"train {self.n_train:,} / val {self.n_val:,} "
            f"(val with unseen user {self.n_val_cold_user:,}, unseen item "
            f"{self.n_val_cold_item:,}) in {self.seconds:.2f} s -> {self.db}"
        )


# Settings that can't change which ratings or ids a dataset holds: where the file was
# found, and where downloads are cached.
_NOT_IDENTITY = ("source", "cache_dir")


def dataset_fingerprint(raw: RawData, prepared: PreparedData, config: Config) -> str:
    """Everything that changes the ids or the ratings: a model cites it, `score` checks it.

    The column mapping and separator are in it, so re-reading the same file with
    --user-col/--item-col swapped makes every model trained before refused.
    """
    reading = {k: v for k, v in config.to_dict()["data"].items() if k not in _NOT_IDENTITY}
    identity = {
        "source_sha256": raw.source_sha256,
        "layout": raw.layout,
        "reading": reading,
        "scale": [prepared.stats.rating_min, prepared.stats.rating_max],
        "split": config.to_dict()["split"],
        "preprocess_version": PREPROCESS_VERSION,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]preprocess[/bold] {task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        # Off when stderr is not a terminal (cron, CI, pipes): Rich would print a bare newline.
        disable=console is None or not console.is_terminal,
    )


def preprocess(*, config: Config, console: Console | None = None) -> PreprocessSummary:
    """Run the stage; raises MfbatchError subclasses on bad input, leaving the db as it was."""
    started = time.perf_counter()
    path = config.db
    existed = path.exists()
    # Open (and lock) the database first: a locked file should fail before minutes of parsing.
    con = db.connect(path)
    try:
        loader = DataLoaderFactory.create(config.data, config.split)
        with _progress(console) as progress:
            task = progress.add_task(
                f"reading {config.data.source or config.data.dataset}", total=3
            )
            log_step(
                console,
                "preprocess",
                f"reading {config.data.source or config.data.dataset}",
                started,
            )
            raw = loader.load_data()
            progress.update(task, advance=1, description=f"preparing {raw.ratings.height:,} rows")
            log_step(console, "preprocess", f"preparing {raw.ratings.height:,} rows", started)
            prepared = loader.preprocess_data(raw)
            progress.update(task, advance=1, description=f"writing {path}")
            log_step(console, "preprocess", f"writing {path}", started)
            fingerprint = dataset_fingerprint(raw, prepared, config)
            seconds = time.perf_counter() - started
            write_dataset(con, path, raw, prepared, config, fingerprint, seconds)
            progress.update(task, advance=1)
    except BaseException:
        con.close()
        if not existed:
            # Leave no empty database behind for a run that wrote nothing.
            for leftover in (path, path.with_name(path.name + ".wal")):
                leftover.unlink(missing_ok=True)
        raise
    con.close()
    stats = prepared.stats
    return PreprocessSummary(
        db=path,
        source=raw.source,
        layout=raw.layout,
        rows_in=stats.rows_in,
        duplicates_dropped=stats.duplicates_dropped,
        n_users=prepared.users.height,
        n_items=prepared.items.height,
        n_train=stats.n_train,
        n_val=stats.n_val,
        n_val_cold_user=stats.n_val_cold_user,
        n_val_cold_item=stats.n_val_cold_item,
        dataset_sha256=fingerprint,
        seconds=time.perf_counter() - started,
    )


def write_dataset(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    raw: RawData,
    prepared: PreparedData,
    config: Config,
    fingerprint: str,
    seconds: float,
) -> None:
    """Replace the four dataset tables in one transaction."""
    stats = prepared.stats
    staged = {
        "staged_users": prepared.users,
        "staged_items": prepared.items,
        "staged_ratings": prepared.ratings,
    }
    for name, frame in staged.items():
        con.register(name, frame.to_arrow())
    try:
        with db.transaction(con, f"the dataset into {path}"):
            for table in ("ratings", "users", "items", "dataset_meta", "dataset_versions"):
                db.run(con, f"drop_{table}")
            for table in ("users", "items", "ratings", "dataset_meta", "dataset_versions"):
                db.run(con, f"create_{table}")
            for table in ("users", "items", "ratings"):
                db.run(con, f"insert_{table}")
            db.run(
                con,
                "insert_dataset_meta",
                dataset_sha256=fingerprint,
                source=raw.source,
                source_sha256=raw.source_sha256,
                loader=raw.loader,
                layout=raw.layout,
                rating_min=stats.rating_min,
                rating_max=stats.rating_max,
                rows_in=stats.rows_in,
                duplicates_dropped=stats.duplicates_dropped,
                n_users=prepared.users.height,
                n_items=prepared.items.height,
                n_ratings=prepared.ratings.height,
                n_train=stats.n_train,
                n_val=stats.n_val,
                n_val_cold_user=stats.n_val_cold_user,
                n_val_cold_item=stats.n_val_cold_item,
                split_kind=config.split.kind,
                val_fraction=config.split.val_fraction,
                split_seed=config.split.seed,
                time_cutoff=stats.time_cutoff,
                config=json.dumps(config.to_dict()),
                mfbatch_version=__version__,
                seconds=seconds,
            )
            db.run(
                con,
                "insert_base_version",
                dataset_sha256=fingerprint,
                source=raw.source,
                rows_in=stats.rows_in,
                rows_added=prepared.ratings.height,
                new_users=prepared.users.height,
                new_items=prepared.items.height,
                # UTC like training_runs.started_at, which score compares it with.
                created_at=datetime.now(timezone.utc).replace(tzinfo=None),
            )
    finally:
        for name in staged:
            con.unregister(name)
