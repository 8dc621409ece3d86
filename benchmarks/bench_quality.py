"""Ranking quality of the default pipeline beside popularity, EASE and implicit's ALS.

    python benchmarks/bench_quality.py DB [--k 20] [--seeds 0,1,2] [--lambdas ...]
                                        [--recency-peers 0.03,0.05,0.1,0.2,0.3,0.5] [--out FILE]
    python benchmarks/bench_quality.py --all [--only ml-100k,...] [--out docs/quality-table.md]

`--all` writes one Markdown table (and its JSON beside it) for every data set of --data;
with `--only` it updates those data sets' rows and keeps the others already there. It
never replaces a file it did not write (docs/quality.md, the narrative, is hand-written).

DB is a database made by `mfbatch preprocess` (e.g. ML-100K with `--split user-time
--val-fraction 0.2`). Every method ranks the same train/val split, and every method's
top-K lists go through ONE metric function (`metrics` below), which implements the
trainer's definitions: Recall@K = hits / min(|relevant|, K); NDCG@K against min(|relevant|,
K) ideal hits; users without validation items are left out; rated-in-train items are never
offered, nor are items with no train rating; users with no train rating get the popularity
list. It is checked once against `mfbatch.training.loop.rank_metrics` on the trained model.

mfbatch is run two ways, each over --seeds (mean ± std):
  - `pipeline`: what `mfbatch train` does: early stopping on the validation split (so the
    figure has seen that split, as every tuned peer's has);
  - `fixed`: the default epoch budget run to its end without looking at validation at all.
On a split by time (where the default weights ratings by recency) the pipeline also runs
with `--recency-half-life 0`, the previous default, for a baseline in the same run.
EASE (λ grid) and ALS (small grid; skipped when `implicit` is not installed) are reported
at their best grid point on this split, which flatters them. ALS is optional: it is not a
dependency of mfbatch (`pip install implicit`). `EASE+recency` / `ALS+recency` are the same
peers given mfbatch's recency weights (`--recency-peers` half-lives, best on this split
too): mfbatch's default uses the ratings' order, and a peer blind to it is not the whole
comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import torch

from mfbatch.config import TrainConfig, recency_for, with_half_lives
from mfbatch.training.loop import train_model
from mfbatch.training.model import MatrixFactorization, ModelShape
from mfbatch.training.objectives import recency_weights
from mfbatch.training.steps import default_epochs
from mfbatch.training.tensors import Csr, Interactions
from mfbatch.training.validation import Validation, rank_metrics


@dataclass(frozen=True)
class Split:
    n_users: int
    n_items: int
    train_u: np.ndarray
    train_i: np.ndarray
    train_r: np.ndarray  # normalised [0, 1]
    train_ts: np.ndarray  # int64 seconds (0 when the data has none)
    val_u: np.ndarray
    val_i: np.ndarray
    val_r: np.ndarray
    rating_min: float
    rating_max: float
    split_kind: str  # what val holds out: sets the default --recency-half-life
    # each train row's `weight` (play counts after --weight-transform); all ones without
    train_w: np.ndarray | None = None


def load(path: str) -> Split:
    con = duckdb.connect(path, read_only=True)
    n_users, n_items, lo, hi, kind = con.sql(
        "SELECT n_users, n_items, rating_min, rating_max, split_kind FROM dataset_meta"
    ).fetchall()[0]
    rows = con.sql(
        "SELECT user_idx, item_idx, rating_norm, coalesce(epoch(ts), 0)::BIGINT AS ts, "
        "split = 'val' AS is_val, weight FROM ratings"
    ).fetchnumpy()
    con.close()
    v = rows["is_val"].astype(bool)
    return Split(
        int(n_users),
        int(n_items),
        rows["user_idx"][~v].astype(np.int64),
        rows["item_idx"][~v].astype(np.int64),
        rows["rating_norm"][~v].astype(np.float32),
        rows["ts"][~v].astype(np.int64),
        rows["user_idx"][v].astype(np.int64),
        rows["item_idx"][v].astype(np.int64),
        rows["rating_norm"][v].astype(np.float32),
        float(lo),
        float(hi),
        str(kind),
        rows["weight"][~v].astype(np.float64),
    )


def inner_split(split: Split, fraction: float, kind: str, seed: int = 0) -> Split:
    """Carve a validation split out of `split`'s train part, the outer val untouched.

    `user-time`: each user's newest round(fraction * n_u) train ratings (at least one left
    in train), like `preprocess --split user-time`; `random`: a seeded share of the rows.
    """
    n = split.train_u.size
    if kind == "random":
        held = np.zeros(n, dtype=bool)
        held[np.random.default_rng(seed).choice(n, round(fraction * n), replace=False)] = True
    else:
        order = np.lexsort((split.train_i, -split.train_ts, split.train_u))  # newest first
        u_sorted = split.train_u[order]
        starts = np.searchsorted(u_sorted, u_sorted, side="left")
        rank = np.arange(n) - starts  # 0 = the user's newest
        counts = np.bincount(split.train_u, minlength=split.n_users)[u_sorted]
        take = np.minimum(np.rint(fraction * counts).astype(np.int64), counts - 1)
        held = np.zeros(n, dtype=bool)
        held[order[rank < take]] = True
    keep = ~held
    return dataclasses.replace(
        split,
        train_u=split.train_u[keep],
        train_i=split.train_i[keep],
        train_r=split.train_r[keep],
        train_ts=split.train_ts[keep],
        train_w=None if split.train_w is None else split.train_w[keep],
        val_u=split.train_u[held],
        val_i=split.train_i[held],
        val_r=split.train_r[held],
        split_kind=kind,
    )


# --- one metric function for every method -------------------------------------------------


def serving(split: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(popularity order, untrained-item mask, user has train ratings) as `evaluate` serves."""
    counts = np.bincount(split.train_i, minlength=split.n_items)
    popular = np.argsort(-counts, kind="stable")
    has_train = np.bincount(split.train_u, minlength=split.n_users) > 0
    return popular, counts == 0, has_train


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Each row's k best columns, best first, ties by the lower index (a stable argsort's
    order) without sorting the whole row: Amazon-CDs' 35k columns made that the cost."""
    if k >= scores.shape[1]:
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    # Candidates tied with the k-th score may have been left out in favour of a higher
    # index; take every column at least as good as the k-th, then order them exactly.
    kth = np.take_along_axis(scores, part, 1).min(axis=1, keepdims=True)
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    for row in range(scores.shape[0]):
        cols = np.flatnonzero(scores[row] >= kth[row])
        order = np.lexsort((cols, -scores[row, cols]))
        out[row] = cols[order[:k]]
    return out


def top_lists(split: Split, scores_of: Callable[[np.ndarray], np.ndarray], k: int) -> np.ndarray:
    """[n_users, k] item indices (-1: nothing offered) from a method's score rows."""
    popular, untrained, has_train = serving(split)
    seen = Csr.build(
        torch.from_numpy(split.train_u), torch.from_numpy(split.train_i), split.n_users
    )
    indptr, indices = seen.indptr.numpy(), seen.indices.numpy()
    lists = np.full((split.n_users, k), -1, dtype=np.int64)
    chunk = max(1, (1 << 22) // split.n_items)
    for start in range(0, split.n_users, chunk):
        users = np.arange(start, min(start + chunk, split.n_users))
        scores = np.asarray(scores_of(users), dtype=np.float64).copy()
        scores[:, untrained] = -np.inf
        for row, u in enumerate(users):
            scores[row, indices[indptr[u] : indptr[u + 1]]] = -np.inf
        top = _top_k(scores, k)
        finite = np.isfinite(np.take_along_axis(scores, top, 1))
        lists[users] = np.where(finite, top, -1)
    fallback = np.where(untrained[popular[:k]], -1, popular[:k])
    lists[~has_train] = fallback
    return lists


def metrics(split: Split, lists: np.ndarray, k: int) -> tuple[float, float]:
    """Recall@K (hits / min(|rel|, K)) and NDCG@K, mean over users with a val item."""
    relevant = np.zeros((split.n_users, split.n_items + 1), dtype=bool)  # last col: -1
    relevant[split.val_u, split.val_i] = True
    n_rel = relevant.sum(1)
    hits = relevant[np.arange(split.n_users)[:, None], lists]
    hits &= lists >= 0
    keep = n_rel > 0
    capped = np.minimum(n_rel, k)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)[np.maximum(capped, 1) - 1]
    recall = hits.sum(1)[keep] / capped[keep]
    ndcg = (hits * discounts[: lists.shape[1]]).sum(1)[keep] / ideal[keep]
    return float(recall.mean()), float(ndcg.mean())


# --- methods ------------------------------------------------------------------------------


def train_matrix(split: Split) -> np.ndarray:
    x = np.zeros((split.n_users, split.n_items), dtype=np.float64)
    x[split.train_u, split.train_i] = 1.0
    return x


def popularity(split: Split) -> Callable[[np.ndarray], np.ndarray]:
    counts = np.bincount(split.train_i, minlength=split.n_items).astype(np.float64)
    return lambda users: np.broadcast_to(counts, (users.size, split.n_items))


def recency(split: Split, half_life: float) -> np.ndarray:
    """Each train rating's weight within its user, as mfbatch's --recency-half-life gives it."""
    return recency_weights(
        torch.from_numpy(split.train_u), torch.from_numpy(split.train_ts), split.n_users, half_life
    ).numpy()


def ease_weights(split: Split, lam: float) -> tuple[np.ndarray, float]:
    """EASE's item-item weights B from the binary matrix X, and the seconds they took."""
    started = time.perf_counter()
    x = train_matrix(split)
    p = np.linalg.inv(x.T @ x + lam * np.eye(split.n_items))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b, time.perf_counter() - started


def ease(
    split: Split, lam: float, history: np.ndarray | None = None, b: np.ndarray | None = None
) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """EASE: a user's scores are their history row times B (`ease_weights`, or `b` when
    given), the row weighted per rating by `history` when given (recency)."""
    seconds = 0.0
    if b is None:
        b, seconds = ease_weights(split, lam)
    x = train_matrix(split)
    if history is not None:
        x = np.zeros_like(x)
        x[split.train_u, split.train_i] = history
    return lambda users: x[users] @ b, seconds


def als(
    split: Split,
    factors: int,
    reg: float,
    alpha: float,
    seed: int,
    confidence: np.ndarray | None = None,
) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """implicit's ALS on the binary matrix, or with each rating's value set to
    `confidence` (recency weights: ALS's confidence is 1 + alpha * value)."""
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares

    user_items = sp.csr_matrix(
        (
            np.ones(split.train_u.size, dtype=np.float32)
            if confidence is None
            else confidence.astype(np.float32),
            (split.train_u, split.train_i),
        ),
        shape=(split.n_users, split.n_items),
    )
    model = AlternatingLeastSquares(
        factors=factors, regularization=reg, alpha=alpha, iterations=15, random_state=seed
    )
    started = time.perf_counter()
    try:  # implicit's own advice: its threads, not OpenBLAS's, parallelise the solve
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, "blas"):
            model.fit(user_items, show_progress=False)
    except ImportError:
        model.fit(user_items, show_progress=False)
    seconds = time.perf_counter() - started
    uf, vf = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return lambda users: uf[users] @ vf.T, seconds


def tensors(split: Split) -> tuple[Interactions, Validation]:
    data = Interactions(
        torch.from_numpy(split.train_u),
        torch.from_numpy(split.train_i),
        torch.from_numpy(split.train_r),
        torch.from_numpy(split.train_ts),
    )
    pairs = Interactions(
        torch.from_numpy(split.val_u), torch.from_numpy(split.val_i), torch.from_numpy(split.val_r)
    )
    popular, untrained = Validation.serving_rules(data.items, split.n_items)
    val = Validation(
        pairs=pairs,
        train_items=Csr.build(data.users, data.items, split.n_users),
        val_items=Csr.build(pairs.users, pairs.items, split.n_users),
        rank_users=torch.unique(pairs.users),
        rating_min=split.rating_min,
        rating_max=split.rating_max,
        popular=popular,
        untrained_items=untrained,
    )
    return data, val


def mfbatch_fit(
    split: Split, config: TrainConfig, *, early_stop: bool = True
) -> tuple[MatrixFactorization, float, Any]:
    """Train as `mfbatch train` does (early stopping on split.val) or blind for the
    config's epochs (`early_stop=False`: validation never looked at)."""
    config = with_half_lives(config, split.split_kind)  # as the train stage resolves them
    if config.epochs is None:
        users = int(np.unique(split.train_u).size)
        config = config.replace(epochs=default_epochs(config, split.n_items, users))
    data, val = tensors(split)
    torch.manual_seed(config.seed)
    model = MatrixFactorization(
        ModelShape(
            split.n_users,
            split.n_items,
            int(config.embedding_dim or 0),
            config.dropout,
            config.batch_norm,
        )
    )
    started = time.perf_counter()
    outcome = train_model(model, data, val if early_stop else None, config)
    return model, time.perf_counter() - started, outcome


def mf_scores(model: MatrixFactorization, n_items: int) -> Callable[[np.ndarray], np.ndarray]:
    items = torch.arange(n_items)

    def scores(users: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.item_logits(torch.from_numpy(users), items).double().numpy()

    return scores


def rmse(split: Split, model: MatrixFactorization) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(split.val_u), torch.from_numpy(split.val_i)).clamp(0, 1)
    err = (pred.numpy() - split.val_r) * (split.rating_max - split.rating_min)
    return float(np.sqrt(np.mean(err**2)))


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def run_mfbatch(
    split: Split, config: TrainConfig, seeds: list[int], k: int, *, early_stop: bool
) -> Iterator[tuple[float, float, float, int]]:
    for seed in seeds:
        cfg = config.replace(seed=seed)
        model, seconds, outcome = mfbatch_fit(split, cfg, early_stop=early_stop)
        recall, ndcg = metrics(split, top_lists(split, mf_scores(model, split.n_items), k), k)
        yield recall, ndcg, seconds, len(outcome.history)


# --- `--all`: every data set of ../shared/data through the commands a user runs ---------

# Published top-K figures (Recall@20 uncapped = hits / |test|, NDCG@20), the data README's.
PUBLISHED = {
    "ml-1m-lcfn": ("UltraGCN (its run log)", 0.2787, 0.2642),
    "amazon-cds": ("UltraGCN (its run log)", 0.1622, 0.1043),
}


def datasets(data: Path) -> dict[str, list[str]]:
    """The preprocess flags of each data set: no per-data-set training flags anywhere."""
    given = ["--split", "given", "--split-col", "split", "--user-col", "user"]
    given += ["--item-col", "item", "--time-col", ""]
    return {
        "ml-100k": ["--dataset", "ml-100k", "--source", str(data / "ml-100k.zip"),
                    "--split", "user-time", "--val-fraction", "0.2"],
        # The loader reads a release folder: `gunzip` into one first, as a user would.
        "ml-1m-partial": ["--dataset", "ml-1m", "--source", "GUNZIP:"
                          + str(data / "ml-1m-partial" / "ratings.dat.gz"),
                          "--split", "user-time", "--val-fraction", "0.2"],
        "lastfm": ["--dataset", "parquet", "--source", str(data / "lastfm.parquet"), *given,
                   "--weight-col", "plays"],
        "ml-1m-lcfn": ["--dataset", "parquet", "--source", str(data / "ml-1m-lcfn.parquet"),
                       *given],
        "amazon-cds": ["--dataset", "parquet", "--source", str(data / "amazon-cds.parquet"),
                       *given],
    }  # fmt: skip


def mfbatch_cli(*args: str | Path) -> dict[str, Any]:
    """`mfbatch ARGS --json` as a user runs it; its JSON summary."""
    done = subprocess.run(
        [sys.executable, "-m", "mfbatch", *map(str, args), "--json"],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"mfbatch {' '.join(map(str, args))}: {done.stderr.strip()[-400:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def uncapped(split: Split, lists: np.ndarray, k: int) -> float:
    """Recall@K as hits / |relevant| (LightGCN's and UltraGCN's definition)."""
    relevant: dict[int, set[int]] = {}
    for u, i in zip(split.val_u.tolist(), split.val_i.tolist(), strict=True):
        relevant.setdefault(u, set()).add(i)
    users = np.array(sorted(relevant))
    return float(
        np.mean([len(relevant[u] & set(row[:k].tolist())) / len(relevant[u])
                 for u, row in zip(users, lists[users], strict=True)])
    )  # fmt: skip


def _measured(split: Split, scores: Callable[[np.ndarray], np.ndarray], k: int) -> dict[str, float]:
    lists = top_lists(split, scores, k)
    recall, ndcg = metrics(split, lists, k)
    return {"recall": recall, "ndcg": ndcg, "recall_uncapped": uncapped(split, lists, k)}


def _cli_run(db: Path, work: Path, split: Split, k: int, *flags: str) -> dict[str, Any]:
    """`mfbatch train` as a user runs it, its validated run measured by the shared code."""
    from mfbatch.artifact.files import load_model

    summary = mfbatch_cli("train", "--db", db, "--export-dir", work / "export", *flags)
    model, _ = load_model(Path(summary["export_path"]))
    row = _measured(split, mf_scores(model, split.n_items), k)
    row["seconds"] = summary["seconds"]
    return row


def _gunzipped(flag: str, work: Path) -> str:
    """`GUNZIP:file.gz` -> a folder in `work` holding the file decompressed."""
    if not flag.startswith("GUNZIP:"):
        return flag
    import gzip
    import shutil

    source = Path(flag.removeprefix("GUNZIP:"))
    folder = work / "source"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name.removesuffix(".gz")
    if not target.exists():
        with gzip.open(source, "rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return str(folder)


def _measure_export(split: Split, k: int, export: str, seconds: float) -> dict[str, Any]:
    from mfbatch.artifact.files import load_model

    model, _ = load_model(Path(export))
    return {**_measured(split, mf_scores(model, split.n_items), k), "seconds": seconds}


def _earlier_runs(db: Path, split_of: None) -> tuple[list[Any], list[Any]]:
    """`--reuse`: the validated runs already in `db`, (before tune, after tune)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        runs = con.execute(
            "SELECT started_at, export_path, seconds FROM training_runs "
            "WHERE data_seen = 'train' ORDER BY started_at"
        ).fetchall()
        tables = {
            t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
        }
        tuned_at = (
            con.execute("SELECT min(chosen_at) FROM tuned_settings").fetchone()[0]
            if "tuned_settings" in tables
            else None
        )
    finally:
        con.close()
    # Recorded relative to the database's folder.
    runs = [(t, str(db.parent / e), s) for t, e, s in runs]
    before = [(e, s) for t, e, s in runs if tuned_at is None or t < tuned_at]
    after = [(e, s) for t, e, s in runs if tuned_at is not None and t > tuned_at]
    return before, after


# EASE given mfbatch's recency weights, at its best: every λ with every half-life (the
# training default's and the user solve's among them), chosen on the measured split.
EASE_RECENCY_LAMBDAS = (200.0, 500.0, 1000.0, 3000.0, 10000.0)
EASE_RECENCY_HALF_LIVES = (0.03, 0.05, 0.1, 0.2, 0.3, 0.5)


def _ease_recency(split: Split, k: int, lambdas: list[float]) -> dict[str, Any]:
    """The best EASE+recency row of the λ x half-life grid (one inverse per λ)."""
    best: dict[str, Any] | None = None
    for lam in sorted({*lambdas, *EASE_RECENCY_LAMBDAS}):
        b, secs = ease_weights(split, lam)
        for h in EASE_RECENCY_HALF_LIVES:
            scores, _ = ease(split, lam, recency(split, h), b=b)
            row = {"method": f"λ={lam:g} h={h:g}", **_measured(split, scores, k), "seconds": secs}
            if best is None or row["recall"] + row["ndcg"] > best["recall"] + best["ndcg"]:
                best = row
    assert best is not None
    grid = len({*lambdas, *EASE_RECENCY_LAMBDAS}) * len(EASE_RECENCY_HALF_LIVES)
    return {**best, "method": f"EASE+recency (best of {grid}: {best['method']})"}


def _peers(split: Split, k: int, lambdas: list[float], quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"method": "popularity", **_measured(split, popularity(split), k)}
    ]
    weighted = split.train_w is not None and bool(np.ptp(split.train_w) > 0)
    if split.n_items <= 20_000:
        best: dict[str, Any] | None = None
        for each in lambdas:
            scores, secs = ease(split, each)
            row = {"method": f"EASE λ={each:g}", **_measured(split, scores, k), "seconds": secs}
            if best is None or row["recall"] + row["ndcg"] > best["recall"] + best["ndcg"]:
                best, lam = row, each
        assert best is not None
        rows.append({**best, "method": f"EASE (best of λ grid: {best['method'][5:]})"})
        if split.train_ts.any():
            rows.append(_ease_recency(split, k, lambdas))
        if weighted:  # the same signal mfbatch's --weight-col gives
            scores, secs = ease(split, lam, split.train_w)
            rows.append({"method": f"EASE+weights λ={lam:g}", **_measured(split, scores, k),
                         "seconds": secs})  # fmt: skip
    try:
        import implicit  # noqa: F401
    except ImportError:
        return rows
    grid = [(f, r, a) for f in (64, 128, 256) for r in (0.05, 1.0, 10.0) for a in (1.0, 10.0)]
    if quick:
        grid = [g for g in grid if g[0] == 128]
    best_als: dict[str, Any] | None = None
    for factors, reg, alpha in grid:
        scores, secs = als(split, factors, reg, alpha, 0)
        row = {"method": f"ALS f={factors} reg={reg:g} a={alpha:g}",
               **_measured(split, scores, k), "seconds": secs,
               "params": (factors, reg, alpha)}  # fmt: skip
        if best_als is None or row["recall"] + row["ndcg"] > best_als["recall"] + best_als["ndcg"]:
            best_als = row
    assert best_als is not None
    rows.append({**best_als, "method": f"ALS (best of {len(grid)}: {best_als['method'][4:]})"})
    if weighted:  # ALS's confidence 1 + alpha * weight, alpha re-chosen for the scale
        f, r, _ = best_als["params"]
        for a in (1.0, 10.0):
            scores, secs = als(split, f, r, a, 0, split.train_w)
            rows.append({"method": f"ALS+weights f={f} reg={r:g} a={a:g}",
                         **_measured(split, scores, k), "seconds": secs})  # fmt: skip
    if split.train_ts.any():
        f, r, a = best_als["params"]
        for h in (0.2, 0.5):
            scores, secs = als(split, f, r, a, 0, recency(split, h))
            rows.append({"method": f"ALS+recency f={f} reg={r:g} a={a:g} h={h:g}",
                         **_measured(split, scores, k), "seconds": secs})  # fmt: skip
    return rows


def run_dataset(
    name: str, flags: list[str], work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    db = work / f"{name}.duckdb"
    threads = ["--threads", str(args.threads or 1)]
    started = time.perf_counter()
    earlier = _earlier_runs(db, split_of=None) if args.reuse and db.exists() else ([], [])
    flags = [_gunzipped(f, work) for f in flags]
    if not (args.reuse and db.exists()):
        mfbatch_cli("preprocess", *flags, "--db", db)
    result: dict[str, Any] = {"dataset": name, "preprocess": flags,
                              "preprocess_seconds": time.perf_counter() - started}  # fmt: skip
    split = load(str(db))
    result["shape"] = {"users": split.n_users, "items": split.n_items,
                       "train": int(split.train_u.size), "val": int(split.val_u.size)}  # fmt: skip
    k, rows = args.k, []
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [_measure_export(split, k, *run) for run in earlier[0]] or [
        _cli_run(db, work, split, k, *threads, "--seed", str(s)) for s in seeds
    ]
    rows.append(_mean("mfbatch default (`mfbatch train`)", runs))
    if args.trials:
        tuned = [_measure_export(split, k, *run) for run in earlier[1]]
        if not tuned:
            mfbatch_cli("tune", "--db", db, "--trials", str(args.trials), "--timeout",
                        str(args.tune_timeout), *threads)  # fmt: skip
            tuned = [_cli_run(db, work, split, k, *threads, "--seed", str(s)) for s in seeds]
        rows.append(_mean(f"mfbatch tuned (`mfbatch tune --trials {args.trials}`, then train)",
                          tuned))  # fmt: skip
    lambdas = [float(v) for v in args.lambdas.split(",")]
    rows += _peers(split, k, lambdas, args.quick)
    if name in PUBLISHED:
        label, recall, ndcg = PUBLISHED[name]
        rows.append({"method": f"published: {label}", "recall_uncapped": recall, "ndcg": ndcg})
    result["rows"] = rows
    return result


def _mean(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": f"{name}, {len(runs)} seed(s)"}
    for key in ("recall", "ndcg", "recall_uncapped", "seconds"):
        values = [float(r[key]) for r in runs if r.get(key) is not None]
        if values:
            row[key] = statistics.mean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return row


# The first line of every report this script writes: a Markdown file without it (the
# hand-written docs/quality.md, say) is never replaced.
REPORT_MARK = "<!-- written by benchmarks/bench_quality.py --all; rerun it, do not edit -->"


def check_report(out: Path) -> None:
    """Refuse, before any work, a report path holding a file this script did not write."""
    if out.suffix != ".md":
        raise SystemExit(f"error: --out/--report {out}: give a .md path (the JSON goes beside it)")
    if out.exists() and not out.read_text(encoding="utf-8").startswith(REPORT_MARK):
        raise SystemExit(
            f"error: --out/--report {out} exists and was not written by this script; "
            "give another path (the default is docs/quality-table.md)"
        )


def earlier_results(out: Path, running: set[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The report's data sets this run does not measure, and the commands that made them:
    an `--only` run updates its rows and keeps the rest."""
    path = out.with_suffix(".json")
    if not out.exists() or not path.exists():
        return [], []
    earlier = json.loads(path.read_text(encoding="utf-8"))
    kept = [r for r in earlier.get("results", []) if r.get("dataset") not in running]
    return kept, [earlier["command"]] if kept and earlier.get("command") else []


def write_report(results: list[dict[str, Any]], command: str, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps({"command": command, "results": results},
                                                   indent=2) + "\n")  # fmt: skip
    lines = [REPORT_MARK, "", "# Quality on real data", "", f"Produced by `{command}`", ""]
    for res in results:
        lines.append(f"## {res['dataset']}")
        if "error" in res:
            lines += ["", f"Not measured: {res['error']}", ""]
            continue
        shape = res["shape"]
        lines += ["", f"`mfbatch preprocess {' '.join(res['preprocess'])}`: {shape['users']:,} "
                  f"users × {shape['items']:,} items, train {shape['train']:,} / "
                  f"val {shape['val']:,}.", "",
                  "| method | Recall@20 | NDCG@20 | Recall@20 uncapped | train s |",
                  "|---|---|---|---|---|"]  # fmt: skip

        def cell(row: dict[str, Any], key: str) -> str:
            if row.get(key) is None:
                return "-"
            std = row.get(key + "_std")
            return f"{row[key]:.4f}" + (f" ± {std:.4f}" if std else "")

        for row in res["rows"]:
            secs = f"{row['seconds']:.1f}" if row.get("seconds") is not None else "-"
            lines.append(f"| {row['method']} | {cell(row, 'recall')} | {cell(row, 'ndcg')} | "
                         f"{cell(row, 'recall_uncapped')} | {secs} |")  # fmt: skip
        lines.append("")
    out.write_text("\n".join(lines))


def main_all(args: argparse.Namespace) -> None:
    command = "python benchmarks/bench_quality.py --all " + " ".join(sys.argv[2:])
    torch.set_num_threads(args.threads or 1)
    chosen = {
        name: flags
        for name, flags in datasets(args.data).items()
        if not args.only or name in args.only.split(",")
    }
    unknown = set(args.only.split(",")) - set(datasets(args.data)) if args.only else set()
    if unknown:
        raise SystemExit(
            f"error: --only {','.join(sorted(unknown))}: no such data set; "
            f"use {','.join(datasets(args.data))}"
        )
    kept, commands = earlier_results(args.out, set(chosen))
    command = "` and `".join([*commands, command])
    results: list[dict[str, Any]] = []
    for name, flags in chosen.items():
        print(f"{name}:", flush=True)
        try:
            results.append(run_dataset(name, flags, args.work / name, args))
        except (RuntimeError, OSError) as exc:
            results.append({"dataset": name, "error": str(exc).splitlines()[-1][:300]})
        print(json.dumps(results[-1])[:2000], flush=True)
        order = list(datasets(args.data))
        merged = sorted(
            [*kept, *results],
            key=lambda r: order.index(r["dataset"]) if r["dataset"] in order else len(order),
        )
        write_report(merged, command, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("db", nargs="?")
    parser.add_argument("--all", action="store_true", help="every data set of --data")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--work", type=Path, default=Path("bench-quality"))
    parser.add_argument(
        "--report",
        type=Path,
        default=Path("docs/quality-table.md"),
        help="--all: the Markdown table (JSON beside it); --out overrides it",
    )
    parser.add_argument("--only", default="", help="--all: these data sets (comma list)")
    parser.add_argument("--trials", type=int, default=20, help="--all: tune trials (0: none)")
    parser.add_argument("--tune-timeout", type=float, default=600.0)
    parser.add_argument("--quick", action="store_true", help="--all: ALS at 128 factors only")
    parser.add_argument(
        "--reuse", action="store_true", help="--all: measure the runs already in --work's dbs"
    )
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lambdas", default="50,100,200,300,500,1000")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--sampled",
        default="",
        help="also the sampled softmax, e.g. 'popularity:256;in-batch:0' (sampler:negatives)",
    )
    parser.add_argument(
        "--recency-peers",
        default="0.03,0.05,0.1,0.2,0.3,0.5",
        help="half-lives for EASE and ALS given mfbatch's recency weights ('' to skip)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.all:
        args.out = args.out or args.report
        check_report(args.out)
        main_all(args)
        return
    if args.db is None:
        parser.error("give DB, or --all")
    if args.threads:
        torch.set_num_threads(args.threads)
    k, seeds = args.k, [int(s) for s in args.seeds.split(",")]
    split = load(args.db)
    rows: list[dict[str, Any]] = []

    def report(name: str, recalls: list[float], ndcgs: list[float], secs: list[float]) -> None:
        rows.append(
            {
                "method": name,
                "recall": statistics.mean(recalls),
                "recall_std": statistics.stdev(recalls) if len(recalls) > 1 else 0.0,
                "ndcg": statistics.mean(ndcgs),
                "ndcg_std": statistics.stdev(ndcgs) if len(ndcgs) > 1 else 0.0,
                "seconds": statistics.median(secs) if secs else None,
            }
        )
        sec = f"{statistics.median(secs):7.2f} s" if secs else "       -"
        print(
            f"{name:<44} Recall@{k} {mean_std(recalls)}  NDCG@{k} {mean_std(ndcgs)}  {sec}",
            flush=True,
        )

    print(
        f"{args.db}: {split.n_users:,} users, {split.n_items:,} items, train "
        f"{split.train_u.size:,}, val {split.val_u.size:,}; torch threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )
    r, n = metrics(split, top_lists(split, popularity(split), k), k)
    report("popularity", [r], [n], [])

    best_ease: tuple[float, float, float, float] | None = None
    for lam in (float(v) for v in args.lambdas.split(",")):
        scores, secs = ease(split, lam)
        r, n = metrics(split, top_lists(split, scores, k), k)
        print(f"  EASE λ={lam:<6g} Recall@{k} {r:.4f}  NDCG@{k} {n:.4f}  {secs:.2f} s")
        if best_ease is None or r + n > best_ease[1] + best_ease[2]:
            best_ease = (lam, r, n, secs)
    assert best_ease is not None
    report(f"EASE (best λ={best_ease[0]:g})", [best_ease[1]], [best_ease[2]], [best_ease[3]])
    half_lives = [float(v) for v in filter(None, args.recency_peers.split(","))]
    if half_lives and split.train_ts.any():
        # The same signal mfbatch's --recency-half-life uses, given to EASE as a
        # recency-weighted history row at scoring time (B itself is fitted as usual).
        best_re: tuple[str, float, float, float] | None = None
        for lam in (float(v) for v in args.lambdas.split(",")):
            for h in half_lives:
                scores, secs = ease(split, lam, recency(split, h))
                r, n = metrics(split, top_lists(split, scores, k), k)
                print(f"  EASE+recency λ={lam:<6g} h={h:<4g} Recall@{k} {r:.4f}  NDCG@{k} {n:.4f}")
                if best_re is None or r + n > best_re[1] + best_re[2]:
                    best_re = (f"λ={lam:g} h={h:g}", r, n, secs)
        assert best_re is not None
        report(f"EASE+recency (best {best_re[0]})", [best_re[1]], [best_re[2]], [best_re[3]])

    try:
        import implicit  # noqa: F401

        have_als = True
    except ImportError:
        have_als = False
        print("  implicit is not installed: ALS skipped (pip install implicit)")
    if have_als:
        # Centred where a wider sweep on ML-100K found ALS's best (alpha 1 beat 5-20,
        # regularisation 10 beat 0.01-1 and 50).
        grid = [(f, reg, 1.0) for f in (32, 64, 128) for reg in (3.0, 10.0, 20.0, 40.0)]
        best_als: tuple[Any, float] | None = None
        for factors, reg, alpha in grid:
            scores, secs = als(split, factors, reg, alpha, 0)
            r, n = metrics(split, top_lists(split, scores, k), k)
            print(
                f"  ALS f={factors} reg={reg} alpha={alpha:<4g} Recall@{k} {r:.4f}  "
                f"NDCG@{k} {n:.4f}  {secs:.2f} s"
            )
            if best_als is None or r + n > best_als[1]:
                best_als = ((factors, reg, alpha), r + n)
        assert best_als is not None
        (factors, reg, alpha), _ = best_als
        res = []
        for seed in seeds:
            scores, secs = als(split, factors, reg, alpha, seed)
            res.append((*metrics(split, top_lists(split, scores, k), k), secs))
        report(
            f"ALS (best of {len(grid)}: f={factors} reg={reg} a={alpha:g})",
            [x[0] for x in res],
            [x[1] for x in res],
            [x[2] for x in res],
        )
    if have_als and half_lives and split.train_ts.any():
        grid_re = [(f, reg, h) for f in (64, 128) for reg in (10.0, 20.0, 40.0) for h in half_lives]
        best_re_als: tuple[Any, float] | None = None
        for factors, reg, h in grid_re:
            scores, secs = als(split, factors, reg, 1.0, 0, recency(split, h))
            r, n = metrics(split, top_lists(split, scores, k), k)
            print(
                f"  ALS+recency f={factors} reg={reg} h={h:<4g} "
                f"Recall@{k} {r:.4f}  NDCG@{k} {n:.4f}"
            )
            if best_re_als is None or r + n > best_re_als[1]:
                best_re_als = ((factors, reg, h), r + n)
        assert best_re_als is not None
        (factors, reg, h), _ = best_re_als
        res = []
        for seed in seeds:
            scores, secs = als(split, factors, reg, 1.0, seed, recency(split, h))
            res.append((*metrics(split, top_lists(split, scores, k), k), secs))
        report(
            f"ALS+recency (best of {len(grid_re)}: f={factors} reg={reg} h={h:g})",
            [x[0] for x in res],
            [x[1] for x in res],
            [x[2] for x in res],
        )

    config = TrainConfig(device="cpu", top_k=k)
    # The shared metric agrees with the trainer's own on the same model (once).
    model, _, _ = mfbatch_fit(split, config.replace(epochs=3))
    ours = metrics(split, top_lists(split, mf_scores(model, split.n_items), k), k)
    _, val = tensors(split)
    theirs = rank_metrics(model, val, k)
    assert np.allclose(ours, theirs, atol=1e-9), (ours, theirs)
    print(f"  metric check vs trainer.rank_metrics: {ours[0]:.6f}/{ours[1]:.6f} agree")

    variants: list[tuple[str, TrainConfig, bool]] = [
        ("mfbatch default (pipeline: early stop on val)", config, True),
        ("mfbatch default (fixed epochs, val unseen)", config, False),
    ]
    if recency_for(split.split_kind) and split.train_ts.any():
        # The previous default, in the same run: what the recency weighting adds.
        no_recency = config.replace(recency_half_life=0.0)
        variants.append(("mfbatch --recency-half-life 0 (pipeline)", no_recency, True))
    for spec in filter(None, args.sampled.split(";")):
        sampler, negatives = spec.split(":")
        sampled = config.replace(objective="sampled", sampler=sampler, negatives=int(negatives))
        variants.append((f"  sampled {sampler} {negatives} (fixed epochs)", sampled, False))
    for label, cfg, early in variants:
        res = list(run_mfbatch(split, cfg, seeds, k, early_stop=early))
        report(label, [x[0] for x in res], [x[1] for x in res], [x[2] for x in res])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"db": args.db, "k": k, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
