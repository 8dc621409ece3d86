"""What `mfbatch train` costs outside its loop.

It imports only what it runs: no torch._dynamo (torch.optim's wrappers load it on first
use; the run's Adam is mfbatch's own FusedAdam), no onnx (export writes the graphs' bytes
itself) and no polars (the ratings are read as numpy columns). Each of these cost
0.15-2 s of a default ML-100K run that trains for ~7 s (docs/benchmarks.md, "Training's
fixed costs"). The default thread count's look at the machine overlaps the reading.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import rows

from mfbatch.training.device import IdleWindow

SCRIPT = """
import json, sys
from mfbatch.config import load_config
from mfbatch.stages.train import train
runs = []
for on, objective in (("train", sys.argv[3]), ("all", sys.argv[3])):
    config = load_config(db=sys.argv[1], overrides={"train": {
        "threads": 1, "epochs": 2, "on": on, "objective": objective,
        "export_dir": sys.argv[2]}})
    runs.append(train(config=config).run_id)
print(json.dumps({"runs": runs, "loaded": sorted(
    m for m in ("torch._dynamo", "onnx", "polars") if m in sys.modules)}))
"""


def _train_in_subprocess(db: Path, export: Path, objective: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(db), str(export), objective],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_validated_run_and_its_refit_import_neither_dynamo_nor_onnx_nor_polars(
    good_db: Path, tmp_path: Path
) -> None:
    result = _train_in_subprocess(good_db, tmp_path / "export", "softmax")
    assert result["loaded"] == []
    recorded = rows(good_db, "SELECT run_id, epochs_run FROM training_runs ORDER BY started_at")
    assert recorded == [(run, 2) for run in result["runs"]]  # type: ignore[attr-defined]
    for run in result["runs"]:  # type: ignore[attr-defined]
        assert (tmp_path / "export" / run / "model.onnx").is_file()
        assert (tmp_path / "export" / run / "serving.json").is_file()


def test_the_sampled_and_rating_objectives_stay_off_dynamo_too(
    good_db: Path, tmp_path: Path
) -> None:
    for objective in ("sampled", "rating"):
        result = _train_in_subprocess(good_db, tmp_path / objective, objective)
        assert result["loaded"] == [], objective


def test_the_idle_window_overlaps_work_done_in_it_and_counts_that_work_as_idle() -> None:
    cpu, opened = time.process_time(), time.monotonic()
    window = IdleWindow()
    busy_until = time.monotonic() + 0.3
    while time.monotonic() < busy_until:  # this process's own start-up work
        pass
    started = time.monotonic()
    idle = window.idle(cores=os.cpu_count() or 1, window_s=0.2)
    # Already 0.3 s open: no further wait for the 0.2 s window.
    assert time.monotonic() - started < 0.1
    # The core this process kept busy is free for training: counted as idle, whatever
    # other jobs hold of the rest.
    own = (time.process_time() - cpu) / (time.monotonic() - opened)
    assert 0.9 * own <= idle <= (os.cpu_count() or 1)


def test_a_fresh_idle_window_waits_its_length() -> None:
    started = time.monotonic()
    IdleWindow().idle(cores=1, window_s=0.15)
    assert time.monotonic() - started >= 0.15
