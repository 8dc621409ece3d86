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


NAMES = {
    "precision": "Precision",
    "recall": "Recall",
    "recall_uncapped": "Recall (uncapped)",
    "ndcg": "NDCG",
    "map": "MAP",
    "hit_rate": "Hit rate",
    "coverage": "Catalogue coverage",
    "rmse": "RMSE (stars, lower is better)",
    "mae": "MAE (stars, lower is better)",
}
# Shown as plain counts under the table, never as a 4-decimal "metric".
COUNTS = ("users_evaluated", "users_without_relevant")
MODEL, BASELINE, BEST = "#1f77b4", "#ff7f0e", "#2ca02c"


def metric_label(metric: str, k: int | None) -> str:
    name = NAMES.get(metric, metric)
    return f"{name}@{k}" if k is not None and metric != "coverage" else name


@dataclass(frozen=True)
class Figure:
    title: str
    how_to_read: str
    png: str


def _figures(
    run: Run,
    epochs: list[dict[str, Any]],
    metrics: list[dict[str, Any]],
    items: list[dict[str, Any]],
    scores: np.ndarray,
    served: tuple[np.ndarray, str],
) -> list[Figure]:
    """One figure per question a reviewer asks, each with a sentence on how to read it."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a batch job draws to memory
    import matplotlib.pyplot as plt

    out: list[Figure] = []
    if epochs:
        shown = (
            f"Recall and NDCG at K={run.top_k} (higher is better)"
            if run.objective != "rating"
            else "RMSE on the held-out stars (lower is better)"
        )
        read = (
            f"Left: the training loss, which should fall and flatten. Right: validation "
            f"{shown}, measured every few epochs; the green dashed line marks the best epoch "
            f"({run.best_epoch}), whose weights were kept and exported. A curve still "
            f"rising at the last epoch asks for more --epochs."
        )
        png = _drawn(plt, _training_curves, run, epochs)
        out.append(Figure("Training curves per epoch", read, png))
    ranked = [m for m in metrics if m["k"] is not None and m["baseline_value"] is not None]
    ranked = [m for m in ranked if m["metric"] not in COUNTS]
    if ranked:
        read = (
            "Each pair of bars is one measure of the top-K lists on the validation ratings: "
            "blue the model, orange the most-popular-items baseline on the same users; the "
            "number above is the lift (model / popularity). Below 1.0x the model loses to "
            "simply recommending what is popular."
        )
        out.append(Figure("Metrics against the popularity baseline", read,
                          _drawn(plt, _against, ranked)))  # fmt: skip
    if items:
        read = (
            "Left: each dot an item, how many validation lists it appears in against how "
            "many train ratings it has; dots only at the right mean only popular items get "
            "recommended. Right: the share of all list slots taken by the most-rated items; "
            "the dashed diagonal is every item listed equally, a curve hugging the left "
            "axis is a list made of a few blockbusters."
        )
        out.append(Figure("Long tail and coverage", read, _drawn(plt, _long_tail, items)))
    if scores.size or served[0].size:
        read = (
            "How the model's scores of listed items are spread, for the validated run's "
            "measured lists and for the served lists (the refit, a different model: its "
            "scale may shift). Both should be smooth; a served spike or a served range far "
            "from the measured one says to check the refit before trusting its lists."
        )
        png = _drawn(plt, _score_histogram, run.run_id, scores, served)
        out.append(Figure("Score distribution: measured vs served lists", read, png))
    return out


def _drawn(plt: Any, draw: Callable[..., Any], *data: Any) -> str:
    """The base64 PNG of the figure `draw(plt, *data)` returns, closed once encoded."""
    fig = draw(plt, *data)
    png = _png(fig)
    plt.close(fig)
    return png


def _series(epochs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The epochs that were validated and their values (validation runs every N epochs)."""
    pairs = [(e["epoch"], e[key]) for e in epochs if e[key] is not None]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def _training_curves(plt: Any, run: Run, epochs: list[dict[str, Any]]) -> Any:
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    x = [e["epoch"] for e in epochs]
    loss_ax.plot(x, [e["train_loss"] for e in epochs], "-o", markersize=3, color=MODEL)
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss")
    if run.objective == "rating":
        lines = [("val_rmse", "RMSE", MODEL)]
        val_ax.set(title="validation RMSE (lower is better)", ylabel="RMSE")
    else:
        k = run.top_k
        lines = [("val_recall", f"Recall@{k}", MODEL), ("val_ndcg", f"NDCG@{k}", BASELINE)]
        val_ax.set(title=f"validation Recall@{k} and NDCG@{k} (higher is better)")
    for key, label, colour in lines:
        xs, ys = _series(epochs, key)
        if xs:
            val_ax.plot(xs, ys, "-o", markersize=4, color=colour, label=label)
    for ax in (loss_ax, val_ax):
        ax.axvline(run.best_epoch, color=BEST, linestyle="--", linewidth=1)
    val_ax.axvline(run.best_epoch, color=BEST, linestyle="--", linewidth=1,
                   label=f"best epoch ({run.best_epoch})")  # fmt: skip
    val_ax.set(xlabel="epoch")
    val_ax.legend()
    return fig


def _against(plt: Any, ranked: list[dict[str, Any]]) -> Any:
    fig, ax = plt.subplots(figsize=(10, 3.5))
    names = [metric_label(m["metric"], m["k"]) for m in ranked]
    pos = np.arange(len(names))
    model = [m["value"] for m in ranked]
    base = [m["baseline_value"] for m in ranked]
    ax.bar(pos - 0.2, model, 0.4, label="mfbatch", color=MODEL)
    ax.bar(pos + 0.2, base, 0.4, label="popularity", color=BASELINE)
    for p, v, b in zip(pos, model, base, strict=True):
        if b:
            ax.annotate(f"{v / b:.2f}x", (p, max(v, b)), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8)  # fmt: skip
    ax.set_xticks(pos, names, rotation=15)
    ax.set_ylim(0, max(max(model), max(base)) * 1.15 or 1.0)
    ax.set(title="the validated run against popularity (same users, same K)", ylabel="value")
    ax.legend()
    return fig


def _long_tail(plt: Any, items: list[dict[str, Any]]) -> Any:
    popularity = np.array([i["n_train"] for i in items], dtype=float)
    listed = np.array([i["listed"] for i in items], dtype=float)
    fig, (tail_ax, share_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    tail_ax.scatter(popularity + 1, listed + 1, s=6, alpha=0.5, color=MODEL)
    tail_ax.set(
        xscale="log",
        yscale="log",
        title="times listed vs train ratings (both +1, log)",
        xlabel="train ratings of the item",
        ylabel="validation lists it is in",
    )
    order = np.argsort(-popularity, kind="stable")
    share = np.cumsum(listed[order]) / max(listed.sum(), 1.0)
    share_ax.plot(np.arange(1, len(order) + 1) / len(order), share, color=MODEL, label="lists")
    share_ax.plot([0, 1], [0, 1], "--", color="#888", label="every item equally")
    share_ax.set(
        title="share of list slots by popularity rank",
        xlabel="items, most rated first (fraction of catalogue)",
        ylabel="cumulative share of slots",
    )
    share_ax.legend()
    return fig


def _score_histogram(
    plt: Any, run_id: str, scores: np.ndarray, served: tuple[np.ndarray, str]
) -> Any:
    fig, ax = plt.subplots(figsize=(10, 3.5))
    served_scores, served_by = served
    for label, values, colour in (
        (f"measured lists (validated run {run_id})", scores, MODEL),
        (f"served lists ({served_by})", served_scores, BASELINE),
    ):
        if values.size:
            ax.hist(values, bins=50, density=True, histtype="step", linewidth=1.5,
                    color=colour, label=label)  # fmt: skip
    ax.set(title="scores of listed items (model rows)", xlabel="score", ylabel="density")
    ax.legend()
    return fig


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _metric_rows(metrics: list[dict[str, Any]]) -> tuple[list[dict[str, str]], str]:
    """The table's rows (metric@K, model, popularity, lift) and the sentence of counts."""
    rows = []
    for m in metrics:
        if m["metric"] in COUNTS:
            continue
        value, base = m["value"], m["baseline_value"]
        lift = f"{value / base:.2f}x" if base else ""
        rows.append({
            "metric": metric_label(m["metric"], m["k"]),
            "mfbatch": f"{value:.4f}",
            "popularity": "" if base is None else f"{base:.4f}",
            "lift": lift,
        })  # fmt: skip
    counts = {m["metric"]: int(m["value"]) for m in metrics if m["metric"] in COUNTS}
    sentence = ""
    if "users_evaluated" in counts:
        sentence = f"Measured over {counts['users_evaluated']:,} users"
        skipped = counts.get("users_without_relevant", 0)
        if skipped:
            sentence += f"; {skipped:,} more had no relevant validation item and are left out"
        sentence += "."
    return rows, sentence


def _page(
    run: Run,
    dataset: Dataset,
    metrics: list[dict[str, Any]],
    figures: list[Figure],
    served: str,
) -> str:
    images = "".join(
        f'<figure><img alt="{html.escape(f.title)}" src="data:image/png;base64,{f.png}">'
        f"<figcaption><b>{html.escape(f.title)}.</b> {html.escape(f.how_to_read)}"
        "</figcaption></figure>"
        for f in figures
    )
    facts = [
        {"what": "run", "value": f"{run.run_id} ({run.objective}, trained on {run.data_seen})"},
        {"what": "best epoch", "value": f"{run.best_epoch} of {run.epochs_run}"},
        {"what": "dataset", "value": f"{dataset.n_users:,} users x {dataset.n_items:,} items, "
                                     f"{dataset.n_train:,} train / {dataset.n_val:,} val ratings, "
                                     f"{dataset.split_kind} split"},
        {"what": "served now", "value": served},
    ]  # fmt: skip
    rows, counts = _metric_rows(metrics)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="generator" content="mfbatch {__version__}">
<title>mfbatch report: run {html.escape(run.run_id)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #444; font-size: 0.95em; max-width: 960px; }}
</style></head><body>
<h1>mfbatch report: run {html.escape(run.run_id)}</h1>
{_table(facts, ["what", "value"])}
<h2>The validated run against popularity</h2>
<p>Top-K lists of the validated run and of the most-popular-items baseline, measured on the
same validation ratings; lift is mfbatch / popularity. {html.escape(counts)}</p>
{_table(rows, ["metric", "mfbatch", "popularity", "lift"])}
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
        served, served_by = "nothing yet (run `mfbatch score`)", ""
        if db.table_exists(con, "recommendations"):
            served_rows = db.records(con, "served_scores")
            served_scores = np.array([r["score"] for r in served_rows if r["source"] == "model"])
            runs = sorted({r["run_id"] for r in served_rows})
            served = f"{len(served_rows):,} rows from run(s) {', '.join(runs)}"
            served_by = f"run {', '.join(runs)}"
    finally:
        con.close()
    figures = _figures(run, epochs, metrics, items, scores, (served_scores, served_by))
    page = _page(run, dataset, metrics, figures, served)
    with outputs.staged(target) as partial:
        partial.write_text(page, encoding="utf-8")
    return ReportSummary(run_id=run.run_id, out=out, figures=len(figures), k=k)
