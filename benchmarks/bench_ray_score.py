"""`score --engine ray` (Ray local mode) vs the default engine, cold and warm, peak memory.

    python benchmarks/bench_ray_score.py [--users 200000] [--items 20000] [--dim 64]
                                          [--seen 100] [--workers 2] [--out FILE]

One synthetic database and model (bench_score.build_database). Each engine runs in its
own fresh process, which scores twice: "cold" is the first call (for Ray: starting the
local cluster and its actors), "warm" the second (Ray already up; actors are started
again, since each call builds its own pipeline). Memory: the driver's VmHWM and the
peak of the summed RSS of the driver and every process under it (Ray's GCS, raylet and
workers), sampled every 0.2 s; the object store's shared pages count once per process
mapping them, so that sum overstates what Ray uses. The two engines' lists are checked
equal (row count and an order-independent checksum).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_score import build_database, seen_items

from mfbatch.training.model import MatrixFactorization, ModelShape

_RUN = """
import json, sys, threading, time
from pathlib import Path
import psutil
from mfbatch.config import load_config
from mfbatch.stages.score import score
from mfbatch.store import db

db_path, engine, workers = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
peak = [0]
stop = threading.Event()
def sample():
    me = psutil.Process()
    while not stop.is_set():
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak[0] = max(peak[0], total)
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
extra = {"engine": "ray", "workers": workers} if engine == "ray" else {}
config = load_config(None, db=db_path, overrides={"score": extra})
times = []
for _ in range(2):
    started = time.perf_counter()
    line = score(config=config).line()
    times.append(time.perf_counter() - started)
stop.set()
con = db.connect(db_path, read_only=True)
rows, check = con.execute(
    "SELECT count(*), sum(hash(user_id, item_id, rank)) FROM recommendations"
).fetchone()
con.close()
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"cold_s": times[0], "warm_s": times[1], "driver_hwm_mb": hwm / 1024,
                  "tree_peak_mb": peak[0] / 2**20, "rows": rows, "checksum": str(check),
                  "line": line}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seen", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    shape = ModelShape(args.users, args.items, args.dim, 0.0, False)
    model = MatrixFactorization(shape, init_std=0.1).eval()
    seen = seen_items(rng, args.users, args.items, args.seen)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "bench.duckdb"
        build_database(db_path, Path(tmp) / "export", model, seen)
        for engine in ("default", "ray"):
            proc = subprocess.run(
                [sys.executable, "-c", _RUN, str(db_path), engine, str(args.workers)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise SystemExit(f"{engine} failed:\n{proc.stdout}\n{proc.stderr}")
            results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[engine]
            print(
                f"{engine:<8} cold {r['cold_s']:6.1f} s  warm {r['warm_s']:6.1f} s  "
                f"driver peak {r['driver_hwm_mb']:6.0f} MB  tree peak {r['tree_peak_mb']:6.0f} MB"
                f"  rows {r['rows']:,}",
                flush=True,
            )
    same = all(results["ray"][key] == results["default"][key] for key in ("rows", "checksum"))
    print(f"lists identical: {same}")
    if args.out:
        args.out.write_text(json.dumps({**results, "identical": same, **vars(args)}, default=str))


if __name__ == "__main__":
    main()
