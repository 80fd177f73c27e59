"""The small CLIP teacher of the synthetic benchmark: trains, saves an ordinary CLIP folder, loads as a teacher."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clusterstm.training.teacher_training import TeacherTrainingArguments, run_teacher_training

REPO = Path(__file__).resolve().parents[1]


def test_teacher_training_saves_a_clip_checkpoint_usable_as_teacher(tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    from clusterstm.teacher.teacher import ClusterSTMTeacher

    torch.set_num_threads(1)
    args = TeacherTrainingArguments(
        output_dir=str(tmp_path / "teacher"),
        max_steps=30,
        per_device_train_batch_size=16,
        num_train_clips=48,
        num_eval_clips=16,
        image_size=32,
        num_frames=2,
        num_hidden_layers=1,
        learning_rate=2e-3,
    )
    results = run_teacher_training(args)
    assert results["global_step"] == 30
    # Contrastive learning on frames makes progress (the loss of 16-way InfoNCE starts near log(16) = 2.77).
    assert results["final_loss"] < results["initial_loss"] - 0.3
    assert results["eval_after"]["chance_R@1"] == pytest.approx(100 / 16)
    saved = json.loads((tmp_path / "teacher" / "teacher_results.json").read_text())
    assert saved["eval_after"] == results["eval_after"]

    model = CLIPModel.from_pretrained(tmp_path / "teacher")
    assert model.config.vision_config.image_size == 32 and model.config.projection_dim == 64
    CLIPImageProcessor.from_pretrained(tmp_path / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    teacher = ClusterSTMTeacher.from_pretrained(tmp_path / "teacher")
    video = teacher.encode_video(torch.randn(2, 2, 3, 32, 32))
    assert video.patch_tokens.shape == (2, 2, 16, 64) and video.grid_size == 4
    tokens = tokenizer(["a red circle moves left", "two blue squares"], padding=True, return_tensors="pt")
    assert teacher.encode_text(tokens["input_ids"], tokens["attention_mask"]).shape == (2, 64)

    # The retrieval curve during training: evaluations every 10 steps that leave the training itself unchanged.
    curved = run_teacher_training(
        TeacherTrainingArguments(**{**vars(args), "output_dir": str(tmp_path / "curve"), "eval_steps": 10})
    )
    assert [point["step"] for point in curved["eval_curve"]] == [10, 20, 30]
    assert curved["final_loss"] == results["final_loss"] and curved["eval_after"] == results["eval_after"]
    assert {k: v for k, v in curved["eval_curve"][-1].items() if k in results["eval_after"]} == results["eval_after"]
    with pytest.raises(ValueError, match="eval_steps"):
        TeacherTrainingArguments(output_dir=str(tmp_path), eval_steps=-1)


def test_train_teacher_script_rejects_bad_sizes(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/train_teacher.py", "--output_dir", str(tmp_path), "--image_size", "30"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "patch_size" in result.stderr
