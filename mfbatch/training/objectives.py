"""Training losses on tensors. Each reuses the module's `forward` / `item_logits`.

- `full_softmax`: a softmax over the whole catalogue for every rated (user, item), summed
  over the user's rated items. Per user that is Σ_{i∈I_u} (logsumexp_j s_uj − s_ui) =
  |I_u|·lse_u − Σ_i s_ui, so one logits row per *user* per step carries every one of that
  user's ratings: the same loss as the per-rating form at a fraction of the cost.
- `sampled_softmax`: the same loss with the catalogue's logsumexp estimated from shared
  samples (popularity-drawn, uniform, the batch's own items, or those plus uniform
  draws: `draw_mixed`), each corrected by −log(S·q(item)),
  for catalogues whose full rows do not fit in memory.
- `mse`: squared error on the observed normalised ratings (the `rating` objective).

All three return the mean per-rating loss of the batch plus the L2 term, so their scale
(and the meaning of `--l2`) does not depend on the batch size.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from mfbatch.training.model import MatrixFactorization


@dataclass(frozen=True)
class UserBatch:
    """A batch of users and, flattened, every (row, item) rating they have in train."""

    users: torch.Tensor  # [B] int64
    rows: torch.Tensor  # [R] position in `users` of each rating
    items: torch.Tensor  # [R] the rated item
    # [R] each rating's weight within its user (e.g. `recency_weights`); None: all ones.
    weights: torch.Tensor | None = None
    # [R] each interaction's own weight (the ratings table's `weight`: play counts after
    # --weight-transform); None: all ones. Unlike `weights` it is a multiplicity: an
    # interaction of weight 2 is the same as the row twice, in the loss, in the per-user
    # counts and in the frequency-scaled L2.
    counts: torch.Tensor | None = None


def interaction_counts(batch: UserBatch) -> torch.Tensor:
    """[R] each rating's multiplicity (`batch.counts`, else ones)."""
    if batch.counts is None:
        return torch.ones(batch.items.numel(), device=batch.items.device)
    return batch.counts.float()


def batch_size_of(batch: UserBatch) -> float | torch.Tensor:
    """The batch's ratings counted with their multiplicity: what its losses are a mean over."""
    if batch.counts is None:
        return max(batch.items.numel(), 1)
    return batch.counts.float().sum().clamp(min=1e-12)


def _frequency(batch: UserBatch) -> torch.Tensor | None:
    """[R] how much each rating counts in the frequency-scaled L2: w² for `weights`
    (Kish's effective sample size, below) times its multiplicity; None: all ones."""
    if batch.weights is None and batch.counts is None:
        return None
    freq = interaction_counts(batch)
    return freq if batch.weights is None else freq * batch.weights.float().square()


def l2_penalty(model: MatrixFactorization, batch: UserBatch, l2: float, mode: str) -> torch.Tensor:
    """L2 on the factor tables, scaled so that summed over an epoch it is one fixed penalty.

    `frequency` weights each row by how many ratings it has (iALS's frequency-scaled L2,
    and what per-rating SGD with L2 on the batch's rows does implicitly):
    Σ_(u,i) ‖p_u‖² + ‖q_i‖². With `batch.weights` (mean 1 per user) a rating counts w²:
    unequal weights make n ratings worth n²/Σw² equal ones (Kish's effective sample
    size), and the prior keeps its strength against that evidence, not against n. (On the
    inner split this made the existing λ right again under recency weighting, where the
    plain count wanted λ ≈ 0.08; README, "Defaults".) `plain` is λ(‖P‖² + ‖Q‖²) spread
    evenly over an epoch's steps: the batch's user rows once each, the item table in
    proportion to the batch's share of users. Both are divided by the batch's ratings,
    like the loss.
    """
    if l2 == 0.0:
        return model.global_bias.new_zeros(())
    n = batch_size_of(batch)
    if mode == "frequency":
        # Row norms weighted by counts, not one gathered row per rating: the same sum
        # without [ratings x dim] temporaries (91k x 256 floats a step at 100k users).
        freq = _frequency(batch)
        if freq is None:
            user_counts = torch.bincount(batch.rows, minlength=batch.users.numel())
            items, item_counts = torch.unique(batch.items, return_counts=True)
        else:
            w2 = freq
            user_counts = w2.new_zeros(batch.users.numel()).index_add_(0, batch.rows, w2)
            items, inverse = torch.unique(batch.items, return_inverse=True)
            item_counts = w2.new_zeros(items.numel()).index_add_(0, inverse, w2)
        user_term = (user_counts * model.user_emb(batch.users).float().pow(2).sum(-1)).sum()
        item_term = (item_counts * model.item_emb(items).float().pow(2).sum(-1)).sum()
        return l2 * (user_term + item_term) / n
    share = batch.users.numel() / model.shape.n_users
    user_term = (model.user_emb(batch.users).float() ** 2).sum()
    # Through the lookup, not .weight: sparse tables then still get sparse gradients.
    every_item = torch.arange(model.shape.n_items, device=batch.users.device)
    item_term = share * (model.item_emb(every_item).float() ** 2).sum()
    return l2 * (user_term + item_term) / n


def user_weights(batch: UserBatch, exponent: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratings per batch user, weight per batch user): |I_u|^-exponent, scaled so the
    batch's ratings still sum to their count.

    The ranking metrics average over users, while a summed per-rating loss lets the
    heaviest raters dominate; a slight down-weighting (exponent 0.075, the default) is the
    best worst case over the five sets' inner splits (docs/model.md, "Defaults"). 0 is the
    plain per-rating sum.
    """
    if batch.counts is None:
        counts = torch.bincount(batch.rows, minlength=batch.users.numel()).float()
    else:  # a user's ratings counted with their multiplicity
        counts = torch.zeros(batch.users.numel(), device=batch.rows.device)
        counts = counts.index_add_(0, batch.rows, batch.counts.float())
    if exponent == 0.0:
        return counts, torch.ones_like(counts)
    weights = counts.clamp(min=1.0) ** -exponent
    return counts, weights * counts.sum() / (weights * counts).sum()


def rating_weights(batch: UserBatch, exponent: float) -> torch.Tensor:
    """[R] the weight of each rating in the loss: its user's `user_weights` times its own
    `batch.weights` (which keep each user's total, so the two do not interact)."""
    _, per_user = user_weights(batch, exponent)
    weights = per_user[batch.rows]
    if batch.counts is not None:
        weights = weights * batch.counts.float()
    return weights if batch.weights is None else weights * batch.weights


def recency_weights(
    users: torch.Tensor, ts: torch.Tensor, n_users: int, half_life: float
) -> torch.Tensor:
    """[R] 2^(-newer / (half_life * n_u)) per rating, rescaled to mean 1 within each user.

    `newer` counts the user's ratings strictly newer than this one (ties share a weight),
    n_u is the user's number of ratings: the weight halves every `half_life` share of a
    user's history back from their newest rating. By position rather than by clock time:
    many users rate in one sitting, where seconds say nothing about order of interest.
    Mean 1 per user keeps each user's share of the loss (and `user_weights`) unchanged.
    0 is no weighting.
    """
    ones = torch.ones(users.numel(), device=users.device)
    if half_life <= 0.0 or users.numel() == 0:
        return ones
    # Newest first within user; ties get the position of their first member, so equal
    # timestamps count no rating of their own group as newer.
    order = torch.argsort(ts, descending=True, stable=True)
    order = order[torch.argsort(users[order], stable=True)]
    u, t = users[order], ts[order]
    n = users.numel()
    new_user = torch.ones(n, dtype=torch.bool, device=users.device)
    new_user[1:] = u[1:] != u[:-1]
    new_group = new_user.clone()
    new_group[1:] |= t[1:] != t[:-1]
    position = torch.arange(n, device=users.device)
    user_start = torch.cummax(torch.where(new_user, position, 0), 0).values
    group_start = torch.cummax(torch.where(new_group, position, 0), 0).values
    newer = (group_start - user_start).double()
    counts = torch.bincount(users, minlength=n_users).double()
    raw = torch.exp2(-newer / (half_life * counts[u]))
    mean = torch.zeros(n_users, dtype=torch.float64, device=users.device)
    mean.index_add_(0, u, raw)
    mean = mean / counts.clamp(min=1.0)
    weights = torch.empty(n, dtype=torch.float32, device=users.device)
    weights[order] = (raw / mean[u]).float()
    return weights


def full_softmax(
    model: MatrixFactorization,
    batch: UserBatch,
    all_items: torch.Tensor,
    temperature: float = 1.0,
    user_exponent: float = 0.0,
) -> torch.Tensor:
    """Mean over the batch's ratings of (logsumexp over the catalogue − positive logit),
    each rating weighted by `rating_weights`: Σ_u (Σ_{i∈I_u} w_ui) lse_u − Σ w_ui s_ui."""
    # Logits may come out of a bf16 matmul on CUDA; logsumexp over thousands of items
    # needs fp32, or the largest term swamps the rest.
    logits = model.item_logits(batch.users, all_items).float() / temperature
    lse = torch.logsumexp(logits, dim=1)
    positive = logits[batch.rows, batch.items]
    weights = rating_weights(batch, user_exponent)
    per_user = torch.zeros_like(lse).index_add_(0, batch.rows, weights)
    summed = (per_user * lse).sum() - (weights * positive).sum()
    return summed / batch_size_of(batch)


@dataclass(frozen=True)
class Samples:
    """Distinct sampled items, how often each was drawn, and the draw's log-probability."""

    items: torch.Tensor  # [U] distinct items
    log_weight: torch.Tensor  # [U] log(multiplicity) − log(S · q(item))


def draw_samples(
    log_q: torch.Tensor,
    n: int,
    generator: torch.Generator,
    batch_items: torch.Tensor | None = None,
) -> Samples:
    """`n` items drawn with replacement from q (`log_q` over the catalogue), or the
    batch's own rated items when `batch_items` is given (in-batch negatives, whose q is
    the items' share of the ratings: users are drawn uniformly, so an item turns up in a
    batch about in proportion to its rating count)."""
    if batch_items is None:
        drawn = torch.multinomial(log_q.exp(), n, replacement=True, generator=generator)
    else:
        drawn = batch_items
    items, multiplicity = torch.unique(drawn, return_counts=True)
    log_weight = multiplicity.float().log() - math.log(drawn.numel()) - log_q[items]
    return Samples(items, log_weight)


def draw_mixed(
    log_q: torch.Tensor, n: int, generator: torch.Generator, batch_items: torch.Tensor
) -> Samples:
    """The batch's own rated items (frequency q: `log_q`) plus `n` uniform draws over the
    catalogue, as one set of samples: each item weighted by its expected count under the
    two together, R q(item) + n / I (the "balance heuristic" of multiple importance
    sampling), so the estimate stays unbiased whichever part drew it.

    In-batch items alone cover the popular head and miss the tail a ranking must also push
    down; uniform draws cover the tail at a weight of I / n each. Together they keep
    the hard (popular) negatives and the tail's estimate (docs/model.md, "Full or sampled")."""
    n_items = log_q.numel()
    uniform = torch.randint(0, n_items, (n,), generator=generator, device=log_q.device)
    drawn = torch.cat([batch_items, uniform])
    items, multiplicity = torch.unique(drawn, return_counts=True)
    expected = batch_items.numel() * log_q[items].double().exp() + n / n_items
    log_weight = multiplicity.double().log() - expected.log()
    return Samples(items, log_weight.float())


def sampled_softmax(
    model: MatrixFactorization,
    batch: UserBatch,
    samples: Samples,
    temperature: float = 1.0,
    user_exponent: float = 0.0,
    l2: float = 0.0,
) -> torch.Tensor:
    """The full softmax loss with Σ_j exp(s_uj) estimated as Σ_k exp(s_uk)/(S q_k), plus
    `l2_penalty`'s frequency-scaled L2 (weight `l2`) on the rows the step looked up.

    Per rating (u, i): logaddexp(s_ui, log Σ_{k: item_k ≠ i} exp(s_uk − log(S q_k))) − s_ui.
    The positive's own draws are taken out of the user's shared estimate in log space, so
    each rating costs O(1) on top of one [B, U] logits block per step; as samples grow the
    estimate tends to the catalogue's sum and the loss to `full_softmax`'s.

    Each table is read once a step (the samples and the rated items together): every
    further lookup of a big table costs its own gradient, and the rated items' logits go
    through `_RatedDots`, never a [ratings x dim] temporary. f (dropout, BatchNorm) is
    applied to the distinct rows, so a dropout mask is shared by the step's users.
    """
    raw_users, user_vec = model.user_rows(batch.users)
    n_drawn = samples.items.numel()
    touched, where = torch.unique(torch.cat([samples.items, batch.items]), return_inverse=True)
    raw_items, item_vec = model.item_rows(touched)
    bias = model.item_bias(touched).squeeze(-1)
    drawn, rated = where[:n_drawn], where[n_drawn:]
    logits = (user_vec @ item_vec[drawn].T + bias[drawn]).float() / temperature
    lse = torch.logsumexp(logits + samples.log_weight, dim=1)  # [B]
    positive = _RatedDots.apply(user_vec, item_vec, batch.rows, rated) + bias[rated]
    positive = positive.float() / temperature
    # The positive's share of the shared estimate: its logit plus its log-weight where it
    # was drawn (−inf where it was not).
    weight_of = torch.full((touched.numel(),), -math.inf, device=lse.device, dtype=lse.dtype)
    weight_of[drawn] = samples.log_weight
    own = positive + weight_of[rated] - lse[batch.rows]
    # log(1 − e^own); clamped so a user whose only sample is the positive stays finite.
    rest = lse[batch.rows] + torch.log((-torch.expm1(own)).clamp(min=1e-6))
    loss = torch.logaddexp(positive, rest) - positive
    loss = (rating_weights(batch, user_exponent) * loss).sum() / batch_size_of(batch)
    if l2 == 0.0:
        return loss
    # l2_penalty's "frequency" sum (a weighted rating counts w²), from the rows already
    # looked up.
    freq = _frequency(batch)
    if freq is None:
        user_counts = torch.bincount(batch.rows, minlength=batch.users.numel())
        item_counts = torch.bincount(rated, minlength=touched.numel())
    else:
        w2 = freq
        user_counts = w2.new_zeros(batch.users.numel()).index_add_(0, batch.rows, w2)
        item_counts = w2.new_zeros(touched.numel()).index_add_(0, rated, w2)
    user_term = (user_counts * raw_users.float().pow(2).sum(-1)).sum()
    item_term = (item_counts * raw_items.float().pow(2).sum(-1)).sum()
    return loss + l2 * (user_term + item_term) / batch_size_of(batch)


class _RatedDots(torch.autograd.Function):
    """s_r = <user_vec[rows_r], item_vec[items_r]> for every rating r, without the
    [ratings x dim] temporaries of gathering both sides (at 1,024 users a step, 91k x 256
    floats gathered, multiplied and scattered back cost more than the rest of the step).

    The forward is a sampled dense-dense product (SDDMM) on the ratings' CSR pattern;
    the backward is two gather-and-sum passes (`embedding_bag`):
    d/d user_vec[u] = Σ_r g_r q_(i_r) over u's ratings (`rows` ascending, so contiguous
    bags) and d/d item_vec[i] = Σ_r g_r p_(u_r) over i's ratings (bags after a sort).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        user_vec: torch.Tensor,
        item_vec: torch.Tensor,
        rows: torch.Tensor,
        items: torch.Tensor,
    ) -> torch.Tensor:
        counts = torch.bincount(rows, minlength=user_vec.shape[0])
        # fp32 whatever autocast made of the inputs: these are logits for a logsumexp.
        users, table = user_vec.float(), item_vec.float()
        with warnings.catch_warnings():
            # "Sparse CSR tensor support is in beta": once per process, on every log.
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]),
                items,
                users.new_zeros(items.numel()),
                size=(users.shape[0], table.shape[0]),
                check_invariants=False,
            )
        out = torch.sparse.sampled_addmm(pattern, users, table.T, beta=0.0).values()
        ctx.save_for_backward(user_vec, item_vec, rows, items, counts)
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        user_vec, item_vec, rows, items, counts = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_user = grad_item = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            grad_user = F.embedding_bag(
                items,
                item_vec.to(grad.dtype),
                torch.cumsum(counts, 0) - counts,
                mode="sum",
                per_sample_weights=grad,
            ).to(user_vec.dtype)
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            by_item, order = torch.sort(items)
            seen, per_item = torch.unique_consecutive(by_item, return_counts=True)
            summed = F.embedding_bag(
                rows[order],
                user_vec.to(grad.dtype),
                torch.cumsum(per_item, 0) - per_item,
                mode="sum",
                per_sample_weights=grad[order],
            )
            grad_item = item_vec.new_zeros(item_vec.shape)
            grad_item[seen] = summed.to(item_vec.dtype)
        return grad_user, grad_item, None, None


def mse(
    model: MatrixFactorization,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error on the [0, 1] ratings."""
    return torch.mean((model(users, items).float() - ratings) ** 2)
