"""ClusterSTM pretraining with Accelerate: one code path from one CPU process to multi-GPU / multi-node.

`run_pretraining(PretrainingArguments(...))` is what `scripts/pretrain.py` and the `clusterstm demo` call. The loop:

- builds (or loads) the student from `--model_name_or_path`; the teacher is a separate stage: either a frozen teacher
  (`--teacher_name_or_path`, any CLIP/SigLIP checkpoint folder) run online through `compute_teacher_targets`, or a
  target cache (`--teacher_targets`, written by `clusterstm precompute-targets`) read with no teacher loaded;
- builds every step's video mask once, through `masking_clusterstm.build_mask`, and passes it as `bool_masked_pos`;
- streams video-text pairs through worker processes that decode with PyAV;
- trains with AdamW + a warmup/cosine schedule, gradient accumulation, optional mixed precision and
  gradient checkpointing;
- writes crash-safe checkpoints (`checkpoint-{step}`, renamed into place only once complete; see `checkpointing`)
  that resume exactly: model, optimizer, scheduler, data position and step, so a SIGKILLed and resumed run ends with
  the same weights as an uninterrupted one; each records the run's identity and the sha256 of its files, so a reused
  output folder, a resume with other settings and a damaged checkpoint are refused or fall back, naming why;
- draws every random mask from a generator seeded by (seed, step, index of the sample in the global batch), so masks
  do not depend on the number of processes;
- keeps losses on the device (read at logging and checkpoint steps only) and skips a step with a non-finite loss or
  gradient on the device (fused AdamW's `found_inf`), so no non-finite update reaches the weights; `--nan_policy
  stop` then stops at the next logging or checkpoint step, naming the first bad step;
- writes `train_results.json`, a `save_pretrained` checkpoint (student + processor; gathered under FSDP) and a model
  card at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration
from torch.utils.data import DataLoader, Sampler
from transformers import HfArgumentParser, get_scheduler

from ..data.corpus import build_train_corpus as _build_corpus
from ..data.corpus import corpus_parameters, derive_seed

# The strategy names and the one check of the masking settings live next to the mask builder (shared with the cache).
from ..models.masking_clusterstm import MASK_FEATURES, validate_masking_arguments  # noqa: F401  (re-exported)
from ..models.masking_clusterstm import MASK_STRATEGY_NAMES as MASK_STRATEGIES

# The package's one retrieval evaluator (kept importable from here).
from ..tasks.retrieval import evaluate_zero_shot_retrieval  # noqa: F401
from ..teacher.dense import check_relevance_method

# The checkpoint functions live in `checkpointing`; re-exported here, where they were first defined.
from .checkpointing import (  # noqa: F401
    CHECKPOINT_MARKER,
    CHECKPOINT_PREFIX,
    TMP_CHECKPOINT_PREFIX,
    CheckpointIntegrityError,
    OutputFolderError,
    check_resume_settings,
    find_latest_checkpoint,
    list_complete_checkpoints,
    new_run_id,
    prepare_output_dir,
    read_checkpoint_state,
    remove_incomplete_checkpoints,
    resolve_resume_checkpoint,
    rotate_checkpoints,
    run_identity,
    save_training_checkpoint,
    stream_state_file,
    verify_checkpoint,
)
from .errors import explain_disk_full

logger = logging.getLogger(__name__)

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
    relevance_method: str = field(
        default="window",
        metadata={
            "help": "How the teacher's relevance targets are read: `window` (the paper's window pooling through the "
            "teacher's pooler), `maskclip` or `clearclip` (training-free dense variants of the last block; CLIP-like "
            "teachers). See docs/RESULTS.md section 7."
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
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "no, bf16 or fp16 (bf16 recommended). Default: what the launcher says (`accelerate launch "
            "--mixed_precision`, its config file, or ACCELERATE_MIXED_PRECISION), else no; a value given here wins."
        },
    )
    torch_compile: bool = field(
        default=False, metadata={"help": "Compile the model's forward with torch.compile (fullgraph where it can)."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save a resumable checkpoint-{step} every N optimizer steps."}
    )
    save_total_limit: int | None = field(
        default=None,
        metadata={"help": "Keep only the N newest checkpoints (in save order; this run's newest are never deleted)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Remove the checkpoints and logs of a previous run in --output_dir before starting."},
    )
    ignore_resume_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Resume even if settings that change the result (batch size, masking, objective weights, data, "
            "optimizer, precision) differ from the checkpoint's; the differences are logged."
        },
    )
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
        default="stop",
        metadata={
            "help": "On a non-finite loss or gradient the step is skipped on the device; `stop`: then end the run at "
            "the next logging or checkpoint step with an error naming the first bad step; `skip`: count it and go on."
        },
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
    check_relevance_method(args.relevance_method)
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
    if args.mixed_precision not in (None, "no", "bf16", "fp16"):
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


def build_optimizer(
    model: torch.nn.Module, args: PretrainingArguments, fused: bool | None = None
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases, norms, embeddings' scales or the temperature).

    `fused` (default: when every trainable parameter is a float tensor on CUDA or the CPU) selects the fused AdamW
    kernel: one launch per step, and a device-side skip of non-finite steps (`found_inf`) without a host sync. Other
    devices get the foreach implementation."""
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
    if fused is None:
        parameters = decay + no_decay
        fused = bool(parameters) and all(
            p.device.type in ("cuda", "cpu") and p.is_floating_point() and not hasattr(p, "placements")
            for p in parameters
        )
    return torch.optim.AdamW(
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=fused or None,
        foreach=None if fused else True,
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
        yield send_to_device(batch, accelerator.device, non_blocking=True)


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
            relevance_method=getattr(args, "relevance_method", "window"),
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
        from ..models.masking_clusterstm import num_visible_tokens

        inputs["bool_masked_pos"] = mask.to(inputs["pixel_values"].device, non_blocking=True)
        # Every frame keeps the same K (the mask builder's and the cache's contract): given K, the model sizes its
        # kept-token tensors without reading the mask back to the host (and compiles without a graph break).
        inputs["num_visible_tokens"] = num_visible_tokens(mask.shape[-1], args.mask_ratio)
    return model(**inputs)


class DeviceStepStats:
    """
    Loss statistics kept on the device between logging steps, so the hot loop never waits for the device.

    Every micro-batch adds its losses (and a non-finite flag) to device tensors; `end_step` folds the step into the
    sums unless the step was non-finite, and counts the skipped steps and the first bad step, all without a host
    sync. `flush` (logging and checkpoint steps, the end) reduces the sums over processes and reads them once.
    """

    def __init__(self, device: torch.device, accum: int) -> None:
        self.device = device
        # float64 sums where the device has it: a resumed run's totals then match an uninterrupted run's closely.
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.accum = accum
        self.names: list[str] | None = None
        self._zero()

    def _zero(self, counts: bool = True) -> None:
        size = len(self.names) if self.names is not None else 0
        self.sums = torch.zeros(size, device=self.device, dtype=self.dtype)
        if counts:
            # [good steps, skipped steps, first bad step (inf: none), bad samples skipped]
            self.counts = torch.tensor([0.0, 0.0, math.inf, 0.0], device=self.device, dtype=self.dtype)
        self.step_values = torch.zeros(size, device=self.device, dtype=self.dtype)
        self.step_nonfinite = torch.zeros((), device=self.device, dtype=torch.bool)

    def add_micro_batch(self, loss: torch.Tensor, objectives: dict[str, torch.Tensor]) -> None:
        names = ["loss", *objectives]
        if self.names is None:
            self.names = names
            self._zero(counts=False)
        elif names != self.names:
            raise RuntimeError(f"The objectives changed during training: {self.names} -> {names}.")
        values = torch.stack([loss.detach()] + [v.detach() for v in objectives.values()]).to(self.dtype)
        self.step_nonfinite |= ~torch.isfinite(values).all()
        self.step_values += torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0) / self.accum

    def add_skipped_samples(self, skipped: torch.Tensor) -> None:
        self.counts[3] += skipped.to(self.device, non_blocking=True).to(self.dtype).sum()

    def end_step(self, step: int, bad: torch.Tensor) -> None:
        """Folds the finished optimizer step `step` (1-based) in; `bad` is the step's global non-finite flag."""
        bad_value = bad.to(self.dtype)
        if self.names is not None:
            self.sums += self.step_values * (1 - bad_value)
        self.counts[0] += 1 - bad_value
        self.counts[1] += bad_value
        self.counts[2] = torch.where(bad, torch.minimum(self.counts[2], self.counts.new_tensor(step)), self.counts[2])
        self.step_values = torch.zeros_like(self.step_values)
        self.step_nonfinite = torch.zeros((), device=self.device, dtype=torch.bool)

    def flush(self, accelerator: Accelerator) -> dict[str, Any]:
        """The statistics since the last flush, averaged over processes (one reduction and one read), then reset."""
        processes = accelerator.num_processes
        sums, counts = self.sums, self.counts
        if processes > 1:
            # Steps are skipped on every process alike (the flag is reduced before the step), so only the loss sums
            # and the bad-sample counts differ between processes.
            packed = accelerator.reduce(torch.cat([sums, counts[3:]]), "sum")
            sums, skipped = packed[:-1] / processes, packed[-1:]
            counts = torch.cat([counts[:3], skipped])
        values = torch.cat([sums, counts]).tolist()
        names = self.names or []
        good, skipped_steps, first_bad, bad_samples = values[len(names) :]
        self._zero()
        return {
            "sums": dict(zip(names, values[: len(names)])),
            "steps": int(round(good)),
            "nan_steps": int(round(skipped_steps)),
            "first_bad_step": None if math.isinf(first_bad) else int(first_bad),
            "bad_samples": int(round(bad_samples)),
        }


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
        # Pinned host batches are copied to the GPU without blocking the loop.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False, non_blocking=torch.cuda.is_available()),
        step_scheduler_with_optimizer=False,
        # Unused parameters are frozen up front (see `_unused_parameters_probe`), so DDP needs no graph walk.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    _setup_logging(accelerator)
    log_precision(args, accelerator)
    warn_unhonoured_distributed_type(accelerator)
    resuming = args.resume_from_checkpoint is not None
    if not args.overwrite_output_dir:
        # Every process checks (and raises) alike; only the main process ever removes anything.
        prepare_output_dir(output_dir, overwrite=False, resuming=resuming)
    if accelerator.is_main_process:
        with explain_disk_full(output_dir, "the output folder"):
            prepare_output_dir(output_dir, overwrite=args.overwrite_output_dir, resuming=resuming)
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
    # Objectives weighted 0 above: their modules are frozen so that every trainable parameter gets a gradient.
    model.sync_objective_trainability()
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
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # On the device before the optimizer exists, so that it can be built fused.
        model.to(accelerator.device)
    # DeepSpeed steps its own (ZeRO) optimizer wrapper: no fused kernel, no device-side skip.
    optimizer = build_optimizer(
        model, args, fused=False if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    )
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
    settings = result_settings(args, config, accelerator, train_dataset)
    run_id = None
    if resume_path is not None:
        run_id = check_resume_settings(resume_path, settings, ignore_mismatch=args.ignore_resume_mismatch)
    if run_id is None:
        # One id for every process of the launch.
        from accelerate.utils import broadcast_object_list

        run_id = broadcast_object_list([new_run_id()])[0] if accelerator.num_processes > 1 else new_run_id()
    identity = run_identity(run_id, settings)
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
    if args.torch_compile:
        # Compiles the module's call in place: DDP (and `accelerator.accumulate`) keep calling the same object.
        unwrapped.compile()
    # A non-finite step is skipped on the device (fused AdamW's `found_inf`: no update of weights or moments) where
    # the optimizer supports it; fp16's GradScaler already skips non-finite steps itself. Elsewhere the flag is read
    # once per optimizer step.
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)
    device_side_skip = (
        bool(getattr(inner_optimizer, "defaults", {}).get("fused"))
        and accelerator.mixed_precision != "fp16"
        and accelerator.distributed_type != DistributedType.DEEPSPEED
    )
    stats = DeviceStepStats(accelerator.device, accum)

    def flush_stats() -> None:
        """Reads the device-side statistics (logging and checkpoint steps, the end) and applies --nan_policy."""
        nonlocal window_loss, window_steps
        flushed = stats.flush(accelerator)
        state["bad_samples_skipped"] += flushed["bad_samples"]
        if flushed["nan_steps"]:
            if args.nan_policy == "stop":
                raise NonFiniteLossError(
                    f"Non-finite loss or gradient at step {flushed['first_bad_step']} on at least one process. The "
                    "weights were not updated by that step and the last checkpoint is intact. Lower --learning_rate, "
                    "prefer bf16 over fp16, check the data, or pass --nan_policy skip."
                )
            logger.warning(
                "Skipped %d step(s) with a non-finite loss or gradient (first: step %d).",
                flushed["nan_steps"],
                flushed["first_bad_step"],
            )
            state["nan_steps_skipped"] += flushed["nan_steps"]
        sums = flushed["sums"]
        state["logged_steps"] += flushed["steps"]
        window_steps += flushed["steps"]
        if sums:
            state["loss_sum"] += sums["loss"]
            window_loss += sums["loss"]
            for name, value in sums.items():
                if name != "loss":
                    state["objective_sums"][name] = state["objective_sums"].get(name, 0.0) + value
                    window_objectives[name] = window_objectives.get(name, 0.0) + value

    if is_streaming:
        start_epoch = resume_stream["epoch"] if resume_stream else 0
    else:
        start_epoch = global_step // steps_per_epoch if steps_per_epoch else 0
    done = global_step >= max_steps
    micro = 0
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
            for batch in loader:
                batch.pop("clip_key", None)
                # uint8 frames from the workers, normalised here (on the device when there is one).
                batch["pixel_values"] = collator.normalize_pixel_values(batch["pixel_values"])
                skipped = batch.pop("num_skipped_samples", None)
                if skipped is not None:
                    stats.add_skipped_samples(skipped)
                # Dropout, MLM masking and hard-negative sampling draw from torch's global RNG: reseeding it per
                # micro-batch makes a resumed run bit-identical to an uninterrupted one.
                torch.manual_seed(derive_seed(args.seed, "step", global_step, micro, accelerator.process_index))
                sample_offset = (
                    micro * accelerator.num_processes + accelerator.process_index
                ) * args.per_device_train_batch_size
                with accelerator.accumulate(model):
                    outputs = pretraining_forward(model, batch, args, global_step, sample_offset, teacher)
                    # No host sync here: the losses and their finiteness stay on the device until a logging step.
                    stats.add_micro_batch(outputs.loss, _objective_losses(outputs))
                    accelerator.backward(outputs.loss)
                    if accelerator.sync_gradients:
                        bad = stats.step_nonfinite
                        if args.max_grad_norm > 0:
                            grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                            if grad_norm is not None and accelerator.mixed_precision != "fp16":
                                bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device))
                        if accelerator.num_processes > 1:
                            # One reduction per optimizer step (not per micro-batch): every process skips alike.
                            bad = accelerator.reduce(bad.float(), "sum") > 0
                        if device_side_skip:
                            inner_optimizer.found_inf = bad.float()
                            try:
                                optimizer.step()
                            finally:
                                del inner_optimizer.found_inf
                        elif accelerator.mixed_precision == "fp16" or not bool(bad):
                            optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        stats.end_step(global_step + 1, bad)
                micro += 1
                if not accelerator.sync_gradients:
                    continue

                # ---- one optimizer step done
                scheduler.step()
                global_step += 1
                micro = 0
                if progress is not None:
                    progress.update(1)
                logging_step = global_step % args.logging_steps == 0 or global_step == max_steps
                checkpoint_step = bool(args.checkpointing_steps) and global_step % args.checkpointing_steps == 0
                if logging_step or checkpoint_step:
                    flush_stats()
                if logging_step:
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
                if checkpoint_step:
                    state["global_step"] = global_step
                    runtime = state["runtime_before"] + time.perf_counter() - start_time
                    save_training_checkpoint(
                        accelerator,
                        output_dir,
                        global_step,
                        {**state, "runtime_before": runtime, "scheduler": scheduler.state_dict()},
                        stream_state=tracker.state_dict() if tracker is not None else None,
                        identity=identity,
                    )
                    if accelerator.is_main_process:
                        rotate_checkpoints(output_dir, args.save_total_limit, run_id=identity["run_id"])
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
        flush_stats()
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
        "mixed_precision": accelerator.mixed_precision,
        "run_id": identity["run_id"],
        "teacher": teacher_record(args, config),
        "bad_samples_skipped": state["bad_samples_skipped"],
        "bad_shards_skipped": len(corpus.skipped_shards),
        "nan_steps_skipped": state["nan_steps_skipped"],
        **{f"train_{name}": value / max(steps_done, 1) for name, value in state["objective_sums"].items()},
    }
    # The saved config describes the model, not this run's teacher availability.
    for name, value in original_weights.items():
        setattr(unwrapped.config, name, value)
    # Under FSDP the parameters are sharded: gather a full state dict (a collective: every process takes part).
    full_state_dict = (
        accelerator.get_state_dict(model) if accelerator.distributed_type == DistributedType.FSDP else None
    )
    if accelerator.is_main_process:
        with explain_disk_full(output_dir, "the final model, train_results.json and the model card"):
            save_final_model(unwrapped, processor, output_dir, state_dict=full_state_dict)
            (output_dir / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
            (output_dir / TEACHER_RECORD).write_text(json.dumps(teacher_record(args, config), indent=2) + "\n")
            write_pretraining_model_card(output_dir, unwrapped.config, args, results)
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


# Settings that change a run's result: resuming with other values is refused (see `check_resume_settings`).
RESULT_SETTINGS = (
    "dataset_name",
    "dataset_config_name",
    "train_split_name",
    "train_file",
    "video_column",
    "caption_column",
    "video_path_template",
    "streaming",
    "shuffle_buffer_size",
    "num_train_clips",
    "synthetic_seed",
    "max_train_samples",
    "max_text_length",
    "frame_sampling",
    "teacher_name_or_path",
    "teacher_targets",
    "mask_strategy",
    "mask_ratio",
    "dc_ratio",
    "dpc_k",
    "mask_features",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "seed",
)
OBJECTIVE_WEIGHTS = (
    "contrastive_loss_weight",
    "relevance_loss_weight",
    "matching_loss_weight",
    "mlm_loss_weight",
    "alignment_loss_weight",
)


def result_settings(
    args: PretrainingArguments, config: Any, accelerator: Accelerator, train_dataset: Any = None
) -> dict[str, Any]:
    """The settings of this run that change its result (recorded in every checkpoint as the run's identity): the
    data, masking, batch and optimizer flags, the objective weights in effect, the number of processes and the
    precision actually used. `--max_steps` is left out on purpose: extending a run is what resuming is for."""
    settings: dict[str, Any] = {name: getattr(args, name) for name in RESULT_SETTINGS}
    settings.update({name: getattr(config, name, None) for name in OBJECTIVE_WEIGHTS})
    if args.relevance_method != "window":
        # Only when set: checkpoints written before the flag existed (all `window`) still resume.
        settings["relevance_method"] = args.relevance_method
    settings["num_processes"] = accelerator.num_processes
    settings["mixed_precision"] = accelerator.mixed_precision
    if train_dataset is not None:
        settings["train_dataset"] = getattr(train_dataset, "_fingerprint", None) or f"{len(train_dataset)} rows"
    return settings


def log_precision(args: PretrainingArguments, accelerator: Accelerator) -> None:
    """Says which precision the run uses and who decided it (the launcher, or an explicit --mixed_precision)."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if args.mixed_precision is None:
        logger.info(
            "Mixed precision: %s (%s).",
            accelerator.mixed_precision,
            "from the launcher" if launcher else "default; no launcher setting",
        )
    elif launcher and launcher != args.mixed_precision:
        logger.warning(
            "Mixed precision: --mixed_precision %s overrides the launcher's %s.", args.mixed_precision, launcher
        )
    else:
        logger.info("Mixed precision: %s (--mixed_precision).", args.mixed_precision)


def warn_unhonoured_distributed_type(accelerator: Accelerator) -> None:
    """Warns when the launcher asked for FSDP or DeepSpeed but Accelerate set up something else (e.g. FSDP on CPU
    processes runs as plain DDP, every process holding every parameter)."""
    requested = None
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        requested = DistributedType.FSDP
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        requested = DistributedType.DEEPSPEED
    if requested is not None and accelerator.distributed_type != requested:
        logger.warning(
            "The launch asked for %s, but Accelerate runs this job as %s (device %s): parameters are not sharded. "
            "FSDP and DeepSpeed need CUDA devices here.",
            requested.value,
            accelerator.distributed_type.value,
            accelerator.device,
        )


def write_pretraining_model_card(
    output_dir: str | os.PathLike, config: Any, args: PretrainingArguments, results: dict[str, Any]
) -> Path:
    """Writes `output_dir/README.md` (see `clusterstm.hub.model_card`), so that `clusterstm push` accepts a
    pretraining output as it is. Local model and teacher folders are named by their folder name only."""
    from ..hub.model_card import write_model_card

    data = args.dataset_name or (Path(args.train_file).name if args.train_file else None)
    run_info = {
        "model_name": args.hub_model_id.split("/")[-1] if args.hub_model_id else Path(output_dir).resolve().name,
        "base_model": args.model_name_or_path,
        "teacher": args.teacher_name_or_path,
        "mask_strategy": args.mask_strategy,
        "mask_ratio": args.mask_ratio,
        "steps": results["global_step"],
        "batch_size": results["train_global_batch_size"],
        "learning_rate": args.learning_rate,
        "train_data": data,
    }
    if args.hub_model_id:
        run_info["repo_id"] = args.hub_model_id
    return write_model_card(output_dir, config, {k: v for k, v in run_info.items() if v is not None})


def teacher_record(args: PretrainingArguments, config: Any) -> dict[str, Any]:
    """What produced a run's targets: the teacher folder (or the target cache and the teacher that wrote it), the
    relevance window and the masking settings. Saved as `output_dir/teacher_config.json` so that
    `clusterstm visualize` pointed at a pretraining output finds its teacher."""
    record: dict[str, Any] = {
        "teacher_name_or_path": args.teacher_name_or_path,
        "teacher_targets": args.teacher_targets,
        "relevance_window_size": config.relevance_window_size,
        "relevance_method": args.relevance_method,
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


def save_final_model(
    model: Any, processor: Any, output_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Saves the student (never the teacher) and its processor as a Hub-ready folder (remote code + auto_map).

    `state_dict`: a gathered full state dict (FSDP), saved instead of the module's own (sharded) one."""
    if state_dict is not None:
        import functools

        from ..hub.export import save_checkpoint

        # `save_checkpoint` calls `model.save_pretrained(folder)`: give that call the gathered weights.
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, state_dict=state_dict)
        try:
            return save_checkpoint(model, output_dir, processor=processor)
        finally:
            del model.save_pretrained
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
