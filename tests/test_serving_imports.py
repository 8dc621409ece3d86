"""Serving imports only what it runs: no onnx, torch or polars on the `score` path (the
module, the library call, and the `mfbatch score` command line), and no pydantic or rich
for `import mfbatch.stages.score` (the typed options are annotations there).

The graph surgery serving needs is done at export (mfbatch.artifact.parts); a run
exported before that is still served, from model.onnx (onnx imported then).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import Workspace, rows

from mfbatch.artifact.parts import SERVING_FILE

SCRIPT = """
import json, sys
from mfbatch.config import load_config
from mfbatch.stages.score import score
summary = score(config=load_config(db=sys.argv[1], overrides={"score": {"threads": 1,
    "provider": "cpu", "top_k": 5}}))
print(json.dumps({"rows": summary.rows,
                  "loaded": sorted(m for m in ("onnx", "torch", "polars") if m in sys.modules)}))
"""


# The console script's own entry point, in a fresh interpreter; what it imported is printed
# at exit (typer ends the command with SystemExit).
CLI = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(
    m for m in ("onnx", "torch", "polars") if m in sys.modules))))
sys.argv = ["mfbatch", *sys.argv[1:]]
from mfbatch.cli import main
main()
"""

HEAVY = ("onnx", "torch", "polars", "pandas", "pydantic", "rich", "typer")


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)


def _score_in_subprocess(db: Path) -> dict[str, object]:
    done = _python("-c", SCRIPT, str(db))
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_scoring_a_run_imports_neither_onnx_nor_torch_nor_polars(ws: Workspace) -> None:
    result = _score_in_subprocess(ws.db)
    assert result["loaded"] == []
    assert result["rows"] == rows(ws.db, "SELECT count(*) FROM recommendations")[0][0] > 0


def test_importing_the_score_stage_loads_no_options_models_nor_heavy_libraries() -> None:
    done = _python(
        "-c",
        "import json, sys; import mfbatch.stages.score; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_score_command_line_imports_neither_onnx_nor_torch_nor_polars(ws: Workspace) -> None:
    done = _python("-c", CLI, "score", "--db", str(ws.db), "--top-k", "5", "--threads", "1")
    assert done.returncode == 0, done.stderr
    *summary, loaded = done.stdout.strip().splitlines()
    assert summary[-1].startswith("scored "), done.stdout
    assert json.loads(loaded) == []
    assert rows(ws.db, "SELECT count(*) FROM recommendations")[0][0] > 0


def test_an_older_export_is_served_the_same_from_model_onnx(ws: Workspace) -> None:
    assert ws.score("--top-k", "5").exit_code == 0
    lists = rows(ws.db, "SELECT user_id, item_id, rank, score FROM recommendations ORDER BY 1, 3")
    for marker in (ws.root / "export").glob(f"*/{SERVING_FILE}"):
        marker.unlink()  # model.onnx alone, as an older version exported it
    result = _score_in_subprocess(ws.db)
    assert result["loaded"] == ["onnx"]
    again = rows(ws.db, "SELECT user_id, item_id, rank, score FROM recommendations ORDER BY 1, 3")
    assert again == lists
