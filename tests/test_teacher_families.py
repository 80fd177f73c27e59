"""Released-teacher families on any grid: each family's own preprocessing, grid matching, start-up checks, a 2-step
pretraining run per family and `clusterstm visualize` with a non-CLIP teacher. Random weights, real classes, no
downloads."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pretrain_helpers import make_tiny_student, tiny_tokenizer
from teacher_families import CLIP_MEAN, CLIP_STD, FAMILIES, WIDTH, make_family_teacher

from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
from clusterstm.teacher.compatibility import check_teacher_compatibility
from clusterstm.teacher.preprocessing import ImageNormalization, StudentFrames
from clusterstm.teacher.targets import compute_teacher_targets
from clusterstm.teacher.teacher import ClusterSTMTeacher

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wordpiece():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def student(tmp_path_factory, wordpiece):
    """The tiny student: 4 frames of 32x32, patch 8 -> a 4x4 grid."""
    return make_tiny_student(tmp_path_factory.mktemp("student") / "student", tokenizer=wordpiece)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, wordpiece):
    root = tmp_path_factory.mktemp("teachers")
    return {family: make_family_teacher(family, root / family, wordpiece) for family in FAMILIES}


def _pretrain_argv(student, teacher, out, *extra):
    return [
        "--model_name_or_path", str(student), "--teacher_name_or_path", str(teacher), "--output_dir", str(out),
        "--dataset_name", "synthetic", "--num_train_clips", "4", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--logging_steps", "1", "--disable_tqdm", *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Family selection and each family's own preprocessing


@pytest.mark.parametrize(
    "family, kind, mean, text_length",
    [
        ("clip_b16", "clip", CLIP_MEAN, None),
        ("siglip", "siglip", [0.5] * 3, 64),
        ("siglip2", "siglip2", [0.5] * 3, 64),
        ("xclip", "xclip", CLIP_MEAN, None),
    ],
)
def test_family_is_picked_from_the_config_with_its_own_preprocessing(teachers, family, kind, mean, text_length):
    teacher = ClusterSTMTeacher.from_pretrained(teachers[family])
    assert teacher.model_kind == kind
    assert teacher.normalization.image_mean == pytest.approx(mean)  # from its preprocessor_config.json
    tokens = teacher.prepare_text(["a red ball", "the orange triangle moves right"])
    if text_length is None:  # CLIP-like: padded to the longest, with mask
        assert tokens["input_ids"].shape[1] < 64 and "attention_mask" in tokens
    else:  # SigLIP: padded to the trained length, no mask
        assert tokens["input_ids"].shape[1] == text_length and "attention_mask" not in tokens
    config_file = Path(teachers[family]) / "preprocessor_config.json"
    assert json.loads(config_file.read_text())["image_mean"] == pytest.approx(mean)


@pytest.mark.parametrize("name", ["MetaClip2", "AltCLIP", "ChineseCLIP"])
def test_clip_friends_use_the_clip_adapter(name):
    import transformers as tf

    vision = {**WIDTH, "patch_size": 16, "image_size": 224}
    text = {**WIDTH, "vocab_size": 99}
    if name == "MetaClip2":
        model = tf.MetaClip2Model(tf.MetaClip2Config(text_config=text, vision_config=vision, projection_dim=24))
    elif name == "AltCLIP":
        text = {**text, "project_dim": 24, "max_position_embeddings": 40}
        model = tf.AltCLIPModel(tf.AltCLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    else:
        model = tf.ChineseCLIPModel(tf.ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    teacher = ClusterSTMTeacher.from_pretrained(model.eval())
    assert teacher.family == "CLIP"
    student = StudentFrames(ImageNormalization(tuple(CLIP_MEAN), tuple(CLIP_STD)), patch_size=8)
    teacher.match_student(student)
    targets = compute_teacher_targets(
        teacher, torch.randn(1, 2, 3, 32, 32), torch.randint(5, 99, (1, 6)), window_size=3, need_patch_tokens=True
    )
    assert targets.relevance.shape == (1, 2, 16) and targets.patch_tokens.shape == (1, 2, 16, 32)
    frames = teacher.frames_from_student(torch.zeros(1, 2, 3, 32, 32))  # a 4x4 grid of 16-px patches
    assert frames.shape == (1, 2, 3, 64, 64)


# ---------------------------------------------------------------------------------------------------------------------
# SigLIP relevance equals a hand computation with SigLIP's own statistics and max-length padding


def _hand_relevance(model, pixel_values, input_ids, window):
    """Slow reference: every window gathered with clamped indices and pooled one at a time by SigLIP's head."""
    with torch.no_grad():
        frames = pixel_values.flatten(0, 1)
        tokens = model.vision_model(pixel_values=frames, interpolate_pos_encoding=True).last_hidden_state
        text = F.normalize(model.get_text_features(input_ids=input_ids).pooler_output, dim=-1)
        b, t = pixel_values.shape[:2]
        grid = math.isqrt(tokens.shape[1])
        out = torch.zeros(b * t, grid * grid)
        half = window // 2
        for m in range(b * t):
            for r in range(grid):
                for c in range(grid):
                    idx = [
                        min(max(r + dr, 0), grid - 1) * grid + min(max(c + dc, 0), grid - 1)
                        for dr in range(-half, half + 1)
                        for dc in range(-half, half + 1)
                    ]
                    pooled = model.vision_model.head(tokens[m, idx][None])[0]
                    out[m, r * grid + c] = F.normalize(pooled, dim=-1) @ text[m // t]
    return out.reshape(b, t, -1)


def test_siglip_relevance_uses_its_own_statistics_and_max_length_padding(tmp_path, wordpiece, student):
    from transformers import SiglipModel

    from clusterstm.data.readers import VideoTextCollator
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor

    # patch 8, native 64 px: matched to the student's 4x4 grid it is fed 32 px frames, the student's own size
    folder = make_family_teacher("siglip", tmp_path / "siglip", wordpiece, patch_size=8, image_size=64)
    teacher = ClusterSTMTeacher.from_pretrained(folder)
    processor = ClusterSTMProcessor.from_pretrained(student)
    info = check_teacher_compatibility(teacher, ClusterSTMConfig.from_pretrained(student), processor)
    assert info["input_size"] == (32, 32)

    # frames decoded once (uint8); the student's tensor is made by its processor, the teacher's from it
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for _ in range(2)]
    captions = ["a red ball moves left", "the orange triangle moves right while a white circle does not move"]
    collator = VideoTextCollator(processor, teacher_tokenizer=teacher.tokenizer, num_frames=4)
    batch = collator([{"video": clip, "caption": caption} for clip, caption in zip(clips, captions)])
    assert batch["teacher_input_ids"].shape[1] < 64  # the collator pads to the longest; the teacher re-pads
    targets = compute_teacher_targets(
        teacher,
        batch["pixel_values"],
        window_size=3,
        teacher_input_ids=batch["teacher_input_ids"],
        teacher_attention_mask=batch["teacher_attention_mask"],
    )

    model = SiglipModel.from_pretrained(folder).eval()
    video = torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 255
    siglip_pixels = (video - 0.5) / 0.5
    ids = teacher.tokenizer(captions, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    expected = _hand_relevance(model, siglip_pixels, ids["input_ids"], 3)
    torch.testing.assert_close(targets.relevance, expected, atol=2e-5, rtol=1e-4)

    # the same hand computation with CLIP's statistics, or padded to the longest caption, gives other targets
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    with_clip_stats = _hand_relevance(model, (video - mean) / std, ids["input_ids"], 3)
    assert (with_clip_stats - targets.relevance).abs().max() > 1e-3
    longest = teacher.tokenizer(captions, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        text_longest = model.get_text_features(**longest).pooler_output
        text_max = model.get_text_features(input_ids=ids["input_ids"]).pooler_output
    assert (F.cosine_similarity(text_longest, text_max) < 0.999).any()


# ---------------------------------------------------------------------------------------------------------------------
# Grid matching


@pytest.mark.parametrize(
    "student_preset, family, patch, native, expected",
    [
        ("base", "clip", 16, 224, 224),  # B/16 student grid 14x14: CLIP B/16 at its native size
        ("base", "clip", 32, 224, 448),  # CLIP B/32 at 448 px
        ("base", "clip", 14, 224, 196),  # CLIP L/14 at 196 px (as UMT)
        ("base", "siglip", 14, 384, 196),  # SigLIP so400m/14-384 at 196 px
        ("base", "siglip2", 16, 256, 224),  # SigLIP2 B/16-256 at 224 px
        ("tiny", "clip", 16, 224, 128),  # tiny preset student (64 px, patch 8): 8x8 grid -> B/16 at 128 px
        ("tiny", "clip", 32, 224, 256),  # ... and B/32 at 256 px
    ],
)
def test_grid_matching_picks_the_documented_resolution(student_preset, family, patch, native, expected):
    import transformers as tf

    config = ClusterSTMConfig.from_preset(student_preset)
    grid = config.vision_config.image_size // config.vision_config.patch_size
    vision = {**WIDTH, "patch_size": patch}
    text = {**WIDTH, "vocab_size": 99}
    if family == "clip":
        model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config={**vision, "image_size": native}))
    elif family == "siglip":
        model = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config={**vision, "image_size": native}))
    else:
        vision["num_patches"] = (native // patch) ** 2
        model = tf.Siglip2Model(tf.Siglip2Config(text_config=text, vision_config=vision))
    teacher = ClusterSTMTeacher(model)
    info = check_teacher_compatibility(teacher, config)
    assert info["input_size"] == (expected, expected)
    assert info["student_grid"] == (grid, grid)
    # the teacher's patch grid at that size is the student's
    if student_preset == "tiny":
        output = teacher.encode_video(torch.randn(1, 1, 3, expected, expected))
        assert output.patch_tokens.shape[2] == grid * grid and output.grid_size == grid


def test_unmatched_grid_errors_naming_both_grids_and_patch_sizes(teachers, student):
    teacher = ClusterSTMTeacher.from_pretrained(teachers["clip_b16"])
    # a 512-px student with 8-px patches has a 64x64 grid: B/16 would need 1024 px, over 4x its 224 px
    config = ClusterSTMConfig.from_preset("tiny", vision_config={"image_size": 512, "patch_size": 8})
    with pytest.raises(ValueError) as error:
        check_teacher_compatibility(teacher, config)
    message = str(error.value)
    for part in ("64x64", "patch size 8", "14x14", "patch size 16", "1024x1024", "224 px"):
        assert part in message, (part, message)


def test_tubelets_feed_their_first_frame():
    import transformers as tf

    model = tf.CLIPModel(tf.CLIPConfig(text_config={**WIDTH, "vocab_size": 99}, vision_config={**WIDTH, "patch_size": 8, "image_size": 32}))
    teacher = ClusterSTMTeacher(model)
    config = ClusterSTMConfig.from_preset("tiny", vision_config={"image_size": 32, "num_frames": 4, "tubelet_size": 2})
    info = check_teacher_compatibility(teacher, config)
    assert info["num_frames"] == 2
    pixel_values = torch.randn(1, 4, 3, 32, 32)
    frames = teacher.frames_from_student(pixel_values)
    assert frames.shape == (1, 2, 3, 32, 32)
    # same statistics on both sides (CLIP): the first frame of every tubelet, unchanged up to rounding
    torch.testing.assert_close(frames, pixel_values[:, ::2], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Start-up checks and precision


def test_alignment_width_mismatch_errors_at_start_up(teachers, tmp_path, wordpiece):
    from clusterstm.training.pretraining import main

    student = make_tiny_student(tmp_path / "student", tokenizer=wordpiece, alignment_loss_weight=1.0)
    teacher = ClusterSTMTeacher.from_pretrained(teachers["siglip"])  # width 32; the tiny student expects 64
    with pytest.raises(ValueError, match=r"width 32 .*teacher_hidden_size=64"):
        check_teacher_compatibility(teacher, ClusterSTMConfig.from_pretrained(student))
    with pytest.raises(ValueError, match=r"width 32 .*teacher_hidden_size=64"):
        main(_pretrain_argv(student, teachers["siglip"], tmp_path / "run"))
    assert not (tmp_path / "run" / "train_results.json").exists()


def test_bf16_teacher_keeps_relevance_in_float32(teachers):
    full = ClusterSTMTeacher.from_pretrained(teachers["siglip"])
    half = ClusterSTMTeacher.from_pretrained(teachers["siglip"], torch_dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.pooler.parameters())  # a float32 copy of the pooling head
    assert next(half.model.vision_model.head.parameters()).dtype == torch.bfloat16
    frames = half.prepare_frames(np.random.default_rng(0).integers(0, 256, (1, 2, 40, 48, 3), dtype=np.uint8))
    assert frames.shape == (1, 2, 3, 224, 224)
    tokens = half.prepare_text(["a red ball"])
    relevance = compute_teacher_targets(half, frames, window_size=3, teacher_input_ids=tokens["input_ids"]).relevance
    reference = compute_teacher_targets(full, frames, window_size=3, teacher_input_ids=tokens["input_ids"]).relevance
    assert relevance.dtype == torch.float32
    assert (relevance - reference).abs().max() < 0.1  # bf16 tower, float32 pooling and cosine


# ---------------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("family", ["clip_b16", "clip_b32", "siglip", "xclip"])
def test_two_step_pretraining_per_family(family, teachers, student, tmp_path):
    from clusterstm.training.pretraining import main

    results = main(_pretrain_argv(student, teachers[family], tmp_path / "run"))
    assert results["global_step"] == 2 and math.isfinite(results["train_loss"])
    assert math.isfinite(results["train_relevance_loss"])


def test_two_step_pretraining_script_with_siglip2_and_alignment(teachers, tmp_path, wordpiece):
    """scripts/pretrain.py with a SigLIP2 teacher (NaFlex inputs) and unmasked-token alignment at its width."""
    folder = make_family_teacher("siglip2", tmp_path / "siglip2", wordpiece, hidden_size=64)
    student = make_tiny_student(tmp_path / "student", tokenizer=wordpiece, alignment_loss_weight=0.5)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "scripts/pretrain.py", *_pretrain_argv(student, folder, out)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 2 and math.isfinite(results["train_alignment_loss"])
    assert "Teacher matched to the student" in result.stderr and "SigLIP2" in result.stderr


def test_precompute_targets_with_a_siglip_teacher(teachers, student, tmp_path):
    from clusterstm.teacher.cache import main

    stats = main(
        [
            "--model_name_or_path", str(student), "--teacher_name_or_path", str(teachers["siglip"]),
            "--output_dir", str(tmp_path / "cache"), "--dataset_name", "synthetic", "--num_train_clips", "4",
            "--per_device_batch_size", "4", "--device", "cpu",
        ]
    )  # fmt: skip
    assert stats["num_clips"] == 4


def test_visualize_accepts_a_siglip2_teacher(tmp_path, wordpiece):
    from clusterstm.cli import main
    from clusterstm.data.synthetic import write_video_pyav

    folder = make_family_teacher("siglip2", tmp_path / "siglip2", wordpiece, patch_size=16, image_size=64)
    video = tmp_path / "clip.mp4"
    write_video_pyav(video, np.random.default_rng(0).integers(0, 256, (8, 48, 64, 3), dtype=np.uint8))
    assert main(["visualize", str(folder), str(video), "a red ball", "--output_dir", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "relevance.png").stat().st_size > 0
    assert (tmp_path / "figs" / "clusters.png").stat().st_size > 0


def test_repad_follows_the_tokenizer_side_and_truncates():
    from clusterstm.teacher.adapters.base import repad

    ids = torch.tensor([[7, 8, 9, 0], [0, 0, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    assert repad(ids, mask, 6, 0, "right").tolist() == [[7, 8, 9, 0, 0, 0], [5, 6, 0, 0, 0, 0]]
    assert repad(ids, mask, 6, 0, "left").tolist() == [[0, 0, 0, 7, 8, 9], [0, 0, 0, 0, 5, 6]]
    assert repad(ids, mask, 2, 0, "right").tolist() == [[7, 8], [5, 6]]


def test_statistics_come_from_the_checkpoint_files(teachers, tmp_path):
    import shutil

    folder = tmp_path / "siglip"
    shutil.copytree(teachers["siglip"], folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config.update(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], rescale_factor=1 / 127.5)
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    teacher = ClusterSTMTeacher.from_pretrained(folder)
    assert teacher.normalization == ImageNormalization((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 1 / 127.5)
    frames = teacher.prepare_frames(torch.full((1, 1, 224, 224, 3), 51, dtype=torch.uint8))
    expected = (51 / 127.5 - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([0.4, 0.5, 0.6])
    torch.testing.assert_close(frames[0, 0, :, 0, 0], expected)
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "image_std": [0.0, 1.0, 1.0]}))
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        ClusterSTMTeacher.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------------
# open_clip (optional extra `clusterstm[open_clip]`)


def test_open_clip_teacher_matches_its_own_forward_and_pretrains(tmp_path, student):
    pytest.importorskip("open_clip")
    from teacher_families import make_open_clip_teacher

    from clusterstm.training.pretraining import main

    folder = make_open_clip_teacher(tmp_path / "open_clip")
    teacher = ClusterSTMTeacher.from_pretrained(folder)
    assert teacher.family == "open_clip" and teacher.normalization.image_mean == pytest.approx(CLIP_MEAN)
    visual = teacher.model.visual
    frames = torch.randn(1, 2, 3, 224, 224)
    output = teacher.encode_video(frames)
    with torch.no_grad():
        visual.output_tokens = True
        _, tokens = visual(frames[0])  # open_clip's own path: tokens after ln_post
        visual.output_tokens = False
        # the last block's attention weights from torch's MultiheadAttention on the block input
        captured = {}
        handle = visual.transformer.resblocks[-1].register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
        visual(frames[0])
        handle.remove()
        block = visual.transformer.resblocks[-1]
        normed = block.ln_1(captured["x"])
        _, weights = block.attn(normed, normed, normed, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(visual.ln_post(output.patch_tokens[0]), tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.cls_attention[0], weights[:, 0, 1:], atol=1e-6, rtol=1e-5)
    ids = teacher.prepare_text(["a red ball"])["input_ids"]
    assert ids.shape == (1, 77)  # padded with 0 to the context length, open_clip's convention

    results = main(_pretrain_argv(student, folder, tmp_path / "run"))
    assert results["global_step"] == 2 and math.isfinite(results["train_relevance_loss"])
