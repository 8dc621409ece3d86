"""Training throughput: mfbatch's device-resident loop vs the design's per-sample DataLoader,
and the wall time of one epoch at 100k users x 20k items.

    python benchmarks/bench_train.py [--ratings 1000000] [--device cpu|cuda] [--out FILE]
    python benchmarks/bench_train.py --epoch [--users 100000] [--items 20000]
                                      [--ratings-per-user 89] [--full-steps 20]

Default mode: both loops train the same MatrixFactorization with the same batch size,
optimizer and MSE loss, in the same process, so the ratio is apples to apples; the softmax
objectives are reported beside it. Medians of --repeats.

`--epoch`: the synthetic generator's 100k x 20k x 89 (8.9M ratings), one whole epoch per
configuration: the default plan (which samples at this catalogue size, 1/400 of the users
a step), the same at the old 128 users a step, the sampled softmax at dim 64 / 1,024
users a step, and the full softmax forced (timed over --full-steps steps and scaled to
the epoch, labelled as such, unless --full-steps 0). `--breakdown` adds where the default
plan's epoch goes: batch building, forward, backward, optimizer (timers around each
phase of the same step `train_epoch` runs, over --breakdown-steps steps, scaled).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mfbatch.config import TrainConfig
from mfbatch.data.synthetic import SyntheticSpec, generate
from mfbatch.data.transforms import dense_ids
from mfbatch.training.loop import EpochData, step_loss, train_epoch
from mfbatch.training.model import MatrixFactorization, ModelShape
from mfbatch.training.objectives import UserBatch
from mfbatch.training.steps import DenseGrads, Plan, make_optimizers, plan
from mfbatch.training.tensors import Interactions


class RatingsDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """The design's loader: one (user, item, rating) sample per __getitem__."""

    def __init__(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> None:
        self.users, self.items, self.ratings = users, items, ratings

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.tensor(self.users[i], dtype=torch.long),
            torch.tensor(self.items[i], dtype=torch.long),
            torch.tensor(self.ratings[i], dtype=torch.float32),
        )


def naive_examples_per_second(
    model: MatrixFactorization,
    data: RatingsDataset,
    config: TrainConfig,
    batches: int,
    device: torch.device,
) -> float:
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True)
    (optimizer,) = make_optimizers(model, config)
    model.train()
    seen = 0
    started = time.perf_counter()
    for step, (u, i, r) in enumerate(loader):
        if step == batches:
            break
        u, i, r = u.to(device), i.to(device), r.to(device)
        optimizer.zero_grad()
        loss = torch.mean((model(u, i) - r) ** 2)
        loss.backward()
        optimizer.step()
        seen += len(u)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def epoch_seconds(
    model: MatrixFactorization,
    data: Interactions,
    config: TrainConfig,
    device: torch.device,
    run_plan: Plan | None = None,
    max_steps: int | None = None,
) -> tuple[float, Plan]:
    """Seconds for one epoch (or `max_steps` steps scaled up to one), and the plan used."""
    shape = model.shape
    epoch_data = EpochData.build(data, shape.n_users, shape.n_items, config.sampler)
    run_plan = run_plan or plan(config, shape.n_items, int(epoch_data.active_users.numel()))
    if max_steps is not None:
        # Time the first steps only: a slice of the users (or ratings) as the epoch.
        units = len(data) if run_plan.loss == "rating" else epoch_data.active_users.numel()
        share = min(1.0, max_steps * run_plan.batch_size / units)
        keep = epoch_data.active_users[: max(1, int(share * units))]
        epoch_data = dataclasses.replace(epoch_data, active_users=keep)
    else:
        share = 1.0
    optimizers = make_optimizers(model, config, run_plan)
    generator = torch.Generator(device=device).manual_seed(0)
    started, cpu = time.perf_counter(), time.process_time()
    train_epoch(model, optimizers, epoch_data, config, run_plan, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    # CPU seconds too: on a shared machine other jobs stretch the wall time, not these
    # (with one thread; more threads spin-waiting would inflate them instead).
    LAST_CPU_SECONDS[0] = (time.process_time() - cpu) / share
    return (time.perf_counter() - started) / share, run_plan


LAST_CPU_SECONDS = [0.0]


def breakdown(
    model: MatrixFactorization, data: Interactions, config: TrainConfig, steps: int
) -> dict[str, float]:
    """CPU seconds per epoch in each phase of the default plan's step (scaled from `steps`
    steps): what `train_epoch` does, with a timer between the phases."""
    shape = model.shape
    epoch_data = EpochData.build(data, shape.n_users, shape.n_items, config.sampler)
    users = epoch_data.active_users
    run_plan = plan(config, shape.n_items, int(users.numel()))
    optimizers = make_optimizers(model, config, run_plan)
    dense_grads = DenseGrads(optimizers)
    generator = torch.Generator().manual_seed(0)
    order = users[torch.randperm(users.numel(), generator=generator)]
    phases = dict.fromkeys(("batch", "forward", "backward", "optimizer"), 0.0)
    last = [time.process_time()]

    def mark(phase: str) -> None:
        now = time.process_time()
        phases[phase] += now - last[0]
        last[0] = now

    model.train()
    done = 0
    for start in range(0, steps * run_plan.batch_size, run_plan.batch_size):
        last[0] = time.process_time()
        idx = order[start : start + run_plan.batch_size]
        rows, items = epoch_data.by_user.rows_of(idx)
        batch = UserBatch(users=idx, rows=rows, items=items)
        mark("batch")
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = step_loss(model, batch, None, epoch_data, config, run_plan.loss, generator)
        mark("forward")
        loss.backward()
        mark("backward")
        dense_grads.fill()
        for opt in optimizers:
            opt.step()
        mark("optimizer")
        done += idx.numel()
    return {k: v * users.numel() / done for k, v in phases.items()}


def ours_examples_per_second(
    model: MatrixFactorization, data: Interactions, config: TrainConfig, device: torch.device
) -> float:
    seconds, _ = epoch_seconds(model, data, config, device)
    return len(data) / seconds


def epoch_bench(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    started = time.perf_counter()
    frame = generate(
        SyntheticSpec(users=args.users, items=args.items, ratings_per_user=args.ratings_per_user)
    )
    users, _ = dense_ids(frame["user_id"])
    items, _ = dense_ids(frame["item_id"])
    u_np, i_np = users.to_numpy().astype(np.int64), items.to_numpy().astype(np.int64)
    r_np = ((frame["rating"].to_numpy() - 1.0) / 4.0).astype(np.float32)
    data = Interactions(
        torch.tensor(u_np, device=device),
        torch.tensor(i_np, device=device),
        torch.tensor(r_np, device=device),
    )
    n_users, n_items = int(u_np.max()) + 1, int(i_np.max()) + 1
    print(
        f"{len(data):,} ratings, {n_users:,} users, {n_items:,} items (generated in "
        f"{time.perf_counter() - started:.1f} s), device {device}, torch threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )
    runs: list[tuple[str, TrainConfig, Plan | None, int | None]] = [
        ("default config (plan picks)", TrainConfig(device="cpu"), None, None),
        (
            "default config at the old 128 users/step",
            TrainConfig(device="cpu"),
            Plan("sampled", 128),
            None,
        ),
        (
            "sampled, dim 64, 1024 users/step",
            TrainConfig(device="cpu", objective="sampled", embedding_dim=64, batch_size=1024),
            None,
            None,
        ),
    ]
    if args.full_steps:
        for dim in (256, 64):
            config = TrainConfig(device="cpu", embedding_dim=dim)
            runs.append(
                (
                    f"full softmax forced, dim {dim} ({args.full_steps} steps, scaled)",
                    config,
                    Plan("softmax", int(config.batch_size or 1)),
                    args.full_steps,
                )
            )
    results: dict[str, float] = {}
    for label, config, forced, steps in runs:
        torch.manual_seed(0)
        dim = int(config.embedding_dim or 0)
        model = MatrixFactorization(ModelShape(n_users, n_items, dim, 0.0, False)).to(device)
        seconds, used = epoch_seconds(model, data, config, device, forced, steps)
        results[label] = seconds
        print(
            f"  {label:<52} {seconds:7.1f} s/epoch wall, {LAST_CPU_SECONDS[0]:7.1f} s CPU  "
            f"({used.loss}, {used.batch_size} users/step, dim {dim}; load avg "
            f"{os.getloadavg()[0]:.1f})",
            flush=True,
        )
    if args.breakdown:
        torch.manual_seed(0)
        config = TrainConfig(device="cpu")
        model = MatrixFactorization(ModelShape(n_users, n_items, 256, 0.0, False)).to(device)
        phases = breakdown(model, data, config, args.breakdown_steps)
        for phase, seconds in phases.items():
            results[f"breakdown {phase}"] = seconds
        print(
            "  default plan, CPU s/epoch by phase: "
            + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
            + f" (total {sum(phases.values()):.2f}; load avg {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratings", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-batches", type=int, default=60)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--epoch", action="store_true", help="the 100k x 20k epoch instead")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--ratings-per-user", type=float, default=89.0)
    parser.add_argument("--full-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--breakdown-steps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epoch:
        results = epoch_bench(args, device)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
        return

    users_n = max(1000, args.ratings // 100)
    frame = generate(
        SyntheticSpec(users=users_n, items=max(500, users_n // 3), ratings_per_user=110)
    )
    frame = frame.head(args.ratings)
    users, _ = dense_ids(frame["user_id"])
    items, _ = dense_ids(frame["item_id"])
    u_np, i_np = users.to_numpy().astype(np.int64), items.to_numpy().astype(np.int64)
    r_np = ((frame["rating"].to_numpy() - 1.0) / 4.0).astype(np.float32)
    shape = ModelShape(int(u_np.max()) + 1, int(i_np.max()) + 1, 64, 0.0, False)
    tensors = Interactions(
        torch.tensor(u_np, device=device),
        torch.tensor(i_np, device=device),
        torch.tensor(r_np, device=device),
    )
    print(
        f"{len(frame):,} ratings, {shape.n_users:,} users, {shape.n_items:,} items, dim 64, "
        f"device {device}, torch threads {torch.get_num_threads()}"
    )

    results: dict[str, float] = {}
    for objective in ("rating", "softmax", "sampled"):
        config = TrainConfig(objective=objective)  # type: ignore[arg-type]
        runs = []
        for _ in range(args.repeats):
            torch.manual_seed(0)
            runs.append(
                ours_examples_per_second(
                    MatrixFactorization(shape).to(device), tensors, config, device
                )
            )
        results[f"mfbatch_{objective}"] = statistics.median(runs)
    config = TrainConfig(objective="rating")
    dataset = RatingsDataset(u_np, i_np, r_np)
    runs = []
    for _ in range(args.repeats):
        torch.manual_seed(0)
        runs.append(
            naive_examples_per_second(
                MatrixFactorization(shape).to(device), dataset, config, args.naive_batches, device
            )
        )
    results["naive_dataloader_rating"] = statistics.median(runs)
    ratio = results["mfbatch_rating"] / results["naive_dataloader_rating"]
    for name, value in results.items():
        print(f"  {name:<26} {value:>14,.0f} examples/s (median of {args.repeats})")
    print(
        f"  ratio mfbatch/naive (same MSE step) {ratio:.1f}x  target >= 10x: "
        f"{'PASS' if ratio >= 10 else 'MISS'}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {**results, "ratio": ratio, "device": str(device), "ratings": len(frame)}, indent=2
            )
        )


if __name__ == "__main__":
    main()
