"""Training throughput: mfbatch's device-resident loop vs the design's per-sample DataLoader.

    python tests/bench/bench_train.py [--ratings 1000000] [--device cpu|cuda] [--out FILE]

Both loops train the same MatrixFactorization with the same batch size, optimizer and MSE
loss, in the same process, so the ratio is apples to apples. The ranking objective (the
default, which also scores sampled negatives) is reported beside it. Medians of --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mfbatch.config import TrainConfig
from mfbatch.data.synthetic import SyntheticSpec, generate
from mfbatch.data.transforms import dense_ids
from mfbatch.model import MatrixFactorization, ModelShape
from mfbatch.trainer import Interactions, make_optimizers, train_epoch


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


def ours_examples_per_second(
    model: MatrixFactorization, data: Interactions, config: TrainConfig, device: torch.device
) -> float:
    optimizers = make_optimizers(model, config)
    generator = torch.Generator(device=device).manual_seed(0)
    started = time.perf_counter()
    train_epoch(model, optimizers, data, config, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratings", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-batches", type=int, default=60)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)

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
    for objective in ("rating", "ranking"):
        config = TrainConfig(objective=objective, rating_weight=0.0)  # type: ignore[arg-type]
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
