"""Tables the CLI prints on a terminal: evaluation figures, a user's lists, the runs."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text


def _t(value: object) -> Text:
    """Data as a cell or a title: text, never Rich markup (an id may be `[bold]x` or `[/]`)."""
    return Text(str(value))


AT_K = ("precision", "recall", "recall_uncapped", "ndcg", "map", "hit_rate")


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if metric.startswith("users_") else f"{value:.4f}"


def evaluation_table(result: Any) -> Table:
    """mfbatch vs popularity, one row a metric, with the lift."""
    table = Table(title=_t(f"run {result.run_id}, K={result.k}"))
    for column in ("metric", "mfbatch", "popularity", "lift"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in result.rows():
        value, base = row["value"], row["baseline_value"]
        metric = row["metric"]
        name = metric + (f"@{row['k']}" if row["k"] and metric in AT_K else "")
        lift = f"{value / base:.2f}x" if value and base and metric in AT_K else ""
        table.add_row(_t(name), _fmt(value, metric), _fmt(base, metric), lift)
    return table


def recommendation_tables(report: Any) -> tuple[Table, Table]:
    """A user's served list, and their own top-rated items."""
    recs = Table(title=_t(f"recommended for user {report.user_id} (run {report.run_id})"))
    for column in ("rank", "item", "title", "genres", "score", "source"):
        recs.add_column(column)
    for rec in report.recommendations:
        recs.add_row(
            str(rec.rank),
            _t(rec.item_id),
            _t(rec.title or ""),
            _t(rec.genres or ""),
            f"{rec.score:.3f}",
            _t(rec.source),
        )
    rated = Table(title=f"their top-rated ({report.n_ratings:,} ratings)")
    for column in ("item", "title", "rating", "split"):
        rated.add_column(column)
    for item in report.top_rated:
        rated.add_row(_t(item.item_id), _t(item.title or ""), f"{item.rating:g}", _t(item.split))
    return recs, rated


def runs_table(listing: list[Any]) -> Table:
    table = Table(title="training runs, newest first")
    # The id is what a user copies into --run-id: never truncated.
    table.add_column("run", no_wrap=True, min_width=22)
    # RMSE only where a listed run has one (the rating objective on explicit ratings).
    rmse = any(run.val_rmse is not None for run in listing)
    for column in ("objective", "data", "status", "epochs", "Recall", "NDCG", "RMSE"):
        if column != "RMSE" or rmse:
            table.add_column(column, overflow="fold")
    table.add_column("served", overflow="fold")
    for run in listing:
        served = ", ".join(
            part
            for part in (
                "promoted" if run.promoted else "",
                f"{run.served_users:,} users" if run.served_users else "",
                "" if run.current_data else "other data",
            )
            if part
        )
        table.add_row(
            _t(run.run_id),
            _t(run.objective),
            _t(run.data_seen),
            _t(run.status),
            f"{run.best_epoch}/{run.epochs_run}",
            "-" if run.val_recall is None else f"{run.val_recall:.4f}",
            "-" if run.val_ndcg is None else f"{run.val_ndcg:.4f}",
            *(["-" if run.val_rmse is None else f"{run.val_rmse:.4f}"] if rmse else []),
            served or "-",
        )
    return table
