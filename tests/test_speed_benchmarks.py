"""The speed benchmarks' `--quick` forms run end to end, so none of them rots (numbers are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script, outputs",
    [
        ("bench_masking.py", ("masking.md", "masking.json")),
        ("bench_pretrain.py", ("pretrain.md", "pretrain.json")),
        ("bench_data.py", ("data.md", "data.json")),
    ],
)
def test_quick_benchmark_writes_its_tables(script, outputs, tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--output_dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    markdown, data = (tmp_path / name for name in outputs)
    assert "|" in markdown.read_text()
    assert json.loads(data.read_text())
