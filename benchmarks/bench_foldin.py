"""Fold-in quality, strong generalization: users the model never saw, served without retraining.

    python benchmarks/bench_foldin.py ../shared/data/ml-100k.zip [--work DIR] [--k 20]

ML-100K, 10% of users held out entirely (seeded). The rest are preprocessed
(`--split user-time --val-fraction 0.2`) and trained with the default settings, then
refit (`train --on all`). The held-out users' oldest 80% of ratings are added with
`preprocess --append` and `mfbatch score` serves them by fold-in; their newest 20% are
what they are measured against (Recall@K = hits / min(|relevant|, K), NDCG@K against
min(|relevant|, K) ideal hits). On the same users:

- fold-in (what `score` published, and each fold-in method on the same model tables),
- a full retrain: a fresh preprocess of everything appended, train, refit, score,
- popularity: the most-rated items of all appended data the user has not rated,
- EASE (Steck 2019's closed form, as in bench_quality.py) on all appended data.

Trained databases are kept in --work, so a second run only re-measures.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from mfbatch.artifact.files import ONNX_FILE
from mfbatch.serving.foldin import fold_in_half_life, fold_in_prior

HOLDOUT = 0.1
KEEP = 0.8


def cli(*args: str | Path) -> str:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mfbatch", *map(str, args)], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"mfbatch {' '.join(map(str, args))} failed:\n{done.stderr}")
    line = done.stdout.strip().splitlines()[-1]
    print(f"  [{time.perf_counter() - started:6.1f} s] {line}", flush=True)
    return line


def split_files(zip_path: Path, work: Path, seed: int) -> pl.DataFrame:
    """base.csv, appended.csv, everything.csv; returns the held-out users' newest 20%."""
    with zipfile.ZipFile(zip_path) as archive:
        data = archive.read("ml-100k/u.data")
    ratings = pl.read_csv(
        io.BytesIO(data),
        separator="\t",
        has_header=False,
        new_columns=["user_id", "item_id", "rating", "timestamp"],
    )
    users = np.sort(ratings["user_id"].unique().to_numpy())
    rng = np.random.default_rng(seed)
    held = rng.choice(users, size=round(HOLDOUT * len(users)), replace=False)
    is_held = pl.col("user_id").is_in(held.tolist())
    base = ratings.filter(~is_held)
    ranked = ratings.filter(is_held).with_columns(
        order=pl.struct("timestamp", "item_id").rank("ordinal").over("user_id"),
        n=pl.len().over("user_id"),
    )
    old = ranked.filter(pl.col("order") <= (pl.col("n") * KEEP).round()).drop("order", "n")
    new = ranked.filter(pl.col("order") > (pl.col("n") * KEEP).round()).drop("order", "n")
    base.write_csv(work / "base.csv")
    old.write_csv(work / "appended.csv")
    pl.concat([base, old]).write_csv(work / "everything.csv")
    return new


def prepare(work: Path, db: Path, source: str) -> None:
    common = ("--dataset", "csv", "--rating-min", "1", "--rating-max", "5", "--db", db)
    cli(
        "preprocess",
        "--source",
        work / source,
        "--split",
        "user-time",
        "--val-fraction",
        "0.2",
        *common,
    )
    cli("train", "--db", db, "--export-dir", work / "export")
    cli("train", "--db", db, "--on", "all", "--export-dir", work / "export")


def metrics(lists: dict[str, list[str]], truth: dict[str, set[str]], k: int) -> tuple[float, float]:
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recalls, ndcgs = [], []
    for user, relevant in truth.items():
        top = lists.get(user, [])[:k]
        hits = np.array([item in relevant for item in top], dtype=float)
        cap = min(len(relevant), k)
        recalls.append(hits.sum() / cap)
        ndcgs.append(float((hits * discounts[: len(hits)]).sum() / discounts[:cap].sum()))
    return float(np.mean(recalls)), float(np.mean(ndcgs))


def served(db: Path, users: list[str]) -> tuple[dict[str, list[str]], dict[str, int]]:
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute(
        "SELECT user_id, item_id, source FROM recommendations "
        "WHERE list_contains($users, user_id) ORDER BY user_id, rank",
        {"users": users},
    ).fetchall()
    con.close()
    lists: dict[str, list[str]] = {}
    sources: dict[str, int] = {}
    for user, item, source in rows:
        lists.setdefault(user, []).append(item)
        sources[source] = sources.get(source, 0) + 1
    return lists, sources


def table_lists(
    scores: np.ndarray, rated: list[np.ndarray], k: int, item_ids: list[str], users: list[str]
) -> dict[str, list[str]]:
    scores = scores.copy()
    for row, items in enumerate(rated):
        scores[row, items] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return {u: [item_ids[i] for i in top[r]] for r, u in enumerate(users)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("zip", type=Path)
    parser.add_argument("--work", type=Path, default=Path("bench-foldin"))
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ease-lambda", type=float, default=500.0)
    args = parser.parse_args()
    work, k = args.work, args.k
    work.mkdir(parents=True, exist_ok=True)
    newest = split_files(args.zip, work, args.seed)
    truth: dict[str, set[str]] = {}
    for user, item in newest.select(
        pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)
    ).iter_rows():
        truth.setdefault(user, set()).add(item)
    users = sorted(truth)
    fold_db, full_db = work / "foldin.duckdb", work / "retrain.duckdb"
    if not fold_db.exists():
        print("base model (held-out users unseen):", flush=True)
        prepare(work, fold_db, "base.csv")
        cli(
            "preprocess",
            "--append",
            "--dataset",
            "csv",
            "--source",
            work / "appended.csv",
            "--db",
            fold_db,
        )
    if not full_db.exists():
        print("full retrain on everything appended:", flush=True)
        prepare(work, full_db, "everything.csv")
    print("score:", flush=True)
    score_line = cli("score", "--db", fold_db)
    cli("score", "--db", full_db)
    rows: list[tuple[str, float, float, str]] = []
    fold_lists, sources = served(fold_db, users)
    rows.append(("fold-in (mfbatch score)", *metrics(fold_lists, truth, k), str(sources)))
    retrain_lists, sources = served(full_db, users)
    rows.append(("full retrain (mfbatch score)", *metrics(retrain_lists, truth, k), str(sources)))

    con = duckdb.connect(str(fold_db), read_only=True)
    n_users, n_items = con.execute("SELECT n_users, n_items FROM dataset_meta").fetchone()
    r = con.execute(
        "SELECT user_idx, item_idx, rating_norm, version, epoch_ms(ts) AS ts_ms FROM ratings"
    ).fetchnumpy()
    user_ids = [u for (u,) in con.execute("SELECT user_id FROM users ORDER BY user_idx").fetchall()]
    item_ids = [i for (i,) in con.execute("SELECT item_id FROM items ORDER BY item_idx").fetchall()]
    export, run_config = con.execute(
        "SELECT export_path, config FROM training_runs WHERE data_seen = 'train+val' "
        "ORDER BY finished_at DESC LIMIT 1"
    ).fetchone()
    train = json.loads(run_config)["train"]
    half_life = fold_in_half_life(train)  # what score weighs a new user's ratings by
    con.close()
    index = {u: i for i, u in enumerate(user_ids)}
    users = sorted(users, key=index.__getitem__)  # by user_idx, the CSR's row order
    held_idx = np.array([index[u] for u in users])
    x = np.zeros((n_users, n_items), dtype=np.float32)
    x[r["user_idx"], r["item_idx"]] = 1.0
    rated = [np.flatnonzero(x[u]) for u in held_idx]

    popularity = np.broadcast_to(x.sum(0), (len(users), n_items)).astype(np.float64)
    pop = table_lists(popularity, rated, k, item_ids, users)
    rows.append(("popularity (all appended data)", *metrics(pop, truth, k), ""))
    gram = (x.T @ x).astype(np.float64)
    gram[np.diag_indices(n_items)] += args.ease_lambda
    inverse = np.linalg.inv(gram)
    b = inverse / (-np.diag(inverse))
    b[np.diag_indices(n_items)] = 0.0
    ease = table_lists(x[held_idx] @ b, rated, k, item_ids, users)
    rows.append(
        (f"EASE lambda={args.ease_lambda:g} (all appended data)", *metrics(ease, truth, k), "")
    )

    # Each fold-in method on the served model's own tables, timed on the same users.
    import onnx
    from onnx import numpy_helper

    from mfbatch.serving.foldin import METHODS, fold_in, recency_weights

    folder = Path(export) if Path(export).is_absolute() else fold_db.parent / export
    proto = onnx.load_model(str(folder / ONNX_FILE))
    v_aug_t = next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == "V_aug_t")
    model_items = v_aug_t.shape[1]
    order = np.argsort(r["user_idx"], kind="stable")
    held_set = np.isin(r["user_idx"][order], held_idx)
    pick = order[held_set]
    pick = pick[np.argsort(r["user_idx"][pick], kind="stable")]
    lens = np.bincount(np.searchsorted(held_idx, r["user_idx"][pick]), minlength=len(held_idx))
    indptr = np.concatenate([[0], np.cumsum(lens)])
    # The refit trained on every rating of version 0; items without one are zero rows.
    trained_items = np.zeros(n_items, dtype=bool)
    trained_items[r["item_idx"][r["version"] == 0]] = True
    usable = trained_items[:model_items]
    # What score does (the run's fold-in half-life and prior), then the same solve with the
    # constant prior it had before session 8, and unweighted.
    weights = recency_weights(r["user_idx"][pick], r["ts_ms"][pick], half_life)
    l2, prior_half_life = fold_in_prior(train)
    prior = recency_weights(r["user_idx"][pick], r["ts_ms"][pick], prior_half_life)
    variants = [(m, weights, f"fold-in method={m}", l2) for m in METHODS]
    variants.append(("softmax", weights, "fold-in method=softmax, constant prior 10", None))
    variants.append(("softmax", None, "fold-in method=softmax, no recency weights", None))
    for method, w, name, lam in variants:
        started = time.perf_counter()
        vectors = fold_in(
            indptr,
            r["item_idx"][pick],
            r["rating_norm"][pick],
            v_aug_t,
            method=method,
            usable=usable,
            weights=w,
            frequency_l2=lam,
            prior_weights=prior if lam is not None else None,
        )
        seconds = time.perf_counter() - started
        scores = np.full((len(users), n_items), -np.inf)
        scores[:, :model_items] = vectors.astype(np.float64) @ v_aug_t
        scores[:, ~trained_items] = -np.inf  # as score does: never an untrained item
        lists = table_lists(scores, rated, k, item_ids, users)
        rows.append(
            (
                name,
                *metrics(lists, truth, k),
                f"{seconds * 1000:.0f} ms for {len(users)} users",
            )
        )

    base_recall = rows[1][1]
    pop_recall = rows[2][1]
    print(f"\n{len(users)} held-out users, K={k}; {score_line}")
    print(f"| recommender | Recall@{k} | NDCG@{k} | vs retrain | vs popularity | note |")
    print("|---|---|---|---|---|---|")
    for name, recall, ndcg, note in rows:
        print(
            f"| {name} | {recall:.4f} | {ndcg:.4f} | {recall / base_recall:.2f}x | "
            f"{recall / pop_recall:.2f}x | {note} |"
        )


if __name__ == "__main__":
    main()
