"""Training throughput: mfbatch's device-resident loop vs the design's per-sample DataLoader,
and the wall time of one epoch at 100k users x 20k items.

    python benchmarks/bench_train.py [--ratings 1000000] [--device cpu|cuda] [--out FILE]
    python benchmarks/bench_train.py --epoch [--users 100000] [--items 20000]
                                      [--ratings-per-user 89] [--full-steps 20]
    python benchmarks/bench_train.py --fixed-costs ../shared/data/ml-100k.zip [--repeats 3]
                                      [--threads 1 (0: the default)] [--baseline TREE]

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

`--fixed-costs ZIP`: the whole `mfbatch train` process on ML-100K (user-time split, 0.2
held out; the default settings), --repeats times as a subprocess: wall and CPU seconds of
the process, the seconds the run records (`--json`: from the stage's start to the end of
the loop) and the loop's own (the epochs' sum), so what lies outside the loop (start-up,
imports, reads, export, writes) shows as the gap; beside it implicit's ALS fit on the same
train rows (128 factors, reg 10, alpha 1, 15 iterations: bench_quality's best on this
split; skipped when implicit is not installed). `--baseline TREE` (a checkout of another
commit, e.g. `git archive main | tar -x -C /tmp/base`) runs the same command from that
tree, alternating with this one in each repeat. Medians; the load average beside each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
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


ROOT = Path(__file__).resolve().parent.parent


def _mfbatch(tree: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """`python -m mfbatch ARGS` run from `tree`: the result, wall and CPU seconds (user +
    system, of the child alone)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mfbatch", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"mfbatch {args[0]} failed in {tree}:\n{done.stderr}")
    return done, wall, cpu


def _als_fit_seconds(db: Path, threads: int, seed: int) -> float | None:
    """implicit's ALS fit on the database's train rows (binary), at bench_quality's best
    point on this split; None when implicit is not installed."""
    try:
        import scipy.sparse as sp
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.sql("SELECT user_idx, item_idx FROM ratings WHERE split = 'train'").fetchnumpy()
        ((n_users, n_items),) = con.sql(
            "SELECT max(user_idx) + 1, max(item_idx) + 1 FROM ratings"
        ).fetchall()
    finally:
        con.close()
    user_items = sp.csr_matrix(
        (np.ones(rows["user_idx"].size, dtype=np.float32), (rows["user_idx"], rows["item_idx"])),
        shape=(n_users, n_items),
    )
    with threadpool_limits(1, "blas"):  # implicit's advice: its threads, not BLAS's
        model = AlternatingLeastSquares(
            factors=128,
            regularization=10.0,
            alpha=1.0,
            iterations=15,
            random_state=seed,
            num_threads=threads,
        )
        started = time.perf_counter()
        model.fit(user_items, show_progress=False)
    return time.perf_counter() - started


def _train_once(tree: Path, db: Path, work: Path, threads: int) -> dict[str, float]:
    # --threads 0 here: leave the flag out, so train picks from the idle cores.
    flags = ["--threads", str(threads)] if threads else []
    done, wall, cpu = _mfbatch(
        tree, "train", "--db", str(db), *flags, "--export-dir", str(work / "export"), "--json"
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    # examples/s is examples over the epochs' own seconds: that sum is the loop's time.
    loop = summary["n_train"] * summary["epochs_run"] / summary["examples_per_second"]
    return {
        "wall": wall,
        "cpu": cpu,
        "recorded": summary["seconds"],
        "loop": loop,
        "load": os.getloadavg()[0],
        # Per run, so other jobs slowing one run's loop and its start alike cancel out.
        "wall_per_recorded": wall / summary["seconds"],
        "wall_per_loop": wall / loop,
        "recall": summary["val"]["Recall@20"],
        "ndcg": summary["val"]["NDCG@20"],
        "best_epoch": summary["best_epoch"],
    }


def fixed_costs(args: argparse.Namespace) -> dict[str, object]:
    """`--fixed-costs`: the whole train process vs its recorded seconds vs ALS's fit."""
    source = Path(args.fixed_costs).resolve()
    trees = [("this tree", ROOT)] + [(f"baseline {b}", Path(b).resolve()) for b in args.baseline]
    # 0: train's default (the idle cores) and implicit's (every core).
    threads = 1 if args.threads is None else args.threads
    results: dict[str, object] = {"threads": threads, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as scratch:
        work = Path(scratch)
        db = work / "ml100k.duckdb"
        _mfbatch(
            ROOT, "preprocess", "--dataset", "ml-100k", "--source", str(source),
            "--split", "user-time", "--val-fraction", "0.2", "--db", str(db),
        )  # fmt: skip
        runs: dict[str, list[dict[str, float]]] = {label: [] for label, _ in trees}
        als: list[float] = []
        for repeat in range(args.repeats):
            for label, tree in trees:
                run = _train_once(tree, db, work, threads)
                runs[label].append(run)
                print(
                    f"  {label:<20} run {repeat + 1}: wall {run['wall']:5.2f} s, CPU "
                    f"{run['cpu']:5.2f} s, recorded {run['recorded']:5.2f} s, loop "
                    f"{run['loop']:5.2f} s, wall/loop {run['wall_per_loop']:.2f}x "
                    f"(Recall@20 {run['recall']:.4f}, NDCG@20 "
                    f"{run['ndcg']:.4f}, best epoch {run['best_epoch']}; load avg "
                    f"{run['load']:.1f})",
                    flush=True,
                )
            fit = _als_fit_seconds(db, threads, repeat)
            if fit is not None:
                als.append(fit)
                print(f"  ALS fit {fit:.3f} s (load avg {os.getloadavg()[0]:.1f})", flush=True)
    als_median = statistics.median(als) if als else None
    for label, _ in trees:
        med = {k: statistics.median(r[k] for r in runs[label]) for k in runs[label][0]}
        results[label] = med
        line = (
            f"{label}: median wall {med['wall']:.2f} s, CPU {med['cpu']:.2f} s, recorded "
            f"{med['recorded']:.2f} s, loop {med['loop']:.2f} s; wall / recorded "
            f"{med['wall_per_recorded']:.2f}x, wall / loop {med['wall_per_loop']:.2f}x "
            "(medians of the runs' own ratios)"
        )
        if als_median:
            line += (
                f"; wall / ALS fit {med['wall'] / als_median:.0f}x, recorded / ALS fit "
                f"{med['recorded'] / als_median:.0f}x"
            )
        print(line)
    if als_median:
        results["als_fit"] = als_median
        print(f"ALS fit (128 factors, reg 10, alpha 1, 15 iterations, threads {threads or 'all'}): "
              f"median {als_median:.3f} s")  # fmt: skip
    else:
        print("implicit is not installed: ALS skipped (pip install implicit)")
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
    parser.add_argument("--fixed-costs", metavar="ZIP", help="ml-100k.zip: the whole process")
    parser.add_argument("--baseline", action="append", default=[], metavar="TREE")
    args = parser.parse_args()
    if args.fixed_costs:
        results = fixed_costs(args)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
        return
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
