"""Typed options, declared once (pydantic models with field docs) for the CLI, TOML and API."""

from mfbatch.config.base import Options, check_threads, machine_cores
from mfbatch.config.load import DEFAULT_DB, SECTIONS, Config, load_config
from mfbatch.config.sections import (
    GENERIC_DATASETS,
    MIN_MEMORY_MB,
    MOVIELENS_RELEASES,
    DataConfig,
    EvaluateConfig,
    PreprocessConfig,
    ScoreConfig,
    SplitConfig,
    dataset_type,
)
from mfbatch.config.train import (
    RECENCY_HALF_LIFE,
    TrainConfig,
    check_sharding,
    epochs_for,
    l2_for,
    recency_for,
    user_half_life_for,
    with_half_lives,
)
from mfbatch.config.tune import TuneConfig

__all__ = [
    "DEFAULT_DB",
    "GENERIC_DATASETS",
    "MIN_MEMORY_MB",
    "MOVIELENS_RELEASES",
    "RECENCY_HALF_LIFE",
    "SECTIONS",
    "Config",
    "DataConfig",
    "EvaluateConfig",
    "Options",
    "PreprocessConfig",
    "ScoreConfig",
    "SplitConfig",
    "TrainConfig",
    "TuneConfig",
    "check_sharding",
    "check_threads",
    "dataset_type",
    "epochs_for",
    "l2_for",
    "load_config",
    "machine_cores",
    "recency_for",
    "user_half_life_for",
    "with_half_lives",
]
