"""What `mfbatch score` reads before it scores: the run, the plan, the raw ids, fold-in.

The database is opened once (read-only, or for writing when the score will publish: the
write lock is checked then) and closed again before any scoring; every check
that can fail on the inputs (a stale model, an unknown id in a file, K above the catalogue)
fails here, before work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from mfbatch.artifact.files import check_model
from mfbatch.errors import ConfigError, InputDataError
from mfbatch.serving.csr import SeenItems, counts
from mfbatch.serving.engines import FoldIn
from mfbatch.serving.foldin import fold_in_half_life, fold_in_prior, recency_weights
from mfbatch.serving.lists import ListPlan, fitted_counts_less
from mfbatch.store import db
from mfbatch.store.datasets import Dataset
from mfbatch.store.history import open_for_publish
from mfbatch.store.runs import Run, find_run

if TYPE_CHECKING:  # annotations only: scoring does not import pydantic
    from mfbatch.config import Config, ScoreConfig


@dataclass(frozen=True)
class ScoreInputs:
    run: Run
    dataset: Dataset
    plan: ListPlan
    user_ids: pa.Array
    item_ids: pa.Array
    fold: FoldIn
    unscorable_items: int
    warnings: tuple[str, ...] = ()  # what score says before it works (not fatal)


@dataclass(frozen=True)
class _Stored:
    """The rows a score reads from the database, as numpy/Arrow columns."""

    dataset: Dataset
    run: Run
    metadata: dict[str, Any]
    seen: dict[str, np.ndarray]  # every (user, item) rated in any split
    untrained: dict[str, np.ndarray]  # (user, item) rows of `seen` the run was not fitted on
    fresh: dict[str, np.ndarray]  # ratings the run has not seen (appended since)
    user_ids: pa.Array
    item_ids: pa.Array
    allowed: np.ndarray | None = None  # item_idx the attribute filters keep (None: none)
    notes: tuple[str, ...] = ()  # warnings found while reading


def _matching(items: Any, predicate: str, flag: str) -> np.ndarray:
    """The item_idx of the items `predicate` holds for (NULL counts as false). Polars
    parses it as one SQL expression over the items table's columns: no statement, no
    subquery into other tables, nothing to inject."""
    import polars as pl

    try:
        chosen = items.filter(pl.sql_expr(predicate))
    except Exception as exc:  # Polars' SQL and column errors have no common base
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        names = ", ".join(items.columns[:30]) + (", ..." if len(items.columns) > 30 else "")
        raise ConfigError(
            f"{flag} {predicate!r}: {reason}; write one SQL condition on the items "
            f"columns ({names})"
        ) from None
    return np.asarray(chosen["item_idx"].to_numpy(), dtype=np.int64)


def _attribute_filter(con: Any, settings: ScoreConfig, warnings: list[str]) -> np.ndarray | None:
    """The item_idx --where holds for less those --exclude-where holds for (None: neither
    given); refused when it leaves no item, before any scoring."""
    if settings.where is None and settings.exclude_where is None:
        return None
    import polars as pl

    items = pl.from_arrow(db.arrow(con, "items_table"))
    assert isinstance(items, pl.DataFrame)
    allowed = np.asarray(items["item_idx"].to_numpy(), dtype=np.int64)
    if settings.where is not None:
        allowed = _matching(items, settings.where, "--where")
        if len(allowed) == 0:
            raise ConfigError(
                f"--where {settings.where!r}: no item matches; nothing would be listed"
            )
    if settings.exclude_where is not None:
        excluded = _matching(items, settings.exclude_where, "--exclude-where")
        if len(excluded) == 0:
            warnings.append(
                f"--exclude-where {settings.exclude_where!r}: no item matches; none excluded"
            )
        allowed = np.setdiff1d(allowed, excluded)
        if len(allowed) == 0:
            given = "--where and --exclude-where" if settings.where else "--exclude-where"
            raise ConfigError(
                f"{given}: {len(excluded):,} of {items.height:,} items excluded leaves none "
                "to recommend; loosen the predicate"
            )
    return allowed


def read_ids(path: Path, what: str) -> list[str]:
    """A file of ids, one per line (blank lines and # comments skipped)."""
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


def _lookup(
    known: pa.Array, path: Path, what: str, warnings: list[str] | None = None
) -> np.ndarray:
    """The indices of the ids in `path`. An unknown id is an error, except where `warnings`
    is given (a deny list: an item gone from the catalogue must not stop the nightly run)."""
    wanted = read_ids(path, what)
    index = {value: i for i, value in enumerate(known.to_pylist())}
    missing = [w for w in wanted if w not in index]
    if missing and warnings is not None:
        shown = ", ".join(repr(m) for m in missing[:5])
        warnings.append(
            f"--{what}: {path} names {len(missing):,} id(s) not in the database (e.g. "
            f"{shown}); they were skipped, the other {len(wanted) - len(missing):,} excluded"
        )
        wanted = [w for w in wanted if w in index]
    elif missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise InputDataError(
            f"--{what}: {path} names {len(missing):,} id(s) not in the database "
            f"(e.g. {shown}); use raw ids from the {'users' if what == 'users' else 'items'} table"
        )
    return np.unique(np.array([index[w] for w in wanted], dtype=np.int64))


def _read(config: Config, writable: bool) -> _Stored:
    settings = config.score
    con = open_for_publish(config.db) if writable else db.connect(config.db, read_only=True)
    try:
        dataset = Dataset.load(con, config.db)
        run = find_run(con, config.db, dataset, settings.run_id, role="serve")
        metadata = check_model(run, dataset)
        if settings.top_k > dataset.n_items:
            raise ConfigError(
                f"--top-k: {settings.top_k} is more than the catalogue's {dataset.n_items:,} items"
            )
        all_splits = run.data_seen == "train+val"
        version = db.record(con, "run_data_version", run_id=run.run_id)
        assert version is not None  # an aggregate always returns a row
        notes: list[str] = []
        return _Stored(
            dataset=dataset,
            run=run,
            metadata=metadata,
            seen=db.arrays(con, "seen_all"),
            untrained=db.arrays(
                con, "untrained_versioned", all_splits=all_splits, version=version["version"]
            ),
            fresh=_fresh(con, all_splits, version["version"]),
            user_ids=db.arrow(con, "user_ids").column("user_id").combine_chunks(),
            allowed=_attribute_filter(con, settings, notes),
            notes=tuple(notes),
            item_ids=db.arrow(con, "item_ids").column("item_id").combine_chunks(),
        )
    finally:
        con.close()


def _fresh(con: Any, all_splits: bool, version: int) -> dict[str, np.ndarray]:
    """The fold-in users' ratings, with the per-interaction weight where ratings has one."""
    fresh = db.arrays(con, "fold_in_ratings", all_splits=all_splits, version=version)
    columns = {c[0] for c in con.execute("DESCRIBE ratings").fetchall()}
    if "weight" in columns:
        weights = db.arrays(con, "fold_in_weights", all_splits=all_splits, version=version)
        fresh["weight"] = np.asarray(weights["weight"], dtype=np.float64)
    return fresh


def _fold_weights(
    fresh: dict[str, np.ndarray], settings: dict[str, Any], half_life: float
) -> np.ndarray | None:
    """Per fold-in rating, a weight as the run weighed its users' ratings: recency weights
    at `half_life` over each user's ratings (softmax objectives, every rating timed) times
    the weight column."""
    weights = None
    ts = fresh.get("ts_ms")
    # As in training: without a time for every rating there is no order to weigh by.
    timed = ts is not None and len(ts) > 0 and not np.ma.is_masked(ts)
    if half_life > 0 and settings.get("objective") != "rating" and timed:
        weights = recency_weights(fresh["user_idx"], np.asarray(ts, np.int64), half_life)
    if "weight" in fresh:
        given = np.nan_to_num(fresh["weight"], nan=1.0).astype(np.float32)
        weights = given if weights is None else weights * given
    return weights


def _item_mask(
    settings: ScoreConfig, item_ids: pa.Array, n_items: int, warnings: list[str]
) -> np.ndarray:
    """0 for an item that may be recommended, -inf for one that may not (allow/deny files)."""
    mask = np.zeros(n_items, dtype=np.float32)
    if settings.include_items is not None:
        mask[:] = -np.inf
        mask[_lookup(item_ids, settings.include_items, "include-items")] = 0.0
    if settings.exclude_items is not None:
        excluded = _lookup(item_ids, settings.exclude_items, "exclude-items", warnings)
        mask[excluded] = -np.inf
    return mask


def _filters(settings: ScoreConfig) -> str:
    flags = ("--where", "--exclude-where", "--include-items", "--exclude-items")
    values = (settings.where, settings.exclude_where, settings.include_items,
              settings.exclude_items)  # fmt: skip
    return "/".join(f for f, v in zip(flags, values, strict=True) if v is not None)


def _fold_in(
    fresh: dict[str, np.ndarray],
    users: np.ndarray,
    n_users: int,
    weights: np.ndarray | None,
    prior: np.ndarray | None,
) -> FoldIn:
    """The unseen ratings of the users being scored, grouped by user (CSR)."""
    wanted = np.zeros(n_users, dtype=bool)
    wanted[users] = True
    keep = wanted[fresh["user_idx"]]
    # The query returns them by user: row r of the CSR is the r-th user to fold in.
    fold_users, rows = np.unique(fresh["user_idx"][keep].astype(np.int64), return_inverse=True)
    return FoldIn(
        users=fold_users,
        rated=SeenItems.from_sorted(rows, fresh["item_idx"][keep], len(fold_users)),
        ratings=fresh["rating_norm"][keep].astype(np.float32),
        item_usable=np.zeros(0, dtype=bool),
        weights=None if weights is None else weights[keep],
        prior_weights=None if prior is None else prior[keep],
    )


def load_inputs(config: Config, *, writable: bool = False) -> ScoreInputs:
    """Read and check everything a score needs; the database is closed again on return.

    `writable`: read through a write connection, refusing first a database the lists
    can't be published to (`open_for_publish`).
    """
    settings = config.score
    stored = _read(config, writable)
    dataset = stored.dataset
    users = np.arange(dataset.n_users, dtype=np.int64)
    if settings.users is not None:
        users = _lookup(stored.user_ids, settings.users, "users")
    warnings = list(stored.notes)
    item_mask = _item_mask(settings, stored.item_ids, dataset.n_items, warnings)
    if stored.allowed is not None:
        kept = np.full_like(item_mask, -np.inf)
        kept[stored.allowed] = item_mask[stored.allowed]
        item_mask = kept
    seen = SeenItems.from_pairs(stored.seen["user_idx"], stored.seen["item_idx"], dataset.n_users)
    popularity = counts(stored.seen["item_idx"], dataset.n_items)
    fitted_users, fitted_items = fitted_counts_less(
        seen, popularity, stored.untrained, dataset.n_users, dataset.n_items
    )
    # The model knows nothing of items it never trained on (or appended after it was
    # trained, beyond its tables): it can't rank them.
    model_users, model_items = int(stored.metadata["n_users"]), int(stored.metadata["n_items"])
    fitted_items[model_items:] = 0
    fitted_users[model_users:] = 0
    item_mask[fitted_items == 0] = -np.inf
    if stored.allowed is not None and not np.isfinite(item_mask).any():
        raise ConfigError(
            f"{_filters(settings)}: of the {len(stored.allowed):,} item(s) the attribute "
            "filter keeps, none is left (excluded, or unknown to the run); nothing would be "
            "listed"
        )
    recorded = stored.run.config.get("train", {})
    half_life = fold_in_half_life(recorded)
    weights = _fold_weights(stored.fresh, recorded, half_life)
    l2, prior_half_life = fold_in_prior(recorded)
    prior = None
    if l2 is not None:  # the same weights unless calibration moved fold-in's half-life
        same = prior_half_life == half_life
        prior = weights if same else _fold_weights(stored.fresh, recorded, prior_half_life)
    fold = _fold_in(stored.fresh, users, dataset.n_users, weights, prior)
    fold = dataclasses.replace(
        fold,
        item_usable=fitted_items[:model_items] > 0,
        temperature=float(recorded.get("temperature") or 1.0),
        frequency_l2=l2,
    )
    folded = np.full(dataset.n_users, -1, dtype=np.int64)
    folded[fold.users] = np.arange(len(fold.users))
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
        run=stored.run,
        dataset=dataset,
        plan=plan,
        user_ids=stored.user_ids,
        item_ids=stored.item_ids,
        fold=fold,
        unscorable_items=int((fitted_items == 0).sum()),
        warnings=tuple(warnings),
    )
