"""Torch CPU threads vs a busy core: why `train --threads` defaults to the idle cores.

    python benchmarks/bench_threads.py [--users 8000] [--items 1700] [--steps 50] [--repeats 3]

One fixed workload (default softmax steps on synthetic data) timed with 1 thread and with
all cores, first as the machine is, then with one core kept busy by a spinning child
process (what a second job on a 2-core box does), and with the default that
`mfbatch.training.device.resolve_threads` picks under that load. Medians of --repeats; the load
average is printed, since other jobs on a shared machine move these figures.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

from mfbatch.config import TrainConfig
from mfbatch.data.synthetic import SyntheticSpec, generate
from mfbatch.data.transforms import dense_ids
from mfbatch.training.device import resolve_threads, usable_cores
from mfbatch.training.loop import EpochData, train_epoch
from mfbatch.training.model import MatrixFactorization, ModelShape
from mfbatch.training.steps import make_optimizers, plan
from mfbatch.training.tensors import Interactions


def spin() -> None:
    while True:
        pass


def workload(data: Interactions, n_users: int, n_items: int, steps: int) -> float:
    config = TrainConfig(device="cpu")
    torch.manual_seed(0)
    model = MatrixFactorization(ModelShape(n_users, n_items, int(config.embedding_dim or 0), 0, 0))
    epoch_data = EpochData.build(data, n_users, n_items, config.sampler)
    run_plan = plan(config, n_items)
    users = epoch_data.active_users[: steps * run_plan.batch_size]
    epoch_data = EpochData(
        epoch_data.data, epoch_data.by_user, users, epoch_data.log_q, epoch_data.all_items
    )
    optimizers = make_optimizers(model, config, run_plan)
    started = time.perf_counter()
    train_epoch(model, optimizers, epoch_data, config, run_plan, torch.Generator().manual_seed(0))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=8000)
    parser.add_argument("--items", type=int, default=1700)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    frame = generate(SyntheticSpec(users=args.users, items=args.items, ratings_per_user=90))
    users, _ = dense_ids(frame["user_id"])
    items, _ = dense_ids(frame["item_id"])
    data = Interactions(
        torch.tensor(users.to_numpy().astype("int64")),
        torch.tensor(items.to_numpy().astype("int64")),
        torch.zeros(frame.height),
    )
    n_users, n_items = int(data.users.max()) + 1, int(data.items.max()) + 1
    cores = usable_cores()
    print(f"{len(data):,} ratings, {n_users:,} users x {n_items:,} items; {cores} cores")

    def timed(threads: int) -> float:
        torch.set_num_threads(threads)
        workload(data, n_users, n_items, 2)  # warm-up
        return statistics.median(
            workload(data, n_users, n_items, args.steps) for _ in range(args.repeats)
        )

    rows = []
    for busy in (False, True):
        spinner = mp.Process(target=spin, daemon=True) if busy else None
        if spinner is not None:
            spinner.start()
            time.sleep(0.5)
        picked, _ = resolve_threads(None)
        load = os.getloadavg()[0]
        for label, threads in (("1 thread", 1), (f"{cores} threads", cores)):
            rows.append((busy, label, timed(threads), load))
        rows.append((busy, f"default ({picked} picked)", timed(picked), load))
        if spinner is not None:
            spinner.terminate()
            spinner.join()
    base = {
        busy: next(s for b, lab, s, _ in rows if b == busy and lab == "1 thread")
        for busy in (False, True)
    }
    for busy, label, seconds, load in rows:
        state = "one core busy" if busy else "as is        "
        print(
            f"  {state}  {label:<22} {seconds:6.2f} s  ({seconds / base[busy]:.2f}x 1 thread; "
            f"load avg {load:.2f})"
        )


if __name__ == "__main__":
    main()
