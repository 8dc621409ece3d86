"""How an epoch steps: the plan (which loss, how many users a step) and the optimizers.

Resolved once per run from the config, the catalogue and the memory budget, before the
first step; `train_epoch` (mfbatch.training.loop) then only follows it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from mfbatch.config import TrainConfig, epochs_for
from mfbatch.config.train import SAMPLED_MIN_EPOCHS
from mfbatch.training.model import MatrixFactorization


@dataclass(frozen=True)
class Plan:
    """How the epoch is batched, resolved once from the config, catalogue and budget."""

    loss: str  # softmax | sampled | rating
    batch_size: int  # users per step (softmax, sampled) or ratings per step (rating)
    note: str | None = None  # why the plan differs from what was asked, for the log
    # Why this loss: the cost rule's figures, printed before training and recorded.
    reason: str = ""
    full_seconds: float | None = None  # the full softmax's estimated training seconds


# Bytes one logit costs in a step: the fp32 logits, their softmax (kept for backward), the
# gradient, and a bf16 copy on CUDA, with slack for the allocator.
BYTES_PER_LOGIT = 16
# Fewer full rows than this per step and the epoch turns into thousands of tiny matmuls;
# sampling then is the faster way to the same loss.
MIN_FULL_ROWS = 64
# Seconds a full-softmax training step costs per user x item x max(dim, 64) on one CPU
# thread (forward logits, two backward matmuls, the logsumexp/softmax passes, Adam):
# 0.24-0.43 ns at 4k-36k items, 0.5-0.65 ns at 100k items where a step's logits leave
# the cache (benchmarks/bench_softmax_cost.py; docs/model.md, "Full or sampled"). The
# planning figure is the conservative end. Below 64 dimensions the per-logit passes
# dominate and a step costs what 64 does. More threads are not credited: on the 2-core
# machine this was measured on, 2 threads ran a step 2.5-5x *slower* than 1 (0.29 -> 1.5
# ns at 20k x 256, cores shared with other jobs), so a thread count says little about
# the throughput a run will get.
KAPPA_CPU_NS = 0.5
MIN_COST_DIM = 64
# CUDA: ASSUMED, not measured (no GPU where this was written): bf16 matmuls at ~100
# TFLOP/s (6 FLOP per user x item x dim) plus ~64 bytes per logit at ~2 TB/s for the fp32
# softmax passes: 0.06 ps per user x item x dim + 32 ps per user x item (~0.18 ps per
# user x item x dim at 256, ~2,700x one CPU thread).
KAPPA_GPU_PS_PER_DIM = 0.06
KAPPA_GPU_PS_PER_LOGIT = 32.0
# A sampled step has a fixed cost whatever its users (the dense Adam over the item table,
# its gradient buffer, the step's sorts), so a sampled epoch takes at most this many
# steps: at 100k users x 20k items, 250 users a step instead of 128 ran an epoch ~1.4x
# faster, and on a planted-structure set ranked within 0.0006 Recall@20 of it after 20
# epochs, where 1,000 a step (100 steps) stalled ~11% lower (README, "Training and
# accuracy").
SAMPLED_STEPS = 400


def full_softmax_seconds(
    n_users: int, n_items: int, dim: int, epochs: int, device_type: str = "cpu"
) -> float:
    """Estimated seconds of `epochs` full-softmax epochs: every active user's logits row
    over the catalogue each epoch, at the cost per user x item x dim above."""
    width = max(dim, MIN_COST_DIM)
    logits = float(epochs) * n_users * n_items
    if device_type == "cuda":
        return logits * (KAPPA_GPU_PS_PER_DIM * width + KAPPA_GPU_PS_PER_LOGIT) * 1e-12
    return logits * width * KAPPA_CPU_NS * 1e-9


def default_epochs(
    config: TrainConfig, n_items: int, n_users: int, device_type: str = "cpu"
) -> int:
    """`config.epochs`, or the default for this data: the step budget (`epochs_for`) when
    the full softmax is what `plan` picks at that budget; for the sampled softmax, the
    same budget over the sampled plan's steps, at least `SAMPLED_MIN_EPOCHS`."""
    if config.epochs:
        return int(config.epochs)
    full = epochs_for(n_users, int(config.batch_size or 1))
    chosen = plan(config.replace(epochs=full), n_items, n_users, device_type=device_type)
    if chosen.loss == "softmax":
        return full
    return epochs_for(n_users, chosen.batch_size, SAMPLED_MIN_EPOCHS)


def plan(
    config: TrainConfig,
    n_items: int,
    n_users: int = 0,
    *,
    device_type: str = "cpu",
    epochs: int | None = None,
) -> Plan:
    """Full softmax or sampled, from what the full one would cost (docs/model.md, "Full or
    sampled"): full when at least `MIN_FULL_ROWS` rows of the catalogue fit `--memory-mb`
    and its estimated training time (`full_softmax_seconds` over `epochs`, the run's
    epoch budget) fits `--time-budget-s`; else the logQ-corrected sampled softmax. A
    sampled epoch takes at most `SAMPLED_STEPS` steps of `n_users` (the users with
    ratings) where the memory allows."""
    batch = int(config.batch_size or 0)
    if config.objective == "rating":
        return Plan("rating", batch, reason="--objective rating")
    budget = config.memory_mb * (1 << 20)
    full_rows = budget // (n_items * BYTES_PER_LOGIT)
    fits = full_rows >= min(batch, MIN_FULL_ROWS)
    n_epochs = int(epochs or config.epochs or default_epochs(config, n_items, n_users, device_type))
    seconds = full_softmax_seconds(
        n_users, n_items, int(config.embedding_dim or 0), n_epochs, device_type
    )
    where = (
        "a GPU (assumed throughput)"
        if device_type == "cuda"
        else f"CPU ({KAPPA_CPU_NS:g} ns per user x item x dim)"
    )
    cost = (
        f"{n_users:,} users x {n_items:,} items x {n_epochs} epochs at dim "
        f"{config.embedding_dim} ~ {_duration(seconds)} on {where}"
    )
    cheap = seconds <= config.time_budget_s
    if config.objective == "softmax" and fits and cheap:
        reason = f"full softmax: {cost}, within --time-budget-s {config.time_budget_s:g}"
        return Plan("softmax", max(1, min(batch, full_rows)), None, reason, seconds)
    sampled_rows = max(1, budget // (config.negatives * BYTES_PER_LOGIT))
    users = min(max(batch, -(-n_users // SAMPLED_STEPS)), sampled_rows)
    what = (
        f"sampled softmax ({config.negatives} {config.sampler} negatives, {max(1, users)} "
        "users a step)"
    )
    if config.objective == "sampled":
        return Plan("sampled", max(1, users), None, f"{what}: --objective sampled", seconds)
    why = (
        f"a full row of {n_items:,} items leaves room for {full_rows} users in "
        f"--memory-mb {config.memory_mb}"
        if not fits
        else f"the full softmax would take {cost}, over --time-budget-s {config.time_budget_s:g}"
    )
    note = f"{why}; training with the {what} instead"
    return Plan("sampled", max(1, users), note, f"{what}: {why}", seconds)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.2g} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# User-table size (rows x dim) from which the softmax objectives update users lazily.
SPARSE_USERS_FROM = 4_000_000


def make_optimizers(
    model: MatrixFactorization,
    config: TrainConfig,
    run_plan: Plan | None = None,
    *,
    steps_per_epoch: int | None = None,
) -> list[torch.optim.Optimizer]:
    """The run's optimizers. `steps_per_epoch` (default: every user of the table in
    batches of the plan's size) is how long a lazily updated user row waits between its
    steps (`LazyAdam`)."""
    lr = float(config.lr or 0.0)  # resolved per objective by TrainConfig
    if run_plan is not None and run_plan.loss == "sampled" and config.optimizer != "sparse_adam":
        # A sampled step reads a few thousand item rows; a dense lookup's gradient is a
        # fresh zero-filled [items x dim] tensor every step (page faults and all). Sparse
        # ones go into one persistent dense gradient instead (`DenseGrads`), so the item
        # table still gets its dense Adam.
        model.item_emb.sparse = model.item_bias.sparse = True
    big_user_table = model.shape.n_users * model.shape.dim >= SPARSE_USERS_FROM
    if config.optimizer == "adam" and config.objective != "rating" and big_user_table:
        # A softmax step reads every item but only its batch's users: a dense Adam
        # rewrites the whole user table every step, so an epoch costs O(users^2): at 100k
        # users x 256 that was ~90% of it. Those rows get sparse gradients and a lazy Adam
        # instead (the item side stays dense), which moves a row on its one step an epoch
        # as far as dense Adam's momentum would over the epoch (`LazyAdam`).
        model.user_emb.sparse = model.user_bias.sparse = True
        users = model.user_parameters()
        rest = [p for p in model.parameters() if all(p is not u for u in users)]
        if steps_per_epoch is None:
            batch = run_plan.batch_size if run_plan is not None else int(config.batch_size or 1)
            steps_per_epoch = -(-model.shape.n_users // max(1, batch))
        return [LazyAdam(users, lr=lr, tail_steps=steps_per_epoch), FusedAdam(rest, lr=lr)]
    if config.optimizer in ("adam", "adamw"):
        decoupled = config.optimizer == "adamw"
        return [
            FusedAdam(
                model.parameters(), lr=lr, weight_decay=config.weight_decay, decoupled=decoupled
            )
        ]
    sparse = [p for n, p in model.named_parameters() if n.endswith(("_emb.weight", "_bias.weight"))]
    dense = [
        p for n, p in model.named_parameters() if not n.endswith(("_emb.weight", "_bias.weight"))
    ]
    if config.optimizer == "adagrad":
        return [torch.optim.Adagrad(model.parameters(), lr=lr)]
    return [torch.optim.SparseAdam(sparse, lr=lr), torch.optim.Adam(dense, lr=lr)]


def user_optimizer(
    model: MatrixFactorization, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.Optimizer:
    """The user solve's optimizer (mfbatch.training.loop.solve_users): a fresh Adam on the
    user tables at the run's learning rate, lazy where training's was."""
    users = model.user_parameters()
    lr = float(config.lr or 0.0)
    if model.user_emb.sparse:
        return LazyAdam(users, lr=lr, tail_steps=steps_per_epoch)
    return FusedAdam(users, lr=lr)


class _Eager(torch.optim.Optimizer):
    """An optimizer that never imports torch._dynamo.

    torch.optim.Optimizer wraps `add_param_group`, `zero_grad` and every built-in `step`
    to keep torch.compile out of them, and the first call of each imports torch._dynamo:
    1-2 s on this machine, as long as `import torch` itself and a fifth of a default
    ML-100K run. Nothing here is compiled, so these are the plain versions.
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        for name, default in self.defaults.items():
            param_group.setdefault(name, default)
        self.param_groups.append(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()


class FusedAdam(_Eager):
    """torch.optim.Adam(fused=True) (AdamW's decoupled decay with `decoupled`): the same
    fused kernel on the same moments and step counts, so the same weights bit for bit
    (tests/test_objectives.py holds it to torch's), without torch._dynamo (`_Eager`)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "decoupled": decoupled,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            steps = [state["step"] for state in states]
            torch._foreach_add_(steps, 1)
            kernel = torch._fused_adamw_ if group["decoupled"] else torch._fused_adam_
            beta1, beta2 = group["betas"]
            kernel(
                params,
                [p.grad for p in params],
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [],
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("FusedAdam takes dense gradients (see DenseGrads)")
            # As torch.optim.Adam(fused=True) starts them: a float32 step on p's device.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state


class LazyAdam(_Eager):
    """Adam on the rows a sparse gradient touches, the others left as they are, for tables
    a step reads a few rows of (big user tables: each user is in one batch an epoch).

    Each touched row moves as far as dense Adam would move it until its next touch, in
    one step: dense Adam keeps moving a row on momentum for the steps after its gradient,
    about 1 / (1 - beta1) = 10 times as far as that first step, where torch.optim.SparseAdam
    moves it once and then not until the next epoch (an epoch's users then moved a tenth
    of what small tables' users do: on Amazon-CDs' inner split, 20 epochs reached 0.0972
    Recall@20 against 0.1287 with this step). So the step is scaled by that tail's sum,
    sum over j < `tail_steps` of (beta1 / sqrt(beta2))^j, and the moments first decay by
    the steps since the row's last touch, as dense Adam's do. tests/test_objectives.py
    holds a row to dense Adam's path. Row-wise ops: SparseAdam builds a sparse tensor per
    moment update and took twice as long (33 vs 16 ms for 2,048 rows x 256, one thread).
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        tail_steps: int = 1,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.tail_steps = max(1, tail_steps)
        # Steps taken, with or without gradients (a distributed rank that owns none of a
        # batch's users still steps): dense Adam's clock, for the decay and bias correction.
        self.clock = 0

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        self.clock += 1
        t = self.clock
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            ratio = beta1 / math.sqrt(beta2)
            tail = (1 - ratio**self.tail_steps) / (1 - ratio)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["touched"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
                idle = (t - 1 - state["touched"].index_select(0, rows)).to(p.dtype).unsqueeze(1)
                state["touched"].index_fill_(0, rows, t)
                exp_avg = state["exp_avg"].index_select(0, rows).mul_(beta1**idle)
                exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2**idle)
                exp_avg.lerp_(values, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, exp_avg)
                state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
                step_size = group["lr"] * tail * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                update = exp_avg.div_(exp_avg_sq.sqrt_().add_(group["eps"]))
                p.index_add_(0, rows, update, alpha=-step_size)


class DenseGrads:
    """Sparse gradients of parameters a dense optimizer holds, summed into one persistent
    dense buffer per parameter. Only the rows the last step filled are zeroed again: the
    rest are zero already (Adam reads the gradient, never writes it), where a whole-table
    memset cost a twentieth of a sampled step, and a fresh [items x dim] tensor every step
    paid page faults as well (most of it)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.params = [
            p
            for opt in optimizers
            if isinstance(opt, FusedAdam | torch.optim.Adam)
            for group in opt.param_groups
            for p in group["params"]
        ]
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def fill(self) -> None:
        for p in self.params:
            grad = p.grad
            if grad is None or not grad.is_sparse:
                continue
            rows = grad._indices()[0]
            held = self.buffers.get(id(p))
            if held is None:
                buffer = torch.zeros_like(p)
            else:
                buffer, filled = held
                buffer.index_fill_(0, filled, 0.0)
            # Uncoalesced is fine: index_add_ sums repeated rows.
            buffer.index_add_(0, rows, grad._values())
            self.buffers[id(p)] = (buffer, rows)
            p.grad = buffer
