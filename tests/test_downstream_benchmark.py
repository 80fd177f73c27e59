"""`benchmarks/downstream.py --quick` runs end to end (pretrained vs scratch tables), so it does not rot."""

import json
import subprocess
import sys
from pathlib import Path

from clusterstm.hub.export import init_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_quick_downstream_comparison_writes_its_table(tmp_path):
    pretrained = init_checkpoint("tiny", tmp_path / "stand_in_for_a_pretrained_checkpoint", seed=1)
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "downstream.py"),
            "--pretrained",
            str(pretrained),
            "--quick",
            "--output_dir",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "downstream.json").read_text())["results"]
    assert set(results) == {"retrieval", "qa", "captioning"}
    for task, runs in results.items():
        assert set(runs) == {"scratch", "pretrained"}, task
    assert 0.0 <= results["qa"]["pretrained"]["eval_accuracy"] <= 100.0
    assert "| captioning | CIDEr |" in (tmp_path / "out" / "downstream.md").read_text()
