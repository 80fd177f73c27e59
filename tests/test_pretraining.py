"""Pretraining loop: end-to-end CLI runs, exact resume after SIGKILL, NaN policy, checkpoints, arguments."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pretrain_helpers import make_tiny_student, make_tiny_teacher, tiny_tokenizer
from safetensors.torch import load_file

from clusterstm.training.pretraining import (
    CHECKPOINT_MARKER,
    NonFiniteLossError,
    PretrainingArguments,
    derive_seed,
    find_latest_checkpoint,
    mask_generators,
    resolve_resume_checkpoint,
    run_pretraining,
)

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _cli(student, out, *extra, teacher=None):
    cmd = [
        sys.executable,
        "scripts/pretrain.py",
        "--model_name_or_path",
        str(student),
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "1",
        "--logging_steps",
        "1",
        "--disable_tqdm",
    ]
    if teacher is not None:
        cmd += ["--teacher_name_or_path", str(teacher)]
    return cmd + [str(x) for x in extra]


def _run(cmd, timeout=300):
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = tiny_tokenizer()
    student = make_tiny_student(root / "student", seed=0, tokenizer=tokenizer)
    teacher = make_tiny_teacher(root / "teacher", seed=0, tokenizer=tokenizer)
    return student, teacher


def test_cli_end_to_end_with_teacher(checkpoints, tmp_path):
    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining

    student, teacher = checkpoints
    out = tmp_path / "run"
    _run(
        _cli(
            student,
            out,
            "--dataset_name",
            "synthetic",
            "--num_train_clips",
            "16",
            "--max_steps",
            "3",
            "--dataloader_num_workers",
            "1",
            "--report_to",
            "jsonl",
            teacher=teacher,
        )
    )

    results = json.loads((out / "train_results.json").read_text())
    for key in (
        "train_loss",
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "global_step",
        "bad_samples_skipped",
        "train_contrastive_loss",
        "train_relevance_loss",
        "train_mlm_loss",
    ):
        assert key in results, key
    assert results["global_step"] == 3 and math.isfinite(results["train_loss"])
    assert results["mask_strategy"] == "cluster"
    # The run records its teacher, so `clusterstm visualize OUT` finds it.
    record = json.loads((out / "teacher_config.json").read_text())
    assert record["teacher_name_or_path"] == str(teacher) and record["relevance_window_size"] == 3
    from clusterstm.visualize import resolve_teacher_path

    found, run_config = resolve_teacher_path(out)
    assert found == Path(teacher) and run_config["mask_ratio"] == 0.8
    logs = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logs] == [1, 2, 3]

    trained = ClusterSTMForPreTraining.from_pretrained(out)
    initial = ClusterSTMForPreTraining.from_pretrained(student)
    state, init_state = trained.state_dict(), initial.state_dict()
    assert set(state) == set(init_state)
    assert not torch.equal(
        state["clusterstm.visual_projection.weight"], init_state["clusterstm.visual_projection.weight"]
    )
    # The teacher is never saved with the student.
    assert not any("teacher" in key for key in load_file(out / "model.safetensors"))
    assert (out / "tokenizer.json").is_file() and any(out.glob("*processor_config.json"))


def test_train_file_with_pyav_workers_and_bad_sample(checkpoints, tmp_path):
    from clusterstm.data.synthetic import SyntheticVideoTextConfig, export_synthetic_benchmark

    student, _ = checkpoints
    config = SyntheticVideoTextConfig(
        num_frames=4, image_size=32, num_train=9, num_val=0, num_test=0, num_compositional=0
    )
    metadata = export_synthetic_benchmark(config, tmp_path / "data", splits=("train",))["train"]
    broken = json.loads(Path(metadata).read_text().splitlines()[0])["file_name"]
    (Path(metadata).parent / broken).write_bytes(b"not a video")
    out = tmp_path / "run"

    # Without --skip_bad_samples the run stops and names the file.
    failed = subprocess.run(
        _cli(
            student,
            out,
            "--train_file",
            metadata,
            "--max_steps",
            "2",
            "--dataloader_num_workers",
            "1",
            "--mask_strategy",
            "tube",
            "--mask_ratio",
            "0.5",
            "--num_train_epochs",
            "1",
        ),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode != 0 and broken in failed.stderr

    _run(
        _cli(
            student,
            out,
            "--train_file",
            metadata,
            "--max_steps",
            "4",
            "--dataloader_num_workers",
            "1",
            "--mask_strategy",
            "tube",
            "--mask_ratio",
            "0.5",
            "--skip_bad_samples",
        )
    )
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 4 and results["mask_strategy"] == "tube"
    # 9 clips, batch 4: two batches per epoch, the broken clip is read in every epoch it is not dropped from.
    assert results["bad_samples_skipped"] >= 1


def test_resume_after_sigkill_gives_identical_weights(checkpoints, tmp_path):
    student, teacher = checkpoints
    common = [
        "--dataset_name",
        "synthetic",
        "--num_train_clips",
        "12",
        "--max_steps",
        "8",
        "--checkpointing_steps",
        "2",
        "--dataloader_num_workers",
        "1",
        "--report_to",
        "none",
    ]
    reference = tmp_path / "reference"
    _run(_cli(student, reference, *common, teacher=teacher))

    crashed = tmp_path / "crashed"
    process = subprocess.Popen(
        _cli(student, crashed, *common, teacher=teacher),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not (crashed / "checkpoint-2" / CHECKPOINT_MARKER).exists():
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    assert not (crashed / "train_results.json").exists(), "killed too late: the run had already finished"
    # Debris of a crash in the middle of a checkpoint write: never picked up by `latest`.
    (crashed / ".tmp-checkpoint-7").mkdir()
    (crashed / "checkpoint-7").mkdir()
    latest = find_latest_checkpoint(crashed)
    assert latest is not None and latest.name in {"checkpoint-2", "checkpoint-4", "checkpoint-6"}

    _run(_cli(student, crashed, *common, "--resume_from_checkpoint", "latest", teacher=teacher))
    assert not (crashed / ".tmp-checkpoint-7").exists()
    reference_weights = load_file(reference / "model.safetensors")
    resumed_weights = load_file(crashed / "model.safetensors")
    assert reference_weights.keys() == resumed_weights.keys()
    for name, tensor in reference_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name
    ref_results = json.loads((reference / "train_results.json").read_text())
    res_results = json.loads((crashed / "train_results.json").read_text())
    assert res_results["global_step"] == ref_results["global_step"] == 8
    assert res_results["train_loss"] == pytest.approx(ref_results["train_loss"], rel=1e-6)


def _args(student, out, **kwargs):
    base = dict(
        model_name_or_path=str(student),
        output_dir=str(out),
        dataset_name="synthetic",
        num_train_clips=8,
        per_device_train_batch_size=4,
        max_steps=4,
        dataloader_num_workers=0,
        disable_tqdm=True,
        report_to="none",
        learning_rate=1e-3,
    )
    base.update(kwargs)
    return PretrainingArguments(**base)


@pytest.fixture
def nan_at_third_call(monkeypatch):
    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining

    original = ClusterSTMForPreTraining.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            outputs.loss = outputs.loss * float("nan")
        return outputs

    monkeypatch.setattr(ClusterSTMForPreTraining, "forward", forward)
    return calls


def test_nan_loss_stops_with_step_and_keeps_checkpoint(checkpoints, tmp_path, nan_at_third_call):
    student, _ = checkpoints
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="step 3"):
        run_pretraining(_args(student, out, checkpointing_steps=2))
    assert find_latest_checkpoint(out).name == "checkpoint-2"
    assert not (out / "model.safetensors").exists()
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-2" / "model.safetensors").values())


def test_nan_loss_skip_policy_skips_the_step(checkpoints, tmp_path, nan_at_third_call):
    student, _ = checkpoints
    results = run_pretraining(_args(student, tmp_path / "run", nan_policy="skip"))
    assert results["global_step"] == 4 and results["nan_steps_skipped"] == 1
    assert math.isfinite(results["train_loss"])
    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def _masks(strategy, generators):
    from clusterstm.models.masking_clusterstm import build_mask

    return build_mask(
        strategy, batch_size=len(generators), num_frames=2, num_patches=16, mask_ratio=0.75, generator=generators
    )


def test_masks_depend_on_global_index_not_on_process_split():
    whole = _masks("random", mask_generators(3, 5, 0, 4))
    halves = [_masks("tube", mask_generators(3, 5, offset, 2)) for offset in (0, 2)]
    split = [_masks("random", mask_generators(3, 5, offset, 2)) for offset in (0, 2)]
    assert torch.equal(whole, torch.cat(split))
    assert (~whole).sum(-1).eq(16 - int(16 * 0.75)).all()
    assert not torch.equal(whole, _masks("random", mask_generators(3, 6, 0, 4)))
    assert torch.equal(halves[0][:, 0], halves[0][:, 1])  # tube masks repeat over frames
    assert derive_seed(1, "mask", 2) == derive_seed(1, "mask", 2) != derive_seed(1, "mask", 3)


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    for step, complete in ((2, True), (4, True), (10, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / CHECKPOINT_MARKER).write_text("{}")
    (tmp_path / ".tmp-checkpoint-6").mkdir()
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert resolve_resume_checkpoint("latest", tmp_path).name == "checkpoint-4"
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-10"), tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_strategy": "blocks"}, "mask_strategy"),
        ({"dc_ratio": 0.0}, "dc_ratio"),
        ({"dpc_k": 0}, "dpc_k"),
        ({"mask_features": "pixels"}, "mask_features"),
        ({"teacher_targets": "cache", "teacher_name_or_path": "t"}, "not both"),
        ({"teacher_targets": "cache", "frame_sampling": "random"}, "frame_sampling uniform"),
        ({"nan_policy": "ignore"}, "nan_policy"),
        ({"train_file": "x.jsonl"}, "exactly one"),
        ({"dataset_name": None, "train_file": "x.txt"}, "Unsupported --train_file .*jsonl.*parquet.*tar"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"push_to_hub": True}, "hub_model_id"),
        ({"report_to": "wandb"}, "report_to"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_flag(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, tmp_path / "out", **kwargs)


def test_missing_model_folder_and_attention_without_teacher(checkpoints, tmp_path):
    student, _ = checkpoints
    with pytest.raises(ValueError, match="config.json"):
        run_pretraining(_args(tmp_path / "nowhere", tmp_path / "a"))
    with pytest.raises(ValueError, match="teacher"):
        run_pretraining(_args(student, tmp_path / "b", mask_strategy="attention"))


def test_evaluate_zero_shot_retrieval(checkpoints):
    from clusterstm.data.readers import load_video_text_dataset
    from clusterstm.data.synthetic import SyntheticVideoTextConfig
    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
    from clusterstm.training.pretraining import evaluate_zero_shot_retrieval

    student, _ = checkpoints
    model = ClusterSTMForPreTraining.from_pretrained(student).train()
    processor = ClusterSTMProcessor.from_pretrained(student)
    config = SyntheticVideoTextConfig(
        num_frames=4, image_size=32, num_train=0, num_val=0, num_test=6, num_compositional=0
    )
    dataset = load_video_text_dataset("synthetic", split="test", synthetic_config=config)
    metrics = evaluate_zero_shot_retrieval(model, processor, dataset, batch_size=4)
    assert metrics["chance_r1"] == pytest.approx(100 / 6)
    assert 0 <= metrics["t2v_r1"] <= metrics["t2v_r5"] <= 100 and metrics["num_videos"] == 6
    assert model.training  # restored


def test_bench_pretrain_masking_shrinks_activations():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pretrain", REPO / "benchmarks" / "bench_pretrain.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.set_num_threads(1)
    rows = bench.bench_preset("tiny", 2, 4, steps=1, ratios=(0.0, 0.8))
    by_variant = {(r["mask_ratio"], r["targets"]): r for r in rows}
    assert set(by_variant) == {(0.0, "online"), (0.0, "cached"), (0.8, "online"), (0.8, "cached")}
    unmasked, masked, cached = by_variant[(0.0, "online")], by_variant[(0.8, "online")], by_variant[(0.8, "cached")]
    assert unmasked["kept_per_frame"] == 64 and masked["kept_per_frame"] == 13
    assert masked["ideal_speedup"] == pytest.approx(64 / 13)
    # Deterministic (unlike wall time on a shared machine): the student saves far fewer activations when masked.
    assert masked["activation_mb"] < 0.8 * unmasked["activation_mb"]
    assert 0 < masked["mask_share"] < 1 and unmasked["mask_share"] == 0
    # The online teacher runs in the step (through compute_teacher_targets); the cached step runs no teacher and
    # computes no mask (the cluster masks come from the cache).
    assert masked["teacher_s"] > 0 and cached["teacher_s"] == 0 and cached["mask_s"] == 0
    # relevance (2 x 64 float16) + mask bits, with parquet overhead
    assert 256 < cached["cache_bytes_per_clip"] < 4096 and cached["precompute_clips_per_second"] > 0
    assert "| tiny |" in bench.render(rows)
