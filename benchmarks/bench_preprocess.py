"""Benchmark `mfbatch preprocess` against a plain pandas implementation of the same steps.

Standalone script (not collected by pytest); `make bench` runs it. Two inputs, both built
in a temporary directory and never inside the repository:

- ML-1M, format-faithful: `ml-1m/ratings.dat` with exactly 1,000,209 lines
  `UserID::MovieID::Rating::Timestamp` (synthetic ratings, 6,040 users, MovieIDs taken from
  the real movies.dat so titles join) plus the real movies.dat / users.dat / README from
  --ml1m-meta, zipped as ml-1m.zip. The GroupLens files must never be committed.
- 25M: 25,000,000 synthetic ratings (250,000 users x 40,000 items) in one Parquet file.
  Also preprocessed out of core (`--memory-mb`, default 512): its time, peak RSS and
  table checksums against the in-memory run's, then both ways once more under an
  address-space cap (RLIMIT_AS, --cap-gib, default 4): the in-memory run is expected to
  fail under it and the out-of-core one to pass. RLIMIT_AS caps virtual memory, which
  Polars' and DuckDB's allocators reserve well beyond what they touch (VmPeak is
  reported beside the peak RSS), so the cap is far above the RSS figures.

Each measured run is a fresh subprocess: wall time from spawn to exit (interpreter start
and imports included) and the peak RSS of that process (VmHWM, which the process reads
from /proc/self/status at exit; ru_maxrss would carry this script's own RSS over exec).
Figures are medians over --repeats. Targets are reported as PASS / MISS, never asserted.

    python benchmarks/bench_preprocess.py --out bench-results/preprocess.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ML1M_ROWS = 1_000_209
ML1M_USERS = 6_040
ML1M_ITEMS = 3_706  # movies with at least one rating in the real release
BIG_ROWS = 25_000_000
BIG_USERS = 250_000
BIG_ITEMS = 40_000
GIB = 1024**3

# Targets: (max wall seconds, max peak RSS bytes or None).
TARGETS: dict[str, tuple[float, float | None]] = {
    "ml-1m": (3.0, None),
    "25m": (60.0, 4e9),
}


# --------------------------------------------------------------------------- inputs


def _exact_rows(spec_kwargs: dict[str, Any], target: int, seed: int) -> Any:
    """Synthetic ratings topped up / trimmed to exactly `target` rows, deterministically."""
    import numpy as np
    import polars as pl

    from mfbatch.data.synthetic import SyntheticSpec, generate

    frame = generate(SyntheticSpec(seed=seed, **spec_kwargs))
    extra_seed = seed + 1000
    while frame.height < target:
        # Top up with a second draw over the same users/items, skipping pairs already rated.
        short = target - frame.height
        per_user = max(1.0, 2.0 * short / spec_kwargs["users"])
        more = generate(
            SyntheticSpec(seed=extra_seed, **{**spec_kwargs, "ratings_per_user": per_user})
        )
        more = more.join(frame.select("user_id", "item_id"), on=["user_id", "item_id"], how="anti")
        frame = pl.concat([frame, more.head(short)]).sort("user_id", maintain_order=True)
        extra_seed += 1
    if frame.height > target:
        rng = np.random.default_rng(seed)
        drop = rng.choice(frame.height, size=frame.height - target, replace=False)
        keep = np.ones(frame.height, dtype=bool)
        keep[drop] = False
        frame = frame.filter(pl.Series(keep))
    return frame


def _synthetic_movies(path: Path) -> None:
    """Stand-in movies.dat (Latin-1, `MovieID::Title::Genres`) when the real one is absent."""
    genres = ["Action", "Comedy", "Drama", "Children's", "Film-Noir", "Sci-Fi", "Romance"]
    accented = ["Café", "Amélie", "Señor", "Niño", "Garçon", "Über", "Æon"]
    lines = []
    for movie_id in range(1, 3953):
        if movie_id % 19 == 0:  # gaps, as in the real id range 1..3952 with 3,883 movies
            continue
        title = f"{accented[movie_id % len(accented)]} Movie {movie_id}: Part {movie_id % 7}"
        lines.append(
            f"{movie_id}::{title} ({1919 + movie_id % 82})::"
            f"{genres[movie_id % 7]}|{genres[(movie_id * 3) % 7]}"
        )
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


def build_ml1m(work: Path, meta: Path) -> tuple[Path, str]:
    """ml-1m.zip with synthetic ratings.dat and the real metadata files; returns (zip, note)."""
    import numpy as np
    import polars as pl

    folder = work / "ml-1m"
    folder.mkdir()
    if (meta / "movies.dat").is_file():
        for name in ("movies.dat", "users.dat", "README"):
            if (meta / name).is_file():
                shutil.copyfile(meta / name, folder / name)
        note = f"real movies.dat/users.dat/README from {meta}"
    else:
        _synthetic_movies(folder / "movies.dat")
        note = f"{meta} not found: synthetic Latin-1 movies.dat, no users.dat/README"
    movie_ids = np.array(
        sorted(
            int(line.split(b"::", 1)[0])
            for line in (folder / "movies.dat").read_bytes().splitlines()
            if line.strip()
        ),
        dtype=np.int64,
    )
    rng = np.random.default_rng(7)
    chosen = np.sort(rng.choice(movie_ids, size=min(ML1M_ITEMS, len(movie_ids)), replace=False))
    frame = _exact_rows(
        {"users": ML1M_USERS, "items": len(chosen), "ratings_per_user": 195.0}, ML1M_ROWS, seed=1
    )
    lines = frame.select(
        pl.concat_str(
            [
                pl.col("user_id"),
                pl.col("item_id").map_batches(
                    lambda s: pl.Series(chosen[s.to_numpy() - 1]), return_dtype=pl.Int64
                ),
                pl.col("rating").cast(pl.Int64),
                pl.col("ts").dt.epoch("s"),
            ],
            separator="::",
        ).alias("line")
    )
    lines.write_csv(folder / "ratings.dat", include_header=False, quote_style="never")
    count = sum(1 for _ in (folder / "ratings.dat").open("rb"))
    if count != ML1M_ROWS:
        raise SystemExit(f"ratings.dat has {count} lines, expected {ML1M_ROWS}")
    archive = work / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"ml-1m/{path.name}")
    shutil.rmtree(folder)
    return archive, note


def build_25m(work: Path) -> Path:
    import polars as pl

    frame = _exact_rows(
        {"users": BIG_USERS, "items": BIG_ITEMS, "ratings_per_user": 100.5}, BIG_ROWS, seed=2
    )
    # Unix seconds, as ratings exports usually carry them.
    frame = frame.with_columns(pl.col("ts").dt.epoch("s"))
    path = work / "ratings-25m.parquet"
    frame.write_parquet(path)
    return path


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    seconds: float
    peak_rss_bytes: int
    rc: int
    cpu_seconds: float = 0.0
    peak_virtual_bytes: int = 0
    error: str = ""


@dataclass
class Case:
    dataset: str
    impl: str
    command: list[str]
    runs: list[Run] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def median_rss(self) -> float:
        return statistics.median(r.peak_rss_bytes for r in self.runs)


def measure(
    command: list[str], log: Path, *, cap_bytes: int | None = None, may_fail: bool = False
) -> Run:
    """One fresh process: wall seconds spawn-to-exit and its peak RSS (bytes).

    `command` runs under `--child`, which reports the process's VmHWM (and VmPeak) at
    exit. Not the rusage of wait4: Linux carries ru_maxrss across exec, so a child forked
    from this (large) process would report at least this process's RSS. CPU seconds are
    the children's user + system time around the run. `cap_bytes` sets RLIMIT_AS in the
    child before it starts.
    """
    import resource

    report = log.with_suffix(".rss")
    report.unlink(missing_ok=True)
    full = [sys.executable, str(Path(__file__).resolve()), "--child", str(report), *command]

    def cap() -> None:
        if cap_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.run(
            full, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, check=False, preexec_fn=cap
        )
        seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        if not may_fail:
            raise SystemExit(f"{' '.join(command)} failed (rc {proc.returncode}):\n{tail}")
        lines = [line for line in tail.splitlines() if line.strip()] or [""]
        # A failed allocation aborts with a Rust backtrace after the line that says so.
        said = [line for line in lines if "failed" in line or "rror" in line] or lines[-1:]
        return Run(seconds, 0, proc.returncode, cpu, 0, said[0][:300])
    peak_kib, virtual_kib = (int(v) for v in report.read_text().split())
    return Run(seconds, peak_kib * 1024, proc.returncode, cpu, virtual_kib * 1024)


def child(argv: list[str]) -> None:
    """`--child REPORT mfbatch|pandas ARGS...`: run one implementation in this process."""
    import atexit

    report, impl, rest = Path(argv[0]), argv[1], argv[2:]

    def peak() -> None:
        status = Path("/proc/self/status").read_text().splitlines()
        kib = next(int(line.split()[1]) for line in status if line[:6] == "VmHWM:")
        virtual = next(int(line.split()[1]) for line in status if line[:7] == "VmPeak:")
        report.write_text(f"{kib} {virtual}")

    atexit.register(peak)
    if impl == "pandas":
        pandas_preprocess(rest)
        return
    from mfbatch.cli import app

    sys.argv = ["mfbatch", *rest]
    app()


def check_db(path: Path) -> dict[str, Any]:
    """What each implementation wrote, so the two can be compared."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        n, n_val, users, items = con.execute(
            "SELECT count(*), count(*) FILTER (split = 'val'), count(DISTINCT user_idx), "
            "count(DISTINCT item_idx) FROM ratings"
        ).fetchone()  # type: ignore[misc]
        titled = con.execute("SELECT count(title) FROM items").fetchone()[0]  # type: ignore[index]
    finally:
        con.close()
    return {"ratings": n, "val": n_val, "users": users, "items": items, "titled_items": titled}


def table_checksums(path: Path) -> dict[str, Any]:
    """Per table: row count and, per column, a sum of hash(rowid, value): equal sums mean
    the same rows in the same stored order (as far as a 64-bit hash tells)."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        found: dict[str, Any] = {}
        for table in ("users", "items", "ratings"):
            found[table] = list(
                con.execute(
                    f"SELECT count(*), sum(hash(rowid, COLUMNS(*)) % 1000000007) FROM {table}"
                ).fetchone()  # type: ignore[arg-type]
            )
        found["dataset_meta"] = [
            str(v)
            for v in con.execute(
                "SELECT * EXCLUDE (config, seconds, created_at) FROM dataset_meta"
            ).fetchone()  # type: ignore[union-attr]
        ]
    finally:
        con.close()
    return found


# --------------------------------------------------------------------------- pandas


def pandas_preprocess(argv: list[str]) -> None:
    """The straightforward pandas version: read, dense ids, scale, dedupe, time split, write."""
    import duckdb
    import numpy as np
    import pandas as pd

    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--kind", choices=["ml-1m", "parquet"], required=True)
    args = parser.parse_args(argv)

    names = ["user_id", "item_id", "rating", "ts"]
    movies = None
    if args.kind == "ml-1m":
        with zipfile.ZipFile(args.source) as zf:
            with zf.open("ml-1m/ratings.dat") as fh:
                df = pd.read_csv(fh, sep="::", engine="python", names=names, header=None)
            with zf.open("ml-1m/movies.dat") as fh:
                movies = pd.read_csv(
                    fh,
                    sep="::",
                    engine="python",
                    names=["item_id", "title", "genres"],
                    header=None,
                    encoding="latin-1",
                )
        lo, hi = 1.0, 5.0
    else:
        df = pd.read_parquet(args.source, columns=names)
        lo, hi = float(df["rating"].min()), float(df["rating"].max())

    df["rating"] = df["rating"].astype("float64")
    df["ts"] = pd.to_datetime(df["ts"], unit="s")
    codes, user_ids = pd.factorize(df["user_id"], sort=True)
    df["user_idx"] = codes.astype("int32")
    codes, item_ids = pd.factorize(df["item_id"], sort=True)
    df["item_idx"] = codes.astype("int32")
    df["rating_norm"] = (df["rating"] - lo) / (hi - lo)

    df = df.sort_values(["user_idx", "item_idx", "ts"], kind="stable")
    df = df.drop_duplicates(["user_idx", "item_idx"], keep="last").reset_index(drop=True)

    n = len(df)
    n_val = max(min(int(n * 0.1 + 0.5), n - 1), 1)
    newest = df["ts"].sort_values(kind="stable").index[n - n_val :]
    df["split"] = "train"
    df.loc[newest, "split"] = "val"
    is_val = df["split"] == "val"
    train = df[~is_val]
    df["cold_user"] = is_val & ~df["user_idx"].isin(train["user_idx"])
    df["cold_item"] = is_val & ~df["item_idx"].isin(train["item_idx"])

    users = pd.DataFrame({"user_idx": np.arange(len(user_ids), dtype="int32")})
    users["user_id"] = user_ids.astype(str)
    users["n_ratings"] = df.groupby("user_idx").size().reindex(users["user_idx"], fill_value=0)
    users["n_train"] = train.groupby("user_idx").size().reindex(users["user_idx"], fill_value=0)
    items = pd.DataFrame({"item_idx": np.arange(len(item_ids), dtype="int32")})
    items["item_id"] = item_ids.astype(str)
    if movies is not None:
        movies["item_id"] = movies["item_id"].astype(str)
        items = items.merge(movies, on="item_id", how="left")
    else:
        items["title"] = None
        items["genres"] = None
    items["n_ratings"] = df.groupby("item_idx").size().reindex(items["item_idx"], fill_value=0)
    items["n_train"] = train.groupby("item_idx").size().reindex(items["item_idx"], fill_value=0)
    ratings = df[
        ["user_idx", "item_idx", "rating", "rating_norm", "ts", "split", "cold_user", "cold_item"]
    ]

    con = duckdb.connect(str(args.db))
    con.execute("BEGIN TRANSACTION")
    for name, frame in (("users", users), ("items", items), ("ratings", ratings)):
        con.register(f"df_{name}", frame)
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM df_{name}")
        con.unregister(f"df_{name}")
    con.execute("COMMIT")
    con.close()
    print(f"pandas: {n:,} ratings, {len(users):,} users, {len(items):,} items -> {args.db}")


# --------------------------------------------------------------------------- main


def run_cases(
    dataset: str, source: Path, repeats: int, work: Path, mf_extra: list[str]
) -> tuple[Case, Case, dict[str, Any]]:
    kind = "ml-1m" if dataset == "ml-1m" else "parquet"
    mf = Case(dataset, "mfbatch", ["mfbatch", "preprocess", "--source", str(source), *mf_extra])
    pd_case = Case(dataset, "pandas", ["pandas", "--kind", kind])
    checks: dict[str, Any] = {}
    for i in range(repeats):
        # Alternate so neither side always runs on a warmer page cache.
        for case in (mf, pd_case):
            db = work / f"{dataset}-{case.impl}.duckdb"
            for leftover in (db, db.with_name(db.name + ".wal")):
                leftover.unlink(missing_ok=True)
            command = [*case.command, "--db", str(db)]
            if case.impl == "pandas":
                command += ["--source", str(source)]
            run = measure(command, work / f"{dataset}-{case.impl}.log")
            case.runs.append(run)
            print(
                f"  {dataset:6} {case.impl:8} run {i + 1}/{repeats}: {run.seconds:6.2f} s, "
                f"peak RSS {run.peak_rss_bytes / GIB:5.2f} GiB",
                flush=True,
            )
            if i == 0:
                checks[case.impl] = check_db(db)
                if case.impl == "mfbatch" and dataset == "25m":
                    checks["checksums"] = table_checksums(db)
            db.unlink(missing_ok=True)
    return mf, pd_case, checks


def run_out_of_core(
    source: Path,
    work: Path,
    flags: list[str],
    *,
    memory_mb: int,
    cap_gib: float,
    repeats: int,
    in_memory: Case,
    in_memory_checksums: dict[str, Any],
) -> dict[str, Any]:
    """The 25M file with --memory-mb: time, peak RSS, tables against the in-memory run's,
    then both ways under an address-space cap."""
    ooc = Case("25m", "mfbatch-out-of-core", ["mfbatch", "preprocess", "--source", str(source)])
    ooc.command += [*flags, "--memory-mb", str(memory_mb)]
    db = work / "25m-out-of-core.duckdb"
    same = None
    for i in range(repeats):
        for leftover in (db, db.with_name(db.name + ".wal")):
            leftover.unlink(missing_ok=True)
        run = measure([*ooc.command, "--db", str(db)], work / "25m-ooc.log")
        ooc.runs.append(run)
        print(
            f"  25m    out-of-core run {i + 1}/{repeats}: {run.seconds:6.2f} s "
            f"({run.cpu_seconds:.1f} CPU-s), peak RSS {run.peak_rss_bytes / GIB:5.2f} GiB, "
            f"VmPeak {run.peak_virtual_bytes / GIB:5.2f} GiB",
            flush=True,
        )
        if i == 0:
            same = table_checksums(db) == in_memory_checksums
            print(f"  25m    out-of-core tables identical to in-memory: {same}", flush=True)
    db.unlink(missing_ok=True)
    cap = int(cap_gib * GIB)
    capped: dict[str, Any] = {}
    for case in (in_memory, ooc):
        capped_db = work / f"25m-capped-{case.impl}.duckdb"
        run = measure(
            [*case.command, "--db", str(capped_db)],
            work / f"25m-capped-{case.impl}.log",
            cap_bytes=cap,
            may_fail=True,
        )
        capped[case.impl] = asdict(run)
        verdict = "passed" if run.rc == 0 else f"FAILED rc {run.rc}: {run.error}"
        print(f"  25m    {case.impl} under RLIMIT_AS {cap_gib:g} GiB: {verdict}", flush=True)
        for leftover in (capped_db, capped_db.with_name(capped_db.name + ".wal")):
            leftover.unlink(missing_ok=True)
    return {
        "memory_mb": memory_mb,
        "median_s": ooc.median_s,
        "median_cpu_s": statistics.median(r.cpu_seconds for r in ooc.runs),
        "median_peak_rss_bytes": ooc.median_rss,
        "runs": [asdict(r) for r in ooc.runs],
        "command": ooc.command,
        "in_memory_median_s": in_memory.median_s,
        "in_memory_median_cpu_s": statistics.median(r.cpu_seconds for r in in_memory.runs),
        "in_memory_median_peak_rss_bytes": in_memory.median_rss,
        "tables_identical_to_in_memory": same,
        "rlimit_as_bytes": cap,
        "capped": capped,
    }


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/preprocess.json"))
    parser.add_argument(
        "--ml1m-meta",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "ml-1m-meta",
        help="folder with the real ML-1M movies.dat, users.dat, README",
    )
    parser.add_argument("--repeats", type=int, default=3, help="ML-1M repeats (3)")
    parser.add_argument("--repeats-25m", type=int, default=1, help="25M repeats (1)")
    parser.add_argument("--quick", action="store_true", help="skip the 25M case")
    parser.add_argument(
        "--memory-mb", type=int, default=512, help="25M out of core: --memory-mb (512)"
    )
    parser.add_argument(
        "--cap-gib", type=float, default=4.0, help="25M: RLIMIT_AS for the capped runs (4)"
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="build inputs here and keep them (not the repo)"
    )
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="mfbatch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    inside = work.resolve().is_relative_to(ROOT) and not work.resolve().is_relative_to(
        ROOT / "bench-results"
    )
    if inside:
        raise SystemExit(f"--keep {work}: inputs may not be written inside the repository")

    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "cases": {},
    }
    try:
        import duckdb
        import pandas
        import polars

        results["machine"]["versions"] = {
            "polars": polars.__version__,
            "duckdb": duckdb.__version__,
            "pandas": pandas.__version__,
        }
        plan: list[tuple[str, Path, int, list[str], str]] = []
        t0 = time.perf_counter()
        archive = work / "ml-1m.zip"
        if archive.exists():
            note = "reused"
        else:
            archive, note = build_ml1m(work, args.ml1m_meta)
        print(f"built {archive} ({note}) in {time.perf_counter() - t0:.1f} s", flush=True)
        plan.append(("ml-1m", archive, args.repeats, [], note))
        if not args.quick:
            t0 = time.perf_counter()
            big = work / "ratings-25m.parquet"
            if not big.exists():
                big = build_25m(work)
            print(f"built {big} in {time.perf_counter() - t0:.1f} s", flush=True)
            flags = ["--dataset", "parquet", "--user-col", "user_id", "--item-col", "item_id"]
            flags += ["--rating-col", "rating", "--time-col", "ts"]
            plan.append(("25m", big, args.repeats_25m, flags, "synthetic, Parquet"))

        rows = []
        for dataset, source, repeats, flags, note in plan:
            mf, pd_case, checks = run_cases(dataset, source, repeats, work, flags)
            max_s, max_rss = TARGETS[dataset]
            ok = mf.median_s < max_s and (max_rss is None or mf.median_rss < max_rss)
            results["cases"][dataset] = {
                "input": note,
                "source_bytes": source.stat().st_size,
                "mfbatch": {
                    "median_s": mf.median_s,
                    "median_peak_rss_bytes": mf.median_rss,
                    "runs": [asdict(r) for r in mf.runs],
                    "command": mf.command,
                    "wrote": checks.get("mfbatch"),
                },
                "pandas": {
                    "median_s": pd_case.median_s,
                    "median_peak_rss_bytes": pd_case.median_rss,
                    "runs": [asdict(r) for r in pd_case.runs],
                    "wrote": checks.get("pandas"),
                },
                "ratio_pandas_over_mfbatch": pd_case.median_s / mf.median_s,
                "target": {"max_s": max_s, "max_peak_rss_bytes": max_rss},
                "status": "PASS" if ok else "MISS",
            }
            rows.append((dataset, mf, pd_case, max_s, max_rss, ok))
            if dataset == "25m":
                results["cases"]["25m-out-of-core"] = run_out_of_core(
                    source,
                    work,
                    flags,
                    memory_mb=args.memory_mb,
                    cap_gib=args.cap_gib,
                    repeats=repeats,
                    in_memory=mf,
                    in_memory_checksums=checks["checksums"],
                )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    header = f"{'dataset':8} {'mfbatch s':>10} {'peak GiB':>9} {'pandas s':>9} {'peak GiB':>9}"
    print(f"{header} {'ratio':>6}  target")
    for dataset, mf, pd_case, max_s, max_rss, ok in rows:
        target = f"< {max_s:g} s" + (f", < {max_rss / 1e9:g} GB" if max_rss else "")
        print(
            f"{dataset:8} {mf.median_s:10.2f} {mf.median_rss / GIB:9.2f} "
            f"{pd_case.median_s:9.2f} {pd_case.median_rss / GIB:9.2f} "
            f"{pd_case.median_s / mf.median_s:5.1f}x  {target}: {'PASS' if ok else 'MISS'}"
        )
    ooc = results["cases"].get("25m-out-of-core")
    if ooc:
        capped = {k: "pass" if v["rc"] == 0 else "FAIL" for k, v in ooc["capped"].items()}
        print(
            f"25m out of core (--memory-mb {ooc['memory_mb']}): {ooc['median_s']:.2f} s "
            f"({ooc['median_cpu_s']:.1f} CPU-s), peak {ooc['median_peak_rss_bytes'] / GIB:.2f} "
            f"GiB vs in memory {ooc['in_memory_median_s']:.2f} s "
            f"({ooc['in_memory_median_cpu_s']:.1f} CPU-s), "
            f"{ooc['in_memory_median_peak_rss_bytes'] / GIB:.2f} GiB; tables identical: "
            f"{ooc['tables_identical_to_in_memory']}; under RLIMIT_AS "
            f"{ooc['rlimit_as_bytes'] / GIB:g} GiB: {capped}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
