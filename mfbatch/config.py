"""Typed configuration, built once per command.

Each stage has a frozen dataclass. `load_config` reads an optional TOML file
(`[data]`, `[split]`, `[preprocess]`, `[train]`, `[score]` tables and a top-level `db`),
applies the CLI's overrides on top, validates, and returns one `Config`. Nothing
downstream sees a dict.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

from mfbatch.errors import ConfigError

SplitKind = Literal["time", "user-time", "random"]
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


def dataset_type(dataset: str) -> DataType:
    """The loader key (`data.type`) for a `--dataset` name."""
    if dataset in MOVIELENS_RELEASES:
        return "movielens"
    if dataset in GENERIC_DATASETS:
        return dataset  # type: ignore[return-value]
    known = ", ".join((*MOVIELENS_RELEASES, *GENERIC_DATASETS))
    raise ConfigError(f"--dataset: unknown dataset {dataset!r}; choose one of {known}")


@dataclass(frozen=True)
class DataConfig:
    """Where ratings come from and how to read them."""

    dataset: str = "ml-1m"
    source: Path | None = None
    # Generic CSV/Parquet column mapping.
    user_col: str = "user_id"
    item_col: str = "item_id"
    rating_col: str = "rating"
    time_col: str | None = "timestamp"
    separator: str = ","
    # Rating scale; inferred from the data (or known for MovieLens) when unset.
    rating_min: float | None = None
    rating_max: float | None = None
    # Synthetic generator.
    users: int = 1_000
    items: int = 500
    ratings_per_user: float = 50.0
    seed: int = 0
    cache_dir: Path | None = None

    @property
    def type(self) -> DataType:
        return dataset_type(self.dataset)

    def __post_init__(self) -> None:
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
        for flag, bound in (("--rating-min", self.rating_min), ("--rating-max", self.rating_max)):
            if bound is not None and not math.isfinite(bound):
                raise ConfigError(f"{flag}: must be a finite number, got {bound}")
        if (
            self.rating_min is not None
            and self.rating_max is not None
            and not math.isfinite(self.rating_max - self.rating_min)
        ):
            raise ConfigError(
                f"--rating-min/--rating-max: the scale [{self.rating_min}, {self.rating_max}] "
                "is too wide (max - min overflows); use the real rating scale"
            )
        if (self.rating_min is None) != (self.rating_max is None):
            raise ConfigError("--rating-min/--rating-max: give both or neither")
        if (
            self.rating_min is not None
            and self.rating_max is not None
            and self.rating_min >= self.rating_max
        ):
            raise ConfigError(
                f"--rating-min ({self.rating_min}) must be below --rating-max ({self.rating_max})"
            )


@dataclass(frozen=True)
class SplitConfig:
    """How ratings are divided into train and validation."""

    kind: SplitKind = "time"
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in get_args(SplitKind):
            raise ConfigError(
                f"--split: unknown split {self.kind!r}; choose time, user-time or random"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(
                f"--val-fraction: must be strictly between 0 and 1, got {self.val_fraction}"
            )


# The least `--memory-mb` preprocess takes: the interpreter, Polars, DuckDB and the
# streaming pass hold about 0.3-0.45 GB before any bucket of ratings (README, "Measured").
MIN_MEMORY_MB = 512


@dataclass(frozen=True)
class PreprocessConfig:
    """How `mfbatch preprocess` runs (not what it writes: both ways give the same tables)."""

    # None: every rating in memory. A number: out of core within about that many MB
    # (mfbatch.data.outofcore; Parquet sources only).
    memory_mb: int | None = None

    def __post_init__(self) -> None:
        if self.memory_mb is not None and (
            isinstance(self.memory_mb, bool) or self.memory_mb < MIN_MEMORY_MB
        ):
            raise ConfigError(
                f"--memory-mb: at least {MIN_MEMORY_MB} (the streaming pass and the "
                f"libraries alone need about that), got {self.memory_mb!r}"
            )


Device = Literal["auto", "cuda", "cpu"]
Objective = Literal["softmax", "sampled", "rating"]
Sampler = Literal["popularity", "in-batch", "uniform"]
L2Mode = Literal["frequency", "plain"]
Optimizer = Literal["adam", "adamw", "sparse_adam", "adagrad"]
Schedule = Literal["constant", "cosine"]
TrainOn = Literal["train", "all"]


def _choice(flag: str, value: str, kind: object) -> None:
    allowed = get_args(kind)
    if value not in allowed:
        raise ConfigError(f"{flag}: {value!r} is not one of {', '.join(allowed)}")


# Settings whose best value depends on the objective; a None field takes its objective's
# value here. Chosen on an inner validation split carved from ML-100K's train split
# (tests/bench/tune_defaults.py; README, "The model" has the figures).
_BY_OBJECTIVE: dict[str, dict[str, Any]] = {
    "rating": {
        "embedding_dim": 128,
        "epochs": 40,
        "patience": 8,
        "batch_size": 2048,
        "lr": 0.005,
        "l2": 0.03,
        "eval_every": 1,
    },
    "softmax": {
        "embedding_dim": 256,
        "epochs": 80,
        "patience": 20,
        "batch_size": 128,
        "lr": 0.005,
        "l2": 0.05,
        "eval_every": 5,
    },
}
_BY_OBJECTIVE["sampled"] = _BY_OBJECTIVE["softmax"]


@dataclass(frozen=True)
class TrainConfig:
    """The model and how it is fitted. Defaults were chosen by measurement (README).

    Fields left None take the value measured best for the objective (`_BY_OBJECTIVE`).
    """

    device: Device = "auto"
    objective: Objective = "softmax"
    embedding_dim: int | None = None
    dropout: float = 0.0
    batch_norm: bool = False
    epochs: int | None = None
    patience: int | None = None
    min_delta: float = 1e-4
    # rating: ratings per step; softmax/sampled: users per step (capped by memory_mb;
    # sampled raises it to 1/400 of the users, mfbatch.training.steps.plan).
    batch_size: int | None = None
    lr: float | None = None
    lr_schedule: Schedule = "cosine"
    optimizer: Optimizer = "adam"
    weight_decay: float = 0.0
    # L2 on the factor rows each step touches (see mfbatch.training.objectives.l2_penalty).
    l2: float | None = None
    l2_mode: L2Mode = "frequency"
    temperature: float = 1.0
    # Softmax objectives: each user's loss weighted by |I_u|^-user_exponent (normalised).
    user_exponent: float = 0.3
    # Softmax objectives: a rating's weight halves every this share of its user's history
    # back from their newest (mfbatch.training.objectives.recency_weights); 0 turns it off. None:
    # `recency_for(split_kind)`, resolved by the train stage from the database.
    recency_half_life: float | None = None
    # Softmax: the budget for one step's [users x items] logits; when too few full rows
    # fit, training falls back to the sampled softmax. Sampled: `negatives` draws a step.
    memory_mb: int = 1024
    negatives: int = 1024
    sampler: Sampler = "popularity"
    top_k: int = 20
    rank_metrics: bool = False  # also compute Recall/NDCG when the objective is rating
    eval_users: int = 5000
    eval_every: int | None = None  # validate every N epochs (and after the last)
    threads: int | None = None  # CPU threads; None: see mfbatch.stages.train.resolve_threads
    seed: int = 0
    amp: bool = True
    on: TrainOn = "train"
    export_dir: Path = Path("export")
    # Data-parallel processes (mfbatch.training.distributed): gloo on CPU, one GPU each with NCCL.
    nproc: int = 1

    def __post_init__(self) -> None:
        _choice("--objective", self.objective, Objective)
        for name, value in _BY_OBJECTIVE[self.objective].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        _choice("--device", self.device, Device)
        _choice("--optimizer", self.optimizer, Optimizer)
        _choice("--lr-schedule", self.lr_schedule, Schedule)
        _choice("--l2-mode", self.l2_mode, L2Mode)
        _choice("--sampler", self.sampler, Sampler)
        _choice("--on", self.on, TrainOn)
        positive_ints = {
            "--embedding-dim": self.embedding_dim,
            "--epochs": self.epochs,
            "--patience": self.patience,
            "--batch-size": self.batch_size,
            "--negatives": self.negatives,
            "--top-k": self.top_k,
            "--eval-users": self.eval_users,
            "--eval-every": self.eval_every,
            "--memory-mb": self.memory_mb,
            "--nproc": self.nproc,
        }
        # Absurd counts are refused like score's; a few more than the cores are capped at
        # training time (mfbatch.stages.train.resolve_threads) with a note.
        check_threads("--threads", self.threads)
        for flag, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag}: must be a whole number >= 1, got {value!r}")
        if self.embedding_dim is not None and self.embedding_dim > 4096:
            raise ConfigError(f"--embedding-dim: {self.embedding_dim} is too large (max 4096)")
        lr = float(self.lr or 0.0)
        if not (math.isfinite(lr) and 0.0 < lr <= 10.0):
            raise ConfigError(f"--lr: must be in (0, 10], got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout: must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.user_exponent) and 0.0 <= self.user_exponent <= 1.0):
            raise ConfigError(f"--user-exponent: must be in [0, 1], got {self.user_exponent}")
        recency = self.recency_half_life
        if recency is not None and not (math.isfinite(recency) and recency >= 0.0):
            raise ConfigError(f"--recency-half-life: must be >= 0 (0 turns it off), got {recency}")
        if not (math.isfinite(self.temperature) and 0.0 < self.temperature <= 100.0):
            raise ConfigError(f"--temperature: must be in (0, 100], got {self.temperature}")
        for flag, amount in (
            ("--weight-decay", self.weight_decay),
            ("--l2", float(self.l2 or 0.0)),
        ):
            if not (math.isfinite(amount) and amount >= 0.0):
                raise ConfigError(f"{flag}: must be >= 0, got {amount}")
        if isinstance(self.nproc, int) and self.nproc > 1:
            check_sharding(self.objective, self.batch_norm, self.optimizer, self.nproc)
        if self.optimizer in ("sparse_adam", "adagrad") and self.weight_decay:
            raise ConfigError(
                f"--weight-decay: {self.optimizer} updates only the rows a batch touches; "
                "use --l2 for regularisation instead"
            )


# Measured on the inner user-time split (README, "Defaults"): 0.2 lifted Recall/NDCG@20 by
# 18% / 26% there. On a random split the held-out ratings are as old as the rest, and every
# half-life measured worse (inner random split); on a global `time` split it measured worse
# too (one outer run), and there is no inner split of that kind to choose one on: off.
RECENCY_HALF_LIFE = 0.2


def recency_for(split_kind: str) -> float:
    """The default `recency_half_life` for a database whose validation split is `split_kind`."""
    return RECENCY_HALF_LIFE if split_kind == "user-time" else 0.0


def check_sharding(objective: str, batch_norm: bool, optimizer: str, nproc: int) -> None:
    """What data-parallel training (mfbatch.training.distributed) does not cover, refused
    in one line."""
    if nproc > 256:
        raise ConfigError(f"--nproc: {nproc} processes is more than 256; pass fewer")
    if objective == "rating":
        raise ConfigError(
            "--nproc: the rating objective is batched by rating, not by user, and is not "
            "sharded; use --objective softmax or sampled, or --nproc 1"
        )
    if batch_norm:
        raise ConfigError(
            "--nproc: --batch-norm keeps running statistics per process that would "
            "diverge; use --no-batch-norm or --nproc 1"
        )
    if optimizer in ("sparse_adam", "adagrad"):
        raise ConfigError(
            f"--nproc: --optimizer {optimizer} gives the item table sparse gradients, which "
            "are not all-reduced; use adam or adamw"
        )


Provider = Literal["auto", "cuda", "cpu"]
Engine = Literal["default", "ray"]
DEFAULT_DB = Path("mfbatch.duckdb")


def machine_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware where the OS says)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def check_threads(flag: str, value: int | None) -> None:
    """More threads than a few per core only thrashes; a typo must not start 100,000."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{flag}: must be a whole number >= 1, got {value!r}")
    most = 4 * machine_cores()
    if value > most:
        raise ConfigError(
            f"{flag}: {value} threads is more than 4x this machine's {machine_cores()} cores; "
            f"pass at most {most} (or leave it unset)"
        )


@dataclass(frozen=True)
class ScoreConfig:
    """What `mfbatch score` computes and how it runs."""

    run_id: str = "latest"
    top_k: int = 20
    batch_size: int | None = None  # users per batch; None sizes it from memory_mb
    memory_mb: int = 512
    provider: Provider = "auto"
    threads: int | None = None
    users: Path | None = None
    include_items: Path | None = None
    exclude_items: Path | None = None
    keep_history: int = 7  # publishes of the served table kept in recommendation_history
    output: Path | None = None  # also write the served lists here (.parquet, .csv, folder)
    # default: in this process. ray: user shards over Ray actors (mfbatch.serving.ray_engine).
    engine: Engine = "default"
    ray_address: str | None = None  # None: start a local Ray; "auto" or host:port: join one
    workers: int | None = None  # actors; None: 2
    gpus_per_worker: float | None = None  # None: 0 (CPU actors)
    parts_dir: Path | None = None  # keep the Parquet parts here (else a spool, removed)
    publish: bool = True  # False (with parts_dir): the Parquet dataset is the output

    def __post_init__(self) -> None:
        _choice("--provider", self.provider, Provider)
        _choice("--engine", self.engine, Engine)
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
        if self.workers is not None and (
            isinstance(self.workers, bool) or not 1 <= self.workers <= 4096
        ):
            raise ConfigError(
                f"--workers: must be a whole number in [1, 4096], got {self.workers!r}"
            )
        if self.gpus_per_worker is not None and not (
            math.isfinite(self.gpus_per_worker) and 0.0 <= self.gpus_per_worker <= 16.0
        ):
            raise ConfigError(f"--gpus-per-worker: must be in [0, 16], got {self.gpus_per_worker}")
        if not self.publish and self.parts_dir is None:
            raise ConfigError(
                "--no-publish: the Parquet parts would be thrown away; pass --parts-dir too"
            )
        if isinstance(self.keep_history, bool) or self.keep_history < 1:
            raise ConfigError(
                f"--keep-history: must be a whole number >= 1, got {self.keep_history!r}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"--top-k: must be a whole number >= 1, got {self.top_k!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size: must be >= 1 (or auto), got {self.batch_size}")
        if self.memory_mb < 16:
            raise ConfigError(f"--memory-mb: at least 16, got {self.memory_mb}")
        check_threads("--threads", self.threads)


@dataclass(frozen=True)
class EvaluateConfig:
    """What `mfbatch evaluate` measures: the validated run's own top-K lists."""

    run_id: str = "latest"
    top_k: int = 20
    min_rating: float | None = None  # stars; validation ratings below it are not relevant

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"--top-k: must be a whole number >= 1, got {self.top_k!r}")
        if self.min_rating is not None and not math.isfinite(self.min_rating):
            raise ConfigError(
                f"--min-rating: must be a finite number of stars, got {self.min_rating}"
            )


@dataclass(frozen=True)
class Config:
    """Everything one command needs, resolved from TOML and CLI flags."""

    db: Path = DEFAULT_DB
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able view, stored with runs so a result says how it was made."""

        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return plain(dataclasses.asdict(self))


_SECTIONS: dict[str, type[Any]] = {
    "data": DataConfig,
    "split": SplitConfig,
    "preprocess": PreprocessConfig,
    "train": TrainConfig,
    "score": ScoreConfig,
    "evaluate": EvaluateConfig,
}


def _expect(value: Any, hint: Any, where: str) -> Any:
    """`value` as the annotated type, or a ConfigError naming the key; no silent coercion."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        arms = get_args(hint)
        if value is None and type(None) in arms:
            return None
        errors = []
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return _expect(value, arm, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            quoted = (
                " (a string: write true or false without quotes)" if isinstance(value, str) else ""
            )
            raise ConfigError(f"{where}: expected true or false, got {value!r}{quoted}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is Path:
        if isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path (a string), got {value!r}")
        return Path(value).expanduser()
    return value


def _build(
    cls: type[Any], values: Mapping[str, Any], where: str, flags: frozenset[str] = frozenset()
) -> Any:
    """`flags` are the keys that came from the command line: errors name them as flags."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    hints = get_type_hints(cls)
    for name in flags:
        # A command-line choice is checked by the section itself, whose message names the
        # flag as typed (--split, not the field `kind`).
        if get_origin(hints[name]) is Literal:
            hints[name] = str
    converted = {
        name: _expect(
            value,
            hints[name],
            "--" + name.replace("_", "-") if name in flags else f"{where} {name}",
        )
        for name, value in values.items()
    }
    try:
        return cls(**converted)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_config(
    path: Path | None = None,
    *,
    db: Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Read `path` (TOML) if given, apply non-None `overrides` per section, validate.

    Every value is checked against its field's type here, once, so a wrong type is a
    one-line error naming the key before any stage starts its work.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"--config: {path} does not exist; pass an existing TOML file")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--config: {path} is not valid TOML ({exc})") from None
    unknown = sorted(set(raw) - {*_SECTIONS, "db"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown table(s) {', '.join(unknown)}; use [{'], ['.join(_SECTIONS)}] and db"
        )
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(
                f"{path}: {name} must be a table ([{name}] then key = value lines), got {table!r}"
            )
        values = dict(table)
        flags = {k: v for k, v in (overrides or {}).get(name, {}).items() if v is not None}
        values.update(flags)
        where = f"[{name}]" if path is None else f"{path} [{name}]"
        sections[name] = _build(cls, values, where, frozenset(flags))
    stored = _expect(raw.get("db", str(DEFAULT_DB)), Path, f"{path} db")
    return Config(db=db if db is not None else stored, **sections)
