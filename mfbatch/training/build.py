"""What a run is built from before its first step: the epoch budget, the L2 strength, the
step plan and the seeded, untrained model (`train_model` in mfbatch.training.loop uses them
all; the train and tune stages ask for them first, to say what will happen)."""

from __future__ import annotations

import torch

from mfbatch.config import TrainConfig, l2_for
from mfbatch.training.model import MatrixFactorization, ModelShape
from mfbatch.training.steps import Plan, default_epochs, plan
from mfbatch.training.tensors import Interactions


def epoch_budget(n_items: int, data: Interactions, config: TrainConfig) -> int:
    """`config.epochs`, or the default for this catalogue and these users with ratings."""
    if config.epochs:
        # Resolved already (train records it, a refit copies it): no pass over the users.
        return int(config.epochs)
    users = int(torch.unique(data.users).numel())
    return default_epochs(config, n_items, users, data.users.device.type)


def interactions_per_item(data: Interactions) -> float:
    """Train interactions (rows, not their weights) per item with ratings: what the L2
    default follows (`l2_for`)."""
    return len(data) / max(1, int(torch.unique(data.items).numel()))


def l2_strength(data: Interactions, config: TrainConfig) -> float:
    """`config.l2`, or the default for these train interactions (`l2_for`)."""
    if config.l2 is not None:
        return float(config.l2)
    return l2_for(interactions_per_item(data))


def plan_for(model: MatrixFactorization, data: Interactions, config: TrainConfig) -> Plan:
    """`plan` for this model and data (its users with ratings) on their device."""
    return data_plan(model.shape.n_items, data, config)


def data_plan(n_items: int, data: Interactions, config: TrainConfig) -> Plan:
    """`plan` for a catalogue of `n_items` and this data (its users with ratings), before
    there is a model (tune asks whether its trials will be sampled)."""
    active = int(torch.unique(data.users).numel())
    return plan(config, n_items, active, device_type=data.users.device.type)


def new_model(
    n_users: int, n_items: int, config: TrainConfig, device: torch.device
) -> MatrixFactorization:
    """The untrained model `config` asks for, seeded: what train and each tune trial fit."""
    torch.manual_seed(config.seed)
    shape = ModelShape(
        n_users=n_users,
        n_items=n_items,
        dim=int(config.embedding_dim or 0),
        dropout=config.dropout,
        batch_norm=config.batch_norm,
        sparse=config.optimizer in ("sparse_adam", "adagrad"),
    )
    return MatrixFactorization(shape).to(device)
