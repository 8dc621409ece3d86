"""Scoring speed: the `mfbatch score` core vs numpy and vs a bare ONNX Runtime floor.

    python benchmarks/bench_score.py [--users 100000] [--items 20000] [--dim 64]
                                      [--ratings-per-user 100] [--repeats 3] [--out FILE]
                                      [--floor-sizes 256,1024,...] [--no-numpy]

The scale point: `--users 1000000 --ratings-per-user 20 --floor-sizes 1024,2048 --no-numpy`.

One synthetic model (random weights; speed does not depend on them), ~`--ratings-per-user`
rated items per user (popularity-skewed), measured in one run:
  (a) numpy: U @ V.T, mask the rated items, argpartition + sort of the top K (one run:
      it is the slowest by far and only a sanity baseline);
  (b) floor: an ONNX Runtime graph of Gather + MatMul + TopK with no masking at all, at
      each of several batch sizes; the floor is the fastest of them (all are reported);
  core:      mfbatch's exported graph driven by mfbatch.serving.session.Scorer (masking included),
             at the batch size the Scorer picks, one batch queued ahead (as build_lists);
  e2e:       `mfbatch score --db FILE --memory-mb M --quiet`, the command line itself, in a
             fresh interpreter on a DuckDB file holding the same shapes: start-up, the
             CLI's imports, config, reading the db, scoring, the publish, the summary;
  the job's whole floor, each part bare, in the same round robin:
    read:    DuckDB read of the rated (user_idx, item_idx) pairs, fresh connection;
    write:   the lists as (publish_id, user_idx, item_idx, rank, score) ints + float32
             into a fresh DuckDB file, one transaction;
    imports: `import numpy, onnxruntime, duckdb, pyarrow` in a fresh interpreter;
    whole floor = best floor + read + write + imports; e2e is measured against it.
  Also: `import mfbatch.stages.score` in a fresh interpreter (target: within 0.15 s of
  the bare imports), and the database's growth per publish (MB).
Medians of --repeats (taken round robin), wall seconds and CPU seconds (all threads; the
e2e child's from getrusage). Ratios are against the floor measured in this run. On a
shared machine the CPU-second ratios are the steadier ones; the load average is printed
before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from mfbatch.artifact.files import export_model, save_model
from mfbatch.artifact.graph import augmented_tables
from mfbatch.config import SplitConfig, machine_cores
from mfbatch.data.base import RawData
from mfbatch.data.transforms import prepare
from mfbatch.serving.csr import SeenItems
from mfbatch.serving.session import Scorer
from mfbatch.stages.preprocess_write import write_dataset
from mfbatch.store import db
from mfbatch.training.model import MatrixFactorization, ModelShape

K = 20


def seen_items(rng: np.random.Generator, n_users: int, n_items: int, per_user: int) -> SeenItems:
    popularity = (np.arange(n_items) + 1.0) ** -0.8
    cdf = np.cumsum(popularity / popularity.sum())
    items = np.searchsorted(cdf, rng.random(n_users * per_user))
    users = np.repeat(np.arange(n_users), per_user)
    pairs = np.unique(users.astype(np.int64) * n_items + np.minimum(items, n_items - 1))
    return SeenItems.from_sorted(pairs // n_items, pairs % n_items, n_users)


def floor_session(u_aug: np.ndarray, v_aug_t: np.ndarray, threads: int) -> ort.InferenceSession:
    nodes = [
        helper.make_node("Gather", ["U", "users"], ["rows"], axis=0),
        helper.make_node("MatMul", ["rows", "Vt"], ["scores"]),
        helper.make_node("TopK", ["scores", "k"], ["top_scores", "top_items"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "floor",
        [
            helper.make_tensor_value_info("users", TensorProto.INT64, ["b"]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        [
            helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, ["b", "k"]),
            helper.make_tensor_value_info("top_items", TensorProto.INT64, ["b", "k"]),
        ],
        [numpy_helper.from_array(u_aug, "U"), numpy_helper.from_array(v_aug_t, "Vt")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def timed(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median (wall seconds, CPU seconds of every thread of this process)."""
    wall, cpu = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return statistics.median(wall), statistics.median(cpu)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bare_read(db_path: Path) -> None:
    import duckdb

    con = duckdb.connect(str(db_path), read_only=True)
    try:
        con.execute("SELECT user_idx, item_idx FROM ratings").fetchnumpy()
    finally:
        con.close()


def bare_write(folder: Path, n_users: int) -> Callable[[], None]:
    """The lean publish with nothing else: K rows a user, ints and float32, one transaction."""
    import duckdb
    import pyarrow as pa

    rows = n_users * K
    table = pa.table(
        {
            "publish_id": np.ones(rows, np.int32),
            "user_idx": np.repeat(np.arange(n_users, dtype=np.int32), K),
            "item_idx": np.random.default_rng(1).integers(0, 20_000, rows).astype(np.int32),
            "rank": np.tile(np.arange(1, K + 1, dtype=np.int32), n_users),
            "score": np.random.default_rng(2).random(rows).astype(np.float32),
        }
    )

    def run() -> None:
        path = folder / "bare-write.duckdb"
        path.unlink(missing_ok=True)
        con = duckdb.connect(str(path))
        try:
            con.register("lists", table)
            con.execute("SET preserve_insertion_order = false")
            con.begin()
            con.execute(
                "CREATE TABLE l (publish_id INTEGER, user_idx INTEGER, item_idx INTEGER, "
                "rank INTEGER, score FLOAT)"
            )
            con.execute("INSERT INTO l SELECT * FROM lists")
            con.commit()
        finally:
            con.close()

    return run


def fresh_import(modules: str) -> Callable[[], None]:
    def run() -> None:
        subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)

    return run


_OLD_LAYOUT = """
CREATE TABLE IF NOT EXISTS recommendation_history (
    publish_id INTEGER NOT NULL, published_at TIMESTAMP NOT NULL, run_id VARCHAR NOT NULL,
    user_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL, rank INTEGER NOT NULL,
    score DOUBLE NOT NULL, predicted_rating DOUBLE, source VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL)
"""


def publish_only(n_users: int, n_items: int, repeats: int) -> None:
    """The publish alone, lean (this version) against the previous one-table layout:
    the same n_users x K lists, medians of `repeats`, and each layout's growth per publish."""
    import duckdb
    import pyarrow as pa

    from mfbatch.serving.lists import ListBatch, to_arrow, to_lean_arrow, with_rating
    from mfbatch.store.history import Scale, publish_lists

    rng = np.random.default_rng(0)
    users = np.arange(n_users, dtype=np.int64)
    items = rng.integers(0, n_items, (n_users, K))
    scores = -np.sort(-rng.random((n_users, K)).astype(np.float32), axis=1)
    batch = ListBatch(users, items, scores, np.ones(n_users, dtype=bool))
    user_ids = pa.array([str(u + 1) for u in range(n_users)], pa.string())
    item_ids = pa.array([str(i + 1) for i in range(n_items)], pa.string())
    lean = to_lean_arrow(batch)
    old = with_rating(to_arrow(batch, user_ids, item_ids), "ranking", 1.0, 5.0)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        paths = {"lean": Path(tmp) / "lean.duckdb", "rows": Path(tmp) / "rows.duckdb"}
        for path in paths.values():
            con = duckdb.connect(str(path))
            con.register("u", pa.table({"user_idx": np.arange(n_users), "user_id": user_ids}))
            con.register("i", pa.table({"item_idx": np.arange(n_items), "item_id": item_ids}))
            con.execute(
                "CREATE TABLE users AS SELECT user_idx::INTEGER AS user_idx, user_id FROM u"
            )
            con.execute(
                "CREATE TABLE items AS SELECT item_idx::INTEGER AS item_idx, item_id FROM i"
            )
            con.execute("CREATE TABLE dataset_meta AS SELECT 'bench' AS dataset_sha256")
            con.close()

        def run_lean() -> None:
            publish_lists(
                paths["lean"],
                lean,
                "bench-run",
                datetime.now(),
                scale=Scale("ranking", 1.0, 5.0),
                partial=False,
                keep=repeats + 1,
            )

        publish_id = 0

        def run_rows() -> None:  # the previous version's insert, as it was
            nonlocal publish_id
            publish_id += 1
            con = duckdb.connect(str(paths["rows"]))
            try:
                con.register("spooled", old)
                con.execute("SET preserve_insertion_order = false")
                con.begin()
                con.execute(_OLD_LAYOUT)
                con.execute(
                    "INSERT INTO recommendation_history SELECT $p, now()::TIMESTAMP, 'bench-run', "
                    "user_id::VARCHAR, item_id::VARCHAR, rank::INTEGER, score::DOUBLE, "
                    "predicted_rating::DOUBLE, source::VARCHAR, now()::TIMESTAMP FROM spooled",
                    {"p": publish_id},
                )
                con.commit()
            finally:
                con.close()

        sizes = {name: path.stat().st_size for name, path in paths.items()}
        got = {"lean": [], "rows": []}
        for _ in range(repeats):
            for name, fn in (("lean", run_lean), ("rows", run_rows)):
                started, cpu = time.perf_counter(), time.process_time()
                fn()
                got[name].append((time.perf_counter() - started, time.process_time() - cpu))
        print(f"publish of {n_users * K:,} rows, load average {os.getloadavg()[0]:.2f}")
        for name in ("lean", "rows"):
            wall = statistics.median(w for w, _ in got[name])
            cpu_s = statistics.median(c for _, c in got[name])
            grown = (paths[name].stat().st_size - sizes[name]) / repeats / 1e6
            print(f"  {name:<5} {wall:6.2f} s {cpu_s:6.2f} cpu-s  {grown:6.1f} MB per publish")


def build_database(
    path: Path, export_dir: Path, model: MatrixFactorization, seen: SeenItems
) -> None:
    """A DuckDB file with the benchmark's users/items/ratings and one recorded run."""
    import polars as pl

    n_users, n_items = model.shape.n_users, model.shape.n_items
    users = np.repeat(np.arange(n_users), np.diff(seen.indptr))
    ratings = pl.DataFrame(
        {
            "user_id": users + 1,
            "item_id": seen.indices + 1,
            "rating": np.ones(len(users)) * 4.0,
            "ts": np.zeros(len(users), dtype=np.int64),
        }
    ).with_columns(pl.from_epoch("ts", time_unit="s"))
    # Every rating in train (val 1 row), so the scorer masks exactly `seen`.
    raw = RawData(ratings, None, "bench", "0" * 64, "synthetic", "synthetic", (1.0, 5.0))
    prepared = prepare(
        raw, split=SplitConfig(kind="random", val_fraction=1e-9), rating_scale=(1.0, 5.0)
    )
    from mfbatch.config import Config

    config = Config(db=path)
    con = db.connect(path)
    write_dataset(con, path, raw, prepared, config, "bench-dataset", 0.0)
    run_id = "bench-run"
    folder = export_dir / run_id
    manifest = save_model(
        model,
        folder,
        manifest={
            "run_id": run_id,
            "dataset_sha256": "bench-dataset",
            "data_seen": "train+val",
            "shape": model.shape.__dict__,
            "rating_min": 1.0,
            "rating_max": 5.0,
            "objective": "ranking",
            "best_epoch": 1,
            "status": "completed",
        },
    )
    export_model(model, manifest, folder)
    now = datetime.now()
    db.run(con, "create_training_runs")
    db.run(
        con,
        "insert_training_run",
        run_id=run_id,
        parent_run_id=None,
        started_at=now,
        finished_at=now,
        status="completed",
        config="{}",
        dataset_sha256="bench-dataset",
        data_seen="train+val",
        device="cpu",
        objective="ranking",
        epochs_run=1,
        best_epoch=1,
        train_loss=None,
        val_rmse=None,
        val_mae=None,
        val_recall=None,
        val_ndcg=None,
        top_k=K,
        n_train=len(users),
        seconds=0.0,
        examples_per_second=0.0,
        export_path=str(folder),
    )
    con.close()
    assert n_items == int(prepared.items.height), "every item must appear in the ratings"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--ratings-per-user", "--seen", dest="seen", type=int, default=100)
    parser.add_argument(
        "--floor-sizes",
        help="comma-separated batch sizes for the floor (default: 256 ... 4096, the scorer's "
        "pick and the memory budget's)",
    )
    parser.add_argument(
        "--no-numpy", action="store_true", help="skip the numpy baseline (minutes at 1M users)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-mb", type=int, default=512)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--publish-only", action="store_true", help="time the publish alone, lean vs rows"
    )
    args = parser.parse_args()
    if args.publish_only:
        publish_only(args.users, args.items, args.repeats)
        return
    threads = machine_cores()
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = MatrixFactorization(
        ModelShape(args.users, args.items, args.dim, 0.0, False), init_std=0.3
    )
    model.eval()
    u_aug, v_aug_t = augmented_tables(model)
    seen = seen_items(rng, args.users, args.items, args.seen)
    all_users = np.arange(args.users, dtype=np.int64)
    no_mask = np.zeros(args.items, dtype=np.float32)
    k = np.array([K], dtype=np.int64)
    print(
        f"{args.users:,} users x {args.items:,} items, dim {args.dim}, "
        f"{len(seen.indices) / args.users:.0f} rated/user, {threads} threads"
    )

    def numpy_baseline() -> None:
        v = np.ascontiguousarray(v_aug_t.T)
        for start in range(0, args.users, batch):
            users = all_users[start : start + batch]
            scores = u_aug[users] @ v.T
            pairs = seen.pairs(users)
            scores[pairs[:, 0], pairs[:, 1]] = -np.inf
            part = np.argpartition(-scores, K, axis=1)[:, :K]
            order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1)
            np.take_along_axis(part, order, 1)

    floor = floor_session(u_aug, v_aug_t, threads)

    def floor_run(size: int) -> Callable[[], None]:
        def run() -> None:
            for start in range(0, args.users, size):
                floor.run(None, {"users": all_users[start : start + size], "k": k})

        return run

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        folder = Path(tmp)
        db_path = folder / "bench.duckdb"
        print("building the benchmark database (not timed)...", flush=True)
        build_database(db_path, folder / "export", model, seen)
        onnx_path = folder / "export" / "bench-run" / "model.onnx"
        scorer = Scorer(onnx_path, provider="cpu", threads=threads)
        batch = scorer.auto_batch_size(args.items, args.memory_mb)
        budget_batch = int((args.memory_mb << 20) // (args.items * 4))
        sizes = sorted(
            {int(n) for n in args.floor_sizes.split(",")}
            if args.floor_sizes
            else {256, 512, 1024, 2048, 4096, batch, min(budget_batch, 16384)}
        )
        print(f"load average {load_before[0]:.2f}; the scorer picks {batch} users/batch")

        def core() -> None:
            # One batch queued ahead of the one collected, as build_lists runs it.
            ahead = None
            for start in range(0, args.users, batch):
                pending = scorer.submit_top_k(all_users[start : start + batch], seen, no_mask, K)
                if ahead is not None:
                    ahead()
                ahead = pending
            if ahead is not None:
                ahead()

        rss: list[float] = []

        def e2e_run() -> None:
            command = ["score", "--db", str(db_path), "--memory-mb", str(args.memory_mb), "-q"]
            proc = subprocess.run(
                [sys.executable, "-c", _E2E, *command],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise SystemExit(f"mfbatch score failed:\n{proc.stdout}\n{proc.stderr}")
            peak_kib, loaded = proc.stdout.strip().splitlines()[-1].split(" ", 1)
            if loaded != "[]":
                raise SystemExit(f"mfbatch score imported {loaded}: the serving path must not")
            rss.append(int(peak_kib) / 1024)

        # Round robin: each repeat runs every floor size, the core and e2e back to back, so
        # a change in what else the machine runs shifts all of them, not one.
        runs: dict[str, tuple[Callable[[], None], Callable[[], float]]] = {
            **{f"floor@{size}": (floor_run(size), time.process_time) for size in sizes},
            "read": (lambda: bare_read(db_path), time.process_time),
            "write": (bare_write(folder, args.users), time.process_time),
            "imports": (fresh_import("numpy, onnxruntime, duckdb, pyarrow"), children_cpu),
            "import_score": (fresh_import("mfbatch.stages.score"), children_cpu),
            "core": (core, time.process_time),
            "e2e": (e2e_run, children_cpu),
        }
        size_before = db_path.stat().st_size
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, (fn, cpu_clock) in runs.items():
                started, cpu_started = time.perf_counter(), cpu_clock()
                fn()
                samples[name].append((time.perf_counter() - started, cpu_clock() - cpu_started))
        median = {
            name: (
                statistics.median(w for w, _ in got),
                statistics.median(c for _, c in got),
            )
            for name, got in samples.items()
        }
        floors = {size: median[f"floor@{size}"] for size in sizes}
        for size in sizes:
            print(f"  floor @ {size:>5} {floors[size][0]:7.2f} s  {floors[size][1]:6.2f} cpu-s")
        best = min(floors, key=lambda size: floors[size][0])
        best_cpu = min(floors, key=lambda size: floors[size][1])
        results: dict[str, float] = {
            "floor": floors[best][0],
            "floor_cpu": floors[best_cpu][1],
            "floor_batch": best,
        }
        results["core"], results["core_cpu"] = median["core"]
        print(f"  core @ {batch:>5}  {results['core']:7.2f} s  {results['core_cpu']:6.2f} cpu-s")
        if not args.no_numpy:
            results["numpy"], results["numpy_cpu"] = timed(numpy_baseline, 1)
            print(f"  numpy        {results['numpy']:7.2f} s  {results['numpy_cpu']:6.2f} cpu-s")
        results["e2e"], results["e2e_cpu"] = median["e2e"]
        results["e2e_peak_rss_mb"] = max(rss)
        results["publish_mb"] = (db_path.stat().st_size - size_before) / args.repeats / 1e6
        for part in ("read", "write", "imports", "import_score"):
            results[part], results[f"{part}_cpu"] = median[part]
        results["whole_floor"] = sum(results[p] for p in ("floor", "read", "write", "imports"))
        results["whole_floor_cpu"] = sum(
            results[p] for p in ("floor_cpu", "read_cpu", "write_cpu", "imports_cpu")
        )
    load_after = os.getloadavg()
    print(
        f"  e2e          {results['e2e']:7.2f} s  {results['e2e_cpu']:6.2f} cpu-s  "
        f"(mfbatch score subprocess, peak RSS {max(rss):.0f} MB)"
    )
    print(f"floor = best of the sizes: {best} users/batch (by CPU seconds: {best_cpu})")
    for part in ("read", "write", "imports", "import_score"):
        print(f"  {part:<12} {results[part]:7.2f} s  {results[part + '_cpu']:6.2f} cpu-s")
    print(
        f"  whole floor  {results['whole_floor']:7.2f} s  {results['whole_floor_cpu']:6.2f} "
        f"cpu-s (floor + read + write + imports); publish {results['publish_mb']:.1f} MB"
    )
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    core_vs_floor = results["core"] / results["floor"]
    numpy_vs_core = results["numpy"] / results["core"] if "numpy" in results else float("nan")
    e2e_vs_floor = results["e2e"] / results["floor"]
    e2e_vs_floor_cpu = results["e2e_cpu"] / results["floor_cpu"]
    e2e_vs_whole = results["e2e"] / results["whole_floor"]
    e2e_vs_whole_cpu = results["e2e_cpu"] / results["whole_floor_cpu"]
    import_gap = results["import_score"] - results["imports"]
    checks = (
        ("e2e / whole floor", e2e_vs_whole, "x", "<= 1.3", e2e_vs_whole <= 1.3),
        ("  same, cpu-s", e2e_vs_whole_cpu, "x", "<= 1.3", e2e_vs_whole_cpu <= 1.3),
        ("import gap s", import_gap, "", "<= 0.15", import_gap <= 0.15),
        ("core / floor", core_vs_floor, "x", "<= 1.5", core_vs_floor <= 1.5),
        *(
            ()
            if args.no_numpy
            else (("numpy / core", numpy_vs_core, "x", ">= 3", numpy_vs_core >= 3),)
        ),
        ("e2e / floor", e2e_vs_floor, "x", "<= 1.3", e2e_vs_floor <= 1.3),
        ("e2e / floor, cpu-s", e2e_vs_floor_cpu, "x", "<= 1.3", e2e_vs_floor_cpu <= 1.3),
        ("peak RSS MB", max(rss), "", "< 1536", max(rss) < 1536),
    )
    for name, value, unit, target, ok in checks:
        print(f"{name:<18} = {value:.2f}{unit}  (target {target}: {'PASS' if ok else 'MISS'})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    **results,
                    "floor_by_batch": {
                        str(n): {"s": w, "cpu_s": c} for n, (w, c) in floors.items()
                    },
                    "core_vs_floor": core_vs_floor,
                    "numpy_vs_core": None if args.no_numpy else numpy_vs_core,
                    "e2e_vs_floor": e2e_vs_floor,
                    "e2e_vs_floor_cpu": e2e_vs_floor_cpu,
                    "e2e_vs_whole_floor": e2e_vs_whole,
                    "e2e_vs_whole_floor_cpu": e2e_vs_whole_cpu,
                    "load_average": [load_before[0], load_after[0]],
                    "users": args.users,
                    "items": args.items,
                    "batch": batch,
                    "threads": threads,
                },
                indent=2,
            )
        )


# `mfbatch score ARGS` exactly as the console script runs it (mfbatch.cli.main), in a fresh
# process; at exit it prints its peak RSS (KiB) and which of onnx/torch/polars it imported.
# VmHWM, not ru_maxrss: the latter carries the parent's high-water mark across fork + exec.
_E2E = """
import atexit, sys
def _last():
    peak = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
    print(peak, sorted(m for m in ("onnx", "torch", "polars") if m in sys.modules), flush=True)
atexit.register(_last)
sys.argv = ["mfbatch", *sys.argv[1:]]
from mfbatch.cli import main
main()
"""

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(machine_cores()))
    _ = onnx
    main()
