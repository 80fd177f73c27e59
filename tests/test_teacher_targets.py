"""The teacher as a stage: `compute_teacher_targets`, the mask door `build_mask`, and the target cache
(write with the synthetic dataset, read back, join by key, refuse mismatches, train from it with no teacher)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_helpers import make_tiny_student, make_tiny_teacher, tiny_tokenizer

from clusterstm.models.masking_clusterstm import (
    MASK_STRATEGIES,
    attention_guided_mask,
    build_mask,
    cluster_wise_mask,
    random_mask,
    tube_mask,
)
from clusterstm.teacher.cache import (
    PrecomputeTargetsArguments,
    TeacherTargetCache,
    clip_key,
    dataset_keys,
    write_teacher_targets,
)
from clusterstm.teacher.targets import compute_teacher_targets
from clusterstm.teacher.teacher import ClusterSTMTeacher

REPO = Path(__file__).resolve().parents[1]
GRID = dict(batch_size=2, num_frames=3, num_patches=16)


# ---------------------------------------------------------------------------------------------------- build_mask


def test_strategy_table_has_exactly_the_five_strategies():
    assert set(MASK_STRATEGIES) == {"cluster", "random", "tube", "attention", "none"}


def test_build_mask_dispatches_to_each_strategy():
    features = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(0))
    attention = torch.rand(2, 3, 16, generator=torch.Generator().manual_seed(1))
    expected = {
        "cluster": cluster_wise_mask(features, 0.75, dc_ratio=0.3, k=2),
        "random": random_mask(2, 3, 16, 0.75, generator=torch.Generator().manual_seed(5)),
        "tube": tube_mask(2, 3, 16, 0.75, generator=torch.Generator().manual_seed(5)),
        "attention": attention_guided_mask(attention, 0.75, generator=torch.Generator().manual_seed(5)),
    }
    for strategy, reference in expected.items():
        mask = build_mask(
            strategy,
            **GRID,
            mask_ratio=0.75,
            features=features,
            cls_attention=attention,
            generator=torch.Generator().manual_seed(5),
            dc_ratio=0.3,
            dpc_k=2,
        )
        assert mask.dtype == torch.bool and mask.shape == (2, 3, 16), strategy
        assert torch.equal(mask, reference), strategy
        assert ((~mask).sum(-1) == 4).all(), strategy
    assert build_mask("none", **GRID, mask_ratio=0.75) is None


def test_build_mask_per_sample_generators_do_not_depend_on_the_batch_split():
    def generators(offset, n):
        return [torch.Generator().manual_seed(100 + offset + i) for i in range(n)]

    for strategy in ("random", "tube", "attention"):
        attention = torch.rand(4, 3, 16, generator=torch.Generator().manual_seed(2))
        whole = build_mask(
            strategy, batch_size=4, num_frames=3, num_patches=16, mask_ratio=0.5, cls_attention=attention,
            generator=generators(0, 4),
        )
        halves = [
            build_mask(
                strategy, batch_size=2, num_frames=3, num_patches=16, mask_ratio=0.5,
                cls_attention=attention[o : o + 2], generator=generators(o, 2),
            )
            for o in (0, 2)
        ]
        assert torch.equal(whole, torch.cat(halves)), strategy


@pytest.mark.parametrize(
    "strategy, kwargs, message",
    [
        ("checkerboard", {}, r"Unknown mask strategy 'checkerboard'"),
        ("cluster", {}, r"'cluster' needs `features` of shape \(2, 3, 16\) \+ \(dim,\)"),
        ("attention", {}, r"'attention' needs `cls_attention` of shape \(2, 3, 16\)"),
        ("cluster", {"features": torch.randn(2, 3, 9, 8)}, r"'cluster': `features` has shape \(2, 3, 9, 8\)"),
        ("attention", {"cls_attention": torch.rand(2, 4, 16)}, r"'attention': `cls_attention` has shape \(2, 4, 16\)"),
        ("random", {"mask_ratio": 1.0}, "mask_ratio"),
        ("random", {"generator": [torch.Generator()]}, "1 generators for a batch of 2"),
    ],
)
def test_build_mask_errors_name_the_strategy_and_input(strategy, kwargs, message):
    arguments = {**GRID, "mask_ratio": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_mask(strategy, **arguments)


# ---------------------------------------------------------------------------------------------------- targets + cache


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    tokenizer = tiny_tokenizer()
    student = make_tiny_student(root / "student", seed=0, tokenizer=tokenizer)
    teacher = make_tiny_teacher(root / "teacher", seed=0, tokenizer=tokenizer)
    return root, student, teacher


def _precompute_args(student, teacher, out, **kwargs):
    base = dict(
        model_name_or_path=str(student),
        teacher_name_or_path=str(teacher),
        output_dir=str(out),
        dataset_name="synthetic",
        num_train_clips=6,
        per_device_batch_size=4,
        shard_size=4,
        device="cpu",
    )
    base.update(kwargs)
    return PrecomputeTargetsArguments(**base)


def _pretraining_args(student, out, **kwargs):
    from clusterstm.training.pretraining import PretrainingArguments

    base = dict(
        model_name_or_path=str(student),
        output_dir=str(out),
        dataset_name="synthetic",
        num_train_clips=6,
        per_device_train_batch_size=3,
        max_steps=2,
        dataloader_num_workers=0,
        disable_tqdm=True,
        report_to="none",
    )
    base.update(kwargs)
    return PretrainingArguments(**base)


def test_compute_teacher_targets_matches_the_teacher_methods(assets):
    _, _, teacher_dir = assets
    teacher = ClusterSTMTeacher.from_pretrained(teacher_dir)
    pixel_values = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = teacher.tokenizer(["a red circle", "a blue square moves"], padding=True, return_tensors="pt")
    targets = compute_teacher_targets(
        teacher,
        pixel_values,
        tokens["input_ids"],
        tokens["attention_mask"],
        window_size=3,
        need_patch_tokens=True,
        need_cls_attention=True,
    )
    video = teacher.encode_video(pixel_values)
    text = teacher.encode_text(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(targets.relevance, teacher.relevance(video.patch_tokens, text, 3).float())
    assert targets.relevance.dtype == torch.float32 and targets.relevance.shape == (2, 4, 16)
    torch.testing.assert_close(targets.patch_tokens, video.patch_tokens)
    torch.testing.assert_close(targets.cls_attention, video.cls_attention.float())
    only = compute_teacher_targets(teacher, pixel_values, tokens["input_ids"], window_size=3)
    assert only.patch_tokens is None and only.cls_attention is None
    with pytest.raises(ValueError, match="window_size"):
        compute_teacher_targets(teacher, pixel_values, tokens["input_ids"], window_size=2)
    with pytest.raises(ValueError, match="captions"):
        compute_teacher_targets(teacher, pixel_values, window_size=3)


def test_cache_round_trip_equals_online_targets(assets):
    from clusterstm.data.readers import VideoTextCollator
    from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
    from clusterstm.training.pretraining import build_train_dataset

    root, student, teacher_dir = assets
    out = root / "cache-cluster"
    args = _precompute_args(student, teacher_dir, out)
    stats = write_teacher_targets(args)
    assert stats["num_clips"] == 6 and stats["bytes_per_clip"] > 0
    assert sorted(p.name for p in out.glob("*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet"]
    record = json.loads((out / "targets_config.json").read_text())
    assert record["teacher_name_or_path"] == str(teacher_dir) and record["relevance_window_size"] == 3
    assert record["num_frames"] == 4 and record["image_size"] == 32 and record["frame_sampling"] == "uniform"
    assert record["mask"]["mask_strategy"] == "cluster" and record["mask"]["mask_ratio"] == 0.8
    assert record["clusterstm_version"]

    import pyarrow.parquet as pq

    table = pq.read_table(out / "shard-00000.parquet")
    assert str(table.schema.field("teacher_relevance").type) == "list<element: list<element: halffloat>>"
    assert set(table.column_names) == {"clip_key", "teacher_relevance", "bool_masked_pos"}

    # online targets of the same clips, through the same function, to compare with the cache
    config = ClusterSTMConfig.from_pretrained(student)
    processor = ClusterSTMProcessor.from_pretrained(student)
    teacher = ClusterSTMTeacher.from_pretrained(teacher_dir)
    dataset = build_train_dataset(args, 4, 32)
    rows = [dataset[i] for i in range(len(dataset))]
    batch = VideoTextCollator(processor, teacher_tokenizer=teacher.tokenizer, num_frames=4)(rows)
    online = compute_teacher_targets(
        teacher,
        batch["pixel_values"],
        window_size=config.relevance_window_size,
        need_patch_tokens=True,
        teacher_input_ids=batch["teacher_input_ids"],
        teacher_attention_mask=batch["teacher_attention_mask"],
    )
    online_mask = build_mask(
        "cluster", batch_size=6, num_frames=4, num_patches=16, mask_ratio=0.8, features=online.patch_tokens
    )

    cache = TeacherTargetCache(out)
    assert len(cache) == 6 and cache.has_masks
    pretraining_args = _pretraining_args(student, root / "unused", teacher_targets=str(out))
    cache.check_run(pretraining_args, config, processor)
    collate = cache.collator(lambda rows_: {"pixel_values": batch["pixel_values"][: len(rows_)]})
    joined = collate(rows)
    torch.testing.assert_close(joined["teacher_relevance"], online.relevance, atol=2e-3, rtol=2e-3)  # float16
    assert torch.equal(joined["bool_masked_pos"], online_mask)
    # the rows are found by key, whatever their order
    reversed_rows = collate(rows[::-1])
    torch.testing.assert_close(reversed_rows["teacher_relevance"], joined["teacher_relevance"].flip(0))
    assert dataset_keys(dataset) == [clip_key(row) for row in rows]


def test_cache_mismatch_is_a_clear_error(assets):
    from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor

    root, student, teacher_dir = assets
    out = root / "cache-random"
    write_teacher_targets(_precompute_args(student, teacher_dir, out, mask_strategy="random", num_train_clips=3))
    cache = TeacherTargetCache(out)
    assert not cache.has_masks  # random masks need no teacher: drawn per step in training
    config = ClusterSTMConfig.from_pretrained(student)
    processor = ClusterSTMProcessor.from_pretrained(student)
    random_run = _pretraining_args(student, root / "u", teacher_targets=str(out), mask_strategy="random")
    cache.check_run(random_run, config, processor)

    cluster_run = _pretraining_args(student, root / "u", teacher_targets=str(out))
    with pytest.raises(ValueError, match=r"does not match this run: .*stores no masks.*mask_strategy: cache None"):
        cache.check_run(cluster_run, config, processor)
    config.relevance_window_size = 5
    with pytest.raises(ValueError, match=r"relevance_window_size: cache 3, run 5"):
        cache.check_run(random_run, config, processor)
    config.relevance_window_size = 3
    config.vision_config.num_frames = 8
    with pytest.raises(ValueError, match=r"num_frames: cache 4, run 8"):
        cache.check_run(random_run, config, processor)
    # a clip of the training data without a cache row
    with pytest.raises(ValueError, match=r"no row for 3 clip\(s\).*t2-clip000003"):
        cache.check_keys([{"video_id": "t2-clip000003", "caption": c} for c in ("a", "b", "c")])
    with pytest.raises(ValueError, match="not a target cache"):
        TeacherTargetCache(root)
    with pytest.raises(ValueError, match="frame_sampling must be uniform"):
        _precompute_args(student, teacher_dir, out, frame_sampling="random")


def test_alignment_with_cache_is_refused_with_the_size_per_clip(assets):
    from clusterstm.training.pretraining import run_pretraining

    root, student, _ = assets
    aligned = make_tiny_student(root / "aligned", seed=0, tokenizer=tiny_tokenizer(), alignment_loss_weight=1.0)
    with pytest.raises(ValueError, match=r"alignment_loss_weight > 0.*~8192 bytes per clip"):
        run_pretraining(_pretraining_args(aligned, root / "run-aligned", teacher_targets=str(root / "cache-cluster")))


def test_pretrain_script_trains_from_cache_without_a_teacher(assets, tmp_path):
    root, student, teacher_dir = assets
    cache_dir = tmp_path / "cache"
    # written through the CLI sub-command, with the pretraining data flags
    from clusterstm.cli import main as cli_main

    code = cli_main(
        [
            "precompute-targets",
            "--model_name_or_path", str(student),
            "--teacher_name_or_path", str(teacher_dir),
            "--dataset_name", "synthetic",
            "--num_train_clips", "6",
            "--batch_size", "3",
            "--mask_strategy", "cluster",
            "--mask_ratio", "0.5",
            "--device", "cpu",
            "--output_dir", str(cache_dir),
        ]
    )  # fmt: skip
    assert code == 0 and (cache_dir / "targets_config.json").is_file()
    out = tmp_path / "run"
    # The teacher folder is made unreadable to the run: loading any teacher would fail the run.
    guard = tmp_path / "guard.py"
    guard.write_text(
        "import runpy, sys\n"
        "import clusterstm.teacher.teacher as t\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError('a teacher was loaded')\n"
        "t.ClusterSTMTeacher.from_pretrained = classmethod(refuse)\n"
        "sys.argv = ['scripts/pretrain.py', *sys.argv[1:]]\n"
        "runpy.run_path('scripts/pretrain.py', run_name='__main__')\n"
    )
    common = [
        "--model_name_or_path", str(student),
        "--dataset_name", "synthetic",
        "--num_train_clips", "6",
        "--per_device_train_batch_size", "3",
        "--max_steps", "2",
        "--dataloader_num_workers", "0",
        "--mask_ratio", "0.5",
        "--logging_steps", "1",
        "--disable_tqdm",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(guard), *common, "--output_dir", str(out), "--teacher_targets", str(cache_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 2 and np.isfinite(results["train_relevance_loss"])
    assert "teacher: cache" in result.stderr
    record = json.loads((out / "teacher_config.json").read_text())
    assert record["teacher_targets"] == str(cache_dir) and record["teacher_name_or_path"] == str(teacher_dir)

    # a run whose settings differ from the cache's stops with the mismatch named
    failed = subprocess.run(
        [sys.executable, "scripts/pretrain.py", *common, "--output_dir", str(tmp_path / "bad"), "--mask_ratio", "0.75",
         "--teacher_targets", str(cache_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert failed.returncode == 2 and "mask_ratio: cache 0.5, run 0.75" in failed.stderr


def test_relevance_method_reaches_the_targets_the_cache_and_the_run_record(assets):
    """`--relevance_method` (issue 21): online pretraining and the cache read relevance the chosen way, the cache
    records it, a run with another method is refused, and a cache written before the flag counts as `window`."""
    from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
    from clusterstm.training.pretraining import run_pretraining

    root, student, teacher_dir = assets
    out = root / "cache-maskclip"
    write_teacher_targets(
        _precompute_args(student, teacher_dir, out, mask_strategy="random", num_train_clips=3, relevance_method="maskclip")
    )
    assert json.loads((out / "targets_config.json").read_text())["relevance_method"] == "maskclip"
    cache = TeacherTargetCache(out)
    config = ClusterSTMConfig.from_pretrained(student)
    processor = ClusterSTMProcessor.from_pretrained(student)
    maskclip_run = _pretraining_args(
        student, root / "u", teacher_targets=str(out), mask_strategy="random", relevance_method="maskclip"
    )
    cache.check_run(maskclip_run, config, processor)
    with pytest.raises(ValueError, match=r"relevance_method: cache 'maskclip', run 'window'"):
        cache.check_run(_pretraining_args(student, root / "u", teacher_targets=str(out), mask_strategy="random"), config, processor)
    cache.config.pop("relevance_method")  # as written before the flag existed
    cache.check_run(_pretraining_args(student, root / "u", teacher_targets=str(out), mask_strategy="random"), config, processor)

    # the cached relevance is the MaskCLIP relevance, not the window-pooled one
    stored = torch.from_numpy(cache.relevance.astype(np.float32))
    window_cache = root / "cache-window"
    write_teacher_targets(_precompute_args(student, teacher_dir, window_cache, mask_strategy="random", num_train_clips=3))
    window = torch.from_numpy(TeacherTargetCache(window_cache).relevance.astype(np.float32))
    assert stored.shape == window.shape and not torch.allclose(stored, window, atol=1e-2)

    with pytest.raises(ValueError, match="relevance_method must be one of"):
        _pretraining_args(student, root / "u", relevance_method="gradcam")
    run = run_pretraining(
        _pretraining_args(student, root / "run-clearclip", teacher_name_or_path=str(teacher_dir), relevance_method="clearclip")
    )
    assert np.isfinite(run["train_relevance_loss"])
    record = json.loads((root / "run-clearclip" / "teacher_config.json").read_text())
    assert record["relevance_method"] == "clearclip"
