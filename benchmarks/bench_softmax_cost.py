"""Seconds a full-softmax training step costs per user x item x dim: the constant of
`plan`'s cost rule (mfbatch.training.steps.KAPPA_CPU_NS, docs/model.md).

    python benchmarks/bench_softmax_cost.py [--threads 1,2] [--shapes 10000x20000x256,...]

Random interactions (30 per user); the real trainer step (`train_epoch` with a softmax
plan, Adam, frequency L2, 128 users a step) over STEPS steps after one warm-up step.
Prints one JSON line per (shape, threads): seconds a step and ns per user*item*max(dim, 64).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from mfbatch.config import TrainConfig
from mfbatch.training.loop import EpochData, train_epoch
from mfbatch.training.model import MatrixFactorization, ModelShape
from mfbatch.training.steps import Plan, make_optimizers
from mfbatch.training.tensors import Interactions

STEPS = 5
BATCH = 128


def one(n_users: int, n_items: int, dim: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    users = torch.arange(n_users).repeat_interleave(30)
    items = torch.randint(0, n_items, (users.numel(),), generator=gen)
    data = Interactions(users, items, torch.ones(users.numel()))
    config = TrainConfig(
        device="cpu", embedding_dim=dim, batch_size=BATCH, recency_half_life=0.0, threads=threads
    )
    torch.manual_seed(0)
    model = MatrixFactorization(ModelShape(n_users, n_items, dim, 0.0, False))
    run_plan = Plan("softmax", BATCH)
    optimizers = make_optimizers(model, config, run_plan)
    epoch_data = EpochData.build(data, n_users, n_items, config.sampler)
    timed = dataclasses.replace(epoch_data, active_users=epoch_data.active_users[: BATCH * STEPS])
    warm = dataclasses.replace(epoch_data, active_users=epoch_data.active_users[:BATCH])
    train_epoch(model, optimizers, warm, config, run_plan, gen)
    started = time.perf_counter()
    train_epoch(model, optimizers, timed, config, run_plan, gen)
    step = (time.perf_counter() - started) / STEPS
    ns = step / (BATCH * n_items * max(dim, 64)) * 1e9
    return {
        "users": n_users,
        "items": n_items,
        "dim": dim,
        "threads": threads,
        "step_s": round(step, 4),
        "ns_per_user_item_dim": round(ns, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--shapes", default="10000x20000x256,10000x35648x64,10000x50000x256")
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        n_users, n_items, dim = (int(x) for x in shape.split("x"))
        for threads in (int(t) for t in args.threads.split(",")):
            print(json.dumps(one(n_users, n_items, dim, threads)), flush=True)


if __name__ == "__main__":
    main()
