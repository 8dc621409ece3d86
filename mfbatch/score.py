"""Stage 3, `mfbatch score`: top-K unrated items for every user, by ONNX Runtime, into DuckDB.

The database is only read at the start and written at the end. In between, batches of users
go through the exported graph and their lists are spooled to an Arrow IPC file beside the
database (uncompressed, read back memory-mapped: the cheapest way to hand millions of rows
to DuckDB later); publishing is a staging table filled from that spool and a rename inside one
transaction. A crash, Ctrl-C or full disk at any point leaves the previous
`recommendations` table exactly as it was.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mfbatch import db
from mfbatch.config import Config
from mfbatch.errors import ConfigError, DatabaseError, InputDataError, ModelError
from mfbatch.export import ONNX_FILE, read_metadata
from mfbatch.inference import Scorer, SeenItems


@dataclass(frozen=True)
class ScoreSummary:
    run_id: str
    provider: str
    users: int
    rows: int
    seconds: float
    db: Path

    def line(self) -> str:
        rate = self.users / self.seconds if self.seconds else 0.0
        return (
            f"scored {self.users:,} users with run {self.run_id} on {self.provider}: "
            f"{self.rows:,} recommendations, {rate:,.0f} users/s, {self.seconds:.2f} s "
            f"-> {self.db} (table recommendations)"
        )


@dataclass(frozen=True)
class _Inputs:
    run_id: str
    objective: str
    model_path: Path
    metadata: dict[str, Any]
    seen: SeenItems
    user_ids: pa.Array
    item_ids: pa.Array
    users: np.ndarray
    item_mask: np.ndarray


def _read_ids(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise InputDataError(f"--{what}: {path} does not exist; pass a file with one id per line")
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    ids = [i for i in ids if i and not i.startswith("#")]
    if not ids:
        raise InputDataError(f"--{what}: {path} holds no ids; put one id per line")
    return ids


def _lookup(known: pa.Array, wanted: list[str], path: Path, what: str) -> np.ndarray:
    index = {value: i for i, value in enumerate(known.to_pylist())}
    missing = [w for w in wanted if w not in index]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise InputDataError(
            f"--{what}: {path} names {len(missing):,} id(s) not in the database "
            f"(e.g. {shown}); use raw ids from the {'users' if what == 'users' else 'items'} table"
        )
    return np.unique(np.array([index[w] for w in wanted], dtype=np.int64))


def _load_inputs(config: Config) -> _Inputs:
    settings = config.score
    con = db.connect(config.db, read_only=True)
    try:
        db.require_tables(con, config.db, "ratings", "users", "items", "dataset_meta")
        if not db.table_exists(con, "training_runs"):
            raise DatabaseError(f"{config.db} has no training runs; run `mfbatch train` first")
        if settings.run_id == "latest":
            row = db.one(con, "latest_run")
            if row is None:
                raise DatabaseError(f"{config.db} has no usable training run; run `mfbatch train`")
        else:
            row = db.one(con, "run_by_id", run_id=settings.run_id)
            if row is None:
                raise ConfigError(f"--run-id: no run {settings.run_id!r} in {config.db}")
        run_id, export_path, data_seen, run_sha, objective = row
        meta = db.one(con, "dataset_info")
        assert meta is not None
        dataset_sha, n_users, n_items = meta[0], int(meta[1]), int(meta[2])
        model_path = Path(export_path) / ONNX_FILE
        metadata = read_metadata(model_path)
        if metadata.get("dataset_sha256") != dataset_sha or run_sha != dataset_sha:
            raise ModelError(
                f"{model_path} was trained on dataset {str(metadata.get('dataset_sha256'))[:12]}, "
                f"but {config.db} now holds {dataset_sha[:12]}; train again on this database "
                "or pass the --db it was trained on"
            )
        if metadata.get("run_id") != run_id:
            raise ModelError(
                f"{model_path} belongs to run {metadata.get('run_id')!r}, not {run_id!r}; "
                f"run `mfbatch export --run-id {run_id}` to rebuild it"
            )
        if (metadata.get("n_users"), metadata.get("n_items")) != (n_users, n_items):
            raise ModelError(
                f"{model_path} covers {metadata.get('n_users')} users x {metadata.get('n_items')} "
                f"items but {config.db} has {n_users} x {n_items}; train again"
            )
        if settings.top_k > n_items:
            raise ConfigError(
                f"--top-k: {settings.top_k} is more than the catalogue's {n_items:,} items"
            )
        seen_frame = db.frame(con, "seen_all" if data_seen == "train+val" else "seen_train")
        user_ids = db.frame(con, "user_ids")["user_id"].to_arrow()
        item_ids = db.frame(con, "item_ids")["item_id"].to_arrow()
    finally:
        con.close()

    users = np.arange(n_users, dtype=np.int64)
    if settings.users is not None:
        users = _lookup(user_ids, _read_ids(settings.users, "users"), settings.users, "users")
    item_mask = np.zeros(n_items, dtype=np.float32)
    if settings.include_items is not None:
        allowed = _lookup(
            item_ids,
            _read_ids(settings.include_items, "include-items"),
            settings.include_items,
            "include-items",
        )
        item_mask[:] = -np.inf
        item_mask[allowed] = 0.0
    if settings.exclude_items is not None:
        denied = _lookup(
            item_ids,
            _read_ids(settings.exclude_items, "exclude-items"),
            settings.exclude_items,
            "exclude-items",
        )
        item_mask[denied] = -np.inf
    seen = SeenItems.from_pairs(
        seen_frame["user_idx"].to_numpy(), seen_frame["item_idx"].to_numpy(), n_users
    )
    return _Inputs(
        run_id, objective, model_path, metadata, seen, user_ids, item_ids, users, item_mask
    )


def score(*, config: Config, console: Console | None = None) -> ScoreSummary:
    """Score, spool, then publish `recommendations` in one transaction."""
    started = time.perf_counter()
    settings = config.score
    inputs = _load_inputs(config)
    scorer = Scorer(inputs.model_path, provider=settings.provider, threads=settings.threads)
    for warning in scorer.warnings:
        if console:
            console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if console:
        console.print(f"scoring with ONNX Runtime on {scorer.provider}", highlight=False)
    n_items = int(inputs.metadata["n_items"])
    batch = settings.batch_size or scorer.auto_batch_size(n_items, settings.memory_mb)
    lo, hi = float(inputs.metadata["rating_min"]), float(inputs.metadata["rating_max"])
    created = datetime.now(timezone.utc).replace(tzinfo=None)

    try:
        spool_dir = Path(tempfile.mkdtemp(prefix=".mfbatch-score-", dir=config.db.parent))
    except OSError as exc:
        raise DatabaseError(
            f"could not create the scoring spool beside {config.db} ({exc}); free space or "
            "make the folder writable; the previous recommendations are unchanged"
        ) from None
    spool = spool_dir / "recommendations.arrow"
    rows = 0
    try:
        writer: pa.ipc.RecordBatchFileWriter | None = None
        progress = Progress(
            TextColumn("[bold]score[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("users"),
            console=console,
            disable=console is None or not console.is_terminal,
            transient=True,
        )
        with progress:
            task = progress.add_task("score", total=len(inputs.users))
            for start in range(0, len(inputs.users), batch):
                users = inputs.users[start : start + batch]
                items, scores = scorer.top_k(users, inputs.seen, inputs.item_mask, settings.top_k)
                table = _to_arrow(inputs, users, items, scores, lo, hi)
                if writer is None:
                    writer = pa.ipc.new_file(str(spool), table.schema)
                writer.write_table(table)
                rows += table.num_rows
                progress.advance(task, len(users))
        if writer is None:
            raise InputDataError("no users to score")
        writer.close()
        _publish(config.db, spool, inputs.run_id, created)
    except OSError as exc:
        raise DatabaseError(
            f"writing recommendations beside {config.db} failed ({exc}); free space and retry; "
            "the previous recommendations are unchanged"
        ) from None
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)
    return ScoreSummary(
        run_id=inputs.run_id,
        provider=scorer.provider,
        users=len(inputs.users),
        rows=rows,
        seconds=time.perf_counter() - started,
        db=config.db,
    )


def _to_arrow(
    inputs: _Inputs,
    users: np.ndarray,
    items: np.ndarray,
    scores: np.ndarray,
    lo: float,
    hi: float,
) -> pa.Table:
    """One batch's lists as Arrow columns; rows scored -inf (nothing left to offer) dropped."""
    k = items.shape[1]
    valid = np.isfinite(scores)
    user_rows = np.broadcast_to(users[:, None], items.shape)[valid]
    ranks = np.broadcast_to(np.arange(1, k + 1, dtype=np.int32)[None, :], items.shape)[valid]
    flat_scores = scores[valid].astype(np.float64)
    if inputs.objective == "rating":
        predicted = pa.array(np.clip(flat_scores, 0.0, 1.0) * (hi - lo) + lo)
    else:
        # A ranking model's score orders items but is not on the star scale.
        predicted = pa.nulls(len(flat_scores), pa.float64())
    # run_id and created_at are constants, added by the publishing query.
    return pa.table(
        {
            # Dictionary-encoded: indices into the raw-id arrays, no string copied per row.
            "user_id": pa.DictionaryArray.from_arrays(
                pa.array(user_rows, pa.int32()), inputs.user_ids
            ),
            "item_id": pa.DictionaryArray.from_arrays(
                pa.array(items[valid], pa.int32()), inputs.item_ids
            ),
            "rank": pa.array(ranks),
            "score": pa.array(flat_scores),
            "predicted_rating": predicted,
        }
    )


def _publish(path: Path, spool: Path, run_id: str, created: datetime) -> None:
    with pa.memory_map(str(spool)) as source:
        spooled = pa.ipc.open_file(source).read_all()
    con = db.connect(path)
    try:
        con.register("spooled_recommendations", spooled)
        # Row order carries no meaning here (rank is a column), so DuckDB may write in
        # parallel.
        db.run(con, "unordered_inserts")
        # Staging happens inside the transaction too: a failure while copying the spool
        # (disk full, bad file) is rolled back like the swap and reported in one line.
        with db.transaction(con, f"recommendations into {path}"):
            # A staging table left by an older version or a foreign tool is stale: drop it.
            db.run(con, "drop_recommendations_staging")
            db.run(con, "create_recommendations_staging", run_id=run_id, created_at=created)
            db.run(con, "drop_recommendations")
            db.run(con, "publish_recommendations")
    finally:
        con.close()
