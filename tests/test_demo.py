"""The README's Quickstart is what CI and this test run, and the demo runs end to end (quick form)."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from clusterstm.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_readme_quickstart_is_what_ci_runs():
    test_command, demo_command = _quickstart_commands()
    ci_commands = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert ci_commands == [test_command] == ["bash quickstart.sh test"]
    assert demo_command == "bash quickstart.sh demo"


def test_cli_rejects_unknown_subcommand():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-everything"])


def test_quickstart_demo_runs_end_to_end(tmp_path):
    """The second Quickstart command, in its quick form: every stage, figures, results and a loadable checkpoint."""
    out = tmp_path / "demo"
    done = subprocess.run(
        ["bash", "quickstart.sh", "demo", "--quick", "--output_dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "zero-shot retrieval" in done.stdout and "ClusterSTM" in done.stdout
    results = json.loads((out / "results.json").read_text())
    for key in ("teacher", "zero_shot_untrained", "zero_shot_pretrained", "pretraining", "qa_finetuned"):
        assert results[key], key
    assert 0.0 <= results["zero_shot_pretrained"]["eval_t2v_r1"] <= 100.0
    assert results["pretraining"]["global_step"] == results["settings"]["pretrain_steps"]
    for name in ("relevance.png", "clusters.png", "training_curves.png"):
        assert (out / "figures" / name).stat().st_size > 1000, name
    for name in ("config.json", "model.safetensors", "README.md", "modeling_clusterstm.py", "teacher/config.json"):
        assert (out / "checkpoint" / name).is_file(), name
