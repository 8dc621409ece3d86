"""The losses in mfbatch.training.objectives against their per-rating definitions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mfbatch.config import TrainConfig, epochs_for
from mfbatch.training.loop import EpochData, train_epoch, train_model
from mfbatch.training.model import MatrixFactorization, ModelShape
from mfbatch.training.objectives import (
    Samples,
    UserBatch,
    draw_mixed,
    draw_samples,
    full_softmax,
    l2_penalty,
    recency_weights,
    sampled_softmax,
)
from mfbatch.training.steps import (
    KAPPA_CPU_NS,
    FusedAdam,
    LazyAdam,
    default_epochs,
    full_softmax_seconds,
    make_optimizers,
    plan,
)
from mfbatch.training.tensors import Csr, Interactions
from mfbatch.training.validation import Validation, rank_metrics


def _model_and_batch(
    n_users: int = 6, n_items: int = 15, seed: int = 0
) -> tuple[MatrixFactorization, UserBatch]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MatrixFactorization(ModelShape(n_users, n_items, 4, 0.0, False), init_std=0.8)
    with torch.no_grad():
        model.item_bias.weight.normal_(0.0, 0.5, generator=gen)
    users, items = [], []
    for u in range(n_users):
        rated = torch.randperm(n_items, generator=gen)[: 1 + u]  # 1..n_users items each
        users += [u] * rated.numel()
        items += rated.tolist()
    csr = Csr.build(torch.tensor(users), torch.tensor(items), n_users)
    batch_users = torch.tensor([4, 0, 2, 5])
    rows, rated_items = csr.rows_of(batch_users)
    return model, UserBatch(batch_users, rows, rated_items)


def _per_rating_full_softmax(model: MatrixFactorization, batch: UserBatch) -> torch.Tensor:
    """The definition, one rating at a time: logsumexp over the catalogue − own logit."""
    every = torch.arange(model.shape.n_items)
    losses = []
    for row, item in zip(batch.rows.tolist(), batch.items.tolist(), strict=True):
        logits = model.item_logits(batch.users[row : row + 1], every)[0]
        losses.append(torch.logsumexp(logits, 0) - logits[item])
    return torch.stack(losses).mean()


def test_grouped_softmax_equals_the_per_rating_softmax() -> None:
    model, batch = _model_and_batch()
    grouped = full_softmax(model, batch, torch.arange(model.shape.n_items))
    expected = _per_rating_full_softmax(model, batch)
    assert grouped.item() == pytest.approx(expected.item(), rel=1e-6)
    # ...and the gradients, which is what training sees.
    weight = model.user_emb.weight
    (g_grouped,) = torch.autograd.grad(grouped, weight)
    (g_expected,) = torch.autograd.grad(_per_rating_full_softmax(model, batch), weight)
    assert torch.allclose(g_grouped, g_expected, atol=1e-6)


def test_temperature_divides_the_logits() -> None:
    model, batch = _model_and_batch()
    every = torch.arange(model.shape.n_items)
    with torch.no_grad():
        model.user_emb.weight /= 2.0
        model.item_bias.weight /= 2.0
    halved = full_softmax(model, batch, every)
    with torch.no_grad():
        model.user_emb.weight *= 2.0
        model.item_bias.weight *= 2.0
    assert full_softmax(model, batch, every, temperature=2.0).item() == pytest.approx(
        halved.item(), rel=1e-6
    )


@pytest.mark.parametrize("q_kind", ["popularity", "uniform"])
def test_logq_sampled_softmax_approaches_the_full_loss(q_kind: str) -> None:
    model, batch = _model_and_batch()
    n_items = model.shape.n_items
    full = full_softmax(model, batch, torch.arange(n_items)).item()
    # A skewed sampling distribution: without the -log q correction the estimate would
    # stay biased however many samples are drawn.
    weights = torch.arange(1, n_items + 1, dtype=torch.float64) ** 2
    if q_kind == "uniform":
        weights = torch.ones(n_items, dtype=torch.float64)
    log_q = (weights / weights.sum()).log().float()
    gen = torch.Generator().manual_seed(0)

    def error(n: int, draws: int) -> float:
        errs = [
            abs(sampled_softmax(model, batch, draw_samples(log_q, n, gen)).item() - full)
            for _ in range(draws)
        ]
        return sum(errs) / draws

    few, many, most = error(8, 20), error(10_000, 5), error(2_000_000, 3)
    assert most < many < few
    assert most < 2e-3 * full
    # ...and so does its gradient, which is what training follows.
    params = [model.user_emb.weight, model.item_emb.weight, model.item_bias.weight]
    exact_grad = torch.autograd.grad(full_softmax(model, batch, torch.arange(n_items)), params)

    def grad_error(n: int, draws: int) -> float:
        total = 0.0
        for _ in range(draws):
            loss = sampled_softmax(model, batch, draw_samples(log_q, n, gen))
            got = torch.autograd.grad(loss, params)
            total += _relative_error(got, exact_grad)
        return total / draws

    g_few, g_many, g_most = grad_error(8, 20), grad_error(10_000, 5), grad_error(2_000_000, 3)
    assert g_most < g_many < g_few
    assert g_most < 5e-3
    # Every item once at weight S*q = 1 is the full sum itself: the positive's own term
    # is taken out of the shared estimate and added back exactly once.
    exact = Samples(torch.arange(n_items), torch.zeros(n_items))
    assert sampled_softmax(model, batch, exact).item() == pytest.approx(full, rel=1e-6)


def _relative_error(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> float:
    """‖got − expected‖ / ‖expected‖ over all the parameters' gradients together."""
    diff = sum(float((g.to_dense() - e).pow(2).sum()) for g, e in zip(got, expected, strict=True))
    return (diff / sum(float(e.pow(2).sum()) for e in expected)) ** 0.5


def test_sampled_gradient_at_the_default_negatives_matches_the_full_one_on_50k_items() -> None:
    """On a 50,000-item catalogue with Zipf-popular ratings (128 users, 30 each), one step's
    gradient (user and item tables together) at the default 1,024 negatives is within 45%
    relative L2 of the full softmax's with popularity draws (measured: at most 0.36 over 8
    steps) and 30% with mixed ones (0.21); the mean of 8 steps within 15% (0.12, 0.07) and
    pointing the same way (cosine >= 0.99). A single step's error is the estimator's noise,
    which Adam averages over steps; the mean's is closer to its bias."""
    n_items, n_users = 50_000, 128
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = MatrixFactorization(ModelShape(n_users, n_items, 32, 0.0, False), init_std=0.3)
    zipf = torch.arange(1, n_items + 1, dtype=torch.float64) ** -0.8
    zipf /= zipf.sum()
    rows = torch.arange(n_users).repeat_interleave(30)
    items = torch.multinomial(zipf, rows.numel(), replacement=True, generator=gen)
    batch = UserBatch(torch.arange(n_users), rows, items)
    params = [model.user_emb.weight, model.item_emb.weight]
    exact = torch.autograd.grad(full_softmax(model, batch, torch.arange(n_items)), params)
    negatives = TrainConfig().negatives
    assert negatives == 1024
    log_q = zipf.log().float()  # the popularity sampler's q (train counts, here the truth)
    batch_q = (torch.bincount(items, minlength=n_items).double() / items.numel()).log().float()
    for name, draw, single in (
        ("popularity", lambda: draw_samples(log_q, negatives, gen), 0.45),
        ("mixed", lambda: draw_mixed(batch_q, negatives, gen, items), 0.3),
    ):
        grads = [
            torch.autograd.grad(sampled_softmax(model, batch, draw()), params) for _ in range(8)
        ]
        errors = [_relative_error(g, exact) for g in grads]
        mean = tuple(sum(g[k].to_dense() for g in grads) / 8 for k in range(2))
        assert max(errors) < single, (name, errors)
        assert _relative_error(mean, exact) < 0.15, name
        cosine = torch.nn.functional.cosine_similarity(
            torch.cat([m.flatten() for m in mean]), torch.cat([e.flatten() for e in exact]), dim=0
        )
        assert cosine > 0.99, name


def test_mixed_samples_weigh_each_item_by_its_expected_count_under_both_parts() -> None:
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.25, 0.0]))
    batch_items = torch.tensor([0, 0, 2, 0])
    samples = draw_mixed(log_q, 8, torch.Generator().manual_seed(0), batch_items)
    uniform = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(0))
    drawn = torch.cat([batch_items, uniform])
    items, counts = torch.unique(drawn, return_counts=True)
    assert torch.equal(samples.items, items)
    # 4 batch draws at q plus 8 uniform ones over 4 items: expected 4 q + 2 per item.
    expected = 4 * torch.tensor([0.5, 0.25, 0.25, 0.0])[items] + 2.0
    assert torch.allclose(samples.log_weight, (counts / expected).log())


def _per_rating_sampled_softmax(
    model: MatrixFactorization, batch: UserBatch, samples: Samples, l2: float
) -> torch.Tensor:
    """The sampled loss by its definition, one rating at a time from gathered rows:
    log(e^s_ui + Σ_{drawn k ≠ i} e^(s_uk + log_weight_k)) − s_ui, plus frequency L2."""
    losses = []
    for row, item in zip(batch.rows.tolist(), batch.items.tolist(), strict=True):
        user = batch.users[row : row + 1]
        drawn = model.item_logits(user, samples.items)[0] + samples.log_weight
        own = model.item_logits(user, torch.tensor([item]))[0]
        rest = drawn[samples.items != item]
        losses.append(torch.logsumexp(torch.cat([own, rest]), 0) - own[0])
    return torch.stack(losses).mean() + l2_penalty(model, batch, l2, "frequency")


@pytest.mark.parametrize("sparse", [False, True])
def test_sampled_softmax_equals_its_per_rating_definition(sparse: bool) -> None:
    """One lookup per table, the rated logits by SDDMM and their embedding_bag backward
    give the per-rating loss and gradients, with dense or (as the trainer sets the item
    table for a sampled plan) sparse item gradients."""
    model, batch = _model_and_batch()
    model.item_emb.sparse = model.item_bias.sparse = sparse
    # Some samples are the batch's positives, some are not, one is drawn twice.
    samples = Samples(torch.tensor([0, 3, 7, 11]), torch.tensor([0.3, -0.2, 0.5, 0.1]))
    params = [model.user_emb.weight, model.item_emb.weight, model.item_bias.weight]
    got = sampled_softmax(model, batch, samples, l2=0.1)
    expected = _per_rating_sampled_softmax(model, batch, samples, l2=0.1)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for g, e in zip(
        torch.autograd.grad(got, params), torch.autograd.grad(expected, params), strict=True
    ):
        assert torch.allclose(g.to_dense(), e.to_dense(), atol=1e-6)


@pytest.mark.parametrize(("optimizer", "decay"), [("adam", 0.0), ("adam", 0.01), ("adamw", 0.01)])
def test_sampled_steps_with_sparse_item_rows_update_like_dense_ones(
    optimizer: str, decay: float
) -> None:
    """The trainer gives a sampled plan's item table sparse gradients summed into one
    persistent dense buffer, re-zeroed only where the last step filled it: the same Adam
    steps as dense gradients (weight decay, which Adam adds to the gradient, included)."""
    gen = torch.Generator().manual_seed(1)
    users = torch.randint(0, 40, (400,), generator=gen)
    items = torch.randint(0, 30, (400,), generator=gen)
    data = Interactions(users, items, torch.rand(400, generator=gen))
    config = TrainConfig(
        objective="sampled",
        embedding_dim=4,
        batch_size=8,
        negatives=16,
        optimizer=optimizer,
        weight_decay=decay,
    )
    weights = []
    for sampled_plan in (None, plan(config, 30, 40)):
        torch.manual_seed(0)
        model = MatrixFactorization(ModelShape(40, 30, 4, 0.0, False))
        optimizers = make_optimizers(model, config, sampled_plan)
        assert model.item_emb.sparse == (sampled_plan is not None)
        epoch_data = EpochData.build(data, 40, 30, config.sampler)
        for _ in range(2):
            train_epoch(
                model,
                optimizers,
                epoch_data,
                config,
                plan(config, 30, 40),
                torch.Generator().manual_seed(0),
            )
        weights.append(model.item_emb.weight.detach().clone())
    assert not torch.equal(weights[0], torch.zeros_like(weights[0]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def test_lazy_adam_moves_a_row_as_dense_adam_does_between_its_touches() -> None:
    """Big user tables get LazyAdam: a row touched once every `gap` steps takes, at each
    touch, the whole way dense Adam moves it on momentum until the next, so after three
    touches it stands where dense Adam's row does. Row 0 is touched every step (the
    steps' clock: the tail assumes a row waits `tail_steps`, as a user does for the next
    epoch); a row never touched does not move."""
    torch.manual_seed(0)
    # Dense Adam, LazyAdam, and SparseAdam (one step, no momentum tail), from one start.
    tables = [torch.nn.Embedding(3, 4, sparse=sparse) for sparse in (False, True, True)]
    for table in tables[1:]:
        table.load_state_dict(tables[0].state_dict())
    start = tables[1].weight.detach().clone()
    gap = 200
    optimizers = [
        FusedAdam(list(tables[0].parameters()), lr=0.01),
        LazyAdam(list(tables[1].parameters()), lr=0.01, tail_steps=gap),
        torch.optim.SparseAdam(list(tables[2].parameters()), lr=0.01),
    ]
    # Late touches, where Adam's bias corrections have settled (LazyAdam takes the whole
    # tail at the touch's correction, dense Adam at each step's).
    touches = {5_000, 5_000 + gap, 5_000 + 2 * gap}
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 5_000 + 3 * gap + 1):
        rows = torch.tensor([0, 1] if t in touches else [0])
        target = torch.randn(rows.numel(), 4, generator=gen)
        for table, opt in zip(tables, optimizers, strict=True):
            opt.zero_grad()
            ((table(rows) - target) ** 2).sum().backward()
            opt.step()
    dense, lazy, sparse = (table.weight.detach() for table in tables)
    moved = (dense[1] - start[1]).norm()
    assert moved > 0.5  # three touches moved it well away from its start
    assert (lazy[1] - dense[1]).norm() < 1e-3 * moved
    assert torch.equal(lazy[2], start[2])
    # SparseAdam's step lands a tenth of the way.
    assert (sparse[1] - start[1]).norm() < 0.3 * moved


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ),
    ],
)
def test_fused_adam_takes_torchs_fused_adam_steps_bit_for_bit(decoupled: bool, device: str) -> None:
    """FusedAdam is torch.optim.Adam / AdamW(fused=True) without torch._dynamo: the same
    weights to the bit under the cosine schedule train uses, so saved runs do not move.
    One parameter gets no gradient in some steps (its moments and step count wait)."""
    torch.manual_seed(0)
    models = [
        torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3)).to(device) for _ in "ab"
    ]
    models[1].load_state_dict(models[0].state_dict())
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    optimizers = [
        cls(models[0].parameters(), lr=0.05, weight_decay=0.01, fused=True),
        FusedAdam(models[1].parameters(), lr=0.05, weight_decay=0.01, decoupled=decoupled),
    ]
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5) for o in optimizers]
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        x, y = x.to(device), y.to(device)
        for model, opt, schedule in zip(models, optimizers, schedules, strict=True):
            opt.zero_grad(set_to_none=True)
            ((model(x) - y) ** 2).mean().backward()
            if step % 3 == 0:
                model[1].bias.grad = None
            opt.step()
            schedule.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(models[0][0].weight, models[0][0].weight.new_zeros(4, 6))


def test_in_batch_samples_use_the_batch_items_with_their_frequency() -> None:
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    samples = draw_samples(log_q, 99, torch.Generator(), batch_items=torch.tensor([0, 0, 2, 0]))
    assert samples.items.tolist() == [0, 2]
    # log(multiplicity) - log(S q): 3 of 4 draws for item 0 (q 0.5), 1 of 4 for item 2.
    expected = torch.log(torch.tensor([3 / (4 * 0.5), 1 / (4 * 0.25)]))
    assert torch.allclose(samples.log_weight, expected)


def test_frequency_l2_weights_rows_by_their_ratings_and_plain_by_table() -> None:
    model, batch = _model_and_batch()
    p, q = model.user_emb.weight.detach(), model.item_emb.weight.detach()
    n = batch.items.numel()
    freq = l2_penalty(model, batch, 0.5, "frequency").item()
    expected = (
        0.5 * ((p[batch.users[batch.rows]] ** 2).sum() + (q[batch.items] ** 2).sum()).item() / n
    )
    assert freq == pytest.approx(expected, rel=1e-5)
    plain = l2_penalty(model, batch, 0.5, "plain").item()
    share = batch.users.numel() / model.shape.n_users
    expected = 0.5 * ((p[batch.users] ** 2).sum() + share * (q**2).sum()).item() / n
    assert plain == pytest.approx(expected, rel=1e-5)
    # Weighted ratings count w² each (their effective number); weights of one change nothing.
    ones = dataclasses.replace(batch, weights=torch.ones(n))
    assert l2_penalty(model, ones, 0.5, "frequency").item() == pytest.approx(freq, rel=1e-6)
    w = torch.linspace(0.2, 1.8, n)
    weighted = l2_penalty(model, dataclasses.replace(batch, weights=w), 0.5, "frequency").item()
    rows = (p[batch.users[batch.rows]] ** 2).sum(1) + (q[batch.items] ** 2).sum(1)
    assert weighted == pytest.approx(0.5 * float((w**2 * rows).sum()) / n, rel=1e-5)


def test_catalogues_too_wide_for_the_memory_budget_fall_back_to_sampling() -> None:
    config = TrainConfig(memory_mb=16, batch_size=256, negatives=1024)
    # 16 MiB holds 1,048 rows of 1,000 items: the full softmax, 256 users a step.
    fits = plan(config, n_items=1_000)
    assert (fits.loss, fits.batch_size, fits.note) == ("softmax", 256, None)
    # 4 MiB holds 65 rows of 4,000 items: the full softmax, 65 users a step.
    capped = plan(config.replace(memory_mb=4), n_items=4_000)
    assert (capped.loss, capped.batch_size) == ("softmax", 65)
    # 2 MiB holds 32: too few to be worth it. Sampled, with a note saying why.
    few = plan(config.replace(memory_mb=2), n_items=4_000)
    assert few.loss == "sampled" and few.note is not None and "--memory-mb 2" in few.note
    assert few.batch_size == 128  # 1,024 samples a row: 128 rows fit in 2 MiB
    # A sampled epoch takes at most 400 steps where the budget allows: 200k users run
    # 500 a step; ML-100K's 943 keep --batch-size; 2 MiB still caps them at 128.
    big = config.replace(memory_mb=4096, objective="sampled")
    assert plan(big, n_items=20_000, n_users=200_000).batch_size == 500
    assert plan(big, n_items=20_000, n_users=943).batch_size == 256
    tight = config.replace(memory_mb=2)
    assert plan(tight, n_items=4_000, n_users=200_000).batch_size == 128
    assert plan(TrainConfig(objective="rating"), 10**7).loss == "rating"


def test_full_or_sampled_follows_the_cost_rule() -> None:
    """docs/model.md, "Full or sampled": full while epochs x users x items x max(dim, 64)
    x KAPPA fits --time-budget-s (and the rows fit --memory-mb), whatever the catalogue."""
    config = TrainConfig(epochs=80)  # dim 256, 600 s, 1 GiB
    # The estimate itself: 0.5 ns per user x item x dim on CPU; dim below 64 costs 64.
    assert full_softmax_seconds(1_000, 2_000, 256, 10) == pytest.approx(
        10 * 1_000 * 2_000 * 256 * KAPPA_CPU_NS * 1e-9
    )
    assert full_softmax_seconds(1_000, 2_000, 8, 10) == full_softmax_seconds(1_000, 2_000, 64, 10)
    # A small catalogue with many users: sampled only when over the budget.
    # 100k users x 5,000 items x 256 x 80 epochs ~ 1.4 h on CPU: over 600 s.
    many = plan(config, n_items=5_000, n_users=100_000)
    assert many.loss == "sampled" and "over --time-budget-s 600" in many.reason
    assert many.note is not None and many.full_seconds == pytest.approx(5_120, rel=1e-3)
    # ... and full once the budget covers it, or with fewer users (ML-100K's 943).
    assert plan(config.replace(time_budget_s=6_000), 5_000, 100_000).loss == "softmax"
    assert plan(config, n_items=5_000, n_users=943).loss == "softmax"
    # A large catalogue with few users: full (the old rule, items <= 8 x --negatives,
    # sampled it): 500 users x 50,000 items ~ 256 s.
    few = plan(config, n_items=50_000, n_users=500)
    assert few.loss == "softmax" and few.note is None
    assert "within --time-budget-s 600" in few.reason and "500 users x 50,000 items" in few.reason
    # The same on a GPU's assumed throughput: Amazon-CDs' size stays full there.
    assert plan(config, 35_648, 43_169).loss == "sampled"
    assert plan(config, 35_648, 43_169, device_type="cuda").loss == "softmax"
    # --objective sampled is obeyed whatever the cost, and says so.
    asked = plan(config.replace(objective="sampled"), n_items=1_000, n_users=100)
    assert asked.loss == "sampled" and asked.note is None and "--objective sampled" in asked.reason


def test_user_exponent_weights_each_users_ratings_and_keeps_the_scale() -> None:
    model, batch = _model_and_batch()
    every = torch.arange(model.shape.n_items)
    logits = model.item_logits(batch.users, every).detach()
    per_rating = torch.logsumexp(logits, 1)[batch.rows] - logits[batch.rows, batch.items]
    counts = torch.bincount(batch.rows, minlength=batch.users.numel()).float()
    raw = counts**-0.5
    weights = raw * counts.sum() / (raw * counts).sum()
    expected = (weights[batch.rows] * per_rating).sum() / batch.items.numel()
    got = full_softmax(model, batch, every, user_exponent=0.5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    # The weights move loss between users, not its scale: they sum to the ratings.
    assert float((weights[batch.rows]).sum()) == pytest.approx(batch.items.numel(), rel=1e-6)


def test_rating_weights_of_one_leave_both_losses_unchanged() -> None:
    model, batch = _model_and_batch()
    every = torch.arange(model.shape.n_items)
    ones = dataclasses.replace(batch, weights=torch.ones(batch.items.numel()))
    for exponent in (0.0, 0.3):
        plain = full_softmax(model, batch, every, user_exponent=exponent)
        weighted = full_softmax(model, ones, every, user_exponent=exponent)
        assert weighted.item() == pytest.approx(plain.item(), rel=1e-6)
        samples = draw_samples(torch.full((model.shape.n_items,), -2.7), 64, torch.Generator())
        assert sampled_softmax(model, ones, samples, user_exponent=exponent).item() == (
            pytest.approx(sampled_softmax(model, batch, samples, user_exponent=exponent).item())
        )


def test_weighted_grouped_softmax_equals_the_weighted_per_rating_sum() -> None:
    model, batch = _model_and_batch()
    every = torch.arange(model.shape.n_items)
    weights = torch.rand(batch.items.numel(), generator=torch.Generator().manual_seed(3)) * 2
    weighted = dataclasses.replace(batch, weights=weights)
    logits = model.item_logits(batch.users, every)
    per_rating = torch.logsumexp(logits, 1)[batch.rows] - logits[batch.rows, batch.items]
    expected = (weights * per_rating).sum() / batch.items.numel()
    got = full_softmax(model, weighted, every)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    (g_got,) = torch.autograd.grad(got, model.item_emb.weight)
    (g_expected,) = torch.autograd.grad(expected, model.item_emb.weight)
    assert torch.allclose(g_got, g_expected, atol=1e-6)


def test_recency_weights_halve_per_share_of_history_and_keep_each_users_total() -> None:
    users = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    ts = torch.tensor([10, 30, 20, 30, 5, 6, 1])
    got = recency_weights(users, ts, 3, half_life=0.5)
    # User 0 (4 ratings, half-life 2 ratings): the two at t=30 are newest (none newer),
    # t=20 has 2 newer, t=10 has 3: raw 1, 1, 2^-1, 2^-1.5, rescaled to mean 1.
    raw0 = torch.tensor([2**-1.5, 1.0, 0.5, 1.0], dtype=torch.float64)
    raw1 = torch.tensor([0.5, 1.0], dtype=torch.float64)  # half-life 1 rating
    expected = torch.cat([raw0 / raw0.mean(), raw1 / raw1.mean(), torch.ones(1).double()])
    assert torch.allclose(got.double(), expected, atol=1e-6)
    assert torch.equal(recency_weights(users, ts, 3, half_life=0.0), torch.ones(7))
    # The order of the input rows does not matter.
    perm = torch.tensor([6, 2, 4, 0, 5, 3, 1])
    assert torch.allclose(recency_weights(users[perm], ts[perm], 3, 0.5), got[perm])


def _drifting_users(seed: int = 0) -> tuple[Interactions, Validation]:
    """Two item blocks (0-9, 10-19). Anchor users rate within one block, at random times;
    drifting users rated 8 items of block A long ago, then 3 of block B, and their held-out
    future is the rest of block B. Only the order of their ratings says which block."""
    gen = torch.Generator().manual_seed(seed)
    users, items, ts = [], [], []
    for u in range(40):
        block = 10 * (u % 2)
        for i in torch.randperm(10, generator=gen)[:6].tolist():
            users.append(u)
            items.append(block + i)
            ts.append(int(torch.randint(0, 1000, (1,), generator=gen)))
    val_u, val_i = [], []
    for u in range(40, 60):
        a = torch.randperm(10, generator=gen)[:8].tolist()
        b = (10 + torch.randperm(10, generator=gen)).tolist()
        for t, i in enumerate(a + b[:3]):
            users.append(u)
            items.append(i)
            ts.append(t)
        val_u += [u] * 7
        val_i += b[3:]
    data = Interactions(
        torch.tensor(users), torch.tensor(items), torch.ones(len(users)), torch.tensor(ts)
    )
    pairs = Interactions(torch.tensor(val_u), torch.tensor(val_i), torch.ones(len(val_u)))
    val = Validation(
        pairs=pairs,
        train_items=Csr.build(data.users, data.items, 60),
        val_items=Csr.build(pairs.users, pairs.items, 60),
        rank_users=torch.arange(40, 60),
        rating_min=1.0,
        rating_max=5.0,
    )
    return data, val


def test_recency_weighting_ranks_a_users_newer_taste_first() -> None:
    data, val = _drifting_users()
    recalls = {}
    for half_life in (0.0, 0.05):
        config = TrainConfig(
            device="cpu",
            embedding_dim=8,
            epochs=60,
            batch_size=16,
            lr=0.05,
            l2=0.05,
            recency_half_life=half_life,
        )
        torch.manual_seed(0)
        model = MatrixFactorization(ModelShape(60, 20, 8, 0.0, False))
        train_model(model, data, None, config)
        recalls[half_life] = rank_metrics(model, val, 5)[0]
    # Unweighted, 8 of a drifting user's 11 ratings say block A, and A's two unrated items
    # take 2 of the top 5 (recall 0.6); weighted, the 3 newest (block B) ratings win.
    assert recalls[0.0] < 0.7
    assert recalls[0.05] > 0.85


def test_default_epochs_follow_the_step_budget() -> None:
    """docs/quality.md, "How the defaults were chosen": the softmax/sampled epochs fit
    2,160 optimizer steps, within 20-80 (sampled: 40-80); the rating objective keeps its
    own 40."""
    assert epochs_for(943, 128) == 80  # ML-100K: 8 steps an epoch
    assert epochs_for(2_999, 128) == 80  # ML-1M partial: 24 steps
    assert epochs_for(6_022, 128) == 45  # ML-1M LCFN: 48 steps
    assert epochs_for(43_169, 128) == 20  # 338 steps, the floor
    assert epochs_for(6_022, 512) == 80  # bigger steps, fewer of them
    assert epochs_for(0, 128) == 80
    assert epochs_for(10_000, 128, least=40) == 40  # the sampled softmax's floor
    assert epochs_for(6_022, 128, least=40) == 45
    assert TrainConfig().epochs is None and TrainConfig(objective="rating").epochs == 40
    # The plan's cost estimate and train_model use the same resolved budget: ML-1M LCFN's
    # size trains the full softmax for 45 epochs; Amazon-CDs' samples, at the sampled
    # floor of 40 (on its inner split 20 kept 0.953 of the best Recall@20, 40 0.990).
    config = TrainConfig()
    assert default_epochs(config, 3_043, 6_022) == 45
    assert plan(config, 3_043, 6_022).full_seconds == pytest.approx(
        full_softmax_seconds(6_022, 3_043, 256, 45)
    )
    assert default_epochs(config, 35_648, 43_169) == 40
    assert plan(config, 35_648, 43_169).loss == "sampled"
    assert default_epochs(config.replace(objective="sampled"), 3_043, 6_022) == 45
    assert default_epochs(config.replace(objective="sampled"), 3_706, 943) == 80
    assert default_epochs(config.replace(epochs=7), 35_648, 43_169) == 7
    users = torch.arange(300).repeat_interleave(2)
    items = torch.randint(0, 20, (600,), generator=torch.Generator().manual_seed(0))
    data = Interactions(users, items, torch.ones(600))
    model = MatrixFactorization(ModelShape(300, 20, 4, 0.0, False))
    small = config.replace(embedding_dim=4, batch_size=128, eval_every=1)
    # 300 users at 128 a step: 3 steps an epoch, 500 epochs by the budget, capped at 80.
    assert len(train_model(model, data, None, small).history) == 80
