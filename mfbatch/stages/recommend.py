"""`mfbatch recommend`: one user's served list beside their own best-rated items.

It reads what `score` published, so it refuses lists made by a run trained on other data
than the database now holds (re-preprocessed since): those ids could mean other things.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mfbatch.errors import ConfigError, DatabaseError, ModelError
from mfbatch.store import db
from mfbatch.store.datasets import Dataset


@dataclass(frozen=True)
class Recommended:
    rank: int
    item_id: str
    title: str | None
    genres: str | None
    score: float
    predicted_rating: float | None
    source: str


@dataclass(frozen=True)
class Rated:
    item_id: str
    title: str | None
    rating: float
    split: str


@dataclass(frozen=True)
class UserReport:
    user_id: str
    n_ratings: int
    run_id: str | None
    recommendations: list[Recommended]
    top_rated: list[Rated]

    def line(self) -> str:
        sources = sorted({r.source for r in self.recommendations})
        return (
            f"user {self.user_id}: {len(self.recommendations)} recommendations "
            f"({', '.join(sources) or 'none'}) from run {self.run_id}, "
            f"{self.n_ratings:,} ratings of their own"
        )


def recommend(*, db_path: Path, user_id: str, limit: int = 20, n: int | None = None) -> UserReport:
    """One user's list (its first `n`, default all) beside their own best-rated items
    (the first `limit`), for a human sanity check."""
    con = db.connect(db_path, read_only=True)
    try:
        dataset = Dataset.load(con, db_path)
        if not db.table_exists(con, "recommendations"):
            raise DatabaseError(f"{db_path} has no recommendations; run `mfbatch score` first")
        user = db.record(con, "user_by_id", user_id=user_id)
        if user is None:
            near = [r["user_id"] for r in db.records(con, "users_near_id", user_id=user_id)]
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise ConfigError(
                f"--user: no user {user_id!r} in {db_path} (raw ids, as in users){hint}"
            )
        recs = db.records(con, "user_recommendations", user_id=user_id)
        if not recs:
            raise DatabaseError(
                f"--user: user {user_id!r} has no served list in {db_path}: added since the "
                "last `mfbatch score` (run it to serve them), or they rated every item"
            )
        runs = {r["run_id"] for r in recs}
        for run_id in runs:
            origin = db.record(con, "run_dataset", run_id=run_id)
            if origin is None or origin["dataset_sha256"] != dataset.sha256:
                raise ModelError(
                    f"the lists in {db_path} were made by run {run_id}, trained on other data "
                    "than the database holds now; run `mfbatch score` again"
                )
        rated = db.records(con, "user_top_rated", user_idx=user["user_idx"], limit=limit)
    finally:
        con.close()
    return UserReport(
        user_id=user_id,
        n_ratings=int(user["n_ratings"]),
        run_id=next(iter(runs)) if len(runs) == 1 else None,
        recommendations=[
            Recommended(**{k: v for k, v in r.items() if k != "run_id"}) for r in recs[:n]
        ],
        top_rated=[Rated(**r) for r in rated],
    )
