"""Tests of `benchmarks/ablation.py`: the grid it builds, its statistics, and the `--quick` run that CI executes."""

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ABLATION = REPO / "benchmarks" / "ablation.py"


def _load_ablation():
    spec = importlib.util.spec_from_file_location("clusterstm_benchmark_ablation", ABLATION)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body is executed.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ablation():
    return _load_ablation()


def test_masking_grid_varies_only_strategy_and_ratio(ablation):
    settings = ablation.Settings()
    grid = ablation.build_grid("masking", settings, seeds=[0, 1, 2], quick=False, ratios=[0.75, 0.9])
    assert len(grid.groups) == 8
    specs = [spec for runs in grid.groups.values() for spec in runs]
    assert len(specs) == 24
    assert {(s.mask_strategy, s.mask_ratio) for s in specs} == {
        (strategy, ratio) for strategy in ablation.STRATEGIES for ratio in (0.75, 0.9)
    }
    # Same objective, window and seeds everywhere: only the masking differs between rows.
    assert {(s.objective, s.relevance_window_size) for s in specs} == {(specs[0].objective, 3)}
    for runs in grid.groups.values():
        assert [s.seed for s in runs] == [0, 1, 2]


def test_window_and_objective_grids(ablation):
    settings = ablation.Settings()
    window = ablation.build_grid("window", settings, seeds=[0, 1], quick=False, ratios=[0.75])
    assert list(window.groups) == ["1x1", "3x3", "5x5"]
    assert [runs[0].relevance_window_size for runs in window.groups.values()] == [1, 3, 5]
    objective = ablation.build_grid("objective", settings, seeds=[0], quick=False, ratios=[0.75])
    assert list(objective.groups)[: len(ablation.OBJECTIVES)] == list(ablation.OBJECTIVES)
    # Runs shared between ablations have the same cache key (they are trained once).
    shared = window.groups["3x3"][0]
    assert ablation.run_key(shared, settings) == ablation.run_key(
        objective.groups["contrastive+relevance (ClusterSTM)"][0], settings
    )
    with pytest.raises(ValueError, match="Unknown ablation"):
        ablation.build_grid("speed", settings, seeds=[0], quick=False, ratios=[0.75])


def test_summarise_mean_and_sample_std(ablation):
    summary = ablation.summarise([{"r1": 1.0, "name": "a"}, {"r1": 3.0, "name": "b"}, {"r1": 5.0, "name": "c"}])
    assert summary["n"] == 3
    assert summary["r1"]["mean"] == pytest.approx(3.0)
    assert summary["r1"]["std"] == pytest.approx(2.0)  # ddof=1
    assert summary["r1"]["values"] == [1.0, 3.0, 5.0]
    assert "name" not in summary
    assert ablation.summarise([{"r1": 2.0}])["r1"]["std"] == 0.0


def test_paired_differences_and_intervals(ablation):
    # Hand-checkable: differences 2, 3, 4 -> mean 3, std 1, t(2 df) = 4.303 -> half-width 4.303 / sqrt(3) = 2.48.
    summary = {
        "base": ablation.summarise([{"r1": 10.0}, {"r1": 20.0}, {"r1": 30.0}]),
        "better": ablation.summarise([{"r1": 12.0}, {"r1": 23.0}, {"r1": 34.0}]),
        "same": ablation.summarise([{"r1": 10.0}, {"r1": 21.0}, {"r1": 29.0}]),
    }
    assert summary["base"]["r1"]["ci95"] == pytest.approx(4.303 * 10.0 / 3**0.5)
    paired = ablation.paired_differences(summary, "r1")
    assert list(paired) == ["better", "same"]
    assert paired["better"]["mean"] == pytest.approx(3.0) and paired["better"]["values"] == [2.0, 3.0, 4.0]
    assert paired["better"]["ci95"] == pytest.approx(4.303 / 3**0.5) and paired["better"]["resolved"]
    assert paired["same"]["mean"] == pytest.approx(0.0) and not paired["same"]["resolved"]
    assert math.isnan(ablation.ci95_half_width(np.array([1.0])))


def test_paired_table_covers_the_fine_tuned_metrics(ablation):
    def rows(r1, qa, cider):
        return ablation.summarise(
            [
                {"test_t2v_r1": a, "test_t2v_meanr": 5.0, "qa_accuracy": b, "caption_cider": c}
                for a, b, c in zip(r1, qa, cider)
            ]
        )

    summary = {
        "1x1": rows([10, 20, 30], [30, 31, 32], [0.5, 0.6, 0.7]),
        "3x3": rows([12, 23, 34], [30, 31, 32], [0.6, 0.8, 1.0]),
    }
    table = "\n".join(ablation._paired_lines(summary))
    assert "QA acc. diff (points)" in table and "CIDEr diff" in table
    # R@1 +3.0 [±2.5] resolved; QA +0.0 (no spread: interval 0, not resolved); CIDEr +0.200 [±0.248] not resolved.
    assert "| 3x3 | +3.0 [±2.5] | yes | +0.0 [±0.0] | no | +0.0 [±0.0] | no | +0.200 [±0.248] | no |" in table
    no_finetune = {
        label: {k: v for k, v in stats.items() if k not in ("qa_accuracy", "caption_cider")}
        for label, stats in summary.items()
    }
    assert "QA acc." not in "\n".join(ablation._paired_lines(no_finetune))


def test_objective_grid_carries_the_relevance_methods(ablation):
    grid = ablation.build_grid("objective", ablation.Settings(), seeds=[0, 1], quick=False, ratios=[0.75])
    methods = {label: runs[0].relevance_method for label, runs in grid.groups.items()}
    assert methods["contrastive+relevance (ClusterSTM)"] == "window"
    assert methods["contrastive+relevance (maskclip targets)"] == "maskclip"
    assert methods["contrastive+relevance (clearclip targets)"] == "clearclip"


def test_relevance_search_grid(ablation):
    settings = ablation.Settings()
    center = ablation.parse_relevance_center("zscore_mse:1:all:1")
    grid = ablation.build_grid(
        "relevance", settings, seeds=[0, 1], quick=False, ratios=[0.75], relevance_center=center
    )
    labels = list(grid.groups)
    # UMT first (the paired differences are against it), then 3 loss forms x 3 weights, then tokens / depth.
    assert labels[:2] == ["contrastive+alignment (UMT)", "contrastive+relevance+alignment"]
    assert len(labels) == 2 + 9 + 4
    assert labels[-4:] == [
        "zscore_mse x1, masked tokens, decoder 1",
        "zscore_mse x1, visible tokens, decoder 1",
        "zscore_mse x1, all tokens, decoder 2",
        "zscore_mse x1, all tokens, decoder 1, window targets",
    ]
    window = grid.groups[labels[-1]][0]
    assert window.relevance_method == "window" and dict(window.config_overrides)["relevance_loss"] == "zscore_mse"
    for label in labels[2:-1]:
        for run in grid.groups[label]:
            assert run.relevance_method == ablation.SEARCH_RELEVANCE_METHOD
            student = dict(ablation.TINY_RELEVANCE_SETTINGS, **dict(run.config_overrides))
            assert ablation.relevance_label(run.config_overrides) == label
            assert student["relevance_loss"] in label
    weights = {dict(r[0].config_overrides).get("relevance_loss_weight", 1.0) for r in grid.groups.values()}
    assert {0.3, 1.0, 3.0, 10.0} <= weights
    # The tiny student's own relevance settings are no override: the same run (and cache entry) as the objective
    # grid's MaskCLIP row.
    (mse_default,) = [runs[0] for label, runs in grid.groups.items() if label == "mse x1, all tokens, decoder 1"]
    assert mse_default.config_overrides == ()
    objective = ablation.build_grid("objective", settings, seeds=[0], quick=False, ratios=[0.75])
    assert ablation.run_key(mse_default, settings) == ablation.run_key(
        objective.groups["contrastive+relevance (maskclip targets)"][0], settings
    )


def test_window_grid_under_a_relevance_center(ablation):
    settings = ablation.Settings()
    center = ablation.parse_relevance_center("zscore_mse:1")
    grid = ablation.build_grid("window", settings, [0], False, [0.75], relevance_center=center)
    assert list(grid.groups) == ["1x1", "3x3", "5x5"] and "zscore_mse x1" in grid.title
    assert {dict(runs[0].config_overrides)["relevance_loss"] for runs in grid.groups.values()} == {"zscore_mse"}
    # its 3x3 row is the relevance grid's "<center>, window targets" run (trained once)
    search = ablation.build_grid("relevance", settings, [0], False, [0.75], relevance_center=center)
    window_targets = search.groups["zscore_mse x1, all tokens, decoder 1, window targets"][0]
    assert ablation.run_key(grid.groups["3x3"][0], settings) == ablation.run_key(window_targets, settings)
    plain = ablation.build_grid("window", settings, [0], False, [0.75])
    assert plain.groups["3x3"][0].config_overrides == ()


def test_later_spec_fields_keep_old_cache_keys(ablation):
    # The key of a run published in docs/RESULTS.md (cluster @ 0.75, seed 0, 300 steps): options added since then
    # must not move it, or every cached run of the published grids would be retrained.
    published = ablation.Settings(steps=300)
    assert ablation.run_key(ablation.RunSpec("cluster", 0.75), published) == "cluster-0.75-w3-s0-e04611de5e51"
    for later in ({"rerank_finetune_steps": 100}, {"finetune_steps": 60}):
        assert ablation.run_key(ablation.RunSpec("cluster", 0.75), dataclasses.replace(published, **later)) == (
            "cluster-0.75-w3-s0-e04611de5e51"
        )
    settings = ablation.Settings()
    run = ablation.RunSpec("cluster", 0.75)
    key = ablation.run_key(run, settings)
    assert ablation.run_key(dataclasses.replace(run, steps=None), settings) == key
    for changed in (
        dataclasses.replace(run, steps=400),
        dataclasses.replace(run, cached_targets=True),
        dataclasses.replace(run, config_overrides=(("relevance_loss", "kl"),)),
    ):
        assert ablation.run_key(changed, settings) != key


def test_equal_time_grid_and_relevance_center_parsing(ablation):
    settings = ablation.Settings(steps=300)
    center = ablation.parse_relevance_center("kl:3")
    assert center == (("relevance_loss", "kl"), ("relevance_loss_weight", 3.0))
    grid = ablation.build_grid(
        "equal_time", settings, [0, 1], False, [0.75], relevance_center=center, equal_time_steps=420
    )
    rows = list(grid.groups.values())
    assert [run.objective for run in rows[0]] == ["contrastive+alignment (UMT)"] * 2
    assert rows[1][0].steps is None and not rows[1][0].cached_targets
    assert rows[2][0].cached_targets and rows[2][0].steps == 420 and rows[2][0].config_overrides == center
    with pytest.raises(ValueError, match="relevance_center"):
        ablation.build_grid("equal_time", settings, [0], False, [0.75])
    for bad in ("huber:1", "kl", "kl:x", "kl:1:some", "mse:1:all:two"):
        with pytest.raises(SystemExit):
            ablation.parse_args(["relevance", "--relevance_center", bad])


def test_bad_arguments_are_rejected(ablation):
    with pytest.raises(SystemExit):
        ablation.parse_args(["masking", "--ratios", "1.0"])
    with pytest.raises(SystemExit):
        ablation.parse_args(["masking", "--steps", "0"])
    with pytest.raises(SystemExit):
        ablation.parse_args(["everything"])


def _finite_numbers(stats: dict) -> list[float]:
    return [value["mean"] for value in stats.values() if isinstance(value, dict) and "mean" in value]


def test_quick_ablation_writes_tables_and_plots(tmp_path):
    output_dir = tmp_path / "docs" / "benchmarks"
    command = [
        sys.executable,
        str(ABLATION),
        "all",
        "--quick",
        "--relevance_center",
        "zscore_mse:1",
        "--rerank_finetune_steps",
        "2",
        "--output_dir",
        str(output_dir),
        "--work_dir",
        str(tmp_path / "work"),
    ]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    matching = (output_dir / "ablation_matching.md").read_text()
    assert "| +matching, mixed negatives |" in matching and "re-ranked (sum)" in matching
    assert "after retrieval fine-tuning" in matching
    equal_time = json.loads((output_dir / "ablation_equal_time.json").read_text())
    calibration = equal_time["meta"]["equal_time_calibration"]
    assert calibration["equal_time_steps"] >= 1 and len(calibration["seconds_per_step"]["relevance_cached"]) == 2
    cached = equal_time["results"][f"relevance, cached targets, {calibration['equal_time_steps']} steps"]
    assert cached["cache_build_s"]["mean"] > 0
    for name in ("masking", "window", "objective", "matching", "relevance", "equal_time"):
        payload = json.loads((output_dir / f"ablation_{name}.json").read_text())
        assert payload["ablation"] == name
        assert payload["meta"]["quick"] is True
        assert len(payload["results"]) >= 2
        for label, stats in payload["results"].items():
            assert stats["n"] == 1
            for key in ("test_t2v_r1", "compositional_t2v_r1", "train_loss_final", "train_runtime_s"):
                assert key in stats, (label, key)
            numbers = _finite_numbers(stats)
            assert numbers and all(math.isfinite(v) for v in numbers), label
            assert 0.0 <= stats["test_t2v_r1"]["mean"] <= 100.0
        assert all(math.isfinite(v) for v in _finite_numbers(payload["untrained"]))
        table = (output_dir / f"ablation_{name}.md").read_text()
        for label in payload["results"]:
            assert f"| {label} |" in table
        png = tmp_path / "docs" / f"ablation_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A seeded grid reproduces on the same machine: a second run from scratch (its own teacher, tokenizer and
    # students, nothing cached) gives bitwise the same losses and metrics.
    again = tmp_path / "again"
    rerun = [sys.executable, str(ABLATION), "masking", "--quick", "--output_dir", str(again), "--work_dir",
             str(tmp_path / "work-again")]  # fmt: skip
    completed = subprocess.run(rerun, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    first = json.loads((output_dir / "ablation_masking.json").read_text())["results"]
    second = json.loads((again / "ablation_masking.json").read_text())["results"]
    for label, stats in first.items():
        for key in ("train_loss_final", "test_t2v_r1", "test_t2v_meanr", "compositional_t2v_meanr"):
            assert second[label][key]["values"] == stats[key]["values"], (label, key)

    # Fine-tuning is a stage over the cached pretraining: the same runs (not retrained) gain QA and CIDEr.
    finetuned = tmp_path / "finetuned"
    command = [sys.executable, str(ABLATION), "masking", "--quick", "--finetune_steps", "2", "--output_dir",
               str(finetuned), "--work_dir", str(tmp_path / "work-again")]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    third = json.loads((finetuned / "ablation_masking.json").read_text())["results"]
    for label, stats in third.items():
        assert stats["train_runtime_s"]["values"] == second[label]["train_runtime_s"]["values"], label
        assert 0.0 <= stats["qa_accuracy"]["mean"] <= 100.0 and stats["caption_cider"]["mean"] >= 0.0


def test_matching_probe_trains_the_head_on_frozen_towers(tmp_path):
    """The probe runs end to end with each head input, trains only the fusion layers + head, and evaluates."""
    output = tmp_path / "probe.json"
    command = [sys.executable, str(REPO / "benchmarks" / "matching_probe.py"), "--head_input", "softmin", "--steps",
               "3", "--num_clips", "8", "--num_test", "8", "--batch_size", "4", "--eval_every", "3",
               "--output_file", str(output)]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    log = json.loads(output.read_text())
    assert [entry["step"] for entry in log] == [0, 3]
    for entry in log:
        assert 0.0 <= entry["auc_hard"] <= 1.0 and 0.0 <= entry["t2v_r1_reranked"] <= 100.0
    # Frozen towers: the contrastive ranking cannot move while the head trains.
    assert log[0]["t2v_r1_contrastive"] == log[-1]["t2v_r1_contrastive"]
    assert math.isfinite(log[-1]["matching_loss_mean_last"])
