"""Per-object token masks, the kept-object coverage metric, and `benchmarks/object_coverage.py` end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from clusterstm.data.synthetic import (
    SyntheticVideoTextConfig,
    generate_split_metadata,
    kept_object_coverage,
    object_token_masks,
    per_object_token_masks,
)


def test_per_object_masks_partition_the_object_mask():
    config = SyntheticVideoTextConfig(num_frames=4, image_size=32, seed=0)
    rows = generate_split_metadata(config, "test")[:3]
    per_object = per_object_token_masks(rows, config, patch_size=8, min_coverage=0.25)
    assert per_object.shape == (3, 4, max(len(r["objects"]) for r in rows), 16)
    touched = per_object_token_masks(rows, config, patch_size=8, min_coverage=0.01)
    for i, row in enumerate(rows):
        assert not touched[i, :, len(row["objects"]) :].any()  # empty slots past the clip's objects
        assert touched[i, :, : len(row["objects"])].any(axis=(0, 2)).all()  # every object touches some token
    # A token >= 25 % covered by one object is >= 25 % covered by objects: per-object tokens lie in the union mask.
    union = object_token_masks(rows, config, patch_size=8, min_coverage=0.25)
    assert not (per_object.any(2) & ~union).any()


def test_kept_object_coverage_hand_case():
    # One clip, 2 frames, 2 objects, 4 tokens. Object 0 on tokens {0, 1}, object 1 on token {3} (absent in frame 1).
    objects = np.zeros((1, 2, 2, 4), dtype=bool)
    objects[0, :, 0, :2] = True
    objects[0, 0, 1, 3] = True
    dropped = np.array([[[True, False, True, True], [True, True, False, False]]])  # True = dropped
    # frame 0: object 0 keeps token 1, object 1 (token 3) dropped; frame 1: object 0 lost, object 1 absent.
    out = kept_object_coverage(dropped, objects)
    assert out["num_object_frames"] == 3
    assert out["object_frames_kept"] == pytest.approx(1 / 3)
    assert out["clips_all_kept"] == 0.0
    assert out["object_tokens_kept"] == pytest.approx(1 / 5)  # 1 of the 5 object tokens
    assert kept_object_coverage(np.zeros_like(dropped), objects)["clips_all_kept"] == 1.0
    with pytest.raises(ValueError, match="does not match object_tokens"):
        kept_object_coverage(dropped[:, :1], objects)


def test_object_coverage_benchmark_end_to_end(tmp_path):
    from pretrain_helpers import tiny_tokenizer

    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    folder = tmp_path / "teacher"
    tokenizer = tiny_tokenizer()
    text = {**small, "vocab_size": len(tokenizer), "max_position_embeddings": 64}
    vision = {**small, "image_size": 64, "patch_size": 16}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "object_coverage.py"
    spec = importlib.util.spec_from_file_location("object_coverage", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    report = module.main(["--teacher", str(folder), "--num_clips", "4", "--ratios", "0.75", "--output_dir", str(out)])
    assert [(r["strategy"], r["mask_ratio"]) for r in report["results"]] == [
        (s, 0.75) for s in ("cluster", "random", "tube", "attention")
    ]
    for row in report["results"]:
        assert 0.0 <= row["object_frames_kept"] <= 1.0 and row["num_object_frames"] > 0
    # Content-blind masks keep about 1 - ratio of the object tokens (16 tokens per frame, 4 kept).
    random_row = report["results"][1]
    assert 0.1 < random_row["object_tokens_kept"] < 0.45
    assert json.loads((out / "object_coverage.json").read_text())["num_clips"] == 4
    assert "| cluster | 0.75 |" in (out / "object_coverage.md").read_text()
