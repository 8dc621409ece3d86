"""How the training defaults were chosen: a grid on an INNER split carved from train.

    python benchmarks/tune_defaults.py DB [--inner user-time|random] [--fraction F]
                                        [--grid JSON] [--seeds 0] [--objective softmax]

The outer validation split of DB is never read (only its size: `--fraction` defaults to
its share of the rows, as `mfbatch tune`'s does; figures before session 8 used 0.2): each
user's newest `--fraction` of their train ratings (or a random share of the rows, `--inner
random`) becomes the validation set, every grid
point trains on the rest for its full epoch budget without early stopping, and is scored
once (Recall/NDCG@20 with bench_quality's metric function; RMSE for `--objective rating`).
`--grid` is a JSON list of TrainConfig overrides applied on top of the objective's
defaults; the default grid is the one README, "The model" reports. The recency half-life
and the user solve's half-life resolve from the inner split's kind as `mfbatch train`
resolves them from the database (on for user-time, off for random); the grid rows measured
before they existed need `"recency_half_life": 0` (`"user_half_life": 0`) to be reproduced.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import (
    inner_split,
    load,
    metrics,
    mf_scores,
    mfbatch_fit,
    rmse,
    top_lists,
)

from mfbatch.config import TrainConfig
from mfbatch.data.transforms import inner_share

SOFTMAX_GRID = [
    {"l2": l2, "batch_size": b, "epochs": e}
    for l2 in (0.02, 0.05, 0.08)
    for b in (32, 128)
    for e in (40, 80)
] + [
    {"l2_mode": "plain", "l2": 1.0},
    {"l2_mode": "plain", "l2": 3.0},
    {"l2_mode": "plain", "l2": 10.0},
    {"l2": 0.0, "optimizer": "adamw", "weight_decay": 0.5},
    {"l2": 0.0, "optimizer": "adamw", "weight_decay": 2.0},
    {"l2": 0.0, "optimizer": "adamw", "weight_decay": 5.0},
    {"embedding_dim": 64},
    {"embedding_dim": 128},
    {"embedding_dim": 512},
    {"temperature": 0.5},
    {"temperature": 2.0},
    {"lr": 0.002},
    {"lr": 0.01},
    {"dropout": 0.2},
    {"batch_norm": True},
]
# 0 is the previous default; on a random inner split the default is already 0.
RECENCY_GRID = [{"recency_half_life": h} for h in (0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 1.0, 2.0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("db")
    parser.add_argument("--inner", default="user-time", choices=["user-time", "random"])
    parser.add_argument("--fraction", type=float, default=None, help="default: the outer share")
    parser.add_argument("--objective", default="softmax")
    parser.add_argument("--grid", default=None)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--k", type=int, default=20)
    # One thread: the grid runs on a shared 2-core machine, where a second torch thread
    # waiting on a busy core makes every op crawl (README, "The model", threads).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = json.loads(args.grid) if args.grid else [{}, *SOFTMAX_GRID, *RECENCY_GRID]
    seeds = [int(s) for s in args.seeds.split(",")]
    outer = load(args.db)
    if args.fraction is None:
        args.fraction = inner_share(outer.val_u.size, outer.val_u.size + outer.train_u.size)
    inner = inner_split(outer, args.fraction, args.inner)
    print(
        f"inner split ({args.inner}, {args.fraction}) of {args.db}: train {inner.train_u.size:,}"
        f", inner val {inner.val_u.size:,}; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    for overrides in grid:
        figures: list[tuple[float, ...]] = []
        for seed in seeds:
            config = TrainConfig(device="cpu", objective=args.objective, seed=seed, **overrides)
            model, seconds, _ = mfbatch_fit(inner, config, early_stop=False)
            if args.objective == "rating":
                figures.append((rmse(inner, model), seconds))
            else:
                lists = top_lists(inner, mf_scores(model, inner.n_items), args.k)
                figures.append((*metrics(inner, lists, args.k), seconds))
        means = [statistics.mean(col) for col in zip(*figures, strict=True)]
        label = json.dumps(overrides) or "{}"
        if args.objective == "rating":
            print(f"{label:<70} RMSE {means[0]:.4f}  {means[1]:5.1f} s", flush=True)
        else:
            print(
                f"{label:<70} Recall@{args.k} {means[0]:.4f}  NDCG@{args.k} {means[1]:.4f}  "
                f"{means[2]:5.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
