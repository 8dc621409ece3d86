"""1 vs N training processes (`mfbatch train --nproc N`, gloo on CPU) on one database.

Each configuration runs `--repeats` times through the CLI in a subprocess, alternating,
so both see the same machine load; reports the median wall time, the fit time the run
records, peak RSS (largest single process) and the validation Recall/NDCG@20.

    python benchmarks/bench_distributed.py --db ml100k.duckdb --nproc 1 2 --repeats 3
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(db: Path, nproc: int, extra: list[str]) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as export:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        command = [sys.executable, "-m", "mfbatch", "train", "--db", str(db)]
        done = subprocess.run(
            [*command, "--export-dir", export, "--nproc", str(nproc), "--json", *extra],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "wall_s": wall,
        "seconds": summary["seconds"],
        # ru_maxrss of children is the largest one so far: a lower bound across runs.
        "peak_rss_mb": max(peak, before) / 1024,
        "recall": summary["val"]["Recall@20"],
        "ndcg": summary["val"]["NDCG@20"],
        "best_epoch": summary["best_epoch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("extra", nargs="*", help="more train flags, after --")
    args = parser.parse_args()
    results: dict[int, list[dict[str, object]]] = {n: [] for n in args.nproc}
    for _ in range(args.repeats):
        for n in args.nproc:
            results[n].append(run(args.db, n, args.extra))
    table = {}
    for n, rows in results.items():
        table[n] = {
            key: statistics.median(float(r[key]) for r in rows)  # type: ignore[arg-type]
            for key in ("wall_s", "seconds", "recall", "ndcg", "best_epoch")
        }
        table[n]["peak_rss_mb"] = max(float(r["peak_rss_mb"]) for r in rows)  # type: ignore[arg-type]
        print(
            f"nproc {n}: wall {table[n]['wall_s']:.1f} s (train {table[n]['seconds']:.1f} s), "
            f"Recall@20 {table[n]['recall']:.4f}, NDCG@20 {table[n]['ndcg']:.4f}, "
            f"best epoch {table[n]['best_epoch']:.0f}"
        )
    if args.out:
        args.out.write_text(json.dumps({"runs": results, "median": table}, indent=2))


if __name__ == "__main__":
    main()
