"""Rich markup never interprets data: ids, titles and file names print as written."""

from __future__ import annotations

from pathlib import Path

from conftest import cli, ok

# Each of these is Rich markup (or breaks it) if a console interprets it.
USERS = ["[bold red]x", "[/]", "[link=http://e.x]u"]
ITEMS = ["[/]i", "[b]j", "k[", "[red]m"]


def test_ids_and_file_names_print_literally(tmp_path: Path) -> None:
    source = tmp_path / "ratings.csv"
    lines = ["user_id,item_id,rating"]
    for u, user in enumerate(USERS):
        for i, item in enumerate(ITEMS):
            if (u + i) % 4 != 3:
                lines.append(f'"{user}","{item}",{1 + (u + i) % 5}')
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    db = tmp_path / "[red]m[link=x][b].duckdb"
    prep = ok(cli("preprocess", "--dataset", "csv", "--source", source, "--db", db,
                  "--time-col", "", "--split", "random", "--val-fraction", "0.2"))  # fmt: skip
    assert str(db) in prep.output  # the summary and the steps name the file as written
    small = ["--embedding-dim", "4", "--epochs", "1", "--threads", "1"]
    ok(cli("train", "--db", db, "--export-dir", tmp_path / "export", *small))
    ok(cli("score", "--db", db, "--top-k", "2", "--provider", "cpu", "--threads", "1"))
    for user in USERS:
        shown = ok(cli("recommend", "--db", db, "--user", user)).stdout
        assert f"user {user} " in shown, shown
        assert any(item in shown for item in ITEMS), shown
    ok(cli("runs", "--db", db))
    missing = cli("recommend", "--db", db, "--user", "[bold]nobody[/bold]")
    assert missing.exit_code != 0
    assert "[bold]nobody[/bold]" in missing.stderr, missing.stderr
