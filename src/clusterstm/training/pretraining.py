"""ClusterSTM pretraining with Accelerate: one code path from one CPU process to multi-GPU / multi-node.

`run_pretraining(PretrainingArguments(...))` is what `scripts/pretrain.py` and the `clusterstm demo` call. The loop:

- builds (or loads) the student from `--model_name_or_path`; the teacher is a separate stage: either a frozen teacher
  (`--teacher_name_or_path`, any CLIP/SigLIP checkpoint folder) run online through `compute_teacher_targets`, or a
  target cache (`--teacher_targets`, written by `clusterstm precompute-targets`) read with no teacher loaded;
- builds every step's video mask once, through `masking_clusterstm.build_mask`, and passes it as `bool_masked_pos`;
- streams video-text pairs through worker processes that decode with PyAV;
- trains with AdamW + a warmup/cosine schedule, gradient accumulation, optional mixed precision and
  gradient checkpointing;
- writes crash-safe checkpoints (`checkpoint-{step}`, renamed into place only once complete) that resume exactly:
  model, optimizer, scheduler, data position and step, so a SIGKILLed and resumed run ends with the same weights
  as an uninterrupted one;
- draws every random mask from a generator seeded by (seed, step, index of the sample in the global batch), so masks
  do not depend on the number of processes;
- stops (or skips the step) on a non-finite loss, before it can reach the weights;
- writes `train_results.json` and a `save_pretrained` checkpoint (student + processor) at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from torch.utils.data import DataLoader, Sampler
from transformers import HfArgumentParser, get_scheduler

from ..data.corpus import build_train_corpus as _build_corpus
from ..data.corpus import corpus_parameters, derive_seed

# The strategy names and the one check of the masking settings live next to the mask builder (shared with the cache).
from ..models.masking_clusterstm import MASK_FEATURES, validate_masking_arguments  # noqa: F401  (re-exported)
from ..models.masking_clusterstm import MASK_STRATEGY_NAMES as MASK_STRATEGIES

# The package's one retrieval evaluator (kept importable from here).
from ..tasks.retrieval import evaluate_zero_shot_retrieval  # noqa: F401

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# Written last into a checkpoint folder, just before it is renamed into place: a folder without it is incomplete.
CHECKPOINT_MARKER = "training_state.json"
TMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
TEACHER_LOSSES = ("relevance_loss_weight", "alignment_loss_weight")
# Written into output_dir: which teacher (or target cache) produced this run's targets, for `clusterstm visualize`.
TEACHER_RECORD = "teacher_config.json"


@dataclass
class PretrainingArguments:
    """Command-line arguments of `scripts/pretrain.py` (parsed with `HfArgumentParser`)."""

    model_name_or_path: str = field(
        metadata={"help": "A ClusterSTM checkpoint folder (from `clusterstm init` or a trained checkpoint)."}
    )
    output_dir: str = field(metadata={"help": "Where checkpoints, logs, train_results.json and the model go."})
    teacher_name_or_path: str | None = field(
        default=None, metadata={"help": "A CLIP- or SigLIP-like checkpoint folder used as the frozen teacher."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "`synthetic` (the embedded benchmark, no download), a `save_to_disk` folder, or any local folder "
            "or Hub id `datasets.load_dataset` reads (e.g. a videofolder with metadata.jsonl). See docs/DATA_FORMATS.md."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration name passed to `datasets.load_dataset` with --dataset_name."}
    )
    train_split_name: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Annotations (.jsonl/.json, .csv, .parquet; one row per clip) or webdataset .tar shards given as a "
            "path, a glob or a brace pattern (shards/train-{000000..000127}.tar)."
        },
    )
    video_root: str | None = field(
        default=None,
        metadata={"help": "Folder relative video paths are resolved against (default: the annotation file's folder)."},
    )
    video_column: str = field(
        default="file_name",
        metadata={"help": "Column holding the video: a path, the file's bytes, or a {bytes, path} struct."},
    )
    caption_column: str = field(
        default="caption", metadata={"help": "Column holding the caption (webdataset: key of the json member)."}
    )
    video_path_template: str | None = field(
        default=None,
        metadata={"help": "Build each video path from its row, e.g. '{video_id}.mp4' (MSR-VTT csv/json files)."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the corpus (larger than memory or disk), split over processes and workers."},
    )
    shuffle_buffer_size: int = field(
        default=1000,
        metadata={"help": "--streaming: per-reader shuffle buffer (0: corpus order, resumed via state_dict)."},
    )
    num_train_clips: int | None = field(
        default=None, metadata={"help": "Synthetic benchmark: number of training clips (default: the benchmark's)."}
    )
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic benchmark's clips."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_text_length: int = field(default=32, metadata={"help": "Maximum caption length in tokens."})
    mask_strategy: str = field(
        default="cluster",
        metadata={"help": f"Video token masking of every training step, one of {MASK_STRATEGIES}."},
    )
    mask_ratio: float = field(default=0.8, metadata={"help": "Fraction of tokens dropped per frame, in [0, 1)."})
    dc_ratio: float = field(
        default=0.02, metadata={"help": "Cluster masking: quantile of inter-frame distances used as density cut-off."}
    )
    dpc_k: int = field(default=5, metadata={"help": "Cluster masking: neighbours of the DPC-KNN local density."})
    mask_features: str = field(
        default="teacher",
        metadata={
            "help": "Cluster masking features: `teacher` (its patch tokens; the student's patch embeddings when no "
            "teacher is loaded) or `patch` (the student's detached patch embeddings)."
        },
    )
    teacher_targets: str | None = field(
        default=None,
        metadata={
            "help": "A target cache folder from `clusterstm precompute-targets`: train from it with no teacher loaded."
        },
    )
    max_steps: int = field(
        default=-1, metadata={"help": "Total optimizer steps; overrides --num_train_epochs if > 0."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Number of epochs when --max_steps is not set."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of AdamW (UMT: 1e-4)."})
    weight_decay: float = field(
        default=0.02, metadata={"help": "AdamW weight decay (UMT: 0.02); not on biases/norms."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables clipping)."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "transformers scheduler name (cosine, linear...)."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps (overrides --warmup_ratio if > 0)."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a fraction of the total steps."})
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16 (bf16 recommended)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save a resumable checkpoint-{step} every N optimizer steps."}
    )
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the N newest checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint-{step} folder, or `latest` (newest complete one in output_dir)."}
    )
    seed: int = field(
        default=42,
        metadata={"help": "Seed of the data order, the masks and dropout (the weights come from the checkpoint)."},
    )
    report_to: str = field(default="jsonl", metadata={"help": "tensorboard, jsonl, all or none."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss and throughput every N optimizer steps."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "Worker processes decoding videos with PyAV."})
    skip_bad_samples: bool = field(
        default=False,
        metadata={"help": "Replace unreadable videos by another sample and count them, instead of stopping."},
    )
    nan_policy: str = field(
        default="stop", metadata={"help": "On a non-finite loss: `stop` (error naming the step) or `skip` the step."}
    )
    frame_sampling: str = field(
        default="uniform",
        metadata={"help": "uniform (middle frame of each segment) or random (seeded per sample and epoch)."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final checkpoint to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository id for --push_to_hub."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})

    def __post_init__(self) -> None:
        validate_pretraining_arguments(self)


def validate_pretraining_arguments(args: PretrainingArguments) -> None:
    """Raises `ValueError` naming the flag for every inconsistent or out-of-range argument."""
    if (args.dataset_name is None) == (args.train_file is None):
        raise ValueError("Pass exactly one of --dataset_name (synthetic, a dataset folder or Hub id) or --train_file.")
    if args.train_file is not None:
        from ..data.sources import builder_for_file, expand_braces

        builder_for_file(expand_braces(args.train_file)[0])  # raises naming the supported formats
    if args.shuffle_buffer_size < 0:
        raise ValueError(f"--shuffle_buffer_size must be >= 0, got {args.shuffle_buffer_size}.")
    validate_masking_arguments(args)
    if args.teacher_targets is not None:
        if args.teacher_name_or_path is not None:
            raise ValueError("Pass --teacher_targets (a target cache) or --teacher_name_or_path (online), not both.")
        if args.frame_sampling != "uniform":
            raise ValueError(
                "--teacher_targets needs --frame_sampling uniform: cached targets belong to fixed frames, randomly "
                "sampled frames would not match them (see docs/TEACHER_TARGETS.md)."
            )
        if args.skip_bad_samples:
            raise ValueError(
                "--teacher_targets cannot be combined with --skip_bad_samples: a replaced clip would be paired with "
                "the targets of the clip it replaces."
            )
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ValueError("Set --max_steps > 0 or --num_train_epochs > 0.")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.per_device_train_batch_size < 2:
        # The contrastive loss needs negatives; one video per process still works across processes, but a
        # one-process run would have none.
        logger.warning(
            "--per_device_train_batch_size 1: the contrastive loss only sees negatives from other processes."
        )
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if args.weight_decay < 0:
        raise ValueError(f"--weight_decay must be >= 0, got {args.weight_decay}.")
    if args.warmup_steps < 0 or not 0.0 <= args.warmup_ratio < 1.0:
        raise ValueError("--warmup_steps must be >= 0 and --warmup_ratio in [0, 1).")
    if args.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"--mixed_precision must be no, bf16 or fp16, got {args.mixed_precision!r}.")
    if args.checkpointing_steps is not None and args.checkpointing_steps < 1:
        raise ValueError(f"--checkpointing_steps must be >= 1, got {args.checkpointing_steps}.")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise ValueError(f"--save_total_limit must be >= 1, got {args.save_total_limit}.")
    if args.report_to not in ("tensorboard", "jsonl", "all", "none"):
        raise ValueError(f"--report_to must be tensorboard, jsonl, all or none, got {args.report_to!r}.")
    if args.nan_policy not in ("stop", "skip"):
        raise ValueError(f"--nan_policy must be stop or skip, got {args.nan_policy!r}.")
    if args.frame_sampling not in ("uniform", "random"):
        raise ValueError(f"--frame_sampling must be uniform or random, got {args.frame_sampling!r}.")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    if args.streaming and args.dataset_name == "synthetic":
        raise ValueError("--streaming needs --train_file or a dataset folder / Hub id (not the synthetic benchmark).")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id.")
    if args.max_text_length < 4:
        raise ValueError(f"--max_text_length must be >= 4, got {args.max_text_length}.")


# ----------------------------------------------------------------------------------------------------------------
# Seeds and sampling
# ----------------------------------------------------------------------------------------------------------------


class EpochShuffleSampler(Sampler[int]):
    """
    A shuffling sampler whose order is a pure function of `(seed, epoch)`.

    Every process builds the same order (Accelerate then hands each process its share of every global batch), and a
    resumed run can rebuild the order of an interrupted epoch exactly; no global RNG is touched.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", self.epoch))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def mask_generators(seed: int, step: int, sample_offset: int, batch_size: int) -> list[torch.Generator]:
    """
    One generator per sample, seeded by (seed, optimizer step, index of the sample in the global batch).

    `sample_offset` is the index of this process' first sample of the micro-batch inside the step's global batch, so
    the same sample gets the same mask whatever the number of processes.
    """
    return [
        torch.Generator().manual_seed(derive_seed(seed, "mask", step, sample_offset + i)) for i in range(batch_size)
    ]


# ----------------------------------------------------------------------------------------------------------------
# Crash-safe checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    suffix = name[len(CHECKPOINT_PREFIX) :]
    return int(suffix) if suffix.isdigit() else None


def list_complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-{step}` folders of `output_dir` that carry the completion marker, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = _checkpoint_step(path)
        if step is not None and path.is_dir() and (path / CHECKPOINT_MARKER).is_file():
            found.append((step, path))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of `output_dir`, or None. Half-written checkpoints are never returned."""
    checkpoints = list_complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume_checkpoint(value: str | None, output_dir: str | os.PathLike) -> Path | None:
    """Turns `--resume_from_checkpoint` (a path or `latest`) into a complete checkpoint folder, or None."""
    if value is None:
        return None
    if value == "latest":
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            logger.warning(
                "--resume_from_checkpoint latest: no complete checkpoint in %s, starting from scratch.", output_dir
            )
        return latest
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint: {value!r} is not a folder.")
    if not (path / CHECKPOINT_MARKER).is_file():
        raise ValueError(
            f"--resume_from_checkpoint: {value!r} is incomplete (no {CHECKPOINT_MARKER}); use another one."
        )
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_training_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    training_state: dict[str, Any],
    stream_state: dict[str, Any] | None = None,
) -> Path:
    """
    Saves model, optimizer, scheduler and RNG states (`accelerator.save_state`) plus `training_state` as
    `output_dir/checkpoint-{step}`, atomically.

    Everything is written into a hidden temporary folder first; the main process then writes the marker file and
    renames the folder into place, so a crash at any point leaves either no `checkpoint-{step}` or a complete one.
    Must be called on every process.
    """
    root = Path(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f"{TMP_CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if stream_state is not None:
        # Streaming: each process' readers' positions (written before the marker, so complete with it).
        stream_state_file(tmp, accelerator.process_index).write_text(json.dumps(stream_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = tmp / CHECKPOINT_MARKER
        with open(marker, "w") as handle:
            json.dump({**training_state, "global_step": step}, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if final.exists():
            # Replacing an older copy of the same step (resumed from an earlier checkpoint): move it aside first.
            stale = root / f"{TMP_CHECKPOINT_PREFIX}{step}-old"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: str | os.PathLike, limit: int | None) -> None:
    """Deletes the oldest complete checkpoints beyond `limit` (main process only)."""
    if limit is None:
        return
    checkpoints = list_complete_checkpoints(output_dir)
    for path in checkpoints[: max(0, len(checkpoints) - limit)]:
        shutil.rmtree(path, ignore_errors=True)


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Deletes temporary folders left by a crash during a checkpoint write (main process only)."""
    root = Path(output_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_CHECKPOINT_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------------------


class MetricsLogger:
    """Writes scalar logs to `output_dir/logs/train_log.jsonl` and/or TensorBoard (main process only)."""

    def __init__(self, output_dir: str | os.PathLike, report_to: str, enabled: bool) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tensorboard = None
        if not enabled or report_to == "none":
            return
        log_dir = Path(output_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        if report_to in ("jsonl", "all"):
            # Appends: a resumed run continues the same file (steps after the last checkpoint may appear twice).
            self.jsonl = open(log_dir / "train_log.jsonl", "a")
        if report_to in ("tensorboard", "all"):
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(log_dir / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class NonFiniteLossError(RuntimeError):
    """Raised (with --nan_policy stop) when the loss is NaN or infinite, before it can reach the weights."""


# ----------------------------------------------------------------------------------------------------------------
# Model, data and optimizer
# ----------------------------------------------------------------------------------------------------------------


def load_student(model_name_or_path: str):
    """Loads `ClusterSTMForPreTraining` and its processor from a local folder."""
    from ..models.modeling_clusterstm import ClusterSTMForPreTraining
    from ..models.processing_clusterstm import ClusterSTMProcessor

    path = Path(model_name_or_path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--model_name_or_path {model_name_or_path!r} is not a ClusterSTM checkpoint folder (no config.json); "
            "create one with `clusterstm init --preset tiny --output_dir DIR`."
        )
    model = ClusterSTMForPreTraining.from_pretrained(path, use_safetensors=True)
    processor = ClusterSTMProcessor.from_pretrained(path)
    return model, processor


def build_optimizer(model: torch.nn.Module, args: PretrainingArguments) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases, norms, embeddings' scales or the temperature)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or name.startswith("teacher.") or ".teacher." in name:
            continue
        if parameter.ndim < 2 or "norm" in name.lower() or "logit_scale" in name or name.endswith(".bias"):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )


def _objective_losses(outputs: Any) -> dict[str, torch.Tensor]:
    """The per-objective scalar losses of a pretraining output (every `*_loss` field that is set)."""
    losses = {}
    for key in outputs.keys() if hasattr(outputs, "keys") else ():
        value = outputs[key]
        if key.endswith("_loss") and key != "loss" and isinstance(value, torch.Tensor) and value.numel() == 1:
            losses[key] = value
    return losses


def build_train_corpus(args: PretrainingArguments, num_frames: int, image_size: int):
    """The training corpus of `args` (built by `clusterstm.data.corpus.build_train_corpus`, shared with the cache)."""
    return _build_corpus(**corpus_parameters(args), num_frames=num_frames, image_size=image_size)


def build_train_dataset(args: PretrainingArguments, num_frames: int, image_size: int):
    """The training split's `datasets` object (see [`build_train_corpus`], which also returns its row resolver)."""
    return build_train_corpus(args, num_frames, image_size).dataset


def stream_batches(loader: Any, accelerator: Accelerator, tracker: Any) -> Iterator[dict[str, Any]]:
    """
    The batches of one streamed epoch, ending on every process as soon as one process' readers are exhausted (the
    contrastive all-gather needs every process in every step), moved to the device, each reader's position recorded
    in `tracker` as the batch is handed out.
    """
    from accelerate.utils import send_to_device

    iterator = iter(loader)
    while True:
        batch = next(iterator, None)
        if accelerator.num_processes > 1:
            available = torch.tensor([0 if batch is None else 1], device=accelerator.device)
            if int(accelerator.gather(available).min().item()) == 0:
                return
        elif batch is None:
            return
        tracker.update(batch.pop("stream_position", None))
        yield send_to_device(batch, accelerator.device)


def stream_state_file(checkpoint: str | os.PathLike, process_index: int) -> Path:
    """Where a checkpoint keeps the stream position of one process (each process reads its own share)."""
    return Path(checkpoint) / f"stream_state_{process_index}.json"


def _unused_parameters_probe(model: torch.nn.Module, batch: dict[str, torch.Tensor], forward: Any) -> list[str]:
    """Names of trainable parameters that get no gradient from one forward/backward (objectives weighted 0, heads
    the configuration never uses). DDP needs them frozen (`find_unused_parameters=True` would cost a graph walk per
    step and breaks with gradient checkpointing)."""
    outputs = forward(model, batch)
    outputs.loss.backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return unused


TEACHER_BATCH_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_pixel_values")


def build_step_mask(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    args: Any,
    step: int,
    sample_offset: int,
    teacher_features: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """
    The video mask of one training step, through `build_mask` (the one door for masks), or `None` without masking.

    Random strategies draw sample `i` from a generator seeded by `(seed, step, sample_offset + i)`, so masks do not
    depend on how the global batch is split over processes. Cluster masks cluster `teacher_features` when given
    (and `--mask_features teacher`), otherwise the student's own detached patch embeddings.
    """
    from ..models.masking_clusterstm import build_mask

    if args.mask_strategy == "none":
        return None
    inner = model.module if hasattr(model, "module") else model
    pixel_values = batch["pixel_values"]
    vision = inner.config.vision_config
    num_frames = (pixel_values.shape[1] if pixel_values.ndim == 5 else 1) // vision.tubelet_size
    num_patches = (pixel_values.shape[-2] // vision.patch_size) * (pixel_values.shape[-1] // vision.patch_size)
    features = None
    if args.mask_strategy == "cluster":
        features = teacher_features if args.mask_features == "teacher" else None
        if features is None:
            with torch.no_grad():
                tower = inner.clusterstm.vision_model
                features = tower.embeddings(tower._check_pixel_values(pixel_values))[1].detach()
    generators = None
    if args.mask_strategy in ("random", "tube", "attention"):
        generators = mask_generators(args.seed, step, sample_offset, pixel_values.shape[0])
    if cls_attention is not None:
        cls_attention = cls_attention.detach().float().cpu()
    return build_mask(
        args.mask_strategy,
        batch_size=pixel_values.shape[0],
        num_frames=num_frames,
        num_patches=num_patches,
        mask_ratio=args.mask_ratio,
        features=features,
        cls_attention=cls_attention,
        generator=generators,
        device=pixel_values.device,
        dc_ratio=args.dc_ratio,
        dpc_k=args.dpc_k,
    )


def pretraining_forward(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    args: Any,
    step: int,
    sample_offset: int,
    teacher: Any = None,
) -> Any:
    """
    One training step's forward of `ClusterSTMForPreTraining` (possibly DDP-wrapped) on a collated batch: the
    teacher stage, the mask, then the student.

    1. Targets missing from `batch` (`teacher_relevance`, and `teacher_patch_tokens` for alignment) are computed by
       `compute_teacher_targets` from `teacher` (online); a batch from a target cache already carries them (and the
       cached `bool_masked_pos` of teacher-driven strategies), and `teacher` is `None`.
    2. The step's mask comes from `build_step_mask` (unless the cache supplied it) and is passed as `bool_masked_pos`.

    `args` carries the masking settings and the seed (a [`PretrainingArguments`] or any object with
    `mask_strategy`, `mask_ratio`, `dc_ratio`, `dpc_k`, `mask_features`, `seed`).
    """
    inner = model.module if hasattr(model, "module") else model
    config = inner.config
    inputs = dict(batch)
    teacher_inputs = {key: inputs.pop(key) for key in TEACHER_BATCH_KEYS if key in inputs}
    mask = inputs.pop("bool_masked_pos", None)
    needs_relevance = config.relevance_loss_weight > 0 and "teacher_relevance" not in inputs
    needs_tokens = config.alignment_loss_weight > 0 and "teacher_patch_tokens" not in inputs
    cluster_on_teacher = mask is None and args.mask_strategy == "cluster" and args.mask_features == "teacher"
    needs_cls_attention = mask is None and args.mask_strategy == "attention"
    targets = None
    if teacher is not None and (needs_relevance or needs_tokens or cluster_on_teacher or needs_cls_attention):
        from ..teacher.targets import compute_teacher_targets

        targets = compute_teacher_targets(
            teacher,
            inputs["pixel_values"],
            inputs["input_ids"],
            inputs.get("attention_mask"),
            window_size=config.relevance_window_size,
            need_relevance=needs_relevance,
            need_patch_tokens=needs_tokens or cluster_on_teacher,
            need_cls_attention=needs_cls_attention,
            **teacher_inputs,
        )
        if targets.relevance is not None:
            inputs["teacher_relevance"] = targets.relevance
        if needs_tokens:
            inputs["teacher_patch_tokens"] = targets.patch_tokens
    elif needs_cls_attention:
        raise ValueError("--mask_strategy attention needs the teacher's CLS attention: a teacher or a target cache.")
    if mask is None:
        mask = build_step_mask(
            model,
            inputs,
            args,
            step,
            sample_offset,
            teacher_features=targets.patch_tokens if targets is not None and cluster_on_teacher else None,
            cls_attention=targets.cls_attention if targets is not None else None,
        )
    if mask is not None:
        inputs["bool_masked_pos"] = mask.to(inputs["pixel_values"].device)
    return model(**inputs)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def cpu_distributed_launch() -> bool:
    """True under a multi-process launch on a machine without CUDA (e.g. `torchrun --nproc_per_node 2` on CPUs).

    Accelerate only picks its gloo CPU backend for torchrun-style launches when told the run is on CPU; otherwise
    every process silently runs alone as rank 0.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world_size > 1 and not torch.cuda.is_available()


def _setup_logging(accelerator: Accelerator) -> None:
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    if accelerator.is_local_main_process:
        logger.setLevel(logging.INFO)
        transformers.utils.logging.set_verbosity_warning()
        datasets.utils.logging.set_verbosity_warning()
    else:
        logger.setLevel(logging.ERROR)
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()


def run_pretraining(args: PretrainingArguments, train_dataset: Any = None) -> dict[str, Any]:
    """
    Runs ClusterSTM pretraining as configured by `args` (see [`PretrainingArguments`]) on every process of the
    current Accelerate launch, and returns the content of `train_results.json` (on every process).

    Without a teacher or target cache, the objectives that need one (relevance reconstruction, token alignment) are
    switched off with a warning (their weights are restored in the saved config), and cluster-wise masking clusters
    the student's own patch embeddings; `--mask_strategy attention` needs a teacher (or a cache) and raises
    `ValueError`. With `--teacher_targets`, no teacher is loaded: targets (and teacher-driven masks) are read from the
    cache, which must match this run (see `clusterstm.teacher.cache`).

    Args:
        args: the run's [`PretrainingArguments`].
        train_dataset (*optional*): an in-memory map-style dataset of video-text rows (a `video` array or
            `video_path`, and `caption_column`) used instead of the one the data flags describe (benchmarks).
    """
    from ..data.readers import VideoTextCollator

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=cpu_distributed_launch(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
        step_scheduler_with_optimizer=False,
        # Unused parameters are frozen up front (see `_unused_parameters_probe`), so DDP needs no graph walk.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    _setup_logging(accelerator)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_incomplete_checkpoints(output_dir)
        if removed:
            logger.warning("Removed %d incomplete checkpoint folder(s) left by a crash.", len(removed))
    accelerator.wait_for_everyone()
    torch.manual_seed(args.seed)

    # ---- model, teacher, processor
    model, processor = load_student(args.model_name_or_path)
    config = model.config
    original_weights = {name: getattr(config, name) for name in TEACHER_LOSSES}
    teacher = None
    target_cache = None
    if args.teacher_targets is not None:
        from ..teacher.cache import TeacherTargetCache

        if config.alignment_loss_weight > 0:
            raise ValueError(
                "--teacher_targets cannot train unmasked-token alignment (alignment_loss_weight > 0): it needs the "
                "teacher's patch tokens, which the cache does not store (they would take "
                f"~{TeacherTargetCache.patch_token_bytes(config)} bytes per clip in float16). Train it with "
                "--teacher_name_or_path, or set alignment_loss_weight=0."
            )
        target_cache = TeacherTargetCache(args.teacher_targets)
        target_cache.check_run(args, config, processor)
    elif args.teacher_name_or_path is not None:
        from ..teacher.compatibility import ClusterSTMTeacher, check_teacher_compatibility

        teacher_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None  # relevance stays fp32
        teacher = ClusterSTMTeacher.from_pretrained(
            args.teacher_name_or_path, device=accelerator.device, torch_dtype=teacher_dtype
        )
        logger.info("Teacher matched to the student: %s", check_teacher_compatibility(teacher, config, processor))
    else:
        if args.mask_strategy == "attention":
            raise ValueError(
                "--mask_strategy attention needs a teacher: pass --teacher_name_or_path or --teacher_targets."
            )
        for name in TEACHER_LOSSES:
            if getattr(config, name) > 0:
                logger.warning(
                    "No teacher: %s=%s is set to 0 for this run (the objective needs a teacher).",
                    name,
                    getattr(config, name),
                )
                setattr(config, name, 0.0)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    # ---- data
    vision = config.vision_config
    if train_dataset is not None:
        from ..data.sources import Corpus

        corpus = Corpus(train_dataset, None)
    else:
        corpus = build_train_corpus(args, vision.num_frames, vision.image_size)
    dataset = corpus.dataset
    collator = VideoTextCollator(
        processor,
        teacher_tokenizer=teacher.tokenizer if teacher is not None else None,
        num_frames=vision.num_frames,
        sampling=args.frame_sampling,
        skip_bad_samples=args.skip_bad_samples,
        max_length=args.max_text_length,
        caption_column=args.caption_column,
        dataset=dataset if (args.skip_bad_samples and not args.streaming) else None,
        resolver=corpus.resolver,
        uint8_pixels=True,
    )
    if target_cache is not None:
        if not args.streaming:
            target_cache.check_keys(dataset, caption_column=args.caption_column, video_column=args.video_column)
        collator = target_cache.collator(collator, caption_column=args.caption_column, video_column=args.video_column)
    is_streaming = args.streaming
    sampler = None
    stream = tracker = None
    if is_streaming:
        from ..data.streaming import ShardedStream, StreamTracker

        if args.max_steps <= 0:
            raise ValueError("--streaming needs --max_steps (a streamed corpus has no length).")
        # Not prepared by Accelerate: each process reads its own shards (Accelerate would make every process read
        # the whole stream, or dispatch batches from process 0).
        stream = ShardedStream(
            dataset,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            seed=args.seed,
            shuffle_buffer_size=args.shuffle_buffer_size,
            shard_files=corpus.shard_files,
        )
        tracker = StreamTracker(args.dataloader_num_workers)
        train_dataloader = DataLoader(
            stream,
            batch_size=args.per_device_train_batch_size,
            collate_fn=collator,
            num_workers=args.dataloader_num_workers,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
        )
    else:
        if len(dataset) < args.per_device_train_batch_size * accelerator.num_processes:
            raise ValueError(
                f"The training set has {len(dataset)} clips, fewer than one global batch "
                f"({args.per_device_train_batch_size} x {accelerator.num_processes} processes)."
            )
        sampler = EpochShuffleSampler(len(dataset), args.seed)
        train_dataloader = DataLoader(
            dataset,
            batch_size=args.per_device_train_batch_size,
            sampler=sampler,
            collate_fn=collator,
            num_workers=args.dataloader_num_workers,
            # Every process must see full, equal batches: the contrastive all-gather needs equal shapes.
            drop_last=True,
            # Workers outlive epochs (no re-spawn, no re-import per epoch); the sampler runs in this process.
            persistent_workers=args.dataloader_num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    # ---- optimizer and schedule
    if accelerator.num_processes > 1:
        probe = collator([row for _, row in zip(range(args.per_device_train_batch_size), iter(dataset))])
        probe.pop("num_skipped_samples", None)
        probe = {k: v for k, v in probe.items() if isinstance(v, torch.Tensor)}
        probe["pixel_values"] = collator.normalize_pixel_values(probe["pixel_values"])
        model.to(accelerator.device)
        torch.manual_seed(derive_seed(args.seed, "probe"))
        with accelerator.autocast():
            unused = _unused_parameters_probe(
                model,
                {k: v.to(accelerator.device) for k, v in probe.items()},
                lambda m, b: pretraining_forward(m, b, args, 0, 0, teacher),
            )
        for name, parameter in model.named_parameters():
            if name in unused:
                parameter.requires_grad_(False)
        if unused:
            logger.info(
                "Frozen %d parameter tensors that this configuration never uses (e.g. %s).", len(unused), unused[0]
            )
    optimizer = build_optimizer(model, args)
    if is_streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)

    accum = args.gradient_accumulation_steps
    if is_streaming:
        steps_per_epoch = None
        max_steps = args.max_steps
        num_epochs = sys.maxsize
    else:
        micro_batches_per_epoch = len(train_dataloader)
        if micro_batches_per_epoch == 0:
            raise ValueError("No full batch per process: lower --per_device_train_batch_size.")
        steps_per_epoch = math.ceil(micro_batches_per_epoch / accum)
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        num_epochs = math.ceil(max_steps / steps_per_epoch)
    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * max_steps)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * accum

    # ---- resume
    state: dict[str, Any] = {
        "global_step": 0,
        "loss_sum": 0.0,
        "objective_sums": {},
        "logged_steps": 0,
        "bad_samples_skipped": 0,
        "nan_steps_skipped": 0,
        "runtime_before": 0.0,
    }
    resume_path = resolve_resume_checkpoint(args.resume_from_checkpoint, output_dir)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        saved = json.loads((resume_path / CHECKPOINT_MARKER).read_text())
        scheduler.load_state_dict(saved.pop("scheduler"))
        state.update({k: v for k, v in saved.items() if k in state})
        logger.info("Resumed from %s at step %d.", resume_path, state["global_step"])
    global_step = state["global_step"]
    resume_stream = None
    if is_streaming and resume_path is not None and global_step > 0:
        stream_file = stream_state_file(resume_path, accelerator.process_index)
        if not stream_file.is_file():
            raise ValueError(
                f"{resume_path} has no stream position for process {accelerator.process_index} ({stream_file.name}): "
                "resume a streaming run with the same number of processes, from a checkpoint of a streaming run."
            )
        resume_stream = json.loads(stream_file.read_text())

    metrics_logger = MetricsLogger(output_dir, args.report_to, accelerator.is_main_process)
    logger.info(
        "Pretraining: %s clips, %d processes x %d per device x %d accumulation = global batch %d, %d steps, "
        "mask %s @ %.2f, teacher: %s",
        "streamed" if is_streaming else len(dataset),
        accelerator.num_processes,
        args.per_device_train_batch_size,
        accum,
        global_batch,
        max_steps,
        args.mask_strategy,
        args.mask_ratio,
        args.teacher_name_or_path or (f"cache {args.teacher_targets}" if args.teacher_targets else "none"),
    )
    progress = None
    if accelerator.is_main_process and not args.disable_tqdm:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_steps, initial=global_step, desc="pretraining", dynamic_ncols=True)

    start_time = time.perf_counter()
    window_start, window_steps = time.perf_counter(), 0
    window_loss, window_objectives = 0.0, {}
    unwrapped = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if is_streaming:
        start_epoch = resume_stream["epoch"] if resume_stream else 0
    else:
        start_epoch = global_step // steps_per_epoch if steps_per_epoch else 0
    done = global_step >= max_steps
    micro = 0
    step_loss, step_objectives, step_bad = 0.0, {}, False
    try:
        for epoch in range(start_epoch, num_epochs):
            if done:
                break
            if is_streaming:
                # A stream is never skipped through: each reader restarts where the checkpoint says it was.
                stream.set_epoch(epoch)
                stream.load_state_dict(resume_stream if resume_stream and resume_stream["epoch"] == epoch else None)
                tracker.start_epoch(epoch, resume_stream)
                resume_stream = None
                loader = stream_batches(train_dataloader, accelerator, tracker)
                epoch_start_step, epoch_start_micro = global_step, micro
            else:
                loader = train_dataloader
                resume_micro = (global_step - epoch * steps_per_epoch) * accum
                if resume_micro > 0:
                    loader = accelerator.skip_first_batches(train_dataloader, resume_micro)
                # Accelerate's loaders re-apply their own iteration counter as the epoch on every `iter()`, so the
                # epoch must be set on the loader actually iterated (a fresh skipping loader would otherwise say 0).
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
                if sampler is not None:
                    sampler.set_epoch(epoch)
                micro = 0
                step_loss, step_objectives, step_bad = 0.0, {}, False
            for batch in loader:
                batch.pop("clip_key", None)
                # uint8 frames from the workers, normalised here (on the device when there is one).
                batch["pixel_values"] = collator.normalize_pixel_values(batch["pixel_values"])
                skipped = batch.pop("num_skipped_samples", None)
                if skipped is not None:
                    state["bad_samples_skipped"] += int(
                        accelerator.reduce(skipped.to(accelerator.device), "sum").item()
                    )
                # Dropout, MLM masking and hard-negative sampling draw from torch's global RNG: reseeding it per
                # micro-batch makes a resumed run bit-identical to an uninterrupted one.
                torch.manual_seed(derive_seed(args.seed, "step", global_step, micro, accelerator.process_index))
                sample_offset = (
                    micro * accelerator.num_processes + accelerator.process_index
                ) * args.per_device_train_batch_size
                with accelerator.accumulate(model):
                    outputs = pretraining_forward(model, batch, args, global_step, sample_offset, teacher)
                    objectives = _objective_losses(outputs)
                    values = torch.stack(
                        [outputs.loss.detach().float()] + [v.detach().float() for v in objectives.values()]
                    )
                    finite = torch.isfinite(values).all()
                    packed = torch.cat(
                        [torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), (~finite).float()[None]]
                    )
                    packed = accelerator.reduce(packed, "sum")
                    if packed[-1] > 0:
                        described = ", ".join(
                            f"{name}={value.item():.4g}" for name, value in zip(["loss", *objectives], values)
                        )
                        if args.nan_policy == "stop":
                            raise NonFiniteLossError(
                                f"Non-finite loss at step {global_step + 1} (micro-batch {micro}) on at least one "
                                f"process (this process: {described}). The weights were not updated by this step; "
                                "the last checkpoint is intact. Lower --learning_rate, prefer bf16 over fp16, check "
                                "the data, or pass --nan_policy skip."
                            )
                        if not step_bad:
                            logger.warning(
                                "Non-finite loss at step %d (%s): skipping the step.", global_step + 1, described
                            )
                        step_bad = True
                    else:
                        accelerator.backward(outputs.loss)
                        means = packed[:-1] / accelerator.num_processes
                        step_loss += means[0].item() / accum
                        for name, value in zip(objectives, means[1:]):
                            step_objectives[name] = step_objectives.get(name, 0.0) + value.item() / accum
                    if accelerator.sync_gradients:
                        if not step_bad and args.max_grad_norm > 0:
                            grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                            if (
                                grad_norm is not None
                                and not torch.isfinite(torch.as_tensor(grad_norm))
                                and args.mixed_precision != "fp16"
                            ):
                                if args.nan_policy == "stop":
                                    raise NonFiniteLossError(
                                        f"Non-finite gradient norm at step {global_step + 1}; the weights were not "
                                        "updated. Lower --learning_rate or pass --nan_policy skip."
                                    )
                                logger.warning(
                                    "Non-finite gradient norm at step %d: skipping the step.", global_step + 1
                                )
                                step_bad = True
                        if not step_bad:
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                micro += 1
                if not accelerator.sync_gradients:
                    continue

                # ---- one optimizer step done
                scheduler.step()
                global_step += 1
                micro = 0
                if step_bad:
                    state["nan_steps_skipped"] += 1
                else:
                    state["loss_sum"] += step_loss
                    state["logged_steps"] += 1
                    for name, value in step_objectives.items():
                        state["objective_sums"][name] = state["objective_sums"].get(name, 0.0) + value
                    window_loss += step_loss
                    window_steps += 1
                    for name, value in step_objectives.items():
                        window_objectives[name] = window_objectives.get(name, 0.0) + value
                step_loss, step_objectives, step_bad = 0.0, {}, False
                if progress is not None:
                    progress.update(1)
                if global_step % args.logging_steps == 0 or global_step == max_steps:
                    elapsed = time.perf_counter() - window_start
                    logs = {
                        "loss": window_loss / max(window_steps, 1),
                        **{name: value / max(window_steps, 1) for name, value in window_objectives.items()},
                        "learning_rate": scheduler.get_last_lr()[0],
                        "samples_per_second": window_steps * global_batch / max(elapsed, 1e-9),
                        "steps_per_second": window_steps / max(elapsed, 1e-9),
                        "epoch": global_step / steps_per_epoch if steps_per_epoch else float(epoch),
                        "bad_samples_skipped": state["bad_samples_skipped"],
                    }
                    metrics_logger.log(logs, global_step)
                    if progress is not None:
                        progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['learning_rate']:.2e}")
                    logger.info(
                        "step %d/%d: %s",
                        global_step,
                        max_steps,
                        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()),
                    )
                    window_start, window_steps, window_loss, window_objectives = time.perf_counter(), 0, 0.0, {}
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    state["global_step"] = global_step
                    runtime = state["runtime_before"] + time.perf_counter() - start_time
                    save_training_checkpoint(
                        accelerator,
                        output_dir,
                        global_step,
                        {**state, "runtime_before": runtime, "scheduler": scheduler.state_dict()},
                        stream_state=tracker.state_dict() if tracker is not None else None,
                    )
                    if accelerator.is_main_process:
                        rotate_checkpoints(output_dir, args.save_total_limit)
                if global_step >= max_steps:
                    done = True
                    break
            if is_streaming and not done and global_step == epoch_start_step and micro == epoch_start_micro:
                raise ValueError(
                    f"The stream gave no full batch in epoch {epoch}: it holds fewer than "
                    f"{args.per_device_train_batch_size} samples per reader ({accelerator.num_processes} processes x "
                    f"{max(1, args.dataloader_num_workers)} workers); lower --per_device_train_batch_size or "
                    "--dataloader_num_workers."
                )
    finally:
        if progress is not None:
            progress.close()
        metrics_logger.close()

    accelerator.wait_for_everyone()
    runtime = state["runtime_before"] + time.perf_counter() - start_time
    steps_done = state["logged_steps"]
    results = {
        "train_loss": state["loss_sum"] / max(steps_done, 1),
        "train_runtime": runtime,
        "train_samples_per_second": global_step * global_batch / max(runtime, 1e-9),
        "train_steps_per_second": global_step / max(runtime, 1e-9),
        "global_step": global_step,
        "epoch": global_step / steps_per_epoch if steps_per_epoch else None,
        "train_global_batch_size": global_batch,
        "num_processes": accelerator.num_processes,
        "mask_strategy": args.mask_strategy,
        "mask_ratio": args.mask_ratio,
        "teacher": teacher_record(args, config),
        "bad_samples_skipped": state["bad_samples_skipped"],
        "bad_shards_skipped": len(corpus.skipped_shards),
        "nan_steps_skipped": state["nan_steps_skipped"],
        **{f"train_{name}": value / max(steps_done, 1) for name, value in state["objective_sums"].items()},
    }
    # The saved config describes the model, not this run's teacher availability.
    for name, value in original_weights.items():
        setattr(unwrapped.config, name, value)
    if accelerator.is_main_process:
        save_final_model(unwrapped, processor, output_dir)
        (output_dir / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
        (output_dir / TEACHER_RECORD).write_text(json.dumps(teacher_record(args, config), indent=2) + "\n")
        if args.push_to_hub:
            from ..hub.publish import push_checkpoint

            push_checkpoint(
                output_dir,
                args.hub_model_id,
                private=args.hub_private_repo,
                require_model_card=False,
                commit_message=f"ClusterSTM pretraining, step {global_step}",
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def teacher_record(args: PretrainingArguments, config: Any) -> dict[str, Any]:
    """What produced a run's targets: the teacher folder (or the target cache and the teacher that wrote it), the
    relevance window and the masking settings. Saved as `output_dir/teacher_config.json` so that
    `clusterstm visualize` pointed at a pretraining output finds its teacher."""
    record: dict[str, Any] = {
        "teacher_name_or_path": args.teacher_name_or_path,
        "teacher_targets": args.teacher_targets,
        "relevance_window_size": config.relevance_window_size,
        "mask_strategy": args.mask_strategy,
        "mask_ratio": args.mask_ratio,
        "dc_ratio": args.dc_ratio,
        "dpc_k": args.dpc_k,
        "mask_features": args.mask_features,
    }
    if args.teacher_targets is not None:
        cache_config = Path(args.teacher_targets) / "targets_config.json"
        if cache_config.is_file():
            record["teacher_name_or_path"] = json.loads(cache_config.read_text()).get("teacher_name_or_path")
    return record


def save_final_model(model: Any, processor: Any, output_dir: str | os.PathLike) -> Path:
    """Saves the student (never the teacher) and its processor as a Hub-ready folder (remote code + auto_map)."""
    try:
        from ..hub.export import save_checkpoint
    except ImportError as error:  # only while the package is partially installed
        logger.warning("clusterstm.checkpoint unavailable (%s): saving without remote-code files.", error)
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        return Path(output_dir)
    return save_checkpoint(model, output_dir, processor=processor)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of `scripts/pretrain.py`."""
    parser = HfArgumentParser(PretrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    return run_pretraining(args)
