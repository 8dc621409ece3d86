"""The rest of issue 20's red-team list: one line each, non-zero exit where refused,
nothing changed; and what is served instead where refusing everyone was wrong."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import Workspace, cli, ok, rows


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _append(ws: Workspace, name: str, lines: list[str]) -> None:
    source = ws.root / name
    source.write_text("user_id,item_id,rating,timestamp\n" + "\n".join(lines) + "\n")
    ok(cli("preprocess", "--append", "--dataset", "csv", "--source", source, "--db", ws.db))


def test_a_user_who_rated_the_whole_catalogue_does_not_block_the_publish(
    ws: Workspace,
) -> None:
    items = [i for (i,) in rows(ws.db, "SELECT item_id FROM items ORDER BY item_id")]
    _append(ws, "all.csv", [f"glutton,{item},4,2000000000" for item in items])
    result = ok(ws.score())
    assert "1 user(s) rated every item and have an empty list (e.g. user 'glutton')" in (
        result.stdout
    )
    served = {u for (u,) in rows(ws.db, "SELECT DISTINCT user_id FROM recommendations")}
    assert "glutton" not in served
    everyone = {u for (u,) in rows(ws.db, "SELECT user_id FROM users")}
    assert served == everyone - {"glutton"}
