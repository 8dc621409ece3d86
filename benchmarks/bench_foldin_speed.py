"""Fold-in speed: new users served by `mfbatch score` without retraining.

    python benchmarks/bench_foldin_speed.py [--base-users 10000] [--new-users 10000]
                                             [--items 20000] [--dim 64] [--seen 100]
                                             [--repeats 3]

A synthetic model (random weights: speed does not depend on them) over --base-users x
--items, recorded in a DuckDB file (bench_score.build_database). Then, in one run:
  fold_in:  mfbatch.serving.foldin.fold_in for --new-users users with ~--seen ratings each against
            the model's item tables, per method (medians of --repeats);
  base:     `mfbatch score` as a subprocess before the append (all users trained);
  append:   `mfbatch preprocess --append` of the new users' ratings (a CSV);
  e2e:      `mfbatch score` again, the new users folded in (wall, and its own summary).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_score import build_database, seen_items

from mfbatch.artifact.graph import augmented_tables
from mfbatch.serving.foldin import fold_in
from mfbatch.training.model import MatrixFactorization, ModelShape


def cli(*args: str | Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mfbatch", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    if done.returncode:
        raise SystemExit(f"mfbatch {args[0]} failed: {done.stderr}")
    return time.perf_counter() - started, done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-users", type=int, default=10_000)
    parser.add_argument("--new-users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seen", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = MatrixFactorization(
        ModelShape(args.base_users, args.items, args.dim, 0.0, False), init_std=0.3
    )
    model.eval()
    _, v_aug_t = augmented_tables(model)
    base_seen = seen_items(rng, args.base_users, args.items, args.seen)
    new = seen_items(rng, args.new_users, args.items, args.seen)
    ratings = rng.random(len(new.indices)).astype(np.float32)
    print(
        f"fold-in of {args.new_users:,} users x ~{len(new.indices) / args.new_users:.0f} "
        f"ratings against {args.items:,} items, dim {args.dim}"
    )
    for method in ("softmax", "ridge"):
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fold_in(new.indptr, new.indices, ratings, v_aug_t, method=method)
            times.append(time.perf_counter() - started)
        print(f"  fold_in method={method}: median {statistics.median(times):.2f} s of {times}")

    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        folder = Path(tmp)
        db_path = folder / "bench.duckdb"
        print("building the benchmark database (not timed)...", flush=True)
        build_database(db_path, folder / "export", model, base_seen)
        seconds, line = cli("score", "--db", db_path, "--provider", "cpu")
        print(f"  base score ({args.base_users:,} trained users): {seconds:.2f} s wall; {line}")
        users = np.repeat(np.arange(args.new_users), np.diff(new.indptr))
        pl.DataFrame(
            {
                "user_id": [f"new-{u}" for u in users],
                "item_id": new.indices + 1,  # build_database's raw ids are idx + 1
                "rating": 1.0 + 4.0 * ratings,
                "timestamp": np.full(len(users), 2_000_000_000),
            }
        ).write_csv(folder / "new.csv")
        seconds, line = cli(
            "preprocess", "--append", "--dataset", "csv", "--source", folder / "new.csv",
            "--db", db_path,
        )  # fmt: skip
        print(f"  append: {seconds:.2f} s wall; {line}")
        seconds, line = cli("score", "--db", db_path, "--provider", "cpu")
        print(f"  e2e score with the new users folded in: {seconds:.2f} s wall; {line}")


if __name__ == "__main__":
    main()
