"""The MF module and the tensor-level trainer, against answers known in advance."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mfbatch.config import TrainConfig
from mfbatch.training.loop import train_model
from mfbatch.training.model import MatrixFactorization, ModelShape
from mfbatch.training.tensors import Csr, Interactions
from mfbatch.training.validation import Validation, rank_metrics, validate


def test_prediction_is_mu_plus_biases_plus_dot() -> None:
    model = MatrixFactorization(
        ModelShape(n_users=3, n_items=4, dim=2, dropout=0.0, batch_norm=False)
    )
    with torch.no_grad():
        model.global_bias.fill_(0.5)
        model.user_bias.weight[:, 0] = torch.tensor([0.1, 0.2, 0.3])
        model.item_bias.weight[:, 0] = torch.tensor([-0.1, 0.0, 0.1, 0.2])
        model.user_emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model.item_emb.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [-1.0, 1.0]]))
    model.eval()
    pred = model(torch.tensor([0, 1, 2]), torch.tensor([1, 0, 3]))
    expected = torch.tensor([0.5 + 0.1 + 0.0 + 3.0, 0.5 + 0.2 - 0.1 + 2.0, 0.5 + 0.3 + 0.2 + 0.0])
    assert torch.allclose(pred, expected)


def test_biases_start_at_zero_and_design_parts_are_switchable() -> None:
    shape = ModelShape(n_users=5, n_items=6, dim=4, dropout=0.2, batch_norm=True)
    model = MatrixFactorization(shape)
    assert float(model.global_bias.detach()) == 0.0
    assert torch.count_nonzero(model.user_bias.weight) == 0
    assert torch.count_nonzero(model.item_bias.weight) == 0
    assert isinstance(model.user_norm, torch.nn.BatchNorm1d)
    assert isinstance(model.item_norm, torch.nn.BatchNorm1d)
    assert model.dropout.p == pytest.approx(0.2)
    plain = MatrixFactorization(dataclasses.replace(shape, dropout=0.0, batch_norm=False))
    assert isinstance(plain.user_norm, torch.nn.Identity)


def test_folded_tables_reproduce_eval_mode_predictions() -> None:
    torch.manual_seed(0)
    model = MatrixFactorization(
        ModelShape(n_users=7, n_items=9, dim=3, dropout=0.2, batch_norm=True)
    )
    model.train()
    for _ in range(3):  # move the running statistics away from their defaults
        model(torch.randint(0, 7, (16,)), torch.randint(0, 9, (16,)))
    model.eval()
    p, q, b_u, b_i, mu = model.folded()
    users = torch.arange(7).repeat_interleave(9)
    items = torch.arange(9).repeat(7)
    direct = model(users, items)
    folded = mu + b_u[users] + b_i[items] + (p[users] * q[items]).sum(-1)
    assert torch.allclose(direct, folded, atol=1e-6)


def _checkerboard(
    n_per_block: int = 12, *, dislikes: bool = False
) -> tuple[Interactions, Validation, int]:
    """Two user groups, two item blocks; each user rated every item of their own block but
    one (the diagonal). The held-out diagonal is the known answer. With `dislikes`, each
    user also gave the lowest rating to half of the other block: what a ratings-only model
    needs to tell the blocks apart (the softmax objectives learn it from absence alone)."""
    users, items, stars, held_u, held_i = [], [], [], [], []
    n = 2 * n_per_block
    for u in range(n):
        block = u // n_per_block
        own = range(block * n_per_block, (block + 1) * n_per_block)
        held = block * n_per_block + (u % n_per_block)
        for i in own:
            if i == held:
                held_u.append(u)
                held_i.append(i)
            else:
                users.append(u)
                items.append(i)
                stars.append(1.0)
        if dislikes:
            other = (1 - block) * n_per_block
            for i in range(other + u % 2, other + n_per_block, 2):
                users.append(u)
                items.append(i)
                stars.append(0.0)
    data = Interactions(torch.tensor(users), torch.tensor(items), torch.tensor(stars))
    pairs = Interactions(
        torch.tensor(held_u), torch.tensor(held_i), torch.ones(len(held_u), dtype=torch.float32)
    )
    val = Validation(
        pairs=pairs,
        train_items=Csr.build(data.users, data.items, n),
        val_items=Csr.build(pairs.users, pairs.items, n),
        rank_users=torch.arange(n),
        rating_min=1.0,
        rating_max=5.0,
    )
    return data, val, n


@pytest.mark.parametrize(
    ("objective", "sampler"),
    [
        ("softmax", "popularity"),
        ("sampled", "popularity"),
        ("sampled", "in-batch"),
        ("sampled", "uniform"),
        ("sampled", "mixed"),
        ("rating", "popularity"),
    ],
)
def test_every_objective_recovers_the_held_out_diagonal(objective: str, sampler: str) -> None:
    data, val, n = _checkerboard(dislikes=objective == "rating")
    config = TrainConfig(
        objective=objective,  # type: ignore[arg-type]
        sampler=sampler,  # type: ignore[arg-type]
        embedding_dim=8,
        epochs=60,
        patience=60,
        eval_every=5,
        batch_size=8 if objective != "rating" else 64,
        lr=0.05,
        l2=0.0,
        negatives=16,
        top_k=1,
        seed=0,
    )
    model = MatrixFactorization(ModelShape(n, n, 8, dropout=0.0, batch_norm=False))
    outcome = train_model(model, data, val, config)
    assert outcome.plan is not None and outcome.plan.loss == objective
    recall_at_1, ndcg_at_1 = rank_metrics(model, val, 1)
    # Every user's single unrated in-block item is their top recommendation.
    assert recall_at_1 == pytest.approx(1.0)
    assert ndcg_at_1 == pytest.approx(1.0)
    assert outcome.history[-1].train_loss < outcome.history[0].train_loss


def test_validation_runs_every_n_epochs_and_after_the_last() -> None:
    data, val, n = _checkerboard()
    config = TrainConfig(embedding_dim=4, epochs=7, patience=100, eval_every=3, batch_size=8)
    model = MatrixFactorization(ModelShape(n, n, 4, dropout=0.0, batch_norm=False))
    outcome = train_model(model, data, val, config)
    assert [r.epoch for r in outcome.history if r.metrics is not None] == [3, 6, 7]
    assert outcome.best_epoch in (3, 6, 7)


def test_rating_objective_predicts_block_ratings() -> None:
    # Users love their own block (5 stars) and dislike the other (1 star); half the cells
    # are observed, and the other half must be predicted.
    gen = torch.Generator().manual_seed(0)
    n = 20
    u, i = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    u, i = u.flatten(), i.flatten()
    stars = torch.where((u < n // 2) == (i < n // 2), 5.0, 1.0)
    observed = torch.rand(u.numel(), generator=gen) < 0.5
    norm = (stars - 1.0) / 4.0
    data = Interactions(u[observed], i[observed], norm[observed])
    pairs = Interactions(u[~observed], i[~observed], norm[~observed])
    val = Validation(
        pairs=pairs,
        train_items=Csr.build(data.users, data.items, n),
        val_items=Csr.build(pairs.users, pairs.items, n),
        rank_users=torch.arange(n),
        rating_min=1.0,
        rating_max=5.0,
    )
    config = TrainConfig(
        objective="rating", embedding_dim=4, epochs=150, patience=150, batch_size=32, lr=0.02
    )
    model = MatrixFactorization(ModelShape(n, n, 4, dropout=0.0, batch_norm=False))
    outcome = train_model(model, data, val, config)
    metrics = validate(model, val, config)
    assert metrics.rmse < 0.5  # stars; a constant guess would be 2.0
    assert outcome.history[0].train_loss > outcome.history[-1].train_loss


def _random_problem(seed: int = 0) -> tuple[Interactions, Validation, int, int]:
    gen = torch.Generator().manual_seed(seed)
    n_users, n_items, n = 30, 40, 600
    users = torch.randint(0, n_users, (n,), generator=gen)
    items = torch.randint(0, n_items, (n,), generator=gen)
    ratings = torch.rand(n, generator=gen)
    cut = 500
    data = Interactions(users[:cut], items[:cut], ratings[:cut])
    pairs = Interactions(users[cut:], items[cut:], ratings[cut:])
    val = Validation(
        pairs=pairs,
        train_items=Csr.build(data.users, data.items, n_users),
        val_items=Csr.build(pairs.users, pairs.items, n_users),
        rank_users=torch.unique(pairs.users),
        rating_min=1.0,
        rating_max=5.0,
    )
    return data, val, n_users, n_items


@pytest.mark.parametrize("objective", ["rating", "softmax", "sampled"])
def test_same_seed_gives_the_same_run(objective: str) -> None:
    data, val, n_users, n_items = _random_problem()
    config = TrainConfig(objective=objective, embedding_dim=8, epochs=4, batch_size=64, seed=3)  # type: ignore[arg-type]

    def run() -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(config.seed)
        model = MatrixFactorization(ModelShape(n_users, n_items, 8, 0.2, True))
        outcome = train_model(model, data, val, config)
        figures = [r.train_loss for r in outcome.history]
        figures += [r.metrics.rmse for r in outcome.history if r.metrics]
        return figures, model.state_dict()

    first, state_a = run()
    second, state_b = run()
    assert first == pytest.approx(second, abs=1e-6)
    for name in state_a:
        assert torch.allclose(state_a[name].float(), state_b[name].float(), atol=1e-6), name


def test_early_stopping_restores_the_best_epoch() -> None:
    # Pure noise and a high learning rate: validation RMSE gets worse after the first
    # epochs, so training stops early and the weights of the best epoch come back.
    data, val, n_users, n_items = _random_problem(seed=1)
    config = TrainConfig(
        objective="rating", embedding_dim=32, epochs=40, patience=3, batch_size=16, lr=0.05
    )
    torch.manual_seed(0)
    model = MatrixFactorization(ModelShape(n_users, n_items, 32, 0.0, False))
    outcome = train_model(model, data, val, config)
    assert outcome.status == "early_stopped"
    assert len(outcome.history) == outcome.best_epoch + config.patience
    best = next(r for r in outcome.history if r.epoch == outcome.best_epoch)
    assert best.metrics is not None
    assert min(r.metrics.rmse for r in outcome.history if r.metrics) == best.metrics.rmse
    assert validate(model, val, config).rmse == pytest.approx(best.metrics.rmse, abs=1e-6)
    assert outcome.history[-1].metrics is not None
    assert outcome.history[-1].metrics.rmse > best.metrics.rmse


def test_non_finite_loss_stops_and_keeps_the_last_good_weights() -> None:
    data, val, n_users, n_items = _random_problem()
    poisoned = Interactions(data.users, data.items, data.ratings.clone())
    poisoned.ratings[7] = math.nan
    config = TrainConfig(objective="rating", embedding_dim=4, epochs=5, batch_size=64)
    model = MatrixFactorization(ModelShape(n_users, n_items, 4, 0.0, False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = train_model(model, poisoned, val, config)
    assert outcome.status == "diverged"
    assert outcome.diverged_epoch == 1
    assert outcome.best_epoch == 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_refit_without_validation_runs_exactly_the_given_epochs() -> None:
    data, _, n_users, n_items = _random_problem()
    config = TrainConfig(embedding_dim=4, epochs=50, batch_size=64, eval_every=1)
    model = MatrixFactorization(ModelShape(n_users, n_items, 4, 0.0, False))
    outcome = train_model(model, data, None, config, epochs=3)
    assert [r.epoch for r in outcome.history] == [1, 2, 3]
    assert outcome.best_epoch == 3
    assert all(r.metrics is None for r in outcome.history)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sparse_adam", "adagrad"])
def test_every_optimizer_lowers_the_loss(optimizer: str) -> None:
    data, val, n_users, n_items = _random_problem()
    config = TrainConfig(
        objective="rating",
        embedding_dim=8,
        epochs=5,
        patience=5,
        batch_size=32,  # type: ignore[arg-type]
        optimizer=optimizer,
        lr=0.02,
    )
    sparse = optimizer in ("sparse_adam", "adagrad")
    model = MatrixFactorization(ModelShape(n_users, n_items, 8, 0.0, False, sparse=sparse))
    outcome = train_model(model, data, val, config)
    assert outcome.history[-1].train_loss < outcome.history[0].train_loss


def test_rank_metrics_match_a_hand_computed_case() -> None:
    # 1 user, 4 items; scores come from item biases only: item 3 > 2 > 1 > 0.
    model = MatrixFactorization(ModelShape(1, 4, 1, 0.0, False))
    with torch.no_grad():
        model.user_emb.weight.zero_()
        model.item_bias.weight[:, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    train_items = Csr.build(torch.tensor([0]), torch.tensor([3]), 1)  # item 3 already rated
    val_items = Csr.build(torch.tensor([0, 0]), torch.tensor([1, 0]), 1)  # relevant: 0 and 1
    val = Validation(
        pairs=Interactions(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.5])),
        train_items=train_items,
        val_items=val_items,
        rank_users=torch.tensor([0]),
        rating_min=1.0,
        rating_max=5.0,
    )
    recall, ndcg = rank_metrics(model, val, 2)  # top-2 unrated: [2, 1]; one hit at rank 2
    assert recall == pytest.approx(0.5)
    assert ndcg == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
