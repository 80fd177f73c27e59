"""The README's Quickstart is what CI and this test run, and the demo runs end to end (quick form)."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from clusterstm.cli import build_parser
from clusterstm.demo import chance_retrieval, reproducible_metrics

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


def test_readme_first_screen_table_is_the_demo_results_file():
    """The README's results table is the `results.md` a full demo run wrote (kept in docs/demo/), verbatim."""
    readme = (REPO / "README.md").read_text()
    first_screen = readme.split("\n## Quickstart", 1)[0]
    table = (REPO / "docs" / "demo" / "results.md").read_text()
    assert table.strip() in first_screen
    results = json.loads((REPO / "docs" / "demo" / "results.json").read_text())
    assert f"{results['zero_shot_pretrained']['eval_t2v_r1']:.1f}" in table
    assert "![" in first_screen


def test_cli_rejects_unknown_subcommand():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-everything"])


def _quick_demo(output_dir):
    """`bash quickstart.sh demo --quick`: the README's command, in quickstart.sh's own environment."""
    done = subprocess.run(
        ["bash", "quickstart.sh", "demo", "--quick", "--output_dir", str(output_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_quickstart_demo_runs_end_to_end_and_reproduces(tmp_path):
    """The second Quickstart command, in its quick form: every stage, figures, results and a loadable checkpoint,
    a readable console, and a second run with the same seed gives the same results.json apart from timings."""
    out = tmp_path / "demo"
    done = _quick_demo(out)
    assert "zero-shot retrieval" in done.stdout and "ClusterSTM" in done.stdout
    results = json.loads((out / "results.json").read_text())
    for key in ("teacher", "zero_shot_untrained", "zero_shot_pretrained", "pretraining", "qa_finetuned"):
        assert results[key], key
    assert 0.0 <= results["zero_shot_pretrained"]["eval_t2v_r1"] <= 100.0
    assert results["pretraining"]["global_step"] == results["settings"]["pretrain_steps"]
    for name in ("relevance.png", "clusters.png", "kept_tokens.png", "training_curves.png"):
        assert (out / "figures" / name).stat().st_size > 1000, name
        assert f"figures/{name}: " in done.stdout, f"{name} is not listed with what to look for"
    for name in ("config.json", "model.safetensors", "README.md", "modeling_clusterstm.py", "teacher/config.json"):
        assert (out / "checkpoint" / name).is_file(), name

    # A readable console: one line per stage with its time, no stage bar, no CPU pin_memory warning, no
    # UNEXPECTED-keys tables, honest baselines (computed chance values, the QA majority baseline named as such).
    assert len(re.findall(r"^\[\d/6\] .*: done in \d+\.\d s$", done.stdout, re.M)) == 6
    assert "stage/s" not in done.stderr and "pin_memory" not in done.stderr and "UNEXPECTED" not in done.stderr
    table = done.stdout.split("zero-shot retrieval (synthetic test)", 1)[1]
    assert "(majority answer)" in table and " - " not in table
    assert results["chance"] == {"r1": 100 / 32, "r5": 500 / 32, "r10": 1000 / 32, "medr": 16.5}
    assert results["environment"]["deterministic_algorithms"] is True
    markdown = (out / "results.md").read_text()
    assert "| video->text R@1 (%) |" in markdown and "Machine:" in markdown

    # The same seed reproduces its own numbers exactly (same machine and software).
    again = tmp_path / "again"
    # Through the same command as the first run, so that both use the same environment (quickstart.sh's .venv).
    _quick_demo(again)
    rerun_results = json.loads((again / "results.json").read_text())
    # This failed until the offline tokenizer's vocabulary was made deterministic (huggingface/tokenizers#1794).
    assert reproducible_metrics(rerun_results) == reproducible_metrics(results)


def test_reproducible_metrics_drops_only_timings_and_paths():
    results = {
        "seed": 0,
        "pretraining": {"train_loss": 1.5, "train_runtime": 3.0, "train_samples_per_second": 9.0},
        "qa_finetuned": {"eval_accuracy": 30.0, "eval_runtime": 1.0},
        "figures": ["a/relevance.png"],
        "stage_seconds": {"x": 1.0},
        "wall_time_seconds": 10.0,
    }
    assert reproducible_metrics(results) == {
        "seed": 0,
        "pretraining": {"train_loss": 1.5},
        "qa_finetuned": {"eval_accuracy": 30.0},
    }


def test_chance_retrieval_is_the_expected_value_of_a_random_ranking():
    import random

    n = 7
    rng = random.Random(0)
    ranks = [rng.randint(1, n) for _ in range(20000)]  # rank of the one match under a random ranking
    chance = chance_retrieval(n)
    assert chance["r1"] == pytest.approx(100 * sum(r <= 1 for r in ranks) / len(ranks), abs=1.0)
    assert chance["r5"] == pytest.approx(100 * sum(r <= 5 for r in ranks) / len(ranks), abs=1.0)
    assert chance["r10"] == 100.0
    assert chance["medr"] == 4.0
