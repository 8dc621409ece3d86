"""The options of `mfbatch train`: the model and how it is fitted.

Fields left unset take the value measured best for the objective (`BY_OBJECTIVE`), so a
refit or a tuned config only says what differs. Defaults were chosen by measurement
(docs/model.md says how).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mfbatch.config.base import Options, PathValue, check_threads, machine_cores
from mfbatch.config.sections import cli
from mfbatch.errors import ConfigError

Device = Literal["auto", "cuda", "cpu"]
Objective = Literal["softmax", "sampled", "rating"]
Sampler = Literal["popularity", "in-batch", "uniform", "mixed"]
L2Mode = Literal["frequency", "plain"]
Optimizer = Literal["adam", "adamw", "sparse_adam", "adagrad"]
Schedule = Literal["constant", "cosine"]
TrainOn = Literal["train", "all"]

# Settings whose best value depends on the objective; an unset field takes its objective's
# value here. Chosen on an inner validation split carved from ML-100K's train split
# (benchmarks/tune_defaults.py; docs/model.md has the figures).
_SOFTMAX = {
    "embedding_dim": 256,
    "patience": 20,
    "batch_size": 128,
    "lr": 0.005,
    "eval_every": 5,
}
BY_OBJECTIVE: dict[str, dict[str, Any]] = {
    "rating": {
        "embedding_dim": 128,
        "epochs": 40,
        "patience": 8,
        "batch_size": 2048,
        "lr": 0.005,
        "l2": 0.03,
        "eval_every": 1,
    },
    "softmax": _SOFTMAX,
    "sampled": _SOFTMAX,
}

# Training's half-life and the user solve's (USER_HALF_LIFE) were chosen together, on the
# inner user-time splits carved from the train split of both user-time sets in
# ../shared/data (ML-100K, ML-1M partial; seeds 0-1, blind), as the best worst-case share
# of each set's own best: training at 0.3 then solving users at 0.05 kept 0.993 of it at
# worst (ML-100K +5.6% / +7.1% Recall/NDCG@20 over the previous 0.125 without a solve,
# ML-1M partial +10.8% / +13.7%); training gentler than the solve matters (0.125 then 0.05:
# no gain on ML-100K). docs/model.md has the grid. On a random split the held-out ratings
# are as old as the rest and every half-life measured worse (inner random split); on a
# global `time` split it measured worse too (one outer run), and there is no inner split of
# that kind to choose one on: both off.
RECENCY_HALF_LIFE = 0.3

# After training, each user's vector is solved again against the trained item tables with
# their ratings weighted by this sharper half-life: the items learn from the whole history
# (RECENCY_HALF_LIFE), a user's vector from their recent taste, as EASE given recency
# weights scores (it fits B on the plain matrix and weighs only the history row).
USER_HALF_LIFE = 0.05


def recency_for(split_kind: str) -> float:
    """The default `recency_half_life` for a database whose validation split is `split_kind`."""
    return RECENCY_HALF_LIFE if split_kind == "user-time" else 0.0


def user_half_life_for(
    split_kind: str, recency_half_life: float, objective: str = "softmax", batch_norm: bool = False
) -> float:
    """The default `user_half_life`: on a user-time split, where training weighs by
    recency at all (`--recency-half-life 0` turns both off), for the softmax objectives,
    and not with BatchNorm (whose running statistics a solve would move)."""
    if split_kind != "user-time" or not recency_half_life or objective == "rating":
        return 0.0
    return 0.0 if batch_norm else USER_HALF_LIFE


def with_half_lives(config: TrainConfig, split_kind: str) -> TrainConfig:
    """`config` with its recency and user-solve half-lives resolved for `split_kind` (what
    is set stays): what train records, so a refit copies them, and tune starts from."""
    recency = config.recency_half_life
    if recency is None:
        recency = recency_for(split_kind)
    solve = config.user_half_life
    if solve is None:
        solve = user_half_life_for(split_kind, recency, config.objective, config.batch_norm)
    return config.replace(recency_half_life=recency, user_half_life=solve)


# Full-softmax epochs, when not given: as many as fit STEP_BUDGET optimizer steps of
# `batch_size` users, within [MIN_EPOCHS, MAX_EPOCHS] (the sampled softmax at least
# SAMPLED_MIN_EPOCHS: `mfbatch.training.steps.default_epochs`). Chosen on inner splits carved
# from train (docs/model.md, "Defaults"): a set with many users takes many steps an
# epoch and overfits the item table long before 80 epochs (ML-1M LCFN, 48 steps an
# epoch: 30 epochs +3.3% Recall@20 over 80 at a 20% inner split; at its given split's own
# 11%, session 8, 45 epochs +0.7% / +0.9% over 31, +0.3% / +0.5% over 60), while sets of a few
# thousand users keep all 80 (ML-1M partial: 80 and 62 tie).
STEP_BUDGET = 2_160
MIN_EPOCHS = 20
MAX_EPOCHS = 80
# A sampled step learns less than a full one, so the sampled softmax's floor is higher.
# Chosen as the best worst case, on inner random splits carved from train, of the two
# sets where the floor decides (Amazon-CDs, which samples, and ML-1M LCFN trained
# sampled; the others reach 80 by the budget), seeds 0-1: floors 20 / 40 / 80 kept at
# worst 0.953 / 0.984 / 0.969 of a set's best Recall@20 (docs/model.md, "Defaults").
SAMPLED_MIN_EPOCHS = 40


# Softmax/sampled L2, when not given: L2_BASE, raised on sparse data to L2_BASE *
# L2_DENSE / (train interactions per item), at most L2_MAX. Chosen on inner splits carved
# from train across the five sets of ../shared/data (docs/model.md, "Defaults"): the sets
# with 40-210 interactions per item were best at 0.05 of {0.05, 0.1, 0.2} (0.1 lost
# 3-14%); the two sparse ones wanted more: LastFM (7.5 per item) 0.2, +12% Recall@20 over
# 0.05, and 0.3 collapsed; Amazon-CDs (13.6 per item) 0.1, +8% (0.2: +5.5%). Per user
# the two sparse sets are in the other order (18 and 11), so the rule counts per item; it
# is not extended past the sparsest set measured (L2_MAX).
L2_BASE = 0.05
L2_DENSE = 30.0
L2_MAX = 0.2


def l2_for(interactions_per_item: float) -> float:
    """The default softmax/sampled L2 for data with this many train interactions (rows,
    not their weights) per item with ratings."""
    scale = L2_DENSE / max(float(interactions_per_item), 1e-9)
    return float(min(L2_MAX, L2_BASE * max(1.0, scale)))


def epochs_for(n_users: int, batch_size: int, least: int = MIN_EPOCHS) -> int:
    """The default epochs of a softmax/sampled run over `n_users` users with ratings, at
    least `least` (SAMPLED_MIN_EPOCHS for the sampled softmax)."""
    steps = max(1, math.ceil(n_users / max(1, batch_size)))
    return int(min(MAX_EPOCHS, max(least, round(STEP_BUDGET / steps))))


def _by_objective(what: str) -> str:
    if what == "l2":
        return (
            f" (default: softmax/sampled {L2_BASE}, raised on sparse data to {L2_BASE} x "
            f"{L2_DENSE:.0f} / train interactions per item, at most {L2_MAX}; "
            f"{BY_OBJECTIVE['rating']['l2']} rating)"
        )
    if what == "epochs":
        rating = BY_OBJECTIVE["rating"]["epochs"]
        return (
            f" (default: full softmax, what fits {STEP_BUDGET:,} steps of --batch-size "
            f"users, {MIN_EPOCHS}-{MAX_EPOCHS}; sampled {SAMPLED_MIN_EPOCHS}-{MAX_EPOCHS}; "
            f"{rating} rating)"
        )
    rating, softmax = BY_OBJECTIVE["rating"][what], BY_OBJECTIVE["softmax"][what]
    return f" (default {softmax} softmax/sampled, {rating} rating)"


class TrainConfig(Options):
    """The model and how it is fitted."""

    device: Device = Field("auto", description="auto (CUDA when present), cuda or cpu.")
    objective: Objective = Field(
        "softmax",
        description="softmax (full softmax over the catalogue, per user), sampled "
        "(logQ-corrected sampled softmax) or rating (MSE on the stars).",
    )
    embedding_dim: int | None = Field(
        None, description="Latent dimensions." + _by_objective("embedding_dim")
    )
    dropout: float = Field(0.0, description="Dropout on both embeddings.")
    batch_norm: bool = Field(
        False,
        description="BatchNorm1d on both embeddings.",
        json_schema_extra=cli("--batch-norm/--no-batch-norm"),
    )
    epochs: int | None = Field(
        None, description="Most epochs; early stopping may end sooner." + _by_objective("epochs")
    )
    patience: int | None = Field(
        None,
        description="Epochs without improvement before stopping." + _by_objective("patience"),
    )
    min_delta: float = Field(
        1e-4, description="Least improvement that counts.", json_schema_extra=cli(show=False)
    )
    batch_size: int | None = Field(
        None,
        description="Users per step (softmax, sampled; a sampled epoch takes at most 400 "
        "steps) or ratings (rating)." + _by_objective("batch_size"),
    )
    lr: float | None = Field(None, description="Learning rate." + _by_objective("lr"))
    lr_schedule: Schedule = Field("cosine", description="constant or cosine.")
    optimizer: Optimizer = Field("adam", description="adam, adamw, sparse_adam or adagrad.")
    weight_decay: float = Field(0.0, description="Optimizer weight decay (dense optimizers).")
    l2: float | None = Field(
        None, description="L2 on the factor rows a step touches." + _by_objective("l2")
    )
    l2_mode: L2Mode = Field(
        "frequency", description="frequency (rows weighted by their ratings) or plain."
    )
    temperature: float = Field(1.0, description="Softmax temperature.")
    # 0.075 since session 8: the best worst case over the five sets' inner splits (0, 0.075,
    # 0.15, 0.3: ML-100K and Amazon-CDs want 0, ML-1M LCFN and ML-1M partial 0.15; docs/
    # model.md, "Defaults"); 0.3 had been chosen on ML-100K before recency and the user solve.
    user_exponent: float = Field(
        0.075, description="Softmax: weight each user's ratings by |I_u|^-x (0 = per rating)."
    )
    recency_half_life: float | None = Field(
        None,
        description="Softmax: a rating's weight halves every this share of its user's history, "
        "newest first (default 0.3 on user-time splits, off otherwise; 0 = off).",
    )
    user_half_life: float | None = Field(
        None,
        description="Softmax: after the last epoch, each user's vector is solved again "
        "against the trained item tables with their ratings weighted by this recency "
        "half-life (as --recency-half-life: a share of the user's history); default 0.05 on "
        "user-time splits while --recency-half-life is on, off otherwise; 0 = off.",
    )
    fold_in_half_life: float | None = Field(
        None,
        description="Fold-in (score, Model.recommend): the recency half-life a new user's "
        "ratings are weighted by (default: after the user solve, the one between "
        "--user-half-life and --recency-half-life at which the run's own users fold back "
        "in closest to their lists; else --recency-half-life).",
    )
    memory_mb: int = Field(
        1024,
        description="Budget for one step's logits; with --time-budget-s decides full vs "
        "sampled softmax.",
    )
    time_budget_s: float = Field(
        600.0,
        description="softmax: the full softmax is used while its estimated training time "
        "(users x items x dim x epochs at a measured cost; docs/model.md) fits this many "
        "seconds, else the sampled softmax.",
    )
    negatives: int = Field(1024, description="sampled: items drawn per step.")
    sampler: Sampler = Field(
        "mixed",
        description="sampled: mixed (the step's rated items plus --negatives uniform draws), "
        "popularity, in-batch or uniform.",
    )
    top_k: int = Field(20, description="K of the validation Recall/NDCG.")
    rank_metrics: bool = Field(
        False,
        description="rating objective: also compute Recall/NDCG.",
        json_schema_extra=cli(show=False),
    )
    eval_users: int = Field(
        5000, description="Users sampled for validation.", json_schema_extra=cli(show=False)
    )
    eval_every: int | None = Field(
        None,
        description="Validate every N epochs (and after the last)." + _by_objective("eval_every"),
    )
    threads: int | None = Field(
        None, description="CPU threads (default: the cores not already busy)."
    )
    seed: int = Field(0, description="Seed for init, shuffling and sampling.")
    amp: bool = Field(
        True, description="Mixed precision on CUDA.", json_schema_extra=cli(show=False)
    )
    on: TrainOn = Field(
        "train",
        description="train (validate, early-stop) or all (refit train+val for the chosen epochs).",
    )
    export_dir: PathValue = Field(Path("export"), description="Where runs are saved.")
    nproc: int = Field(1, description="Data-parallel processes: gloo on CPU, NCCL on GPUs.")

    @classmethod
    def derive(cls, values: dict[str, Any]) -> dict[str, Any]:
        defaults = BY_OBJECTIVE.get(values.get("objective", "softmax"), {})
        for name, value in defaults.items():
            if values.get(name) is None:
                values[name] = value
        return values

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for flag in (
            "--embedding-dim",
            "--epochs",
            "--patience",
            "--batch-size",
            "--negatives",
            "--top-k",
            "--eval-users",
            "--eval-every",
            "--memory-mb",
            "--nproc",
        ):
            value = getattr(self, flag[2:].replace("-", "_"))
            if value is None and flag == "--epochs":
                continue  # softmax/sampled: resolved from the data (`epochs_for`)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag}: must be a whole number >= 1, got {value!r}")
        # Absurd counts are refused like score's; a few more than the cores are capped at
        # training time (mfbatch.stages.train) with a note.
        check_threads("--threads", self.threads)
        if self.embedding_dim is not None and self.embedding_dim > 4096:
            raise ConfigError(f"--embedding-dim: {self.embedding_dim} is too large (max 4096)")
        self._check_ranges()
        most = max(2, machine_cores())
        if self.nproc > most:
            # Each rank is a process holding torch and a copy of the data (64 took 3.8 GB in
            # 12 s on 2 cores): no more than the cores, or one per GPU, which GPU machines
            # have as many cores as.
            raise ConfigError(
                f"--nproc: {self.nproc} processes on this machine's {machine_cores()} cores; "
                f"pass at most {most}"
            )
        if self.nproc > 1:
            check_sharding(self.objective, self.batch_norm, self.optimizer, self.nproc)
        if self.optimizer in ("sparse_adam", "adagrad") and self.weight_decay:
            raise ConfigError(
                f"--weight-decay: {self.optimizer} updates only the rows a batch touches; "
                "use --l2 for regularisation instead"
            )
        return self

    def _check_ranges(self) -> None:
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
        fold = self.fold_in_half_life
        if fold is not None and not (math.isfinite(fold) and fold >= 0.0):
            raise ConfigError(f"--fold-in-half-life: must be >= 0 (0 turns it off), got {fold}")
        solve = self.user_half_life
        if solve is not None and not (math.isfinite(solve) and solve >= 0.0):
            raise ConfigError(f"--user-half-life: must be >= 0 (0 turns it off), got {solve}")
        if solve and self.batch_norm:
            raise ConfigError(
                "--user-half-life: the user solve keeps the item tables fixed, which "
                "BatchNorm's running statistics would not; pass --user-half-life 0 with "
                "--batch-norm"
            )
        if not (math.isfinite(self.time_budget_s) and self.time_budget_s > 0.0):
            raise ConfigError(f"--time-budget-s: must be > 0, got {self.time_budget_s}")
        if not (math.isfinite(self.temperature) and 0.0 < self.temperature <= 100.0):
            raise ConfigError(f"--temperature: must be in (0, 100], got {self.temperature}")
        for flag, amount in (("--weight-decay", self.weight_decay), ("--l2", float(self.l2 or 0))):
            if not (math.isfinite(amount) and amount >= 0.0):
                raise ConfigError(f"{flag}: must be >= 0, got {amount}")


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
