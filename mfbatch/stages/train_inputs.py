"""What `mfbatch train` reads: the ratings as tensors, and the validation it measures on."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import torch

from mfbatch.config import Config, TrainConfig, load_config
from mfbatch.errors import ConfigError, DatabaseError, ModelError
from mfbatch.store import db
from mfbatch.store.datasets import Dataset
from mfbatch.store.runs import Run, find_run
from mfbatch.training.tensors import Csr, Interactions
from mfbatch.training.validation import Validation

if TYPE_CHECKING:  # tune hands its frames over; train reads numpy columns (no Polars import)
    import polars as pl


@dataclass(frozen=True)
class Ratings:
    """Every rating a run may use, as the columns of `training_ratings` (its row order)."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray  # rating_norm
    ts: np.ndarray  # ts_ms, where `timed`
    timed: np.ndarray  # False where a rating has no timestamp
    is_val: np.ndarray
    weights: np.ndarray

    @classmethod
    def from_columns(cls, columns: Mapping[str, np.ndarray]) -> Ratings:
        """From DuckDB's `fetchnumpy` (a column with NULLs comes as a masked array)."""
        ts = columns["ts_ms"]
        return cls(
            users=np.asarray(columns["user_idx"]),
            items=np.asarray(columns["item_idx"]),
            ratings=np.asarray(columns["rating_norm"]),
            ts=np.ma.getdata(ts),
            timed=~np.ma.getmaskarray(ts),
            is_val=np.asarray(columns["is_val"], dtype=bool),
            weights=np.asarray(columns["weight"]),
        )

    @classmethod
    def from_frame(cls, frame: pl.DataFrame) -> Ratings:
        """From a Polars frame of the same columns (`mfbatch tune`'s inner split)."""
        ts = frame["ts_ms"]
        return cls(
            users=frame["user_idx"].to_numpy(),
            items=frame["item_idx"].to_numpy(),
            ratings=frame["rating_norm"].to_numpy(),
            ts=ts.fill_null(0).to_numpy(),
            timed=ts.is_not_null().to_numpy(),
            is_val=frame["is_val"].to_numpy(),
            weights=frame["weight"].to_numpy(),
        )

    def where(self, keep: np.ndarray) -> Ratings:
        return Ratings(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.users)


@dataclass(frozen=True)
class TrainInputs:
    dataset: Dataset
    ratings: Ratings  # every rating the run may use
    settings: TrainConfig  # a refit's are its validated run's
    parent: str | None  # a refit's validated run
    epochs: int | None  # a refit's epoch count (its validated run's best)
    tuned: str = ""  # a word on the `mfbatch tune` settings applied, for the first line


def read_inputs(config: Config) -> TrainInputs:
    """The dataset and its ratings; for a refit, the validated run's settings and epochs."""
    settings = config.train
    con = db.connect(config.db, read_only=True)
    try:
        dataset = Dataset.load(con, config.db)
        # Numpy columns, not a Polars frame: importing Polars alone took ~0.15-0.35 s.
        ratings = Ratings.from_columns(
            db.arrays(con, "training_ratings", all_splits=settings.on == "all")
        )
        if settings.on != "all":
            settings, tuned = _tuned(con, settings, dataset)
            return TrainInputs(dataset, ratings, settings, None, None, tuned)
        validated = find_run(con, config.db, dataset, role="measure")
    finally:
        con.close()
    settings = _refit_config(validated, settings)
    return TrainInputs(dataset, ratings, settings, validated.run_id, max(validated.best_epoch, 1))


def _tuned(
    con: duckdb.DuckDBPyConnection, settings: TrainConfig, dataset: Dataset
) -> tuple[TrainConfig, str]:
    """`mfbatch tune`'s chosen settings (the newest study, same objective and data), laid
    under the fields the flags and the config file set."""
    if not db.table_exists(con, "tuned_settings"):
        return settings, ""
    row = db.record(con, "latest_tuned_settings")
    if row is None or row["objective"] != settings.objective:
        return settings, ""
    if row["dataset_sha256"] != dataset.sha256:
        return settings, f", tuned settings of study {row['study']!r} ignored (other data)"
    tuned = {k: v for k, v in json.loads(row["settings"]).items() if k not in settings._given}
    if not tuned:
        return settings, ""
    shown = " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in tuned.items()
    )
    return settings.replace(**tuned), (
        f", tuned settings of study {row['study']!r} ({shown}; flags override them)"
    )


def _tensor(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # A copy: Arrow-backed arrays are read-only, and torch wants to own its memory.
    tensor = torch.tensor(array, dtype=dtype)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _refit_config(run: Run, config: TrainConfig) -> TrainConfig:
    """The validated run's own settings, so the refit differs from it only in its data."""
    values = {k: v for k, v in run.config["train"].items() if k in TrainConfig.model_fields}
    # Runs recorded before --recency-half-life / --user-half-life existed trained without.
    values.setdefault("recency_half_life", 0.0)
    values.setdefault("user_half_life", 0.0)
    values.update(on="all", device=config.device, export_dir=config.export_dir, nproc=config.nproc)
    try:
        return load_config(overrides={"train": values}).train
    except ConfigError as exc:
        # The stored settings, not the user's flags: say which run they came from.
        raise ModelError(
            f"the validated run {run.run_id} was trained with settings this version no "
            f"longer takes ({exc}); train a new validated run, then refit"
        ) from None


def interactions(
    inputs: TrainInputs, device: torch.device, db_path: object
) -> tuple[Interactions, Validation | None]:
    """The ratings to fit as tensors on `device`, and the validation split (train runs)."""
    ratings, settings = inputs.ratings, inputs.settings
    fit = ratings if settings.on == "all" else ratings.where(~ratings.is_val)
    if len(fit) == 0:
        raise DatabaseError(f"{db_path}: the ratings table has no train rows; run preprocess")
    if settings.on == "train" and not ratings.is_val.any():
        raise DatabaseError(
            f"{db_path}: the val split is empty, so nothing can be validated; "
            "preprocess with --val-fraction > 0, or refit with --on all"
        )
    data = Interactions(
        users=_tensor(fit.users, device, torch.int64),
        items=_tensor(fit.items, device, torch.int64),
        ratings=_tensor(fit.ratings, device, torch.float32),
        # Without a time for every rating there is no order to weight by recency.
        ts=_tensor(fit.ts, device, torch.int64) if fit.timed.all() else None,
        # All ones is no weighting: left out, the losses take their unweighted path.
        weights=None
        if bool((fit.weights == 1.0).all())
        else _tensor(fit.weights, device, torch.float32),
    )
    val = None
    if settings.on == "train":
        val = _validation(ratings.where(ratings.is_val), data, settings, device, inputs.dataset)
    return data, val


def _validation(
    held: Ratings,
    data: Interactions,
    settings: TrainConfig,
    device: torch.device,
    dataset: Dataset,
) -> Validation:
    pairs = Interactions(
        users=_tensor(held.users, device, torch.int64),
        items=_tensor(held.items, device, torch.int64),
        ratings=_tensor(held.ratings, device, torch.float32),
    )
    popular, untrained = Validation.serving_rules(data.items, dataset.n_items)
    n_users = dataset.n_users
    candidates = np.unique(held.users)
    if candidates.size > settings.eval_users:
        rng = np.random.default_rng(settings.seed)
        candidates = np.sort(rng.choice(candidates, settings.eval_users, replace=False))
    return Validation(
        pairs=pairs,
        train_items=Csr.build(data.users, data.items, n_users),
        val_items=Csr.build(pairs.users, pairs.items, n_users),
        rank_users=_tensor(candidates, device, torch.int64),
        rating_min=dataset.rating_min,
        rating_max=dataset.rating_max,
        popular=popular,
        untrained_items=untrained,
        explicit=dataset.feedback == "explicit",
    )
