"""The options of each stage, declared once: type, default and documentation per field.

`description` is the help text the CLI shows; `json_schema_extra` says how the field
appears on the command line (`flag`, or `cli: False` for TOML/API-only settings).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from mfbatch.config.base import Options, PathValue, check_threads, machine_cores
from mfbatch.errors import ConfigError

SplitKind = Literal["time", "user-time", "random", "given"]
WeightTransform = Literal["none", "log1p"]
DataType = Literal["movielens", "csv", "parquet", "synthetic"]

MOVIELENS_RELEASES = (
    "ml-100k",
    "ml-1m",
    "ml-10m",
    "ml-20m",
    "ml-25m",
    "ml-32m",
    "ml-latest",
    "ml-latest-small",
)
GENERIC_DATASETS = ("csv", "parquet", "synthetic")
# The least `--memory-mb` preprocess takes: the interpreter, Polars, DuckDB and the
# streaming pass hold about 0.3-0.45 GB before any bucket of ratings (docs/scaling.md).
MIN_MEMORY_MB = 512


def cli(flag: str | None = None, *, show: bool = True) -> dict[str, Any]:
    """How a field appears on the command line: its flag (default --field-name)."""
    return {"flag": flag, "cli": show}


def _ray_address_ok(address: str) -> bool:
    """'auto', HOST:PORT or ray://HOST:PORT (the forms `ray.init(address=...)` takes)."""
    if address == "auto":
        return True
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def dataset_type(dataset: str) -> DataType:
    """The loader key (`data.type`) for a `--dataset` name."""
    if dataset in MOVIELENS_RELEASES:
        return "movielens"
    if dataset in GENERIC_DATASETS:
        return dataset  # type: ignore[return-value]
    known = ", ".join((*MOVIELENS_RELEASES, *GENERIC_DATASETS))
    raise ConfigError(f"--dataset: unknown dataset {dataset!r}; choose one of {known}")


class DataConfig(Options):
    """Where ratings come from and how to read them."""

    dataset: str = Field(
        "ml-1m",
        description="ml-100k, ml-1m, ml-10m, ml-20m, ml-25m, ml-latest[-small], csv, "
        "parquet or synthetic.",
    )
    source: PathValue | None = Field(
        None,
        description="Local zip, folder or file to read. Without it, MovieLens releases are "
        "downloaded into the cache and checksum-verified.",
    )
    user_col: str = Field("user_id", description="csv/parquet: user id column.")
    item_col: str = Field("item_id", description="csv/parquet: item id column.")
    rating_col: str | None = Field(
        "rating",
        description="csv/parquet: rating column; '' for none (implicit feedback: each row is "
        "one positive interaction). Left at its default and absent from the file: implicit.",
    )
    time_col: str | None = Field(
        "timestamp", description="csv/parquet: timestamp column; '' for none (random split only)."
    )
    weight_col: str | None = Field(
        None,
        description="csv/parquet: a per-interaction weight column (play counts, quantities), "
        "numbers >= 0; without it every interaction weighs 1.",
    )
    weight_transform: WeightTransform = Field(
        "log1p",
        description="How a weight enters the loss: log1p (log2(1 + w), so 1 stays 1 and "
        "1,000 plays weigh ~10) or none (w as is). Implicit duplicates add up first.",
    )
    separator: str = Field(",", description="csv: field separator.")
    rating_min: float | None = Field(None, description="Lowest possible rating (else inferred).")
    rating_max: float | None = Field(None, description="Highest possible rating (else inferred).")
    users: int = Field(1_000, description="synthetic: number of users.")
    items: int = Field(500, description="synthetic: number of items.")
    ratings_per_user: float = Field(50.0, description="synthetic: mean ratings per user.")
    seed: int = Field(
        0, description="synthetic: generator seed.", json_schema_extra=cli("--data-seed")
    )
    cache_dir: PathValue | None = Field(
        None, description="Where downloads are kept (default ~/.cache/mfbatch)."
    )

    @property
    def type(self) -> DataType:
        return dataset_type(self.dataset)

    @classmethod
    def derive(cls, values: dict[str, Any]) -> dict[str, Any]:
        for key in ("time_col", "rating_col", "weight_col"):
            if values.get(key) == "":  # '' on the command line or in TOML: no such column
                values[key] = None
        return values

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        dataset_type(self.dataset)
        if len(self.separator) != 1:
            raise ConfigError(f"--separator: must be a single character, got {self.separator!r}")
        if self.users < 1 or self.items < 1:
            raise ConfigError("--users/--items: must be at least 1")
        if not 0 < self.ratings_per_user <= self.items:
            raise ConfigError(
                f"--ratings-per-user: must be in (0, items={self.items}], "
                f"got {self.ratings_per_user}"
            )
        _check_scale(self.rating_min, self.rating_max)
        return self


def _check_scale(lo: float | None, hi: float | None) -> None:
    for flag, bound in (("--rating-min", lo), ("--rating-max", hi)):
        if bound is not None and not math.isfinite(bound):
            raise ConfigError(f"{flag}: must be a finite number, got {bound}")
    if lo is not None and hi is not None and not math.isfinite(hi - lo):
        raise ConfigError(
            f"--rating-min/--rating-max: the scale [{lo}, {hi}] is too wide (max - min "
            "overflows); use the real rating scale"
        )
    if (lo is None) != (hi is None):
        raise ConfigError("--rating-min/--rating-max: give both or neither")
    if lo is not None and hi is not None and lo >= hi:
        raise ConfigError(f"--rating-min ({lo}) must be below --rating-max ({hi})")


class SplitConfig(Options):
    """How ratings are divided into train and validation."""

    kind: SplitKind = Field(
        "user-time",
        description="user-time (each user's newest), time (global cutoff), random, or given "
        "(a column of the source says train or test: --split-col).",
        json_schema_extra=cli("--split"),
    )
    split_col: str | None = Field(
        None,
        description="--split given: the column whose values are train or test (val: test).",
    )
    val_fraction: float = Field(0.1, description="Share of ratings held out for validation.")
    seed: int = Field(0, description="Seed of the random split.")

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(
                f"--val-fraction: must be strictly between 0 and 1, got {self.val_fraction}"
            )
        if self.kind == "given" and not self.split_col:
            raise ConfigError("--split given: name the column that holds it with --split-col")
        if self.kind != "given" and self.split_col:
            raise ConfigError(f"--split-col: only with --split given (not --split {self.kind})")
        return self


class PreprocessConfig(Options):
    """How `mfbatch preprocess` runs, and the item metadata it stores beside the ratings
    (which never changes the dataset's identity: models do not read it)."""

    memory_mb: int | None = Field(
        None,
        description=f"Parquet sources: preprocess out of core within about this many MB (at "
        f"least {MIN_MEMORY_MB}) instead of holding every rating in memory; the same tables.",
    )
    items_source: PathValue | None = Field(
        None,
        description="Item metadata: a CSV or Parquet file, one row per item, an id column and "
        "any others (title, genres, attributes), stored in items for recommend and score "
        "--where / --exclude-where. With --append: updates the stored metadata.",
    )
    items_id_col: str | None = Field(
        None,
        description="--items-source: its item id column (default: the --item-col name, "
        "else item_id, else id; with --append, the one used before).",
    )
    items_separator: str | None = Field(
        None, description="--items-source CSV: field separator (default ',', tab for .tsv)."
    )

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        if self.items_source is None:
            for flag, value in (
                ("--items-id-col", self.items_id_col),
                ("--items-separator", self.items_separator),
            ):
                if value is not None:
                    raise ConfigError(f"{flag}: only with --items-source FILE")
        if self.items_separator is not None and len(self.items_separator) != 1:
            raise ConfigError(
                f"--items-separator: must be a single character, got {self.items_separator!r}"
            )
        if self.items_id_col is not None and not self.items_id_col.strip():
            raise ConfigError("--items-id-col: name the column (it can't be empty)")
        if self.memory_mb is not None and self.memory_mb < MIN_MEMORY_MB:
            raise ConfigError(
                f"--memory-mb: at least {MIN_MEMORY_MB} (the streaming pass and the "
                f"libraries alone need about that), got {self.memory_mb!r}"
            )
        return self


Provider = Literal["auto", "cuda", "cpu"]
Engine = Literal["default", "ray"]


def _positive(flag: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{flag}: must be a whole number >= 1, got {value!r}")


class ScoreConfig(Options):
    """What `mfbatch score` computes and how it runs."""

    run_id: str = Field(
        "latest", description="Run to serve: an id, or 'latest' (the newest refit, else validated)."
    )
    top_k: int = Field(20, description="Items per user.")
    batch_size: int | None = Field(
        None, description="Users per batch (default: sized from --memory-mb)."
    )
    memory_mb: int = Field(512, description="Memory budget for one batch.")
    provider: Provider = Field("auto", description="auto (CUDA when present), cuda or cpu.")
    threads: int | None = Field(None, description="ONNX Runtime threads (default: all cores).")
    users: PathValue | None = Field(
        None, description="File of user ids (one per line): update only their lists."
    )
    include_items: PathValue | None = Field(
        None, description="File of item ids: recommend only these."
    )
    exclude_items: PathValue | None = Field(
        None, description="File of item ids: never recommend these."
    )
    where: str | None = Field(
        None,
        description="Recommend only items this SQL predicate on the items table holds for, "
        "e.g. \"genres LIKE '%Comedy%'\" (one expression; columns of items, --items-source "
        "attributes included; NULL counts as false).",
    )
    exclude_where: str | None = Field(
        None,
        description="Never recommend items this SQL predicate on the items table holds for, "
        'e.g. "explicit" or "year < 1990" (NULL counts as false: such items stay).',
    )
    keep_history: int = Field(7, description="Publishes kept in recommendation_history.")
    output: PathValue | None = Field(
        None, description="Also write the lists to a .parquet/.csv file or a Parquet folder."
    )
    engine: Engine = Field(
        "default", description="default (this process) or ray (user shards over Ray actors)."
    )
    ray_address: str | None = Field(
        None, description="ray: 'auto' or host:port of a cluster (default: a local Ray)."
    )
    workers: int | None = Field(
        None, description="ray: scoring actors (default 2), one ONNX session each."
    )
    gpus_per_worker: float | None = Field(
        None, description="ray: GPUs per actor (default 0); CUDA provider when > 0."
    )
    parts_dir: PathValue | None = Field(
        None, description="ray: keep the Parquet parts (one per shard) here."
    )
    publish: bool = Field(
        True,
        description="ray: publish into DuckDB, or (--no-publish) leave the Parquet parts as "
        "the output.",
        json_schema_extra=cli("--publish/--no-publish"),
    )

    def _check_ray_bounds(self) -> None:
        """A local Ray runs every actor on this machine: no more actors than cores (each is
        a process with its own ONNX session; 126 on 2 cores hung). A cluster's size is
        checked when Ray is reached (mfbatch.serving.ray_engine)."""
        if self.ray_address is None and self.workers is not None:
            most = max(2, machine_cores())
            if self.workers > most:
                raise ConfigError(
                    f"--workers: {self.workers} actors on this machine's {machine_cores()} "
                    f"cores; pass at most {most}, or --ray-address of a cluster"
                )
        if self.ray_address is not None and not _ray_address_ok(self.ray_address):
            raise ConfigError(
                f"--ray-address: {self.ray_address!r} is not 'auto', HOST:PORT or ray://HOST:PORT"
            )

    @model_validator(mode="after")
    def _check(self) -> ScoreConfig:
        if self.engine != "ray":
            given = {
                "--ray-address": self.ray_address is not None,
                "--workers": self.workers is not None,
                "--gpus-per-worker": self.gpus_per_worker is not None,
                "--parts-dir": self.parts_dir is not None,
                "--no-publish": not self.publish,
            }
            for flag, present in given.items():
                if present:
                    raise ConfigError(f"{flag}: only with --engine ray")
        if self.workers is not None and not 1 <= self.workers <= 4096:
            raise ConfigError(
                f"--workers: must be a whole number in [1, 4096], got {self.workers!r}"
            )
        self._check_ray_bounds()
        if self.gpus_per_worker is not None and not (
            math.isfinite(self.gpus_per_worker) and 0.0 <= self.gpus_per_worker <= 16.0
        ):
            raise ConfigError(f"--gpus-per-worker: must be in [0, 16], got {self.gpus_per_worker}")
        if not self.publish and self.parts_dir is None:
            raise ConfigError(
                "--no-publish: the Parquet parts would be thrown away; pass --parts-dir too"
            )
        _positive("--keep-history", self.keep_history)
        _positive("--top-k", self.top_k)
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size: must be >= 1 (or auto), got {self.batch_size}")
        if self.memory_mb < 16:
            raise ConfigError(f"--memory-mb: at least 16, got {self.memory_mb}")
        check_threads("--threads", self.threads)
        return self


class EvaluateConfig(Options):
    """What `mfbatch evaluate` measures: the validated run's own top-K lists."""

    run_id: str = Field(
        "latest", description="Validated run to measure: an id or 'latest' (newest validated)."
    )
    top_k: int = Field(20, description="K of the lists and metrics.")
    min_rating: float | None = Field(
        None, description="Count only validation ratings >= this (stars) as relevant."
    )
    provider: Provider = Field("auto", description="auto (CUDA when present), cuda or cpu.")
    threads: int | None = Field(None, description="ONNX Runtime threads (default: all cores).")
    memory_mb: int = Field(
        512, description="Memory budget for one batch.", json_schema_extra=cli(show=False)
    )

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        _positive("--top-k", self.top_k)
        if self.min_rating is not None and not math.isfinite(self.min_rating):
            raise ConfigError(
                f"--min-rating: must be a finite number of stars, got {self.min_rating}"
            )
        check_threads("--threads", self.threads)
        return self


__all__ = [
    "GENERIC_DATASETS",
    "MIN_MEMORY_MB",
    "MOVIELENS_RELEASES",
    "DataConfig",
    "EvaluateConfig",
    "PreprocessConfig",
    "ScoreConfig",
    "SplitConfig",
    "cli",
    "dataset_type",
    "machine_cores",
]
