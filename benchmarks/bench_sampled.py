"""The sampled softmax against the full one, and the sampled plan's batch size, on one split.

    python benchmarks/bench_sampled.py DB [--seeds 0,1,2] [--threads 1] [--epochs N]
                                        [--eval-users N] [--variants 'LABEL=JSON;...']

Every variant trains blind (its whole epoch budget, validation never read) from the same
defaults plus its JSON overrides of TrainConfig, once per seed; Recall/NDCG@20 are then
`rank_metrics` on the validation split (bench_quality checks it against its own
metric function), over every validation user or a seeded sample of `--eval-users`.
Upper-case keys of a variant replace `mfbatch.training.steps` constants for that variant:
`"SAMPLED_STEPS"` (the most steps a sampled epoch takes; a huge value gives the plain
--batch-size back), `"SPARSE_USERS_FROM"` (a huge value keeps the user table on the
dense Adam).

The default variants make README's "Full vs sampled softmax" table (ML-100K user-time
0.2, user exponent 0). The synthetic guard of the big-catalogue plan:

    python benchmarks/bench_sampled.py syn.duckdb --seeds 0 --epochs 20 --eval-users 10000 \
        --variants 'plan={};1000 users a step={"SAMPLED_STEPS": 100};128 users a step=
        {"SAMPLED_STEPS": 1000000000}'

(syn.duckdb: `mfbatch preprocess --dataset synthetic --users 100000 --items 20000
--ratings-per-user 89 --split user-time --val-fraction 0.2`.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import load, mean_std, tensors

from mfbatch.config import TrainConfig
from mfbatch.training import loop as trainer
from mfbatch.training import steps
from mfbatch.training.model import MatrixFactorization, ModelShape
from mfbatch.training.validation import rank_metrics

DEFAULT_VARIANTS = (
    'full softmax={"user_exponent": 0};'
    'sampled, popularity, 1024 draws={"objective": "sampled", "user_exponent": 0};'
    'sampled, in-batch={"objective": "sampled", "sampler": "in-batch", "user_exponent": 0};'
    "sampled, popularity, 256 draws="
    '{"objective": "sampled", "negatives": 256, "user_exponent": 0}'
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("db")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--eval-users", type=int, default=None)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    split = load(args.db)
    data, val = tensors(split)
    if args.eval_users and val.rank_users.numel() > args.eval_users:
        pick = torch.randperm(val.rank_users.numel(), generator=torch.Generator().manual_seed(0))
        val = dataclasses.replace(val, rank_users=val.rank_users[pick[: args.eval_users]])
    print(
        f"{args.db}: {split.n_users:,} users, {split.n_items:,} items, train "
        f"{split.train_u.size:,}; ranked users {val.rank_users.numel():,}; torch threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )
    defaults = {name: getattr(steps, name) for name in ("SAMPLED_STEPS", "SPARSE_USERS_FROM")}
    for spec in filter(None, args.variants.split(";")):
        label, _, overrides = spec.partition("=")
        settings = json.loads(overrides)
        for name, value in defaults.items():
            setattr(steps, name, int(settings.pop(name, value)))
        recalls, ndcgs, walls, cpus = [], [], [], []
        plan = None
        for seed in seeds:
            config = TrainConfig(device="cpu", seed=seed, **settings)
            if args.epochs:
                config = config.replace(epochs=args.epochs)
            torch.manual_seed(seed)
            dim = int(config.embedding_dim or 0)
            model = MatrixFactorization(ModelShape(split.n_users, split.n_items, dim, 0.0, False))
            wall, cpu = time.perf_counter(), time.process_time()
            outcome = trainer.train_model(model, data, None, config)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            plan = outcome.plan
            recall, ndcg = rank_metrics(model, val, 20)
            recalls.append(recall)
            ndcgs.append(ndcg)
        assert plan is not None
        print(
            f"{label:<36} Recall@20 {mean_std(recalls)}  NDCG@20 {mean_std(ndcgs)}  "
            f"train {statistics.median(walls):.1f} s wall / {statistics.median(cpus):.1f} s "
            f"CPU (median)  [{plan.loss}, {plan.batch_size} users/step; load avg "
            f"{os.getloadavg()[0]:.1f}]",
            flush=True,
        )
    for name, value in defaults.items():
        setattr(steps, name, value)


if __name__ == "__main__":
    main()
