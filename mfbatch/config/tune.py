"""The options of `mfbatch tune`: a hyperparameter search on an inner split of train."""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, model_validator

from mfbatch.config.base import Options, check_threads
from mfbatch.config.sections import cli
from mfbatch.errors import ConfigError

# What the search tries, per TrainConfig field: [low, high] (floats drawn log-uniform, except
# user_exponent and recency_half_life, drawn uniform) or, for embedding_dim, the choices.
# A recency half-life of 0 (off) is always among the candidates where there are timestamps.
SPACE: dict[str, list[float]] = {
    "embedding_dim": [32, 64, 128, 256],
    "lr": [1e-3, 2e-2],
    "l2": [3e-3, 0.3],
    "temperature": [0.5, 2.0],
    "user_exponent": [0.0, 0.6],
    "recency_half_life": [0.05, 1.0],
    "user_half_life": [0.02, 0.5],
    # Searched only where train's defaults take the sampled softmax (log-uniform, whole).
    "negatives": [256, 8192],
}
LOG_UNIFORM = frozenset({"lr", "l2", "temperature"})


class TuneConfig(Options):
    """How the search runs; what it starts from is the [train] section."""

    trials: int = Field(20, description="Trials to run in all (a resumed study counts its own).")
    timeout: float | None = Field(
        None, description="Stop starting new trials after this many seconds (default: none)."
    )
    epochs: int = Field(
        80,
        description="Most epochs a trial trains; the search picks epochs up to this "
        "(the first trial is train's defaults).",
    )
    inner_fraction: float | None = Field(
        None,
        description="Share of each user's train ratings held out as the inner validation "
        "(the newest when every rating has a time, else at random; default: the outer "
        "split's own share, within 0.05-0.5, else 0.2).",
    )
    study: str = Field("default", description="Study name: the same name resumes the search.")
    seed: int = Field(0, description="Seed of the sampler, the inner split and every trial.")
    threads: int | None = Field(
        None, description="CPU threads (default: the cores not already busy)."
    )
    space: dict[str, list[float]] = Field(
        default_factory=dict,
        description="Search ranges laid over the defaults: field = [low, high], "
        "embedding_dim = [choices...].",
        json_schema_extra=cli(show=False),
    )

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        for flag, value in (("--trials", self.trials), ("--epochs", self.epochs)):
            if isinstance(value, bool) or value < 1:
                raise ConfigError(f"{flag}: must be a whole number >= 1, got {value!r}")
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError(f"--timeout: must be > 0 seconds, got {self.timeout}")
        if self.inner_fraction is not None and not 0.0 < self.inner_fraction < 1.0:
            raise ConfigError(f"--inner-fraction: must be in (0, 1), got {self.inner_fraction}")
        if not self.study.strip():
            raise ConfigError("--study: give the study a name")
        check_threads("--threads", self.threads)
        for name, bounds in self.space.items():
            _check_range(name, bounds)
        return self

    def ranges(self) -> dict[str, list[Any]]:
        """The search space: the defaults with [tune] space laid over them."""
        return {**SPACE, **self.space}


def _check_range(name: str, bounds: list[float]) -> None:
    where = f"[tune] space {name}"
    if name not in SPACE:
        raise ConfigError(f"{where}: not searched; use one of {', '.join(SPACE)}")
    if name == "embedding_dim":
        if not bounds or any(int(b) != b or b < 1 for b in bounds):
            raise ConfigError(f"{where}: give a list of whole dimensions >= 1, got {bounds}")
        return
    if len(bounds) != 2 or not bounds[0] <= bounds[1]:
        raise ConfigError(f"{where}: give [low, high] with low <= high, got {bounds}")
    if name == "negatives" and (bounds[0] < 1 or any(int(b) != b for b in bounds)):
        raise ConfigError(f"{where}: give whole numbers of items >= 1, got {bounds}")
    if name in LOG_UNIFORM and bounds[0] <= 0:
        raise ConfigError(f"{where}: searched on a log scale, so low must be > 0, got {bounds}")
