"""Training on tensors: `train_model` (orchestration), `train_epoch`, `validate`.

No files and no database here: the stage (mfbatch.stages.train) loads tensors, hands them over,
and persists what comes back. The whole train split lives on the device; batches are
slices of a shuffled index, never a per-sample Dataset/DataLoader.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mfbatch.config import TrainConfig
from mfbatch.training import objectives
from mfbatch.training.build import epoch_budget, l2_strength, plan_for
from mfbatch.training.distributed import Shard
from mfbatch.training.epoch_data import EpochData
from mfbatch.training.model import MatrixFactorization
from mfbatch.training.objectives import UserBatch
from mfbatch.training.steps import DenseGrads, Plan, make_optimizers, user_optimizer
from mfbatch.training.tensors import Interactions
from mfbatch.training.validation import Metrics, Validation, score_of, validate


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    metrics: Metrics | None
    seconds: float


@dataclass
class Outcome:
    model: MatrixFactorization
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    status: str = "completed"  # completed | early_stopped | diverged
    diverged_epoch: int | None = None
    plan: Plan | None = None
    # The user solve after the last epoch (`solve_users`): its loss and validation, which
    # are the returned model's.
    solved: EpochRecord | None = None


def _autocast(device: torch.device, config: TrainConfig) -> torch.autocast | nullcontext[None]:
    if device.type == "cuda" and config.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def step_loss(
    model: MatrixFactorization,
    batch: UserBatch,
    ratings: torch.Tensor | None,
    epoch_data: EpochData,
    config: TrainConfig,
    loss_kind: str,
    generator: torch.Generator,
    pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """The step's loss. `pool`: the items in-batch and mixed samples come from (the whole
    step's rated items, on every rank alike); the batch's own when None."""
    l2 = float(config.l2 or 0.0)
    pool = batch.items if pool is None else pool
    if loss_kind == "rating":
        assert ratings is not None
        # Per rating, as it has always been: each rating's rows once.
        return objectives.mse(model, batch.users, batch.items, ratings) + objectives.l2_penalty(
            model, batch, l2, "frequency"
        )
    if loss_kind == "softmax":
        loss = objectives.full_softmax(
            model, batch, epoch_data.all_items, config.temperature, config.user_exponent
        )
    else:
        if config.sampler == "mixed":
            samples = objectives.draw_mixed(epoch_data.log_q, config.negatives, generator, pool)
        else:
            samples = objectives.draw_samples(
                epoch_data.log_q,
                config.negatives,
                generator,
                batch_items=pool if config.sampler == "in-batch" else None,
            )
        # Frequency L2 from the rows the loss looked up anyway (one lookup per table).
        frequency = config.l2_mode == "frequency"
        loss = objectives.sampled_softmax(
            model,
            batch,
            samples,
            config.temperature,
            config.user_exponent,
            l2=l2 if frequency else 0.0,
        )
        if frequency:
            return loss
    return loss + objectives.l2_penalty(model, batch, l2, config.l2_mode)


def _batch(
    epoch_data: EpochData, idx: torch.Tensor, loss: str
) -> tuple[UserBatch, torch.Tensor | None]:
    """The step's batch: ratings by index (MSE), or every rating of the users `idx`."""
    data = epoch_data.data
    if loss == "rating":
        rows = torch.arange(idx.numel(), device=idx.device)
        return UserBatch(users=data.users[idx], rows=rows, items=data.items[idx]), data.ratings[idx]
    rows, at = epoch_data.by_user.positions_of(idx)
    weights = None if epoch_data.weights is None else epoch_data.weights[at]
    counts = None if epoch_data.counts is None else epoch_data.counts[at]
    return UserBatch(idx, rows, epoch_data.by_user.indices[at], weights, counts), None


def _skip_draws(
    epoch_data: EpochData,
    config: TrainConfig,
    run_plan: Plan,
    generator: torch.Generator,
    pool: torch.Tensor | None,
) -> None:
    """Draw (and drop) a step's samples, as a rank with none of its users must."""
    if run_plan.loss == "sampled" and config.sampler != "in-batch":
        # Both draw `negatives` items from the generator (uniform or by q).
        if config.sampler == "mixed":
            assert pool is not None
            objectives.draw_mixed(epoch_data.log_q, config.negatives, generator, pool)
        else:
            objectives.draw_samples(epoch_data.log_q, config.negatives, generator)


def train_epoch(
    model: MatrixFactorization,
    optimizers: list[torch.optim.Optimizer],
    epoch_data: EpochData,
    config: TrainConfig,
    run_plan: Plan,
    generator: torch.Generator,
    on_batch: Callable[[int], None] | None = None,
    shard: Shard | None = None,
) -> float:
    """One pass over the ratings in shuffled batches (of users for the softmax losses, of
    ratings for MSE); returns the mean batch loss.

    With an active `shard` (mfbatch.training.distributed) every rank walks the same global batches
    and trains on the users of each that it owns; see that module for why this is the
    single-process step split in parts.
    """
    model.train()
    data = epoch_data.data
    device = data.users.device
    if run_plan.loss == "rating":
        order = torch.randperm(len(data), device=device, generator=generator)
    else:
        users = epoch_data.active_users
        order = users[torch.randperm(users.numel(), device=device, generator=generator)]
    total = torch.zeros((), device=device)
    n_batches = 0
    sharded = shard is not None and shard.active
    dense_grads = DenseGrads(optimizers)
    per_user = epoch_data.by_user.indptr[1:] - epoch_data.by_user.indptr[:-1]
    for start in range(0, order.numel(), run_plan.batch_size):
        idx = order[start : start + run_plan.batch_size]
        scale = 1.0
        pool = None
        if shard is not None and sharded:
            if run_plan.loss == "sampled" and config.sampler in ("in-batch", "mixed"):
                # The whole step's rated items, so every rank draws the samples one
                # process would (the ranks' gradients then sum to its gradient).
                pool = epoch_data.by_user.indices[epoch_data.by_user.positions_of(idx)[1]]
            idx, scale = shard.step_share(idx, per_user)
        batch, ratings = _batch(epoch_data, idx, run_plan.loss)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if idx.numel():
            with _autocast(device, config):
                loss = step_loss(
                    model, batch, ratings, epoch_data, config, run_plan.loss, generator, pool
                )
            # A rank's share of the global batch's ratings: the ranks' gradients then sum
            # to the single-process one (scale is 1.0 in one process).
            loss = loss * scale
            loss.backward()
        else:
            # This rank owns none of the batch's users. It still draws the step's
            # samples, so every rank's generator stays at the same point, and joins the
            # all-reduce with zero gradients.
            loss = torch.zeros((), device=device)
            _skip_draws(epoch_data, config, run_plan, generator, pool)
        if shard is not None and sharded:
            shard.sync_gradients(model)
        dense_grads.fill()
        for opt in optimizers:
            opt.step()
        # Summed on the device: no host sync per batch.
        total += loss.detach()
        n_batches += 1
        if on_batch is not None:
            on_batch(batch.items.numel())
    if shard is not None and sharded:
        shard.total(total)
    return float(total.item()) / max(n_batches, 1)


def _setup(
    model: MatrixFactorization,
    data: Interactions,
    config: TrainConfig,
    schedule_epochs: int,
    run_plan: Plan | None = None,
) -> tuple[EpochData, Plan, list[torch.optim.Optimizer], list[Any], torch.Generator]:
    """The epoch's data, the step plan (`plan_for` unless given), optimizers and
    schedules, seeded."""
    device = data.users.device
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    epoch_data = EpochData.build(
        data,
        model.shape.n_users,
        model.shape.n_items,
        config.sampler,
        float(config.recency_half_life or 0.0),
    )
    if run_plan is None:
        run_plan = plan_for(model, data, config)
    steps = epoch_data.steps(run_plan.batch_size)
    optimizers = make_optimizers(model, config, run_plan, steps_per_epoch=steps)
    schedulers = [
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=schedule_epochs)
        for opt in optimizers
        if config.lr_schedule == "cosine"
    ]
    return epoch_data, run_plan, optimizers, schedulers, generator


def train_model(
    model: MatrixFactorization,
    data: Interactions,
    val: Validation | None,
    config: TrainConfig,
    *,
    epochs: int | None = None,
    schedule_epochs: int | None = None,
    on_epoch_start: Callable[[int, int], Callable[[int], None] | None] | None = None,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
    shard: Shard | None = None,
    run_plan: Plan | None = None,
    select: bool = True,
) -> Outcome:
    """Train with early stopping on `val` and restore the best epoch's weights.

    `select=False` (a given split, whose held-out rows are the test set): `val` is measured
    at every validation but never chosen on: no early stopping, the last epoch is kept.

    Validation runs every `eval_every` epochs and on the last one; patience counts epochs
    since the best validated one. Without `val` (a refit on all data) it runs exactly
    `epochs` epochs. `schedule_epochs` is the length the learning-rate schedule anneals
    over: a refit copying a validated run stopped at its best epoch passes that run's epoch
    budget, so both see the same rates.
    """
    max_epochs = int(epochs or epoch_budget(model.shape.n_items, data, config))
    if config.l2 is None:  # the train stage resolves (and records) it; other callers here
        config = config.replace(l2=l2_strength(data, config))
    epoch_data, run_plan, optimizers, schedulers, generator = _setup(
        model, data, config, schedule_epochs or max_epochs, run_plan
    )
    patience = int(config.patience or 1)
    outcome = Outcome(model=model, plan=run_plan)
    # Zeroed now as well as at the end: rows no rating reaches get no gradient (bar
    # softmax items, pushed down as negatives but never offered), so validation scores
    # the predictions the exported model will make, cold pairs included.
    zero_untrained(model, data)
    best_score = -math.inf
    # The starting weights are the fallback if the very first epoch diverges.
    best_state = copy.deepcopy(model.state_dict())
    every = int(config.eval_every or 1)
    for epoch in range(1, max_epochs + 1):
        started = time.perf_counter()
        on_batch = on_epoch_start(epoch, len(data)) if on_epoch_start else None
        loss = train_epoch(
            model, optimizers, epoch_data, config, run_plan, generator, on_batch, shard
        )
        if shard is not None and shard.active:
            # User rows moved only on their owner rank: every rank takes the owners' rows,
            # so validation, early stopping and the kept weights agree on all ranks.
            shard.gather_users(model)
        # Sampled negatives can reach items no rating did: back to zero before validating.
        zero_untrained(model, data)
        for scheduler in schedulers:
            scheduler.step()
        if not math.isfinite(loss) or not _finite(model):
            outcome.status, outcome.diverged_epoch = "diverged", epoch
            break
        checked = val is not None and (epoch % every == 0 or epoch == max_epochs)
        metrics = validate(model, val, config) if val is not None and checked else None
        record = EpochRecord(epoch, loss, metrics, time.perf_counter() - started)
        outcome.history.append(record)
        if on_epoch_end:
            on_epoch_end(record)
        if val is None or metrics is not None:
            score = score_of(metrics, config.objective) if metrics and select else float(epoch)
            if score > best_score + config.min_delta:
                best_score, outcome.best_epoch = score, epoch
                best_state = copy.deepcopy(model.state_dict())
        if select and metrics is not None and epoch - outcome.best_epoch >= patience:
            outcome.status = "early_stopped"
            break
    model.load_state_dict(best_state)
    if outcome.status != "diverged" and solves_users(config, data):
        outcome.solved = _solve(model, data, val, config, run_plan, shard, outcome.best_epoch)
        if outcome.solved is None:  # a solve that diverged leaves training's vectors
            model.load_state_dict(best_state)
    model.eval()
    return outcome


def _solve(
    model: MatrixFactorization,
    data: Interactions,
    val: Validation | None,
    config: TrainConfig,
    run_plan: Plan,
    shard: Shard | None,
    epoch: int,
) -> EpochRecord | None:
    """`solve_users`, then the solved model's validation; None if it did not stay finite."""
    started = time.perf_counter()
    loss = solve_users(model, data, config, run_plan, shard)
    if not (math.isfinite(loss) and _finite(model)):
        return None
    metrics = validate(model, val, config) if val is not None else None
    return EpochRecord(epoch, loss, metrics, time.perf_counter() - started)


# Epochs of the user solve: every user's row takes this many Adam steps against the
# trained item tables (docs/model.md, "Defaults": 5, 10 and 20 measured).
USER_SOLVE_EPOCHS = 10


def solves_users(config: TrainConfig, data: Interactions) -> bool:
    """Whether `train_model` ends with `solve_users`: a softmax objective, a user
    half-life, and a time on every rating to weigh by."""
    return bool(config.user_half_life) and config.objective != "rating" and data.ts is not None


def solve_users(
    model: MatrixFactorization,
    data: Interactions,
    config: TrainConfig,
    run_plan: Plan,
    shard: Shard | None = None,
) -> float:
    """Each user's vector fitted again against the trained item tables, frozen, with their
    ratings weighted by `config.user_half_life` instead of `recency_half_life`: the items
    learned from the whole history, a user's vector now from their recent taste (the
    signal EASE weighs its history row by). The same loss, a fresh Adam on the user
    tables at the run's learning rate; returns the last epoch's mean loss."""
    users = model.user_parameters()
    frozen = [p for p in model.parameters() if all(p is not u for u in users)]
    epoch_data = EpochData.build(
        data,
        model.shape.n_users,
        model.shape.n_items,
        config.sampler,
        float(config.user_half_life or 0.0),
    )
    solver = user_optimizer(model, config, epoch_data.steps(run_plan.batch_size))
    generator = torch.Generator(device=data.users.device)
    generator.manual_seed(config.seed + 1)
    loss = 0.0
    for p in frozen:
        p.requires_grad_(False)
    try:
        for _ in range(USER_SOLVE_EPOCHS):
            loss = train_epoch(
                model, [solver], epoch_data, config, run_plan, generator, None, shard
            )
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if shard is not None and shard.active:
        shard.gather_users(model)
    zero_untrained(model, data)
    return loss


@torch.no_grad()
def zero_untrained(model: MatrixFactorization, data: Interactions) -> None:
    """Rows no rating reached hold their random start (or only a push down as sampled
    negatives): zeroed, so neither validation nor the export scores from noise."""
    for table, bias, index in (
        (model.user_emb, model.user_bias, data.users),
        (model.item_emb, model.item_bias, data.items),
    ):
        seen = torch.zeros(table.num_embeddings, dtype=torch.bool, device=index.device)
        seen[index] = True
        table.weight[~seen] = 0.0
        bias.weight[~seen] = 0.0


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
