"""What `mfbatch train` writes: the run's folder (weights, manifest, model.onnx) and its
rows in `training_runs` / `training_epochs`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mfbatch.artifact.files import export_model, save_model
from mfbatch.config import Config, TrainConfig
from mfbatch.store import db
from mfbatch.store.datasets import Dataset
from mfbatch.store.runs import stored_export_path
from mfbatch.training.loop import USER_SOLVE_EPOCHS, EpochRecord, Outcome
from mfbatch.training.model import MatrixFactorization
from mfbatch.training.tensors import Interactions
from mfbatch.version import __version__

if TYPE_CHECKING:
    import duckdb


@dataclass(frozen=True)
class TrainSummary:
    run_id: str
    device: str
    status: str
    epochs_run: int
    best_epoch: int
    data_seen: str
    n_train: int
    val: dict[str, float | None]
    seconds: float
    examples_per_second: float
    export_path: Path
    top_k: int

    def line(self) -> str:
        figures = ", ".join(
            f"{name} {value:.4f}" for name, value in self.val.items() if value is not None
        )
        return (
            f"trained {self.run_id} on {self.device}: {self.status}, best epoch "
            f"{self.best_epoch}/{self.epochs_run}"
            + (f", val {figures}" if figures else "")
            + f"; {self.n_train:,} rows ({self.data_seen}), "
            f"{self.examples_per_second:,.0f} examples/s, {self.seconds:.1f} s "
            f"-> {self.export_path}"
        )


def save_run(
    model: MatrixFactorization,
    export_path: Path,
    *,
    run_id: str,
    parent: str | None,
    dataset: Dataset,
    settings: TrainConfig,
    outcome: Outcome,
) -> None:
    """Weights and manifest, then model.onnx, into export/<run_id>/ (each written whole)."""
    manifest = save_model(
        model,
        export_path,
        manifest={
            "run_id": run_id,
            "parent_run_id": parent,
            "dataset_sha256": dataset.sha256,
            "data_seen": "train+val" if settings.on == "all" else "train",
            "shape": dataclasses.asdict(model.shape),
            "rating_min": dataset.rating_min,
            "rating_max": dataset.rating_max,
            "objective": settings.objective,
            "best_epoch": outcome.best_epoch,
            "status": outcome.status,
            "mfbatch_version": __version__,
            "torch_version": torch.__version__,
            "created_at": datetime.now(timezone.utc).isoformat(),
        },
    )
    export_model(model, manifest, export_path)


def summarise(
    run_id: str,
    device: torch.device,
    outcome: Outcome,
    settings: TrainConfig,
    data: Interactions,
    seconds: float,
    fit_seconds: float,
    export_path: Path,
) -> TrainSummary:
    solve = USER_SOLVE_EPOCHS if outcome.solved else 0
    examples = len(data) * max(len(outcome.history) + solve, 1)
    best = _best(outcome)
    return TrainSummary(
        run_id=run_id,
        device=device.type,
        status=outcome.status,
        epochs_run=len(outcome.history),
        best_epoch=outcome.best_epoch,
        data_seen="train+val" if settings.on == "all" else "train",
        n_train=len(data),
        val={
            "RMSE": best.metrics.rmse if best and best.metrics else None,
            "MAE": best.metrics.mae if best and best.metrics else None,
            f"Recall@{settings.top_k}": best.metrics.recall if best and best.metrics else None,
            f"NDCG@{settings.top_k}": best.metrics.ndcg if best and best.metrics else None,
        },
        seconds=seconds,
        examples_per_second=examples / fit_seconds,
        export_path=export_path,
        top_k=settings.top_k,
    )


def _best(outcome: Outcome) -> EpochRecord | None:
    """The returned model's validation: the user solve's when it ran, else the best epoch's."""
    if outcome.solved is not None and outcome.solved.metrics is not None:
        return outcome.solved
    return next((r for r in outcome.history if r.epoch == outcome.best_epoch), None)


def record_run(
    con: duckdb.DuckDBPyConnection,
    config: Config,
    settings: TrainConfig,
    summary: TrainSummary,
    outcome: Outcome,
    dataset: Dataset,
    parent: str | None,
    started_at: datetime,
    plan_row: dict[str, str | None],
) -> None:
    """The run's `training_runs` row (with the loss chosen, why, and the validation
    warning: `plan_row`) and its `training_epochs`, in one transaction on `con`."""
    best = _best(outcome)
    metrics = best.metrics if best else None
    history = outcome.history

    def column(values: list[float | None]) -> np.ndarray:
        # Object arrays: None goes in as NULL (DuckDB scans numpy columns directly; no
        # Polars or pandas needed for 80 rows).
        return np.array(values, dtype=object)

    epochs = {
        "run_id": np.array([summary.run_id] * len(history), dtype=object),
        "epoch": np.array([r.epoch for r in history], dtype=np.int64),
        "train_loss": np.array([r.train_loss for r in history], dtype=np.float64),
        "val_rmse": column([r.metrics.rmse if r.metrics else None for r in history]),
        "val_mae": column([r.metrics.mae if r.metrics else None for r in history]),
        "val_recall": column([r.metrics.recall if r.metrics else None for r in history]),
        "val_ndcg": column([r.metrics.ndcg if r.metrics else None for r in history]),
        "seconds": np.array([r.seconds for r in history], dtype=np.float64),
    }
    resolved = config.model_copy(update={"train": settings}).to_dict()
    con.register("staged_epochs", epochs)
    with db.transaction(con, f"training run {summary.run_id} into {config.db}"):
        db.run(con, "create_training_runs")
        db.run(con, "create_training_epochs")
        for query in (
            "add_training_plan_columns",
            "add_training_reason_column",
            "add_training_warning_column",
        ):
            db.run(con, query)
        db.run(
            con,
            "insert_training_run",
            run_id=summary.run_id,
            parent_run_id=parent,
            started_at=started_at,
            finished_at=datetime.now(timezone.utc).replace(tzinfo=None),
            status=outcome.status,
            config=json.dumps(resolved),
            dataset_sha256=dataset.sha256,
            data_seen=summary.data_seen,
            device=summary.device,
            objective=settings.objective,
            epochs_run=summary.epochs_run,
            best_epoch=summary.best_epoch,
            train_loss=best.train_loss if best else None,
            val_rmse=metrics.rmse if metrics else None,
            val_mae=metrics.mae if metrics else None,
            val_recall=metrics.recall if metrics else None,
            val_ndcg=metrics.ndcg if metrics else None,
            top_k=settings.top_k,
            n_train=summary.n_train,
            seconds=summary.seconds,
            examples_per_second=summary.examples_per_second,
            export_path=stored_export_path(summary.export_path, config.db),
        )
        db.run(con, "insert_training_epochs")
        db.run(con, "record_training_plan", run_id=summary.run_id, **plan_row)
    con.unregister("staged_epochs")
