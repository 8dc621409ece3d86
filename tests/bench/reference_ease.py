"""EASE and popularity on a prepared mfbatch database: the yardstick for `mfbatch evaluate`.

    python tests/bench/reference_ease.py --db ut.duckdb [--k 20] [--lambdas 100,300,500,1000]

Reads the same train/val split mfbatch trained on and scores every user with EASE
(Steck 2019: B = I - P diag(1/diag(P)), P = (X'X + lambda I)^-1) in dense numpy, which is
fine up to a few thousand items. Metrics use the definitions of sql/evaluate.sql (Recall =
hits / |relevant|; NDCG against min(|relevant|, K) ideal hits; users without validation
items left out), so the figures compare with `mfbatch evaluate` one to one.
"""

from __future__ import annotations

import argparse

import duckdb
import numpy as np


def metrics(scores: np.ndarray, relevant: np.ndarray, k: int) -> tuple[float, float]:
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(relevant, top, 1)
    n_rel = relevant.sum(1)
    keep = n_rel > 0
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)[np.minimum(n_rel, k) - 1]
    recall = hits.sum(1)[keep] / n_rel[keep]
    ndcg = (hits * discounts).sum(1)[keep] / ideal[keep]
    return float(recall.mean()), float(ndcg.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--lambdas", default="100,300,500,1000")
    args = parser.parse_args()
    con = duckdb.connect(args.db, read_only=True)
    n_users, n_items = con.sql("SELECT n_users, n_items FROM dataset_meta").fetchall()[0]
    rows = con.sql("SELECT user_idx, item_idx, split = 'val' FROM ratings").fetchnumpy()
    con.close()
    users, items, is_val = rows["user_idx"], rows["item_idx"], rows["(split = 'val')"]
    x = np.zeros((n_users, n_items), dtype=np.float64)
    x[users[~is_val], items[~is_val]] = 1.0
    relevant = np.zeros((n_users, n_items), dtype=bool)
    relevant[users[is_val], items[is_val]] = True
    seen = x > 0

    popularity = np.where(seen, -np.inf, x.sum(0)[None, :])
    recall, ndcg = metrics(popularity, relevant, args.k)
    print(f"popularity       Recall@{args.k} {recall:.4f}  NDCG@{args.k} {ndcg:.4f}")
    gram = x.T @ x
    for lam in (float(v) for v in args.lambdas.split(",")):
        p = np.linalg.inv(gram + lam * np.eye(n_items))
        b = -p / np.diag(p)
        np.fill_diagonal(b, 0.0)
        recall, ndcg = metrics(np.where(seen, -np.inf, x @ b), relevant, args.k)
        print(f"EASE lambda={lam:<6g} Recall@{args.k} {recall:.4f}  NDCG@{args.k} {ndcg:.4f}")


if __name__ == "__main__":
    main()
