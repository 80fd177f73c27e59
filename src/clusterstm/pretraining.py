"""ClusterSTM pretraining with Accelerate: one code path from one CPU process to multi-GPU / multi-node.

`run_pretraining(PretrainingArguments(...))` is what `scripts/pretrain.py` and the `clusterstm demo` call. The loop:

- builds (or loads) the student from `--model_name_or_path`, optionally attaches a frozen teacher
  (`--teacher_name_or_path`, any CLIP/SigLIP checkpoint folder) that is never saved with the student;
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

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from torch.utils.data import DataLoader, Sampler
from transformers import HfArgumentParser, get_scheduler

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# Written last into a checkpoint folder, just before it is renamed into place: a folder without it is incomplete.
CHECKPOINT_MARKER = "training_state.json"
TMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
MASK_STRATEGIES = ("cluster", "random", "tube", "attention", "none")
# Strategies whose masks need random numbers; "cluster" is a deterministic function of the features.
RANDOM_MASK_STRATEGIES = ("random", "tube", "attention")
TEACHER_LOSSES = ("relevance_loss_weight", "alignment_loss_weight")


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
        default=None, metadata={"help": "`synthetic`: the embedded synthetic video-text benchmark (no download)."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "A jsonl or csv file with one row per clip (video path + caption)."}
    )
    video_root: str | None = field(
        default=None, metadata={"help": "Folder the video paths of --train_file are relative to (default: its folder)."}
    )
    video_column: str = field(default="file_name", metadata={"help": "Column of --train_file holding the video path."})
    caption_column: str = field(default="caption", metadata={"help": "Column of --train_file holding the caption."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream --train_file instead of loading it (corpora too big for memory)."}
    )
    num_train_clips: int | None = field(
        default=None, metadata={"help": "Synthetic benchmark: number of training clips (default: the benchmark's)."}
    )
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic benchmark's clips."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_text_length: int = field(default=32, metadata={"help": "Maximum caption length in tokens."})
    mask_strategy: str | None = field(
        default=None,
        metadata={"help": f"Token masking, one of {MASK_STRATEGIES} (default: the model config's)."},
    )
    mask_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of tokens dropped per frame, in [0, 1) (default: the config's)."}
    )
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps; overrides --num_train_epochs if > 0."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Number of epochs when --max_steps is not set."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of AdamW (UMT: 1e-4)."})
    weight_decay: float = field(default=0.02, metadata={"help": "AdamW weight decay (UMT: 0.02); not on biases/norms."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables clipping)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name (cosine, linear...)."})
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
    seed: int = field(default=42, metadata={"help": "Seed of the weights' init-independent randomness: data order, masks, dropout."})
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
        raise ValueError("Pass exactly one of --dataset_name synthetic or --train_file.")
    if args.dataset_name is not None and args.dataset_name != "synthetic":
        raise ValueError(f"--dataset_name must be 'synthetic' (got {args.dataset_name!r}); use --train_file for data.")
    if args.train_file is not None and Path(args.train_file).suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise ValueError(f"--train_file must be a .jsonl or .csv file, got {args.train_file!r}.")
    if args.mask_strategy is not None and args.mask_strategy not in MASK_STRATEGIES:
        raise ValueError(f"--mask_strategy must be one of {MASK_STRATEGIES}, got {args.mask_strategy!r}.")
    if args.mask_ratio is not None and not 0.0 <= args.mask_ratio < 1.0:
        raise ValueError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}.")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ValueError("Set --max_steps > 0 or --num_train_epochs > 0.")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.per_device_train_batch_size < 2:
        # The contrastive loss needs negatives; one video per process still works across processes, but a
        # one-process run would have none.
        logger.warning("--per_device_train_batch_size 1: the contrastive loss only sees negatives from other processes.")
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
    if args.streaming and args.train_file is None:
        raise ValueError("--streaming needs --train_file.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id.")
    if args.max_text_length < 4:
        raise ValueError(f"--max_text_length must be >= 4, got {args.max_text_length}.")


# ----------------------------------------------------------------------------------------------------------------
# Seeds and sampling
# ----------------------------------------------------------------------------------------------------------------


def derive_seed(*values: int | str) -> int:
    """A 63-bit seed that is a pure function of `values` (stable across processes, runs and Python versions)."""
    digest = hashlib.blake2b(repr(tuple(values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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


def per_sample_random_masks(
    strategy: str,
    generators: Sequence[torch.Generator],
    num_frames: int,
    num_tokens: int,
    mask_ratio: float,
    cls_attention: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masks `(B, T, N)` (True = dropped) for a random strategy, sample `i` drawn from `generators[i]` only."""
    from .masking_clusterstm import attention_guided_mask, random_mask, tube_mask

    masks = []
    for i, generator in enumerate(generators):
        if strategy == "random":
            masks.append(random_mask(1, num_frames, num_tokens, mask_ratio, generator=generator))
        elif strategy == "tube":
            masks.append(tube_mask(1, num_frames, num_tokens, mask_ratio, generator=generator))
        elif strategy == "attention":
            if cls_attention is None:
                raise ValueError("The attention mask strategy needs the teacher's CLS attention.")
            attention = cls_attention[i : i + 1].detach().float().cpu()
            masks.append(attention_guided_mask(attention, mask_ratio, generator=generator))
        else:
            raise ValueError(f"{strategy!r} is not a random mask strategy.")
    return torch.cat(masks, dim=0)


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
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s, starting from scratch.", output_dir)
        return latest
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint: {value!r} is not a folder.")
    if not (path / CHECKPOINT_MARKER).is_file():
        raise ValueError(f"--resume_from_checkpoint: {value!r} is incomplete (no {CHECKPOINT_MARKER}); use another one.")
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
    accelerator: Accelerator, output_dir: str | os.PathLike, step: int, training_state: dict[str, Any]
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


def load_student(model_name_or_path: str, mask_strategy: str | None = None, mask_ratio: float | None = None):
    """Loads `ClusterSTMForPreTraining` and its processor from a local folder, overriding the masking settings."""
    from .modeling_clusterstm import ClusterSTMForPreTraining
    from .processing_clusterstm import ClusterSTMProcessor

    path = Path(model_name_or_path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--model_name_or_path {model_name_or_path!r} is not a ClusterSTM checkpoint folder (no config.json); "
            "create one with `clusterstm init --preset tiny --output_dir DIR`."
        )
    model = ClusterSTMForPreTraining.from_pretrained(path)
    if mask_strategy is not None:
        model.config.mask_strategy = mask_strategy
    if mask_ratio is not None:
        model.config.mask_ratio = mask_ratio
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
