"""`mfbatch report`: one self-contained HTML page about a run, for a person to look at.

Everything is read from the database (`training_epochs`, `evaluations`, `evaluation_lists`,
`recommendations`); the figures are drawn with matplotlib's Agg backend and embedded as
base64 PNGs, so the file opens offline, from an e-mail or a bucket, with no network.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mfbatch.errors import DatabaseError
from mfbatch.store import db, outputs
from mfbatch.store.datasets import Dataset
from mfbatch.store.runs import Run, find_run
from mfbatch.version import __version__


@dataclass(frozen=True)
class ReportSummary:
    run_id: str
    out: Path
    figures: int
    k: int | None

    def line(self) -> str:
        return f"report for run {self.run_id}: {self.figures} figures -> {self.out}"


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figures(
    epochs: list[dict[str, Any]],
    metrics: list[dict[str, Any]],
    items: list[dict[str, Any]],
    scores: np.ndarray,
    served: np.ndarray,
) -> list[tuple[str, str]]:
    """(caption, base64 PNG) per figure that has data to show."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a batch job draws to memory
    import matplotlib.pyplot as plt

    out: list[tuple[str, str]] = []
    if epochs:
        out.append(_drawn(plt, "Training curves per epoch", _training_curves, epochs))
    ranked = [m for m in metrics if m["k"] is not None and m["baseline_value"] is not None]
    ranked = [m for m in ranked if not m["metric"].startswith("users_")]
    if ranked:
        out.append(_drawn(plt, "Metrics against the popularity baseline", _against, ranked))
    if items:
        out.append(_drawn(plt, "Long tail and coverage", _long_tail, items))
    if scores.size or served.size:
        out.append(_drawn(plt, "Score distribution", _score_histogram, scores, served))
    return out


def _drawn(plt: Any, caption: str, draw: Callable[..., Any], *data: Any) -> tuple[str, str]:
    """(caption, base64 PNG) of the figure `draw(plt, *data)` returns, closed once encoded."""
    fig = draw(plt, *data)
    png = _png(fig)
    plt.close(fig)
    return caption, png


def _training_curves(plt: Any, epochs: list[dict[str, Any]]) -> Any:
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    x = [e["epoch"] for e in epochs]
    loss_ax.plot(x, [e["train_loss"] for e in epochs], marker="o", color="#1f77b4")
    loss_ax.set(title="training loss", xlabel="epoch")
    for key, label in (
        ("val_recall", "Recall@K"),
        ("val_ndcg", "NDCG@K"),
        ("val_rmse", "RMSE"),
    ):
        values = [e[key] for e in epochs]
        if any(v is not None for v in values):
            val_ax.plot(x, [np.nan if v is None else v for v in values], marker=".", label=label)
    val_ax.set(title="validation", xlabel="epoch")
    val_ax.legend()
    return fig


def _against(plt: Any, ranked: list[dict[str, Any]]) -> Any:
    fig, ax = plt.subplots(figsize=(10, 3.5))
    names = [f"{m['metric']}@{m['k']}" for m in ranked]
    pos = np.arange(len(names))
    ax.bar(pos - 0.2, [m["value"] for m in ranked], 0.4, label="mfbatch")
    ax.bar(pos + 0.2, [m["baseline_value"] for m in ranked], 0.4, label="popularity")
    ax.set_xticks(pos, names, rotation=20)
    ax.set(title="the validated run against popularity (same split, same lists' K)")
    ax.legend()
    return fig


def _long_tail(plt: Any, items: list[dict[str, Any]]) -> Any:
    popularity = np.array([i["n_train"] for i in items], dtype=float)
    listed = np.array([i["listed"] for i in items], dtype=float)
    fig, (tail_ax, share_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    tail_ax.scatter(popularity + 1, listed + 1, s=6, alpha=0.5)
    tail_ax.set(
        xscale="log",
        yscale="log",
        title="long tail: times listed vs train ratings (+1)",
        xlabel="train ratings of the item",
        ylabel="lists it is in",
    )
    order = np.argsort(-popularity, kind="stable")
    share = np.cumsum(listed[order]) / max(listed.sum(), 1.0)
    share_ax.plot(np.arange(1, len(order) + 1) / len(order), share)
    share_ax.set(
        title="share of list slots by popularity rank",
        xlabel="items, most rated first (fraction of catalogue)",
        ylabel="cumulative share of slots",
    )
    return fig


def _score_histogram(plt: Any, scores: np.ndarray, served: np.ndarray) -> Any:
    fig, ax = plt.subplots(figsize=(10, 3.5))
    for label, listed_scores in (("measured lists", scores), ("served lists", served)):
        if listed_scores.size:
            ax.hist(listed_scores, bins=50, alpha=0.6, label=label)
    ax.set(title="score distribution of listed items (model rows)", xlabel="score")
    ax.legend()
    return fig


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.0f}" if value.is_integer() and value > 1 else f"{value:,.4f}"
        return html.escape("" if value is None else str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(
    run: Run,
    dataset: Dataset,
    metrics: list[dict[str, Any]],
    figures: list[tuple[str, str]],
    served: str,
) -> str:
    images = "".join(
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, data in figures
    )
    facts = [
        {"what": "run", "value": f"{run.run_id} ({run.objective}, trained on {run.data_seen})"},
        {"what": "best epoch", "value": f"{run.best_epoch} of {run.epochs_run}"},
        {"what": "dataset", "value": f"{dataset.n_users:,} users x {dataset.n_items:,} items, "
                                     f"{dataset.n_train:,} train / {dataset.n_val:,} val ratings"},
        {"what": "served now", "value": served},
    ]  # fmt: skip
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="generator" content="mfbatch {__version__}">
<title>mfbatch report: run {html.escape(run.run_id)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>mfbatch report: run {html.escape(run.run_id)}</h1>
{_table(facts, ["what", "value"])}
<h2>Figures against popularity</h2>
{_table(metrics, ["metric", "k", "value", "baseline_value"])}
{images}
</body></html>
"""


def report(
    *, db_path: Path, out: Path, run_id: str = "latest", export_dir: Path | None = None
) -> ReportSummary:
    """Write the report of a validated run (default: the newest) to `out`."""
    # Refused before any work: `out` may only replace an earlier report (store.outputs).
    target = outputs.check(out, flag="--out", kind="report", db_path=db_path, export_dir=export_dir)
    con = db.connect(db_path, read_only=True)
    try:
        dataset = Dataset.load(con, db_path)
        run = find_run(con, db_path, dataset, run_id, role="measure")
        epochs = db.records(con, "run_epochs", run_id=run.run_id)
        metrics = (
            db.records(con, "latest_evaluation", run_id=run.run_id)
            if db.table_exists(con, "evaluations")
            else []
        )
        if not metrics:
            raise DatabaseError(
                f"run {run.run_id} has not been evaluated; run `mfbatch evaluate --db {db_path}`"
            )
        k = next((int(m["k"]) for m in metrics if m["k"] is not None), None)
        items = db.records(con, "list_item_counts", run_id=run.run_id, k=k)
        scores = np.array(
            [r["score"] for r in db.records(con, "list_scores", run_id=run.run_id, k=k)]
        )
        served_scores = np.array([])
        served = "nothing yet (run `mfbatch score`)"
        if db.table_exists(con, "recommendations"):
            served_rows = db.records(con, "served_scores")
            served_scores = np.array([r["score"] for r in served_rows if r["source"] == "model"])
            runs = sorted({r["run_id"] for r in served_rows})
            served = f"{len(served_rows):,} rows from run(s) {', '.join(runs)}"
    finally:
        con.close()
    figures = _figures(epochs, metrics, items, scores, served_scores)
    page = _page(run, dataset, metrics, figures, served)
    with outputs.staged(target) as partial:
        partial.write_text(page, encoding="utf-8")
    return ReportSummary(run_id=run.run_id, out=out, figures=len(figures), k=k)
