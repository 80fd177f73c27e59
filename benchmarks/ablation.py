"""Ablations of ClusterSTM on the embedded synthetic video-text benchmark.

One command, six grids, each with seeds, spreads and paired 95 % intervals:

- `masking`: cluster-wise (ClusterSTM) vs random vs tube vs attention-guided (UMT) masking at several mask ratios,
  with the same tiny model, data, steps and objectives;
- `window`: relevance window 1x1 vs 3x3 vs 5x5 (the analogue of the paper's supplementary Table I);
- `objective`: contrastive only; + teacher token alignment (UMT); + relevance reconstruction (ClusterSTM); both;
  and relevance on MaskCLIP / ClearCLIP targets;
- `relevance`: the relevance objective searched (loss form x weight, then tokens and decoder depth around
  `--relevance_center`) beside UMT alignment and relevance + alignment;
- `equal_time`: UMT alignment with the online teacher vs relevance from cached targets for the steps that take the
  same wall-clock time on this machine (calibrated side by side);
- `matching`: the video-text matching loss with hard, uniform or mixed negatives, and re-ranking with its head.

Every run pretrains a tiny `ClusterSTMForPreTraining` from scratch (same initialisation per seed) against one shared
frozen CLIP teacher (trained once with `clusterstm.training.teacher_training.run_teacher_training` and cached), then measures
zero-shot text->video retrieval (R@1/R@5 on the `test` and `compositional` splits, via `clusterstm.tasks.metrics`). With
`--finetune_steps > 0` the pretrained checkpoint is also fine-tuned for the same number of steps on video QA and
captioning with `clusterstm.training.finetuning.run_finetuning` (the product's Trainer path) and evaluated on the test split
(QA accuracy, CIDEr with the offline Python tokenizer, no METEOR).

Usage (from the repository root):

    python benchmarks/ablation.py all                      # the full grid of docs/RESULTS.md
    python benchmarks/ablation.py masking --seeds 0 1 2 --steps 300
    python benchmarks/ablation.py all --quick               # tiny grid (< 90 s), what CI runs

Outputs: `<output_dir>/ablation_<name>.json` and `.md` (mean ± std over seeds), PNG bar charts in `<plot_dir>`.
Single runs are cached as JSON under `--work_dir` (keyed by every setting that affects them), so an interrupted grid
resumes and runs shared between ablations (e.g. cluster masking at 0.75 with a 3x3 window) are trained once.

Every run trains through the product's loop, `clusterstm.training.pretraining.run_pretraining`, on the training clips
held in memory (`train_dataset=`, so the same clips are not re-rendered or re-decoded for each of the dozens of runs):
the published ablations exercise the product's teacher stage, mask builder (`build_mask`) and optimiser.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("clusterstm.ablation")

ABLATIONS = ("masking", "window", "objective", "matching", "relevance", "equal_time")
STRATEGIES = ("cluster", "random", "tube", "attention")
# Relevance methods beside Algorithm III's window pooling (`clusterstm.teacher.dense`).
RELEVANCE_METHODS = ("maskclip", "clearclip")
# Objective variants: which of the teacher-driven losses are on (the contrastive loss always is).
OBJECTIVES: dict[str, dict[str, float]] = {
    "contrastive": {"relevance_loss_weight": 0.0, "alignment_loss_weight": 0.0},
    "contrastive+alignment (UMT)": {"relevance_loss_weight": 0.0, "alignment_loss_weight": 1.0},
    "contrastive+relevance (ClusterSTM)": {"relevance_loss_weight": 1.0, "alignment_loss_weight": 0.0},
    "contrastive+relevance+alignment": {"relevance_loss_weight": 1.0, "alignment_loss_weight": 1.0},
}
# Matching ablation: the VTM loss on top of ClusterSTM's objective, with hard (the default) or uniform negatives.
MATCHING_OBJECTIVES: dict[str, dict[str, Any]] = {
    "+matching, hard negatives": {
        "matching_loss_weight": 1.0,
        "matching_negatives": "hard",
        "matching_pooling": "mean",
    },
    "+matching, uniform negatives": {
        "matching_loss_weight": 1.0,
        "matching_negatives": "uniform",
        "matching_pooling": "mean",
    },
    "+matching, mixed negatives": {
        "matching_loss_weight": 1.0,
        "matching_negatives": "mixed",
        "matching_pooling": "mean",
    },
    "+matching, hard negatives, soft-min": {
        "matching_loss_weight": 1.0,
        "matching_negatives": "hard",
        "matching_pooling": "softmin",
    },
    "+matching, mixed negatives, soft-min": {
        "matching_loss_weight": 1.0,
        "matching_negatives": "mixed",
        "matching_pooling": "softmin",
    },
}
# Relevance-objective search (`relevance` grid): loss forms, each at three weights over a decade (the MSE of cosines
# is ~0.03 at weight 1, two orders below the contrastive loss, so its weights reach higher).
RELEVANCE_LOSS_WEIGHTS: dict[str, tuple[float, ...]] = {
    "mse": (1.0, 3.0, 10.0),
    "zscore_mse": (0.3, 1.0, 3.0),
    "kl": (0.3, 1.0, 3.0),
}
# The relevance settings every run trains with unless its row overrides them: the tiny preset's when the grids were
# first run, pinned here so that a change of the config defaults does not move the published grids or their cache.
TINY_RELEVANCE_SETTINGS = {
    "relevance_loss": "mse",
    "relevance_loss_weight": 1.0,
    "relevance_tokens": "all",
    "decoder_num_layers": 1,
}
# Targets of the search: the best-localised relevance of docs/RESULTS.md section 7.
SEARCH_RELEVANCE_METHOD = "maskclip"
# Candidates the matching head re-scores per query in the matching ablation's re-ranking evaluation.
RERANK_TOP_K = 16
RETRIEVAL_KEYS = (
    "test_t2v_r1",
    "test_t2v_r5",
    "test_t2v_meanr",
    "compositional_t2v_r1",
    "compositional_t2v_r5",
    "compositional_t2v_meanr",
)
FINETUNE_KEYS = ("qa_accuracy", "caption_cider")
# Frames (with captions) per teacher training step.
TEACHER_BATCH_SIZE = 64


@dataclass
class Settings:
    """Everything shared by the runs of one grid (data, teacher, optimisation)."""

    steps: int = 100
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.1
    # Frames per clip seen by the student and the teacher (evenly subsampled from the benchmark's 8).
    num_frames: int = 4
    num_train: int = 1000
    num_test: int = 100
    num_compositional: int = 100
    synthetic_seed: int = 0
    teacher_steps: int = 300
    teacher_train_clips: int = 1000
    teacher_eval_clips: int = 200
    # Fine-tuning (QA and captioning) after pretraining; 0 disables it.
    finetune_steps: int = 0
    finetune_train_clips: int = 512
    finetune_eval_clips: int = 128
    # Matching grid: retrieval fine-tuning steps (contrastive + matching, unmasked videos) before re-ranking is
    # evaluated again, the protocol under which UMT / BLIP re-rank; 0 disables it.
    rerank_finetune_steps: int = 0
    # Default masking / objective of the window and objective ablations (ClusterSTM's).
    default_strategy: str = "cluster"
    default_ratio: float = 0.75
    # VTM and MLM are switched off in every run (they do not enter zero-shot retrieval and would double the CPU
    # cost); the contrastive loss and the teacher-driven losses under study are what the runs differ in.
    matching_loss_weight: float = 0.0
    mlm_loss_weight: float = 0.0


@dataclass(frozen=True)
class RunSpec:
    """One pretraining run."""

    mask_strategy: str
    mask_ratio: float
    relevance_window_size: int = 3
    objective: str = "contrastive+relevance (ClusterSTM)"
    seed: int = 0
    # How the teacher's relevance targets are read (`--relevance_method` of pretraining).
    relevance_method: str = "window"
    # Student config settings of the relevance objective (`relevance_loss`, `relevance_loss_weight`,
    # `relevance_tokens`, `decoder_num_layers`) as sorted (name, value) pairs; applied after the objective's weights.
    config_overrides: tuple[tuple[str, Any], ...] = ()
    # Train from a target cache the teacher wrote once (`--teacher_targets`) instead of the online teacher.
    cached_targets: bool = False
    # Pretraining steps of this run when not the grid's (the equal-time comparison).
    steps: int | None = None


# Settings added after runs were cached that do not shape the pretraining: never part of a run's key.
LATER_SETTINGS = ("rerank_finetune_steps",)
# Fields added to `RunSpec` after runs were cached: left out of the cache key at their defaults, so those runs stay.
LATER_SPEC_FIELDS = ("config_overrides", "cached_targets", "steps")


@dataclass
class Grid:
    """The runs of one ablation: `groups` maps a row label to its runs over seeds."""

    name: str
    title: str
    groups: dict[str, list[RunSpec]] = field(default_factory=dict)


def build_grid(
    name: str,
    settings: Settings,
    seeds: Sequence[int],
    quick: bool,
    ratios: Sequence[float],
    strategies: Sequence[str] | None = None,
    relevance_center: tuple[tuple[str, Any], ...] | None = None,
    equal_time_steps: int | None = None,
) -> Grid:
    """The runs of ablation `name` (one of `ABLATIONS`). `relevance_center`: the relevance settings around which the
    `relevance` grid varies tokens and decoder depth (and which `equal_time` compares); `equal_time_steps`: the
    steps the cached-target relevance run gets in the time of the grid's steps of online UMT alignment."""
    default = RunSpec(settings.default_strategy, settings.default_ratio)
    if name == "masking":
        grid = Grid(name, "Masking strategy x mask ratio (objective: contrastive + relevance, 3x3 window)")
        if strategies is None:
            strategies = ("cluster", "random") if quick else STRATEGIES
        for ratio in ratios:
            for strategy in strategies:
                grid.groups[f"{strategy} @ {ratio:g}"] = [
                    replace(default, mask_strategy=strategy, mask_ratio=ratio, seed=s) for s in seeds
                ]
    elif name == "window":
        # With --relevance_center, the windows are compared under that relevance loss (its 3x3 row is the relevance
        # grid's "<center>, window targets" run).
        relevance = "" if relevance_center is None else f", {relevance_label(relevance_center)}"
        grid = Grid(
            name,
            f"Relevance window (cluster masking @ {settings.default_ratio:g}, contrastive + relevance{relevance})",
        )
        base = default if relevance_center is None else replace(default, config_overrides=relevance_center)
        for window in (1, 3) if quick else (1, 3, 5):
            grid.groups[f"{window}x{window}"] = [replace(base, relevance_window_size=window, seed=s) for s in seeds]
    elif name == "objective":
        grid = Grid(name, f"Objective (cluster masking @ {settings.default_ratio:g}, 3x3 window)")
        objectives = list(OBJECTIVES)[::2] if quick else list(OBJECTIVES)
        for objective in objectives:
            grid.groups[objective] = [replace(default, objective=objective, seed=s) for s in seeds]
        # The same relevance objective on localised targets (docs/RESULTS.md section 7: MaskCLIP / ClearCLIP read the
        # teacher's last block so that its relevance falls on the named objects).
        for method in ("maskclip",) if quick else RELEVANCE_METHODS:
            grid.groups[f"contrastive+relevance ({method} targets)"] = [
                replace(default, relevance_method=method, seed=s) for s in seeds
            ]
    elif name == "matching":
        grid = Grid(
            name,
            f"Video-text matching (cluster masking @ {settings.default_ratio:g}, contrastive + relevance + matching): "
            f"negatives, matching loss and re-ranking of the top {RERANK_TOP_K}",
        )
        for objective in MATCHING_OBJECTIVES:
            grid.groups[objective] = [replace(default, objective=objective, seed=s) for s in seeds]
    elif name == "relevance":
        grid = Grid(
            name,
            f"Relevance objective search (cluster masking @ {settings.default_ratio:g}, 3x3 window, "
            f"{SEARCH_RELEVANCE_METHOD} targets): loss form x weight, then tokens and decoder depth around the best",
        )
        alignment = "contrastive+alignment (UMT)"
        grid.groups[alignment] = [replace(default, objective=alignment, seed=s) for s in seeds]
        grid.groups["contrastive+relevance+alignment"] = [
            replace(default, objective="contrastive+relevance+alignment", seed=s) for s in seeds
        ]
        search = replace(default, relevance_method=SEARCH_RELEVANCE_METHOD)
        forms = {"mse": (1.0, 10.0), "zscore_mse": (1.0,)} if quick else RELEVANCE_LOSS_WEIGHTS
        for loss, weights in forms.items():
            for weight in weights:
                overrides = relevance_overrides(loss, weight)
                grid.groups[relevance_label(overrides)] = [
                    replace(search, config_overrides=overrides, seed=s) for s in seeds
                ]
        if relevance_center is not None:
            variants = [{"relevance_tokens": "masked"}, {"relevance_tokens": "visible"}, {"decoder_num_layers": 2}]
            for variant in variants[:1] if quick else variants:
                overrides = relevance_overrides(**{**TINY_RELEVANCE_SETTINGS, **dict(relevance_center), **variant})
                grid.groups[relevance_label(overrides)] = [
                    replace(search, config_overrides=overrides, seed=s) for s in seeds
                ]
            # The same settings on Algorithm III's window-pooled targets (which `relevance_method` to default to).
            grid.groups[f"{relevance_label(relevance_center)}, window targets"] = [
                replace(default, config_overrides=relevance_center, seed=s) for s in seeds
            ]
    elif name == "equal_time":
        if relevance_center is None or equal_time_steps is None:
            raise ValueError("The equal_time ablation needs --relevance_center (and its calibrated steps).")
        grid = Grid(
            name,
            f"Equal wall-clock (cluster masking @ {settings.default_ratio:g}, 3x3 window): UMT alignment with the "
            f"online teacher for {settings.steps} steps vs relevance reconstruction ({relevance_label(relevance_center)}"
            f") from cached targets for the {equal_time_steps} steps that take the same time on this machine",
        )
        alignment = "contrastive+alignment (UMT)"
        grid.groups[f"alignment, online teacher, {settings.steps} steps"] = [
            replace(default, objective=alignment, seed=s) for s in seeds
        ]
        relevance = replace(default, relevance_method=SEARCH_RELEVANCE_METHOD, config_overrides=relevance_center)
        grid.groups[f"relevance, online teacher, {settings.steps} steps"] = [replace(relevance, seed=s) for s in seeds]
        grid.groups[f"relevance, cached targets, {equal_time_steps} steps"] = [
            replace(relevance, cached_targets=True, steps=equal_time_steps, seed=s) for s in seeds
        ]
    else:
        raise ValueError(f"Unknown ablation {name!r}; expected one of {ABLATIONS} or 'all'.")
    return grid


def relevance_overrides(
    relevance_loss: str, relevance_loss_weight: float, relevance_tokens: str = "all", decoder_num_layers: int = 1
) -> tuple[tuple[str, Any], ...]:
    """A relevance configuration as `RunSpec.config_overrides`: the settings that differ from the tiny student's
    (so that its own configuration is the same run, and the same cache entry, as in the other grids)."""
    settings = {
        "relevance_loss": relevance_loss,
        "relevance_loss_weight": float(relevance_loss_weight),
        "relevance_tokens": relevance_tokens,
        "decoder_num_layers": int(decoder_num_layers),
    }
    return tuple(sorted((k, v) for k, v in settings.items() if v != TINY_RELEVANCE_SETTINGS[k]))


def relevance_label(overrides: tuple[tuple[str, Any], ...]) -> str:
    """`"zscore_mse x1, all tokens, decoder 1"` for a relevance configuration."""
    c = {**TINY_RELEVANCE_SETTINGS, **dict(overrides)}
    return (
        f"{c['relevance_loss']} x{c['relevance_loss_weight']:g}, {c['relevance_tokens']} tokens, "
        f"decoder {c['decoder_num_layers']}"
    )


def parse_relevance_center(text: str) -> tuple[tuple[str, Any], ...]:
    """`LOSS:WEIGHT[:TOKENS[:DEPTH]]` (e.g. `zscore_mse:1`) as `RunSpec.config_overrides`."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 4 or parts[0] not in RELEVANCE_LOSS_WEIGHTS:
        raise argparse.ArgumentTypeError(
            f"--relevance_center {text!r}: expected LOSS:WEIGHT[:TOKENS[:DEPTH]] with LOSS in {list(RELEVANCE_LOSS_WEIGHTS)}"
        )
    tokens = parts[2] if len(parts) > 2 else "all"
    if tokens not in ("all", "masked", "visible"):
        raise argparse.ArgumentTypeError(f"--relevance_center {text!r}: TOKENS must be all, masked or visible")
    try:
        return relevance_overrides(parts[0], float(parts[1]), tokens, int(parts[3]) if len(parts) > 3 else 1)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--relevance_center {text!r}: {error}") from None


# ------------------------------------------------------------------------------------------------------------ assets
@dataclass
class Assets:
    """What every run shares: the teacher's folder, the student's init folder (config + processor), the data."""

    teacher_dir: Path
    init_dir: Path
    processor: Any
    # The training clips (`video` uint8 (T, H, W, 3) already subsampled to `Settings.num_frames`, `caption`), fed to
    # the product's `run_pretraining` as an in-memory dataset.
    train_dataset: Any
    eval_videos: dict[str, np.ndarray]
    eval_tokens: dict[str, dict[str, torch.Tensor]]
    teacher_info: dict[str, Any]


def _digest(payload: Any) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepare_assets(settings: Settings, work_dir: Path) -> Assets:
    """Trains (or loads the cached) teacher, writes the student's init folder, generates and tokenises the data."""
    from clusterstm.data.synthetic import SyntheticVideoTextConfig, generate_synthetic_benchmark
    from clusterstm.hub.export import init_checkpoint
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
    from clusterstm.training.teacher_training import TeacherTrainingArguments, run_teacher_training

    work_dir.mkdir(parents=True, exist_ok=True)
    # Every setting that shapes the teacher is pinned here (not left to the library defaults), and only these key
    # the cache, so options added to `TeacherTrainingArguments` later (a progress bar...) keep the same teacher.
    teacher_settings = {
        "max_steps": settings.teacher_steps,
        "per_device_train_batch_size": TEACHER_BATCH_SIZE,
        "learning_rate": 1e-3,
        "weight_decay": 0.05,
        "seed": 0,
        "image_size": 64,
        "num_frames": 8,
        "patch_size": 8,
        "hidden_size": 64,
        "projection_dim": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_text_length": 32,
        "num_train_clips": settings.teacher_train_clips,
        "num_eval_clips": settings.teacher_eval_clips,
        "synthetic_seed": settings.synthetic_seed,
    }
    teacher_dir = work_dir / f"teacher-{_digest(teacher_settings)}"
    if not (teacher_dir / "teacher_results.json").is_file():
        logger.info("training the shared teacher (%d steps) into %s", settings.teacher_steps, teacher_dir)
        run_teacher_training(TeacherTrainingArguments(output_dir=str(teacher_dir), **teacher_settings))
    teacher_results = json.loads((teacher_dir / "teacher_results.json").read_text())

    init_dir = work_dir / "student-init"
    if not (init_dir / "config.json").is_file():
        # `clusterstm init` (falls back to a plain config + processor folder while the heads are being merged).
        init_checkpoint("tiny", init_dir)
    processor = ClusterSTMProcessor.from_pretrained(init_dir)

    data_config = SyntheticVideoTextConfig(
        num_train=settings.num_train,
        num_val=0,
        num_test=settings.num_test,
        num_compositional=settings.num_compositional,
        seed=settings.synthetic_seed,
    )
    data = generate_synthetic_benchmark(data_config, splits=("train", "test", "compositional"))

    def tokens(tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
        out = tokenizer(captions, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    stride = max(1, data_config.num_frames // settings.num_frames)
    eval_videos = {
        split: np.asarray(data[split]["video"])[:, ::stride][:, : settings.num_frames]
        for split in ("test", "compositional")
    }
    eval_tokens = {
        split: tokens(processor.tokenizer, list(data[split]["caption"])) for split in ("test", "compositional")
    }
    teacher_info = {
        "steps": settings.teacher_steps,
        "train_clips": settings.teacher_train_clips,
        "train_runtime_s": teacher_results.get("train_runtime"),
        "val_frame_to_caption_r1": teacher_results.get("eval_after", {}).get("image_to_text_R@1"),
        "val_caption_to_frame_r1": teacher_results.get("eval_after", {}).get("text_to_image_R@1"),
    }
    return Assets(
        teacher_dir=teacher_dir,
        init_dir=init_dir,
        processor=processor,
        train_dataset=_clips_dataset(
            np.asarray(data["train"]["video"])[:, ::stride][:, : settings.num_frames], list(data["train"]["caption"])
        ),
        eval_videos=eval_videos,
        eval_tokens=eval_tokens,
        teacher_info=teacher_info,
    )


def _clips_dataset(videos: np.ndarray, captions: list[str]) -> Any:
    """An in-memory `datasets.Dataset` of `video` (uint8, formatted as numpy) and `caption` rows."""
    from datasets import Array4D, Dataset, Features, Value

    features = Features({"video": Array4D(shape=videos.shape[1:], dtype="uint8"), "caption": Value("string")})
    dataset = Dataset.from_dict({"video": videos, "caption": captions}, features=features)
    dataset.set_format("numpy", columns=["video"], output_all_columns=True, dtype=np.uint8)
    return dataset


def pixel_values(videos: np.ndarray) -> torch.Tensor:
    """uint8 `(B, T, H, W, 3)` -> `(B, T, 3, H, W)` normalised with the CLIP mean/std, which is what both the
    student's `ClusterSTMVideoProcessor` and the teacher's `CLIPImageProcessor` produce for 64x64 frames (no resize)."""
    from clusterstm.training.teacher_training import normalize_frames

    return normalize_frames(videos)


# ------------------------------------------------------------------------------------------------------------ runs
def build_student(spec: RunSpec, settings: Settings, assets: Assets):
    """A freshly initialised tiny `ClusterSTMForPreTraining` (seeded by `spec.seed`) with the run's settings."""
    from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining

    config = ClusterSTMConfig.from_pretrained(assets.init_dir)
    for key, value in TINY_RELEVANCE_SETTINGS.items():
        setattr(config, key, value)
    config.relevance_window_size = spec.relevance_window_size
    config.contrastive_loss_weight = 1.0
    config.matching_loss_weight = settings.matching_loss_weight
    config.mlm_loss_weight = settings.mlm_loss_weight
    for key, value in {**OBJECTIVES, **MATCHING_OBJECTIVES}[spec.objective].items():
        setattr(config, key, value)
    for key, value in spec.config_overrides:
        setattr(config, key, value)
    torch.manual_seed(spec.seed)
    return ClusterSTMForPreTraining(config)


def zero_shot_retrieval(model, assets: Assets, batch_size: int = 64) -> dict[str, float]:
    """Zero-shot text->video (and video->text) R@1/R@5 in percent on the test and compositional splits, ranked by
    the package's one evaluator (`clusterstm.tasks.retrieval`, ties count against the ground truth)."""
    from clusterstm.tasks.retrieval import zero_shot_retrieval as evaluate

    results = {}
    for split, videos in assets.eval_videos.items():
        tokens = assets.eval_tokens[split]
        batches = (
            {
                "pixel_values": pixel_values(videos[start : start + batch_size]),
                "input_ids": tokens["input_ids"][start : start + batch_size],
                "attention_mask": tokens["attention_mask"][start : start + batch_size],
            }
            for start in range(0, len(videos), batch_size)
        )
        metrics = evaluate(model, batches)
        # Mean rank moves long before R@1 does in short runs, so it is the most sensitive of these.
        for key in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_meanr", "v2t_r1"):
            results[f"{split}_{key}"] = float(metrics[key])
        results[f"{split}_chance_r1"] = metrics["chance_r1"]
    return results


def pretrain(spec: RunSpec, settings: Settings, assets: Assets, run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Pretrains one student through the product's loop (`run_pretraining` on the in-memory training clips: the
    teacher stage, one mask per step through `build_mask`, the student, AdamW with a cosine schedule); returns the
    trained model and its training statistics."""
    from clusterstm.hub.export import save_checkpoint
    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining
    from clusterstm.training.pretraining import PretrainingArguments, run_pretraining

    # The run's student (its objective, window and seeded initialisation) is an init folder the product loop loads.
    init_dir = save_checkpoint(build_student(spec, settings, assets), run_dir / "student-init", assets.processor)
    output_dir = run_dir / "pretrain"
    steps = spec.steps or settings.steps
    train_dataset = assets.train_dataset
    targets: dict[str, Any] = {"teacher_name_or_path": str(assets.teacher_dir)}
    if spec.cached_targets:
        cache_dir = target_cache(spec, assets, init_dir)
        targets = {"teacher_targets": str(cache_dir)}
        train_dataset = keyed(train_dataset)
    args = PretrainingArguments(
        model_name_or_path=str(init_dir),
        output_dir=str(output_dir),
        **targets,
        dataset_name="synthetic",  # described for the record; the clips are `assets.train_dataset`
        max_steps=steps,
        per_device_train_batch_size=min(settings.batch_size, len(assets.train_dataset)),
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_ratio=settings.warmup_ratio,
        mask_strategy=spec.mask_strategy,
        mask_ratio=spec.mask_ratio,
        relevance_method=spec.relevance_method,
        # The data order and the masks' generators depend on the seed only (not on the strategy), so all strategies
        # see the same batches.
        seed=spec.seed,
        frame_sampling="uniform",
        report_to="jsonl",
        logging_steps=1,
        dataloader_num_workers=0,
    )
    results = run_pretraining(args, train_dataset=train_dataset)
    log = [json.loads(line) for line in (output_dir / "logs" / "train_log.jsonl").read_text().splitlines() if line]
    tail = log[-max(1, steps // 10) :]
    parts = sorted({key for record in tail for key in record if key.endswith("_loss")})
    stats = {
        "train_runtime_s": results["train_runtime"],
        "train_loss_final": float(np.mean([record["loss"] for record in tail])),
        **{f"{key}_final": float(np.mean([record[key] for record in tail if key in record])) for key in parts},
    }
    if spec.cached_targets:
        # The teacher's one pass over the clips that the cache cost (paid once, shared by every cached run).
        stats["cache_build_s"] = json.loads((Path(args.teacher_targets) / "cache_build.json").read_text())["seconds"]
    if not all(np.isfinite(v) for v in stats.values()) or results["nan_steps_skipped"]:
        raise RuntimeError(f"non-finite loss in {spec}: {stats}, {results['nan_steps_skipped']} steps skipped")
    return ClusterSTMForPreTraining.from_pretrained(output_dir, use_safetensors=True), stats


def keyed(dataset: Any) -> Any:
    """The training clips with a `video_id` column (`train-00000`...), which keys them in a target cache."""
    return dataset.add_column("video_id", [f"train-{i:05d}" for i in range(len(dataset))])


def target_cache(spec: RunSpec, assets: Assets, init_dir: Path) -> Path:
    """Writes (once; then reused) the teacher's targets for the training clips with the product's
    `write_teacher_targets` (`clusterstm precompute-targets`), for the run's window, relevance method and mask
    settings; the time it took is in the folder's `cache_build.json`."""
    from clusterstm.teacher.cache import PrecomputeTargetsArguments, write_teacher_targets

    settings = {
        "teacher": assets.teacher_dir.name,
        "clips": len(assets.train_dataset),
        "window": spec.relevance_window_size,
        "method": spec.relevance_method,
        "strategy": spec.mask_strategy,
        "ratio": spec.mask_ratio,
    }
    cache_dir = assets.teacher_dir.parent / f"targets-{_digest(settings)}"
    if not (cache_dir / "cache_build.json").is_file():
        stats = write_teacher_targets(
            PrecomputeTargetsArguments(
                model_name_or_path=str(init_dir),
                teacher_name_or_path=str(assets.teacher_dir),
                output_dir=str(cache_dir),
                dataset_name="synthetic",  # for the record; the clips are the in-memory ones
                mask_strategy=spec.mask_strategy,
                mask_ratio=spec.mask_ratio,
                relevance_method=spec.relevance_method,
                device="cpu",
            ),
            dataset=keyed(assets.train_dataset),
        )
        (cache_dir / "cache_build.json").write_text(json.dumps(stats, indent=2) + "\n")
    return cache_dir


def rerank_retrieval(model, settings: Settings, assets: Assets, run_dir: Path) -> dict[str, float]:
    """Zero-shot retrieval on the test split through the product's evaluator (`run_finetuning` with evaluation only),
    ranked by the contrastive similarity alone and after the matching head re-scores the top `RERANK_TOP_K`, ordered
    by the matching probability (`reranked`, UMT) or by matching log-odds + similarity (`summed`, BLIP)."""
    from clusterstm.hub.export import save_checkpoint

    checkpoint = save_checkpoint(model, run_dir / "pretrained", assets.processor)
    return rerank_checkpoint(checkpoint, settings, run_dir)


def matching_separability(checkpoint: Path, assets: Assets) -> dict[str, float]:
    """How well the matching head tells a test caption's own clip from another: its match probability for the 100
    true pairs against one random other clip per caption (`random`) and against the clip the contrastive similarity
    ranks highest among the others (`hard`, the kind of candidate that re-ranking has to demote). Two readings, 0.5 =
    chance for both: `matching_win_*`, the share of captions whose own clip scores above that other clip (ties count
    half; per caption, which is what re-ranking needs), and `matching_auc_*`, the AUC over all (true pair, other pair)
    combinations across captions (also asks that scores be comparable between captions). Unmasked clips, the
    product's retrieval model (`ClusterSTMForVideoTextRetrieval.match_scores`)."""
    from clusterstm.models.modeling_clusterstm import ClusterSTMForVideoTextRetrieval

    model = ClusterSTMForVideoTextRetrieval.from_pretrained(checkpoint, use_safetensors=True).eval()
    tokens = assets.eval_tokens["test"]
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with torch.no_grad():
        videos, video_tokens = model.encode_videos(pixel_values(assets.eval_videos["test"]), return_tokens=True)
        similarity = model.encode_texts(ids, mask) @ videos.T
        n = similarity.shape[0]
        shift = torch.randint(1, n, (n,), generator=torch.Generator().manual_seed(0))
        random_other = (torch.arange(n) + shift) % n
        hardest_other = similarity.fill_diagonal_(-torch.inf).argmax(dim=1)
        positive = model.match_scores(video_tokens, ids, mask)
        out = {}
        for name, others in (("random", random_other), ("hard", hardest_other)):
            negative = model.match_scores(video_tokens[others], ids, mask)
            out[f"matching_win_{name}"] = _win_rate(positive, negative).item()
            # the Mann-Whitney form of the AUC: every true pair against every other pair
            out[f"matching_auc_{name}"] = _win_rate(positive[:, None], negative[None]).item()
    return out


def _win_rate(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Share of (broadcast) comparisons where `positive` scores above `negative`, ties counting half."""
    return ((positive > negative).float() + 0.5 * (positive == negative).float()).mean()


def trainer_arguments(output_dir: Path, settings: Settings, train_steps: int, learning_rate: float, seed: int):
    """The `TrainingArguments` of the grids' fine-tuning stages: `train_steps` of cosine-scheduled training (0:
    evaluation only) on the CPU, no checkpoints, no logging."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        do_train=train_steps > 0,
        do_eval=True,
        max_steps=train_steps if train_steps > 0 else -1,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=learning_rate,
        warmup_steps=int(settings.warmup_ratio * train_steps),
        lr_scheduler_type="cosine",
        seed=seed,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
    )


def rerank_checkpoint(
    checkpoint: Path, settings: Settings, run_dir: Path, train_steps: int = 0, seed: int = 0, prefix: str = "rerank"
) -> dict[str, float]:
    """`rerank_retrieval` of a saved checkpoint (also fills in results cached before the `sum` fusion existed). With
    `train_steps`, the checkpoint is first fine-tuned for retrieval (`run_finetuning`, its contrastive and matching
    losses on unmasked clips) on `finetune_train_clips` training clips, then evaluated the same way."""

    from clusterstm.training.finetuning import DataArguments, ModelArguments, run_finetuning

    out = {}
    for index, (fusion, name) in enumerate((("matching", "reranked"), ("sum", "summed"))):
        train = train_steps > 0 and index == 0
        training_args = trainer_arguments(
            run_dir / prefix, settings, train_steps if train else 0, settings.learning_rate / 2, seed
        )
        metrics = run_finetuning(
            ModelArguments(
                task="retrieval",
                model_name_or_path=str(checkpoint),
                rerank_top_k=RERANK_TOP_K,
                rerank_fusion=fusion,
            ),
            DataArguments(
                dataset_name="synthetic",
                eval_split="test",
                synthetic_seed=settings.synthetic_seed,
                synthetic_num_train=settings.finetune_train_clips,
                synthetic_num_eval=settings.num_test,
            ),
            training_args,
        )
        if train:
            # The fusion "sum" is evaluated on the fine-tuned model, saved by the Trainer run above.
            checkpoint = run_dir / prefix
        out[f"{prefix}_eval_t2v_r1_contrastive"] = float(metrics["eval_t2v_r1"])
        out[f"{prefix}_eval_v2t_r1_contrastive"] = float(metrics["eval_v2t_r1"])
        out[f"{prefix}_eval_t2v_r1_{name}"] = float(metrics["eval_rerank_t2v_r1"])
        out[f"{prefix}_eval_v2t_r1_{name}"] = float(metrics["eval_rerank_v2t_r1"])
    return out


def finetune(model, settings: Settings, assets: Assets, run_dir: Path, seed: int) -> dict[str, float]:
    """Identical short fine-tuning on QA and captioning with `run_finetuning`; test-split accuracy and CIDEr."""

    from clusterstm.hub.export import save_checkpoint
    from clusterstm.training.finetuning import DataArguments, ModelArguments, run_finetuning

    checkpoint = save_checkpoint(model, run_dir / "pretrained", assets.processor)
    results = {}
    for task, key, metric_suffix in (("qa", "qa_accuracy", "accuracy"), ("captioning", "caption_cider", "CIDEr")):
        output_dir = run_dir / task
        training_args = trainer_arguments(output_dir, settings, settings.finetune_steps, settings.learning_rate, seed)
        model_args = ModelArguments(task=task, model_name_or_path=str(checkpoint), caption_tokenizer="python")
        data_args = DataArguments(
            dataset_name="synthetic",
            eval_split="test",
            synthetic_seed=settings.synthetic_seed,
            synthetic_num_train=settings.finetune_train_clips,
            synthetic_num_eval=settings.finetune_eval_clips,
        )
        metrics = run_finetuning(model_args, data_args, training_args)
        # Exact key (per-question-type accuracies such as `eval_accuracy_colour` must not be picked up).
        by_name = {k.lower(): v for k, v in metrics.items()}
        name = f"eval_{metric_suffix}".lower()
        if name not in by_name:
            raise KeyError(f"{task}: no {name} in {sorted(metrics)}")
        results[key] = float(by_name[name])
    return results


# Settings of the fine-tuning stage: not part of a run's cache key (the pretraining does not depend on them); a
# cached run is fine-tuned afterwards when its recorded fine-tuning settings differ from the requested ones.
FINETUNE_SETTINGS = ("finetune_steps", "finetune_train_clips", "finetune_eval_clips", "rerank_finetune_steps")


def run_key(spec: RunSpec, settings: Settings) -> str:
    fields = asdict(spec)
    for name in LATER_SPEC_FIELDS:
        if fields[name] == RunSpec.__dataclass_fields__[name].default:
            del fields[name]
    # The pretraining's settings: fine-tuning ones at their defaults, so fine-tuning reuses the pretrained run.
    pretraining = asdict(replace(settings, **{name: getattr(Settings(), name) for name in FINETUNE_SETTINGS}))
    for name in LATER_SETTINGS:  # added after runs were cached, and not part of pretraining
        del pretraining[name]
    # "loop" keeps results of the earlier private training loop from being reused as product-loop results.
    payload = {"spec": fields, "settings": pretraining, "loop": "run_pretraining"}
    return f"{spec.mask_strategy}-{spec.mask_ratio:g}-w{spec.relevance_window_size}-s{spec.seed}-{_digest(payload)}"


def execute_run(spec: RunSpec, settings: Settings, assets: Assets, work_dir: Path) -> dict[str, Any]:
    """Runs (or loads the cached result of) one pretraining run + evaluation (+ fine-tuning, also of a cached run)."""
    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining

    run_dir = work_dir / "runs" / run_key(spec, settings)
    result_file = run_dir / "result.json"
    model = None
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        if "rerank_eval_t2v_r1_contrastive" in result and "rerank_eval_t2v_r1_summed" not in result:
            result.update(rerank_checkpoint(run_dir / "pretrained", settings, run_dir))
        if "rerank_eval_t2v_r1_contrastive" in result and "matching_win_hard" not in result:
            result.update(matching_separability(run_dir / "pretrained", assets))
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        model, stats = pretrain(spec, settings, assets, run_dir)
        result = {"spec": asdict(spec), **stats, **zero_shot_retrieval(model, assets)}
        if model.config.matching_loss_weight > 0:
            result.update(rerank_retrieval(model, settings, assets, run_dir))
            result.update(matching_separability(run_dir / "pretrained", assets))
        result["wall_time_s"] = time.perf_counter() - start
        logger.info(
            "%s: test R@1 %.1f, compositional R@1 %.1f (%.0f s)",
            run_dir.name,
            result["test_t2v_r1"],
            result["compositional_t2v_r1"],
            result["wall_time_s"],
        )
    if settings.rerank_finetune_steps > 0 and "rerank_eval_t2v_r1_contrastive" in result:
        tuned = {"steps": settings.rerank_finetune_steps, "clips": settings.finetune_train_clips}
        if result.get("ft_rerank_settings") != tuned:
            start = time.perf_counter()
            result.update(
                rerank_checkpoint(
                    run_dir / "pretrained", settings, run_dir, settings.rerank_finetune_steps, spec.seed, "ft_rerank"
                )
            )
            result["ft_rerank_runtime_s"] = time.perf_counter() - start
            result["ft_rerank_settings"] = tuned
    finetune_settings = {name: getattr(settings, name) for name in FINETUNE_SETTINGS[:3]}
    if settings.finetune_steps > 0 and result.get("finetune_settings") != finetune_settings:
        if model is None:
            model = ClusterSTMForPreTraining.from_pretrained(run_dir / "pretrain", use_safetensors=True)
        start = time.perf_counter()
        result.update(finetune(model, settings, assets, run_dir, spec.seed))
        result["finetune_runtime_s"] = time.perf_counter() - start
        result["finetune_settings"] = finetune_settings
        logger.info("%s: QA %.1f %%, CIDEr %.3f", run_dir.name, result["qa_accuracy"], result["caption_cider"])
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    if settings.finetune_steps == 0:
        # A grid without fine-tuning reports none (a cached run may carry some from another grid).
        result = {k: v for k, v in result.items() if k not in (*FINETUNE_KEYS, "finetune_runtime_s")}
    return result


def calibrate_equal_time(
    settings: Settings, assets: Assets, work_dir: Path, center: tuple[tuple[str, Any], ...]
) -> dict[str, Any]:
    """Steps of cached-target relevance training that take the time of `settings.steps` steps of online UMT
    alignment: both timed on this machine through `pretrain` (short runs, alternately, twice; the fastest per-step
    time of each), and stored in `work_dir` so that the grid's step count stays fixed when it is resumed."""
    steps = max(3, min(30, settings.steps // 10))
    key = _digest({"center": center, "settings": asdict(settings), "steps": steps})
    record_file = work_dir / f"equal_time_calibration-{key}.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    default = RunSpec(settings.default_strategy, settings.default_ratio, steps=steps)
    specs = {
        "alignment_online": replace(default, objective="contrastive+alignment (UMT)"),
        "relevance_cached": replace(
            default, relevance_method=SEARCH_RELEVANCE_METHOD, config_overrides=center, cached_targets=True
        ),
    }
    per_step: dict[str, list[float]] = {name: [] for name in specs}
    for _ in range(2):
        for name, spec in specs.items():
            with tempfile.TemporaryDirectory(dir=work_dir) as run_dir:
                _, stats = pretrain(spec, settings, assets, Path(run_dir))
            per_step[name].append(stats["train_runtime_s"] / steps)
    fastest = {name: min(times) for name, times in per_step.items()}
    record = {
        "calibration_steps": steps,
        "seconds_per_step": per_step,
        "equal_time_steps": round(settings.steps * fastest["alignment_online"] / fastest["relevance_cached"]),
        "machine": machine_description(),
    }
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def untrained_reference(settings: Settings, assets: Assets, seeds: Sequence[int]) -> dict[str, Any]:
    """Zero-shot retrieval of the randomly initialised students (the floor every run must beat)."""
    rows = []
    for seed in seeds:
        model = build_student(RunSpec(settings.default_strategy, settings.default_ratio, seed=seed), settings, assets)
        rows.append(zero_shot_retrieval(model, assets))
    return summarise(rows)


# ------------------------------------------------------------------------------------------------------------ report
# Two-sided 95 % quantiles of Student's t for 1-30 degrees of freedom (standard table values); the normal 1.96 beyond.
T_QUANTILE_975 = dict(
    enumerate(
        (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042),
        start=1,
    )
)  # fmt: skip


def ci95_half_width(values: np.ndarray) -> float:
    """Half-width of the 95 % t-interval of the mean of `values` (nan for fewer than two values)."""
    if len(values) < 2:
        return float("nan")
    return T_QUANTILE_975.get(len(values) - 1, 1.96) * float(values.std(ddof=1)) / float(np.sqrt(len(values)))


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample std (ddof=1; 0 for one seed), 95 % t-interval half-width, n and the per-seed values of every
    numeric metric."""
    out: dict[str, Any] = {"n": len(rows)}
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)]
    for key in keys:
        values = np.array([row[key] for row in rows], dtype=np.float64)
        out[key] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "ci95": ci95_half_width(values),
            "values": values.tolist(),
        }
    return out


def paired_differences(summary: dict[str, dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Every row minus the first, seed by seed (rows of one seed share the initialisation, data and batch order, so
    the pairing removes their variance): mean difference, its 95 % t-interval half-width, and whether the interval
    excludes zero."""
    labels = list(summary)
    base = np.array(summary[labels[0]][key]["values"])
    out = {}
    for label in labels[1:]:
        values = np.array(summary[label][key]["values"])
        if len(values) != len(base):
            continue
        diff = values - base
        half = ci95_half_width(diff)
        out[label] = {
            "mean": float(diff.mean()),
            "ci95": half,
            "resolved": bool(np.isfinite(half) and abs(diff.mean()) > half),
            "values": diff.tolist(),
        }
    return out


def _fmt(stat: dict[str, Any] | None, digits: int = 1) -> str:
    if not stat:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def write_report(
    grid: Grid,
    summary: dict[str, dict[str, Any]],
    reference: dict[str, Any],
    meta: dict[str, Any],
    output_dir: Path,
    plot_dir: Path,
    tag: str | None = None,
) -> dict[str, Path]:
    """`ablation_<name>.json`, `ablation_<name>.md` and `ablation_<name>.png`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_dir.mkdir(parents=True, exist_ok=True)
    stem = f"ablation_{grid.name}" + (f"_{tag}" if tag else "")
    json_path = output_dir / f"{stem}.json"
    md_path = output_dir / f"{stem}.md"
    png_path = plot_dir / f"{stem}.png"
    payload = {"ablation": grid.name, "title": grid.title, "meta": meta, "untrained": reference, "results": summary}
    if len(summary) > 1 and next(iter(summary.values()))["n"] > 1:
        keys = ("test_t2v_r1", "test_t2v_meanr", "compositional_t2v_r1", *_finetune_keys(summary))
        payload["paired_vs_first"] = {key: paired_differences(summary, key) for key in keys}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")

    has_finetune = any("qa_accuracy" in stats for stats in summary.values())
    header = "| variant | n | test R@1 | test R@5 | test mean rank | comp. R@1 | comp. R@5 | comp. mean rank |"
    rule = "|---|---|---|---|---|---|---|---|"
    if has_finetune:
        header += " QA acc. | CIDEr |"
        rule += "---|---|"
    header += " final loss | train s/run |"
    rule += "---|---|"
    lines = [
        f"# Ablation: {grid.name}",
        "",
        grid.title + ".",
        "",
        f"Mean ± sample std over seeds; zero-shot text->video R@k in percent and mean rank of the right video "
        f"(lower is better; chance: (num_videos + 1) / 2). {meta['description']}",
        "",
        header,
        rule,
    ]
    for label, stats in summary.items():
        row = f"| {label} | {stats['n']} | " + " | ".join(_fmt(stats.get(key)) for key in RETRIEVAL_KEYS) + " |"
        if has_finetune:
            row += f" {_fmt(stats.get('qa_accuracy'))} | {_fmt(stats.get('caption_cider'), 3)} |"
        row += f" {_fmt(stats.get('train_loss_final'), 3)} | {_fmt(stats.get('train_runtime_s'), 0)} |"
        lines.append(row)
    untrained = "| untrained (reference) | {} | {} | {} | {} | {} | {} | {} |".format(
        reference["n"], *(_fmt(reference.get(key)) for key in RETRIEVAL_KEYS)
    )
    if has_finetune:
        untrained += " – | – |"
    lines.append(untrained + " – | – |")
    lines += _paired_lines(summary)
    lines += _matching_lines(summary)
    chance = reference.get("test_chance_r1", {}).get("mean")
    lines += [
        "",
        f"Chance R@1: {chance:.2f} % (test), {reference.get('compositional_chance_r1', {}).get('mean', float('nan')):.2f} % "
        "(compositional).",
        "",
        f"Command: `{meta['command']}`  ",
        f"Wall time of this invocation: {meta['wall_time_s']:.0f} s; the {meta['num_runs']} runs took "
        f"{meta['sum_run_wall_time_s']:.0f} s in all (each measured when it ran, cached runs included) on "
        f"{meta['machine']}.",
        "",
        f"![{grid.name}](../{png_path.name})"
        if plot_dir.resolve() == output_dir.resolve().parent
        else f"Plot: `{png_path.name}`",
        "",
    ]
    md_path.write_text("\n".join(lines))
    plot(grid, summary, png_path)
    return {"json": json_path, "md": md_path, "png": png_path}


def _matching_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """For runs with the matching loss: its final value against the 1:2 prior's entropy, and test R@1 ranked by the
    contrastive similarity vs re-ranked by the matching head (same evaluator, same clips), zero-shot and (when run)
    after retrieval fine-tuning."""
    rows = {label: stats for label, stats in summary.items() if "matching_loss_final" in stats}
    if not rows:
        return []
    prior = -(np.log(1 / 3) / 3 + 2 * np.log(2 / 3) / 3)  # cross-entropy of always predicting P(match) = 1/3
    lines = [
        "",
        f"Matching: final matching loss (the 1:2 prior's entropy is {prior:.4f}; below it the head has learned "
        f"something) and test R@1 ranked by the contrastive similarity vs after re-ranking the top {RERANK_TOP_K} "
        "with the matching head (`run_finetuning --rerank_top_k`), ordered by the matching probability alone "
        "(`--rerank_fusion matching`, UMT) or by matching log-odds + contrastive similarity (`--rerank_fusion sum`, "
        "BLIP); zero-shot, and after retrieval fine-tuning where that column group is filled.",
    ]
    if any("matching_auc_hard" in stats for stats in rows.values()):
        lines += [
            "",
            "Separability (zero-shot, test): does the matching probability of each caption's own clip beat a random "
            "other clip, and the other clip the contrastive similarity ranks highest? Per caption: the share of "
            "captions where it does (what re-ranking needs); across captions: the AUC over all (true pair, other "
            "pair) combinations. 0.5 = chance.",
            "",
            "| variant | per caption, vs random clip | per caption, vs hardest clip | AUC vs random clip | AUC vs hardest clip |",
            "|---|---|---|---|---|",
        ]
        for label, stats in rows.items():
            keys = ("matching_win_random", "matching_win_hard", "matching_auc_random", "matching_auc_hard")
            lines.append(f"| {label} | " + " | ".join(_fmt(stats.get(key), 3) for key in keys) + " |")
    for prefix, title in (("rerank", "zero-shot"), ("ft_rerank", "after retrieval fine-tuning")):
        if not any(f"{prefix}_eval_t2v_r1_contrastive" in stats for stats in rows.values()):
            continue
        lines += [
            "",
            f"**{title}**",
            "",
            "| variant | matching loss (final) | t2v R@1 contrastive | re-ranked (matching) | re-ranked (sum) | "
            "v2t R@1 contrastive | re-ranked (matching) | re-ranked (sum) | t2v gain (sum), paired |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, stats in rows.items():
            cells = [
                _fmt(stats.get(f"{prefix}_eval_{d}_r1_{kind}"))
                for d in ("t2v", "v2t")
                for kind in ("contrastive", "reranked", "summed")
            ]
            base, summed = stats.get(f"{prefix}_eval_t2v_r1_contrastive"), stats.get(f"{prefix}_eval_t2v_r1_summed")
            gain = "n/a"
            if base and summed:
                diff = np.array(summed["values"]) - np.array(base["values"])
                gain = f"{diff.mean():+.1f} [±{ci95_half_width(diff):.1f}]"
            lines.append(
                f"| {label} | {_fmt(stats['matching_loss_final'], 4)} | " + " | ".join(cells) + f" | {gain} |"
            )
    return lines


# Columns of the paired comparison: (result key, column title, digits).
PAIRED_COLUMNS = (("test_t2v_r1", "test R@1 diff (points)", 1), ("test_t2v_meanr", "test mean rank diff", 1))
FINETUNE_PAIRED_COLUMNS = (("qa_accuracy", "QA acc. diff (points)", 1), ("caption_cider", "CIDEr diff", 3))


def _finetune_keys(summary: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """The fine-tuning metrics every row of `summary` carries (none when the grid ran without fine-tuning)."""
    return tuple(key for key in FINETUNE_KEYS if all(key in stats for stats in summary.values()))


def _paired_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The paired comparison table (every row against the first) for test R@1 and test mean rank, and for QA
    accuracy and CIDEr when the grid fine-tuned."""
    first = next(iter(summary))
    if summary[first]["n"] < 2 or len(summary) < 2:
        return []
    finetuned = _finetune_keys(summary)
    columns = [*PAIRED_COLUMNS, *(column for column in FINETUNE_PAIRED_COLUMNS if column[0] in finetuned)]
    diffs = {key: paired_differences(summary, key) for key, _, _ in columns}
    lines = [
        "",
        f"Paired differences against **{first}** (per seed: same initialisation, data and batches), mean [95 % "
        "t-interval]; `yes` when the interval excludes 0. The interval's half-width is the smallest difference "
        "the table resolves.",
        "",
        "| variant | " + " | ".join(f"{title} | resolved" for _, title, _ in columns) + " |",
        "|---|" + "---|---|" * len(columns),
    ]
    for label in diffs[columns[0][0]]:
        cells = []
        for key, _, digits in columns:
            diff = diffs[key][label]
            resolved = "yes" if diff["resolved"] else "no"
            cells.append(f"{diff['mean']:+.{digits}f} [±{diff['ci95']:.{digits}f}] | {resolved}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plot(grid: Grid, summary: dict[str, dict[str, Any]], path: Path) -> None:
    """Bar charts with std error bars: one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("test_t2v_r1", "test R@1 (%)"),
        ("test_t2v_r5", "test R@5 (%)"),
        ("test_t2v_meanr", "test mean rank (lower = better)"),
        ("compositional_t2v_r1", "compositional R@1 (%)"),
        ("compositional_t2v_meanr", "compositional mean rank"),
    ]
    if any("qa_accuracy" in stats for stats in summary.values()):
        panels += [("qa_accuracy", "QA accuracy (%)"), ("caption_cider", "CIDEr")]
    labels = list(summary)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    for axis, (key, title) in zip(axes[0], panels):
        means = [summary[label].get(key, {}).get("mean", np.nan) for label in labels]
        stds = [summary[label].get(key, {}).get("std", 0.0) for label in labels]
        axis.bar(range(len(labels)), means, yerr=stds, capsize=3, color=[colours(i % 10) for i in range(len(labels))])
        axis.set_xticks(range(len(labels)))
        axis.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        axis.set_title(title, fontsize=9)
    n = max(stats["n"] for stats in summary.values())
    fig.suptitle(f"ClusterSTM ablation: {grid.name} (mean ± std, n = {n} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_description() -> str:
    cores = os.cpu_count()
    return f"{platform.machine()} CPU, {cores} cores (shared with other jobs), torch {torch.__version__}, {torch.get_num_threads()} threads"


# ------------------------------------------------------------------------------------------------------------ main
def quick_settings() -> Settings:
    return Settings(
        steps=3,
        batch_size=8,
        num_train=32,
        num_test=16,
        num_compositional=16,
        teacher_steps=5,
        teacher_train_clips=32,
        teacher_eval_clips=16,
        finetune_train_clips=16,
        finetune_eval_clips=8,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ablation", choices=(*ABLATIONS, "all"), help="Which ablation to run.")
    parser.add_argument("--quick", action="store_true", help="Tiny grid (1 seed, few steps, small data), < 90 s.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Seeds (default 0 1 2; --quick: 0).")
    parser.add_argument("--steps", type=int, default=None, help="Pretraining steps per run.")
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="Mask ratios of the masking ablation.")
    parser.add_argument(
        "--strategies", nargs="+", choices=STRATEGIES, default=None, help="Masking ablation: strategies to compare."
    )
    parser.add_argument(
        "--tag", default=None, help="Suffix of the output names (ablation_<name>_<tag>.*), for extra grids."
    )
    parser.add_argument(
        "--relevance_center",
        type=parse_relevance_center,
        default=None,
        help="LOSS:WEIGHT[:TOKENS[:DEPTH]]: the relevance settings the `relevance` grid varies tokens and decoder "
        "depth around, the one `equal_time` compares with UMT alignment, and the one `window` compares windows "
        "under (e.g. zscore_mse:1).",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="Only these rows of the grid (exact labels), e.g. to confirm the best rows of a search at more seeds.",
    )
    parser.add_argument("--finetune_steps", type=int, default=None, help="QA/captioning fine-tuning steps (0: off).")
    parser.add_argument(
        "--rerank_finetune_steps",
        type=int,
        default=None,
        help="Matching grid: retrieval fine-tuning steps before re-ranking is evaluated again (0: off).",
    )
    parser.add_argument("--batch_size", type=int, default=None, help="Pretraining batch size.")
    parser.add_argument("--num_train", type=int, default=None, help="Synthetic training clips.")
    parser.add_argument("--output_dir", default="docs/benchmarks", help="Where the JSON and markdown tables go.")
    parser.add_argument("--plot_dir", default=None, help="Where the PNG plots go (default: the parent of output_dir).")
    parser.add_argument(
        "--work_dir",
        default=None,
        help="Cache of the teacher, the init folder and the single runs (default: a folder in the temp dir).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a CPU shared with other jobs, 2 threads measured ~7x slower than 1).",
    )
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.ratios is not None and not all(0.0 <= r < 1.0 for r in args.ratios):
        parser.error("--ratios must be in [0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Path]]:
    """Runs the requested ablations and writes their tables and plots; returns the written paths."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = quick_settings() if args.quick else Settings()
    overrides = {
        "steps": args.steps,
        "finetune_steps": args.finetune_steps,
        "rerank_finetune_steps": args.rerank_finetune_steps,
        "batch_size": args.batch_size,
        "num_train": args.num_train,
    }
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    ratios = args.ratios if args.ratios is not None else ([0.75] if args.quick else [0.75, 0.9])
    default_work = Path(tempfile.gettempdir()) / ("clusterstm-ablation-quick" if args.quick else "clusterstm-ablation")
    work_dir = Path(args.work_dir) if args.work_dir else default_work
    output_dir = Path(args.output_dir)
    plot_dir = Path(args.plot_dir) if args.plot_dir else output_dir.parent
    if args.ablation == "all":
        # The equal-time comparison needs the searched relevance configuration.
        names = tuple(name for name in ABLATIONS if name != "equal_time" or args.relevance_center is not None)
    else:
        names = (args.ablation,)
    command = "python benchmarks/ablation.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    total_start = time.perf_counter()
    assets = prepare_assets(settings, work_dir)
    reference = untrained_reference(settings, assets, seeds)
    written = {}
    for name in names:
        start = time.perf_counter()
        calibration = None
        if name == "equal_time" and args.relevance_center is not None:
            calibration = calibrate_equal_time(settings, assets, work_dir, args.relevance_center)
        grid = build_grid(
            name,
            settings,
            seeds,
            args.quick,
            ratios,
            args.strategies,
            relevance_center=args.relevance_center,
            equal_time_steps=calibration["equal_time_steps"] if calibration else None,
        )
        if args.rows:
            unknown = sorted(set(args.rows) - set(grid.groups))
            if unknown:
                raise SystemExit(f"--rows: {unknown} are not rows of the {name} grid; its rows: {list(grid.groups)}")
            grid.groups = {label: runs for label, runs in grid.groups.items() if label in args.rows}
        # Seed by seed over all rows, so that an interrupted grid has complete seeds to report (rerun it with
        # fewer --seeds: the finished runs come from the cache).
        results: dict[RunSpec, dict[str, Any]] = {}
        for index in range(len(seeds)):
            for specs in grid.groups.values():
                results[specs[index]] = execute_run(specs[index], settings, assets, work_dir)
        summary = {label: summarise([results[spec] for spec in specs]) for label, specs in grid.groups.items()}
        run_seconds = sum(row["wall_time_s"] for row in results.values())
        description = (
            f"Tiny ClusterSTM ({settings.steps} pretraining steps, batch {settings.batch_size}, lr "
            f"{settings.learning_rate:g}, cosine, {settings.num_train} synthetic training clips of "
            f"{settings.num_frames}x64x64 (every other frame of the benchmark's 8); "
            f"{settings.num_test} test / {settings.num_compositional} compositional clips); shared CLIP teacher "
            f"trained {settings.teacher_steps} steps. MLM off in every run; VTM off except in the matching ablation."
        )
        if settings.finetune_steps:
            description += (
                f" QA / captioning: {settings.finetune_steps} fine-tuning steps on {settings.finetune_train_clips} "
                f"clips with `run_finetuning`, evaluated on {settings.finetune_eval_clips} test clips "
                "(CIDEr-D, python tokenizer, no METEOR)."
            )
        meta = {
            "command": command,
            "description": description,
            "settings": asdict(settings),
            "seeds": list(seeds),
            "teacher": assets.teacher_info,
            # Includes cached runs, so a resumed grid reports only the time it spent itself.
            "wall_time_s": time.perf_counter() - start,
            # Sum of the single runs' own wall times (pretraining + evaluation), cached ones included.
            "sum_run_wall_time_s": run_seconds,
            "num_runs": sum(len(specs) for specs in grid.groups.values()),
            "machine": machine_description(),
            "quick": args.quick,
        }
        if calibration is not None:
            meta["equal_time_calibration"] = calibration
        written[name] = write_report(grid, summary, reference, meta, output_dir, plot_dir, args.tag)
        logger.info("%s written to %s", name, written[name]["md"])
    logger.info("total wall time %.0f s", time.perf_counter() - total_start)
    return written


if __name__ == "__main__":
    main()
