"""`mfbatch.load(db=..., run=...)`: a run as an object, for ad-hoc questions from Python.

    model = mfbatch.load(db="ml.duckdb")                      # the run `score` serves
    model.recommend(["1", "2"], k=10)                         # Polars: user_id, rank, item_id, ...
    model.recommend(histories={"visitor": ["50", "172"]}, k=5)  # folded in, never stored
    model.similar_items(["50"], k=5)

It reads what `mfbatch score` reads (stages/score_inputs: the run, the masks, the raw ids,
the ratings the run has not seen) and builds lists with the same code and the same compiled
graph (serving/lists.build_lists over the run's model.onnx), so a known user's list is the
one `score` publishes with the same K and filters. The database is closed again on load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from mfbatch.errors import ConfigError

if TYPE_CHECKING:
    import polars as pl

    from mfbatch.config import Config
    from mfbatch.serving.lists import ListBatch, ListPlan
    from mfbatch.serving.session import Scorer
    from mfbatch.stages.score_inputs import ScoreInputs

# Users per call of the graph: bounds the [B, I] score block as `score` does.
BATCH = 1024
History = Iterable[str] | Mapping[str, float]


def _shown(ids: list[str]) -> str:
    return ", ".join(repr(i) for i in ids[:5]) + (
        f" (+{len(ids) - 5} more)" if len(ids) > 5 else ""
    )


class Model:
    """A loaded run: `recommend` and `similar_items`, answered as Polars frames of raw ids."""

    def __init__(self, inputs: ScoreInputs, scorer: Scorer) -> None:
        from mfbatch.serving.engines import apply_fold_in

        self.run_id = inputs.run.run_id
        self.objective = inputs.run.objective
        self._inputs = inputs
        self._scorer = scorer
        # Users with ratings the run has not seen get their folded-in vectors, as in score.
        self._plan: ListPlan = apply_fold_in(
            inputs.plan, inputs.fold, scorer.items_aug_t, inputs.run.objective
        )
        self._user_index = {u: i for i, u in enumerate(inputs.user_ids.to_pylist())}
        self._item_index = {v: i for i, v in enumerate(inputs.item_ids.to_pylist())}

    def __repr__(self) -> str:
        d = self._inputs.dataset
        shape = f"{d.n_users:,} users x {d.n_items:,} items"
        return f"<mfbatch.Model run {self.run_id} ({self.objective}): {shape}>"

    def _items(self, ids: Iterable[str], what: str) -> np.ndarray:
        ids = [str(i) for i in ids]
        missing = [i for i in ids if i not in self._item_index]
        if missing:
            raise ConfigError(f"{what}: no item {_shown(missing)} in the database (raw item ids)")
        return np.array([self._item_index[i] for i in ids], dtype=np.int64)

    def _mask(self, include: Iterable[str] | None, exclude: Iterable[str] | None) -> np.ndarray:
        mask = self._plan.item_mask.copy()
        if include is not None:
            allowed = np.full_like(mask, -np.inf)
            keep = self._items(include, "include")
            allowed[keep] = mask[keep]
            mask = allowed
        if exclude is not None:
            mask[self._items(exclude, "exclude")] = -np.inf
        return mask

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self._inputs.dataset.n_items:
            raise ConfigError(f"k: must be in [1, {self._inputs.dataset.n_items:,}], got {k}")

    def recommend(
        self,
        users: str | Iterable[str] | None = None,
        *,
        histories: Mapping[str, History] | None = None,
        k: int = 10,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
    ) -> pl.DataFrame:
        """The top `k` items for known `users` (raw ids) or for `histories` (a label -> the
        item ids someone rated, or item id -> stars), never an item they rated.

        `include`/`exclude` filter the catalogue (raw item ids), like score's
        --include-items/--exclude-items. Columns: user_id, rank, item_id, score, source
        ("model", "fold-in" or "popularity" for a user the run cannot speak for).
        """
        if (users is None) == (histories is None):
            raise ConfigError("recommend: pass users=[...] or histories={label: [items]}")
        self._check_k(k)
        mask = self._mask(include, exclude)
        if histories is not None:
            return self._for_histories(histories, k, mask)
        wanted = [users] if isinstance(users, str) else [str(u) for u in users or []]
        missing = [u for u in wanted if u not in self._user_index]
        if missing:
            raise ConfigError(
                f"recommend: no user {_shown(missing)} in the database; for someone new, "
                "pass histories={label: [item ids]}"
            )
        idx = np.array([self._user_index[u] for u in wanted], dtype=np.int64)
        plan = dataclasses.replace(self._plan, users=idx, item_mask=mask, k=k)
        return self._frame(plan, self._inputs.user_ids)

    def _frame(self, plan: ListPlan, user_ids: pa.Array) -> pl.DataFrame:
        import polars as pl

        from mfbatch.serving.lists import build_lists, to_arrow

        batches: list[ListBatch] = list(build_lists(self._scorer, plan, BATCH))
        tables = [to_arrow(b, user_ids, self._inputs.item_ids) for b in batches]
        frame = pl.from_arrow(pa.concat_tables(tables))
        assert isinstance(frame, pl.DataFrame)
        return frame.select(
            pl.col("user_id").cast(pl.String),
            "rank",
            pl.col("item_id").cast(pl.String),
            "score",
            pl.col("source").cast(pl.String),
        )

    def _for_histories(
        self, histories: Mapping[str, History], k: int, mask: np.ndarray
    ) -> pl.DataFrame:
        from mfbatch.serving.csr import SeenItems
        from mfbatch.serving.engines import FoldIn, apply_fold_in

        dataset = self._inputs.dataset
        labels, indptr, items, ratings = list(histories), [0], [], []
        span = (dataset.rating_max - dataset.rating_min) or 1.0
        for label in labels:
            history = histories[label]
            stars = dict(history) if isinstance(history, Mapping) else None
            ids = list(stars) if stars is not None else [str(i) for i in history]
            items.extend(self._items(ids, f"histories[{label!r}]").tolist())
            if stars is None:  # items only: each counts as a top rating
                ratings.extend([1.0] * len(ids))
            else:
                ratings.extend((float(stars[i]) - dataset.rating_min) / span for i in ids)
            indptr.append(len(items))
        n = len(labels)
        owners = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
        item_idx = np.array(items, dtype=np.int64)
        seen = SeenItems.from_sorted(owners, item_idx, n)
        plan = dataclasses.replace(
            self._plan,
            users=np.arange(n, dtype=np.int64),
            seen=seen,
            item_mask=mask,
            k=k,
            cold=np.zeros(n, dtype=bool),
            folded=np.arange(n, dtype=np.int64),
        )
        fold = FoldIn(
            users=np.arange(n, dtype=np.int64),
            rated=seen,
            ratings=np.clip(np.array(ratings, dtype=np.float32), 0.0, 1.0),
            item_usable=self._plan.item_mask[: self._scorer.n_items] > -np.inf,
            weights=self._history_weights(owners),
            temperature=float(self._train_settings.get("temperature", 1.0)),
        )
        plan = apply_fold_in(plan, fold, self._scorer.items_aug_t, self.objective)
        return self._frame(plan, pa.array(labels, type=pa.string()))

    @property
    def _train_settings(self) -> dict[str, Any]:
        settings = self._inputs.run.config.get("train", {})
        return settings if isinstance(settings, dict) else {}

    def _history_weights(self, owners: np.ndarray) -> np.ndarray | None:
        """The run's recency weights, as `score` gives a folded-in user's ratings: a
        history is listed oldest first, and its order stands in for the times."""
        from mfbatch.serving.foldin import fold_in_half_life, recency_weights

        half_life = fold_in_half_life(self._train_settings)
        if half_life <= 0 or self.objective == "rating":
            return None
        return recency_weights(owners, np.arange(len(owners), dtype=np.int64), half_life)

    def similar_items(self, items: str | Iterable[str], k: int = 10) -> pl.DataFrame:
        """For each item, the `k` items whose vectors in the run's graph point most the same
        way (cosine of the factor rows; bias left out). Columns: item_id, rank, similar_id,
        score. Items the run never trained on are neither asked about nor offered."""
        import polars as pl

        self._check_k(k)
        wanted = [items] if isinstance(items, str) else [str(i) for i in items]
        idx = self._items(wanted, "similar_items")
        table = self._scorer.items_aug_t
        d = table.shape[0] - 2
        vectors = table[:d].T.astype(np.float64)
        norms = np.linalg.norm(vectors, axis=1)
        usable = (self._plan.item_mask[: len(norms)] > -np.inf) & (norms > 0)
        untrained = [
            w for w, i in zip(wanted, idx, strict=True) if i >= len(norms) or not usable[i]
        ]
        if untrained:
            raise ConfigError(f"similar_items: the run never trained on {_shown(untrained)}")
        unit = np.where(usable[:, None], vectors / np.maximum(norms, 1e-12)[:, None], 0.0)
        scores = unit[idx] @ unit.T
        scores[:, ~usable] = -np.inf
        scores[np.arange(len(idx)), idx] = -np.inf  # not similar to itself
        k = min(k, int(usable.sum()) - 1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        item_ids = self._inputs.item_ids.to_pylist()
        return pl.DataFrame(
            {
                "item_id": [w for w in wanted for _ in range(k)],
                "rank": list(range(1, k + 1)) * len(wanted),
                "similar_id": [item_ids[j] for row in top for j in row],
                "score": np.take_along_axis(scores, top, axis=1).ravel(),
            },
            schema={"item_id": pl.String, "rank": pl.Int32, "similar_id": pl.String,
                    "score": pl.Float64},
        )  # fmt: skip


def load_model(config: Config, *, provider: str = "cpu", threads: int | None = None) -> Model:
    """The run `config.score.run_id` names ('latest': the one score serves), loaded."""
    from mfbatch.serving.session import Scorer
    from mfbatch.stages.score_inputs import load_inputs

    config = config.override("score", {"top_k": 1}, where="load")
    inputs = load_inputs(config)
    return Model(inputs, Scorer(Path(inputs.run.model_path), provider=provider, threads=threads))


__all__ = ["Model", "load_model"]
