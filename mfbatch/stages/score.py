"""Stage 3, `mfbatch score` (serving): top-K unrated items for every user into DuckDB.

Serves the *serving model*: by default the newest refit on all ratings, else the newest
validated run (the summary says which). Whatever run it serves, no list ever holds an
item the user rated in any split. Users with no rating that run trained on get the most
popular items they have not rated (`source = 'popularity'`), never an untrained vector.

The database is read at the start and written at the end. In between, batches of users
go through the exported graph and their lists are spooled to an Arrow IPC file beside the
database; publishing writes that spool into `recommendation_history` as the next publish
(for `--users`, with everyone else's previous rows) inside one transaction, and the view
`recommendations` shows the newest publish. A crash, Ctrl-C or full disk at any point
leaves the previous lists served exactly as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
from rich.console import Console

from mfbatch import db, workdirs
from mfbatch.config import Config
from mfbatch.errors import ConfigError, DatabaseError, InputDataError
from mfbatch.foldin import fold_in, method_for
from mfbatch.history import export_lists, publish
from mfbatch.inference import Scorer, SeenItems
from mfbatch.lists import ListBatch, ListPlan, build_lists, fitted_counts, to_arrow, with_rating
from mfbatch.progress import Steps
from mfbatch.runs import Dataset, Run, find_run

SPOOL_PREFIX = ".mfbatch-score-"


@dataclass(frozen=True)
class ScoreSummary:
    run_id: str
    data_seen: str
    provider: str
    users: int
    popularity_users: int
    rows: int
    partial: bool
    seconds: float
    db: Path
    publish_id: int
    output: Path | None = None
    folded_users: int = 0
    fold_seconds: float = 0.0
    unscorable_items: int = 0

    def line(self) -> str:
        rate = self.users / self.seconds if self.seconds else 0.0
        kind = "refit on train+val" if self.data_seen == "train+val" else "validated on train"
        cold = (
            f", {self.popularity_users:,} of them from popularity (no rating the run trained on)"
            if self.popularity_users
            else ""
        )
        how = "updated for these users" if self.partial else "replaced"
        folded = (
            f", {self.folded_users:,} folded in (ratings the run has not seen; "
            f"{self.fold_seconds:.2f} s)"
            if self.folded_users
            else ""
        )
        unscorable = (
            f"; {self.unscorable_items:,} items the run can't score left out"
            if self.unscorable_items
            else ""
        )
        return (
            f"scored {self.users:,} users with run {self.run_id} ({kind}) on {self.provider}"
            f"{cold}{folded}: {self.rows:,} recommendations, {rate:,.0f} users/s, "
            f"{self.seconds:.2f} s -> {self.db} (recommendations {how}, publish "
            f"{self.publish_id})" + (f" and {self.output}" if self.output else "") + unscorable
        )


@dataclass(frozen=True)
class ScoreInputs:
    """What both engines score from, read once: the run, the plan, the raw ids, fold-in."""

    run: Run
    dataset: Dataset
    plan: ListPlan
    user_ids: pa.Array
    item_ids: pa.Array
    # Fold-in: the users to solve (ascending user_idx) and all their ratings as CSR.
    fold_users: np.ndarray
    fold_indptr: np.ndarray
    fold_items: np.ndarray
    fold_ratings: np.ndarray
    item_usable: np.ndarray  # bool [model n_items]: items the run trained on
    unscorable_items: int


def _read_ids(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise InputDataError(f"--{what}: {path} does not exist; pass a file with one id per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise InputDataError(
            f"--{what}: {path} line {line} is not UTF-8 text (byte {exc.object[exc.start]:#x}); "
            "save the file as UTF-8 with one id per line"
        ) from None
    ids = [line.strip() for line in text.splitlines()]
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


def load_inputs(config: Config) -> ScoreInputs:
    """Read and check everything a score needs; the database is closed again on return."""
    settings = config.score
    con = db.connect(config.db, read_only=True)
    try:
        dataset = Dataset.load(con, config.db)
        run = find_run(con, config.db, dataset, settings.run_id, role="serve")
        metadata = run.check_model(dataset)
        if settings.top_k > dataset.n_items:
            raise ConfigError(
                f"--top-k: {settings.top_k} is more than the catalogue's {dataset.n_items:,} items"
            )
        # Served lists never hold an item the user rated in any split, whatever run it is.
        seen_pairs = db.arrays(con, "seen_all")
        all_splits = run.data_seen == "train+val"
        if db.table_exists(con, "dataset_versions"):
            version = db.record(con, "run_data_version", run_id=run.run_id)
            assert version is not None  # an aggregate always returns a row
            trained = db.arrays(
                con, "trained_counts_versioned", all_splits=all_splits, version=version["version"]
            )
            fresh = db.arrays(
                con, "fold_in_ratings", all_splits=all_splits, version=version["version"]
            )
        else:  # preprocessed before lineage existed: nothing was appended
            trained = db.arrays(con, "trained_counts", all_splits=all_splits)
            fresh = None
        user_ids = db.arrow(con, "user_ids").column("user_id").combine_chunks()
        item_ids = db.arrow(con, "item_ids").column("item_id").combine_chunks()
    finally:
        con.close()

    users = np.arange(dataset.n_users, dtype=np.int64)
    if settings.users is not None:
        users = _lookup(user_ids, _read_ids(settings.users, "users"), settings.users, "users")
    item_mask = np.zeros(dataset.n_items, dtype=np.float32)
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
    fitted_users, fitted_items = fitted_counts(trained, dataset.n_users, dataset.n_items)
    # The model knows nothing of items it never trained on (or appended after it was
    # trained, beyond its tables): it can't rank them.
    model_users, model_items = int(metadata["n_users"]), int(metadata["n_items"])
    fitted_items[model_items:] = 0
    fitted_users[model_users:] = 0
    item_mask[fitted_items == 0] = -np.inf
    folded = np.full(dataset.n_users, -1, dtype=np.int64)
    fold_users = np.zeros(0, dtype=np.int64)
    fold_indptr = np.zeros(1, dtype=np.int64)
    fold_items = np.zeros(0, dtype=np.int64)
    fold_ratings = np.zeros(0, dtype=np.float32)
    if fresh is not None and len(fresh["user_idx"]):
        wanted = np.zeros(dataset.n_users, dtype=bool)
        wanted[users] = True
        keep = wanted[fresh["user_idx"]]
        fresh = {name: column[keep] for name, column in fresh.items()}
        fold_user_rows = fresh["user_idx"].astype(np.int64)
        fold_users, counts = np.unique(fold_user_rows, return_counts=True)
        fold_indptr = np.concatenate([[0], np.cumsum(counts)])
        fold_items = fresh["item_idx"].astype(np.int64)
        fold_ratings = fresh["rating_norm"].astype(np.float32)
        folded[fold_users] = np.arange(len(fold_users))
    popularity = np.bincount(seen_pairs["item_idx"], minlength=dataset.n_items)
    seen = SeenItems.from_pairs(seen_pairs["user_idx"], seen_pairs["item_idx"], dataset.n_users)
    plan = ListPlan(
        users=users,
        seen=seen,
        item_mask=item_mask,
        cold=(fitted_users == 0) & (folded < 0),
        popularity=popularity,
        k=settings.top_k,
        folded=folded,
    )
    return ScoreInputs(
        run,
        dataset,
        plan,
        user_ids,
        item_ids,
        fold_users,
        fold_indptr,
        fold_items,
        fold_ratings,
        item_usable=fitted_items[:model_items] > 0,
        unscorable_items=int((fitted_items == 0).sum()),
    )


def refuse_empty_lists(empty: list[int], user_ids: pa.Array) -> None:
    """Never publish a user with nothing: every engine checks its lists with this."""
    if empty:
        shown = ", ".join(repr(user_ids[u].as_py()) for u in empty[:5])
        raise ConfigError(
            f"some users would get an empty list (e.g. user {shown}): they rated every "
            "item left after --include-items/--exclude-items; widen the allow list; "
            "nothing was published"
        )


def remove_stale_spools(folder: Path) -> int:
    """Spool folders a killed `score` left beside the database (owner process gone)."""
    return workdirs.remove_stale(folder, SPOOL_PREFIX)


def score(*, config: Config, console: Console | None = None) -> ScoreSummary:
    """Score, spool, then publish `recommendations` in one transaction."""
    started = time.perf_counter()
    settings = config.score
    if settings.engine == "ray":
        # Shards over Ray actors, Parquet parts, then the same publish (mfbatch.engines).
        from mfbatch.engines.ray_score import score_with_ray

        return score_with_ray(config=config, console=console)
    # Publishing needs the write lock: refuse a locked or read-only database before scoring.
    db.check_writable(config.db)
    remove_stale_spools(config.db.parent)
    inputs = load_inputs(config)
    run = inputs.run
    scorer = Scorer(run.model_path, provider=settings.provider, threads=settings.threads)
    for warning in scorer.warnings:
        if console:
            console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if console:
        kind = "refit on train+val" if not run.validated else "validated on train, no refit yet"
        console.print(
            f"serving run {run.run_id} ({kind}) with ONNX Runtime on {scorer.provider}",
            highlight=False,
            soft_wrap=True,
        )
    fold_started = time.perf_counter()
    plan = inputs.plan
    if len(inputs.fold_users):
        # Ratings the run has not seen: a vector solved against its frozen item tables.
        folded_rows = fold_in(
            inputs.fold_indptr,
            inputs.fold_items,
            inputs.fold_ratings,
            scorer.items_aug_t,
            method=method_for(run.objective),
            usable=inputs.item_usable,
        )
        plan = dataclasses.replace(plan, folded_rows=folded_rows)
    fold_seconds = time.perf_counter() - fold_started
    n_items = scorer.n_items
    batch = settings.batch_size or scorer.auto_batch_size(n_items, settings.memory_mb)
    lo, hi = inputs.dataset.rating_min, inputs.dataset.rating_max
    created = datetime.now(timezone.utc).replace(tzinfo=None)

    try:
        spool_dir = workdirs.make(config.db.parent, SPOOL_PREFIX)
    except OSError as exc:
        raise DatabaseError(
            f"could not create the scoring spool beside {config.db} ({exc}); free space or "
            "make the folder writable; the previous recommendations are unchanged"
        ) from None
    spool = spool_dir / "recommendations.arrow"
    popularity_users = 0
    empty: list[int] = []
    spooler = Spooler(
        spool,
        lambda lists: with_rating(
            to_arrow(lists, inputs.user_ids, inputs.item_ids), run.objective, lo, hi
        ),
    )
    try:
        with Steps(console, "score", len(plan.users), "users") as progress:
            for lists in build_lists(scorer, plan, batch):
                empty.extend(lists.empty_users()[: 5 - len(empty)].tolist())
                popularity_users += int((~lists.from_model).sum())
                spooler.put(lists)
                if lists.empty_users().size and len(empty) >= 5:
                    break
                progress.advance(len(lists.users))
        rows = spooler.close()
        if rows is None:
            raise InputDataError("no users to score")
        refuse_empty_lists(empty, inputs.user_ids)
        publish_id = _publish(
            config.db,
            spool,
            run.run_id,
            created,
            partial=settings.users is not None,
            keep=settings.keep_history,
        )
    except OSError as exc:
        raise DatabaseError(
            f"writing recommendations beside {config.db} failed ({exc}); free space and retry; "
            "the previous recommendations are unchanged"
        ) from None
    finally:
        spooler.stop()
        shutil.rmtree(spool_dir, ignore_errors=True)
    written = None
    if settings.output is not None:
        written, _ = export_lists(db_path=config.db, out=settings.output)
    return ScoreSummary(
        run_id=run.run_id,
        data_seen=run.data_seen,
        provider=scorer.provider,
        users=len(inputs.plan.users),
        popularity_users=popularity_users,
        rows=rows,
        partial=settings.users is not None,
        seconds=time.perf_counter() - started,
        db=config.db,
        publish_id=publish_id,
        output=written,
        folded_users=len(inputs.fold_users),
        fold_seconds=fold_seconds,
        unscorable_items=inputs.unscorable_items,
    )


class Spooler:
    """Converts each batch's lists to Arrow and appends them to the spool, on its own thread.

    ONNX Runtime releases the GIL while it scores, so the conversion and the file write of
    one batch run while the next batch scores instead of taking turns with it. Batches are
    written in the order they were put. A failure on the thread (disk full, Ctrl-C delivered
    there, a bug) is raised again in the caller, unchanged, by the next put() or close().
    """

    def __init__(self, path: Path, convert: Callable[[ListBatch], pa.Table]) -> None:
        self._path = path
        self._convert = convert
        # Two in flight at most: the one being written and the one just scored; more
        # would only hold lists in memory while the disk is behind.
        self._queue: queue.Queue[ListBatch | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._rows: int | None = None
        self._thread = threading.Thread(target=self._drain, name="mfbatch-spool", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        writer: pa.ipc.RecordBatchFileWriter | None = None
        rows = 0
        try:
            while (lists := self._queue.get()) is not None and not self._stopping.is_set():
                table = self._convert(lists)
                if writer is None:
                    writer = pa.ipc.new_file(str(self._path), table.schema)
                writer.write_table(table)
                rows += table.num_rows
            if writer is not None:
                writer.close()
                writer = None
                self._rows = rows
        except BaseException as exc:  # re-raised on the caller's thread, whatever it is
            self._error = exc
        finally:
            if writer is not None:
                writer.close()

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, lists: ListBatch | None) -> None:
        while self._thread.is_alive():
            self._check()
            try:
                self._queue.put(lists, timeout=0.05)
                return
            except queue.Full:
                continue
        self._check()

    def close(self) -> int | None:
        """Waits for every batch to be on disk: the rows spooled, None if there were none."""
        self.put(None)
        self._thread.join()
        self._check()
        return self._rows

    def stop(self) -> None:
        """Ends the thread without writing what is still queued (after a failure)."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join()


def _publish(
    path: Path, spool: Path, run_id: str, created: datetime, *, partial: bool, keep: int
) -> int:
    with pa.memory_map(str(spool)) as source:
        spooled = pa.ipc.open_file(source).read_all()
    return publish_lists(path, spooled, run_id, created, partial=partial, keep=keep)


def publish_lists(
    path: Path, lists: object, run_id: str, created: datetime, *, partial: bool, keep: int
) -> int:
    """`lists` (an Arrow table, or a pyarrow dataset of Parquet parts that DuckDB scans)
    into `recommendations` in one transaction; returns the publish id."""
    con = db.connect(path)
    try:
        con.register("spooled_recommendations", lists)
        # Row order carries no meaning here (rank is a column), so DuckDB may write in
        # parallel.
        db.run(con, "unordered_inserts")
        # The copy from the spool is inside the transaction: a failure while writing it
        # (disk full, a truncated part) is rolled back like the rest and reported in one line.
        with db.transaction(con, f"recommendations into {path}"):
            return publish(con, run_id=run_id, created=created, partial=partial, keep=keep)
    finally:
        con.close()
