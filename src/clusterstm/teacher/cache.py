"""Cached teacher targets: run a frozen teacher once over a corpus, then pretrain from the cache with no teacher.

Layout of a cache folder (written by `write_teacher_targets`, i.e. `clusterstm precompute-targets` /
`scripts/precompute_teacher_targets.py`):

- `shard-00000.parquet`, ...: one row per clip with
  - `clip_key` (string): ties the row to its clip, see [`clip_key`];
  - `teacher_relevance` (list of `num_frames` lists of `num_patches` float16): the window-pooled relevance target;
  - `bool_masked_pos` (list of lists of bool, only when the mask strategy needs the teacher: `cluster` on teacher
    features, `attention`): the clip's mask (`True` = dropped).
- `targets_config.json`: the teacher, relevance window, frame sampling, frame count, resolution, patch grid,
  normalisation, mask settings and package version. `TeacherTargetCache.check_run` compares it with a run and names
  every mismatch.

Caching needs deterministic frames: the cache stores the targets of the frames `--frame_sampling uniform` picks
(the middle frame of each segment), and the pipeline has no other random augmentation. The writer and
`--teacher_targets` therefore refuse `--frame_sampling random` (an error, not a warning: targets of other frames
would silently train the wrong relevance maps). See docs/TEACHER_TARGETS.md.

Teacher-driven masks are stored once per clip: cluster masks are a deterministic function of the teacher's tokens
(same mask as online); attention-guided masks are drawn once per clip (seeded by `--seed` and the clip key) instead
of once per step as online.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dense import check_relevance_method

logger = logging.getLogger(__name__)

TARGETS_CONFIG = "targets_config.json"
SHARD_PATTERN = "shard-{:05d}.parquet"
KEY_COLUMN = "clip_key"
RELEVANCE_COLUMN = "teacher_relevance"
MASK_COLUMN = "bool_masked_pos"
# Mask settings that change a stored (teacher-driven) mask.
MASK_SETTINGS = ("mask_strategy", "mask_ratio", "dc_ratio", "dpc_k", "mask_features")


def clip_key(row: dict[str, Any], caption_column: str = "caption", video_column: str = "file_name") -> str:
    """
    The key tying a cache row to its clip: the clip's identity (`video_id`, else the annotation's `video_column`
    value as written in the file, else the resolved `video_path`) and a hash of its caption, `"<id>|<sha1[:16]>"`.
    The video root is not part of the key, so a corpus moved to another folder keeps its cache.
    """
    identity = row.get("video_id")
    if identity is None:
        identity = row.get(video_column)
    if identity is None:
        identity = row.get("video_path")
    if isinstance(identity, dict):  # datasets Video(decode=False)
        identity = identity.get("path")
    if identity is None:
        raise ValueError(
            f"Cannot key this row for the target cache: it has no 'video_id', {video_column!r} or 'video_path' "
            f"column (keys: {sorted(row)})."
        )
    caption = row.get(caption_column)
    if not isinstance(caption, str):
        raise ValueError(f"Cannot key this row for the target cache: {caption_column!r} is not a caption string.")
    return f"{os.fspath(identity)}|{hashlib.sha1(caption.encode()).hexdigest()[:16]}"


def dataset_keys(dataset: Any, caption_column: str = "caption", video_column: str = "file_name") -> list[str]:
    """Keys of every row of a map-style dataset, read column-wise (no video is decoded)."""
    names = getattr(dataset, "column_names", None)
    if names is None:
        return [clip_key(dataset[i], caption_column, video_column) for i in range(len(dataset))]
    columns = [c for c in ("video_id", video_column, "video_path", caption_column) if c in names]
    table = {c: dataset[c] for c in columns}
    return [clip_key({c: table[c][i] for c in columns}, caption_column, video_column) for i in range(len(dataset))]


def mask_needs_teacher(mask_strategy: str, mask_features: str) -> bool:
    """Whether a strategy's mask is computed from teacher outputs (so a cache stores it)."""
    return mask_strategy == "attention" or (mask_strategy == "cluster" and mask_features == "teacher")


def _package_version() -> str:
    from .. import __version__

    return __version__


def run_settings(config: Any, processor: Any, frame_sampling: str, relevance_method: str = "window") -> dict[str, Any]:
    """The data/model settings a cache must share with a run (from the student config and processor, and how the
    relevance was read from the teacher)."""
    vision = config.vision_config
    video_processor = processor.video_processor
    return {
        "relevance_window_size": config.relevance_window_size,
        "relevance_method": relevance_method,
        "num_frames": vision.num_frames,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "tubelet_size": vision.tubelet_size,
        "frame_sampling": frame_sampling,
        "image_mean": [float(v) for v in video_processor.image_mean],
        "image_std": [float(v) for v in video_processor.image_std],
    }


class TeacherTargetCache:
    """
    A target cache folder, loaded into memory (about `num_frames * num_patches * 2` bytes per clip, plus the mask
    bits), indexed by [`clip_key`].
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        import pyarrow.parquet as pq

        self.folder = Path(folder)
        config_path = self.folder / TARGETS_CONFIG
        if not config_path.is_file():
            raise ValueError(f"--teacher_targets {os.fspath(folder)!r} is not a target cache (no {TARGETS_CONFIG}).")
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        shards = sorted(self.folder.glob("shard-*.parquet"))
        if not shards:
            raise ValueError(f"Target cache {os.fspath(folder)!r} has no shard-*.parquet files.")
        keys: list[str] = []
        relevance, masks = [], []
        self.has_masks = False
        for shard in shards:
            table = pq.read_table(shard)
            keys.extend(table.column(KEY_COLUMN).to_pylist())
            relevance.append(_nested_to_numpy(table.column(RELEVANCE_COLUMN), np.float16))
            if MASK_COLUMN in table.column_names:
                self.has_masks = True
                masks.append(_nested_to_numpy(table.column(MASK_COLUMN), np.bool_))
        self.relevance = np.concatenate(relevance)
        self.masks = np.concatenate(masks) if self.has_masks else None
        self.index = {key: i for i, key in enumerate(keys)}
        if len(self.index) != len(keys):
            raise ValueError(f"Target cache {os.fspath(folder)!r} has duplicated clip keys.")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def bytes_per_clip(self) -> float:
        """On-disk size of the shards divided by the number of clips."""
        total = sum(p.stat().st_size for p in self.folder.glob("shard-*.parquet"))
        return total / max(len(self), 1)

    @staticmethod
    def patch_token_bytes(config: Any) -> int:
        """What one clip's teacher patch tokens would take in float16 (what UMT alignment would need cached)."""
        vision = config.vision_config
        tokens = (vision.num_frames // vision.tubelet_size) * (vision.image_size // vision.patch_size) ** 2
        return tokens * config.teacher_hidden_size * 2

    def check_run(self, args: Any, config: Any, processor: Any) -> None:
        """Raises `ValueError` naming every setting of the run (`args`: the pretraining arguments; the student's
        `config` and `processor`) that differs from the cache's."""
        expected = run_settings(config, processor, args.frame_sampling, args.relevance_method)
        # Caches written before `relevance_method` existed hold window-pooled relevance.
        written = {"relevance_method": "window", **self.config}
        mismatches = [
            f"{name}: cache {written.get(name)!r}, run {value!r}"
            for name, value in expected.items()
            if written.get(name) != value
        ]
        if mask_needs_teacher(args.mask_strategy, args.mask_features):
            cached = self.config.get("mask") or {}
            if not self.has_masks:
                mismatches.append(
                    f"mask_strategy: the run's {args.mask_strategy!r} masks need the teacher, the cache stores no "
                    "masks (written with a teacher-free strategy)"
                )
            for name in MASK_SETTINGS:
                if cached.get(name) != getattr(args, name):
                    mismatches.append(f"{name}: cache {cached.get(name)!r}, run {getattr(args, name)!r}")
        if mismatches:
            raise ValueError(
                f"Target cache {os.fspath(self.folder)!r} does not match this run: " + "; ".join(mismatches) + ". "
                "Rewrite it with `clusterstm precompute-targets` and the run's settings."
            )
        self.use_masks = self.has_masks and mask_needs_teacher(args.mask_strategy, args.mask_features)

    def rows(self, keys: Sequence[str]) -> list[int]:
        """Row indices of `keys`; a missing key is a `ValueError` naming it."""
        missing = [key for key in keys if key not in self.index]
        if missing:
            raise ValueError(
                f"Target cache {os.fspath(self.folder)!r} has no row for {len(missing)} clip(s) of the training data, "
                f"e.g. {missing[0]!r}; it was written for another corpus (or other captions)."
            )
        return [self.index[key] for key in keys]

    def check_keys(self, dataset: Any, caption_column: str = "caption", video_column: str = "file_name") -> None:
        """Every clip of a map-style training set must have a cache row (checked up front, column-wise)."""
        self.rows(dataset_keys(dataset, caption_column, video_column))

    def collator(self, inner: Any, caption_column: str = "caption", video_column: str = "file_name"):
        """Wraps a collator so that its batches carry the clips' cached `teacher_relevance` (float32) and, for
        teacher-driven mask strategies, `bool_masked_pos`."""
        return CachedTargetsCollator(inner, self, caption_column, video_column)


class CachedTargetsCollator:
    """A collator whose batches are joined with the target cache by [`clip_key`]."""

    def __init__(self, inner: Any, cache: TeacherTargetCache, caption_column: str, video_column: str) -> None:
        self.inner = inner
        self.relevance = cache.relevance
        self.masks = cache.masks if getattr(cache, "use_masks", False) else None
        self.index = cache.index
        self.rows = cache.rows
        self.caption_column = caption_column
        self.video_column = video_column

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        indices = self.rows([clip_key(row, self.caption_column, self.video_column) for row in rows])
        batch = self.inner(rows)
        batch["teacher_relevance"] = torch.from_numpy(self.relevance[indices].astype(np.float32))
        if self.masks is not None:
            batch["bool_masked_pos"] = torch.from_numpy(self.masks[indices].copy())
        return batch

    def normalize_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The wrapped collator's normalisation (its workers hand over uint8 frames)."""
        return self.inner.normalize_pixel_values(pixel_values)


def _nested_to_numpy(column: Any, dtype: Any) -> np.ndarray:
    """A `list<list<x>>` parquet column with equal inner lengths as a `(rows, frames, tokens)` array."""
    rows = column.to_pylist()
    return np.asarray(rows, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PrecomputeTargetsArguments:
    """Arguments of `clusterstm precompute-targets` / `scripts/precompute_teacher_targets.py`. The data flags are
    those of `scripts/pretrain.py` (same names, same dataset builder)."""

    model_name_or_path: str = field(
        metadata={"help": "The student checkpoint folder the cache is for (frames, resolution, processor, window)."}
    )
    teacher_name_or_path: str = field(metadata={"help": "A CLIP- or SigLIP-like checkpoint folder (the teacher)."})
    output_dir: str = field(metadata={"help": "Where the parquet shards and targets_config.json go."})
    dataset_name: str | None = field(default=None, metadata={"help": "`synthetic`: the embedded benchmark."})
    train_file: str | None = field(default=None, metadata={"help": "A jsonl or csv file with one row per clip."})
    video_root: str | None = field(default=None, metadata={"help": "Folder the video paths are relative to."})
    video_column: str = field(default="file_name", metadata={"help": "Column of --train_file holding the video."})
    caption_column: str = field(default="caption", metadata={"help": "Column holding the caption."})
    streaming: bool = field(default=False, metadata={"help": "Stream --train_file."})
    num_train_clips: int | None = field(default=None, metadata={"help": "Synthetic benchmark: training clips."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic benchmark's clips."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the corpus."})
    max_text_length: int = field(default=32, metadata={"help": "Student caption length (as in pretraining)."})
    frame_sampling: str = field(default="uniform", metadata={"help": "Must be `uniform` (deterministic frames)."})
    mask_strategy: str = field(default="cluster", metadata={"help": "The run's mask strategy."})
    mask_ratio: float = field(default=0.8, metadata={"help": "The run's mask ratio."})
    dc_ratio: float = field(default=0.02, metadata={"help": "Cluster masking density cut-off quantile."})
    dpc_k: int = field(default=5, metadata={"help": "Cluster masking DPC-KNN neighbours."})
    mask_features: str = field(default="teacher", metadata={"help": "Cluster masking features: teacher or patch."})
    relevance_method: str = field(
        default="window", metadata={"help": "How relevance is read from the teacher: window, maskclip or clearclip."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the stored attention-guided masks."})
    per_device_batch_size: int = field(default=16, metadata={"help": "Clips per teacher forward (alias --batch_size)."})
    shard_size: int = field(default=10000, metadata={"help": "Rows per parquet shard."})
    device: str | None = field(default=None, metadata={"help": "Teacher device (default: cuda if available)."})

    def __post_init__(self) -> None:
        from ..models.masking_clusterstm import validate_masking_arguments

        if (self.dataset_name is None) == (self.train_file is None):
            raise ValueError("Pass exactly one of --dataset_name synthetic or --train_file.")
        if self.dataset_name is not None and self.dataset_name != "synthetic":
            raise ValueError(f"--dataset_name must be 'synthetic', got {self.dataset_name!r}.")
        if self.frame_sampling != "uniform":
            raise ValueError(
                "--frame_sampling must be uniform for a target cache: targets belong to fixed frames, randomly "
                "sampled ones would not match them at training time (see docs/TEACHER_TARGETS.md)."
            )
        validate_masking_arguments(self)
        check_relevance_method(self.relevance_method)
        for name in ("per_device_batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")


def write_teacher_targets(
    args: PrecomputeTargetsArguments, dataset: Any = None, teacher: Any = None
) -> dict[str, Any]:
    """
    Runs the teacher once over the corpus and writes the cache into `args.output_dir`.

    Args:
        args: [`PrecomputeTargetsArguments`].
        dataset (*optional*): an in-memory dataset instead of the one the data flags describe.
        teacher (*optional*): an already loaded [`ClusterSTMTeacher`] instead of `args.teacher_name_or_path`.

    Returns:
        `dict` with `num_clips`, `seconds`, `clips_per_second`, `bytes` and `bytes_per_clip` (parquet on disk).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..data.corpus import build_train_dataset, corpus_parameters, derive_seed
    from ..data.readers import VideoTextCollator
    from ..models.configuration_clusterstm import ClusterSTMConfig
    from ..models.masking_clusterstm import build_mask
    from ..models.processing_clusterstm import ClusterSTMProcessor
    from .compatibility import check_teacher_compatibility
    from .targets import compute_teacher_targets
    from .teacher import ClusterSTMTeacher

    config = ClusterSTMConfig.from_pretrained(args.model_name_or_path)
    processor = ClusterSTMProcessor.from_pretrained(args.model_name_or_path)
    vision = config.vision_config
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if teacher is None:
        teacher = ClusterSTMTeacher.from_pretrained(args.teacher_name_or_path, device=device)
    check_teacher_compatibility(teacher, config, processor)
    if dataset is None:
        dataset = build_train_dataset(
            **corpus_parameters(args), num_frames=vision.num_frames, image_size=vision.image_size
        )
    collator = VideoTextCollator(
        processor,
        teacher_tokenizer=teacher.tokenizer,
        num_frames=vision.num_frames,
        sampling="uniform",
        max_length=args.max_text_length,
        caption_column=args.caption_column,
    )
    store_masks = mask_needs_teacher(args.mask_strategy, args.mask_features)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for old in output_dir.glob("shard-*.parquet"):
        old.unlink()

    fields = [pa.field(KEY_COLUMN, pa.string()), pa.field(RELEVANCE_COLUMN, pa.list_(pa.list_(pa.float16())))]
    if store_masks:
        fields.append(pa.field(MASK_COLUMN, pa.list_(pa.list_(pa.bool_()))))
    schema = pa.schema(fields)
    pending: dict[str, list] = {f.name: [] for f in fields}
    num_shards = num_clips = 0

    def flush() -> None:
        nonlocal num_shards
        if not pending[KEY_COLUMN]:
            return
        table = pa.table(
            {
                KEY_COLUMN: pending[KEY_COLUMN],
                RELEVANCE_COLUMN: pa.array(pending[RELEVANCE_COLUMN], type=schema.field(RELEVANCE_COLUMN).type),
                **({MASK_COLUMN: pending[MASK_COLUMN]} if store_masks else {}),
            },
            schema=schema,
        )
        pq.write_table(table, output_dir / SHARD_PATTERN.format(num_shards))
        num_shards += 1
        for values in pending.values():
            values.clear()

    start = time.perf_counter()
    batch_rows: list[dict[str, Any]] = []

    def run_batch(rows: list[dict[str, Any]]) -> None:
        nonlocal num_clips
        keys = [clip_key(row, args.caption_column, args.video_column) for row in rows]
        batch = collator(rows)
        targets = compute_teacher_targets(
            teacher,
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"],
            window_size=config.relevance_window_size,
            relevance_method=args.relevance_method,
            need_patch_tokens=store_masks and args.mask_strategy == "cluster",
            need_cls_attention=store_masks and args.mask_strategy == "attention",
            teacher_input_ids=batch.get("teacher_input_ids"),
            teacher_attention_mask=batch.get("teacher_attention_mask"),
        )
        relevance = targets.relevance.to(torch.float16).cpu().numpy()
        if store_masks:
            b, t, n = targets.relevance.shape
            mask = build_mask(
                args.mask_strategy,
                batch_size=b,
                num_frames=t,
                num_patches=n,
                mask_ratio=args.mask_ratio,
                features=targets.patch_tokens,
                cls_attention=None if targets.cls_attention is None else targets.cls_attention.cpu(),
                generator=[torch.Generator().manual_seed(derive_seed(args.seed, "cached-mask", key)) for key in keys],
                dc_ratio=args.dc_ratio,
                dpc_k=args.dpc_k,
            )
            pending[MASK_COLUMN].extend(mask.cpu().numpy().tolist())
        pending[KEY_COLUMN].extend(keys)
        pending[RELEVANCE_COLUMN].extend(relevance.tolist())
        num_clips += len(rows)
        if len(pending[KEY_COLUMN]) >= args.shard_size:
            flush()

    seen: set[str] = set()
    for row in dataset:
        key = clip_key(row, args.caption_column, args.video_column)
        if key in seen:  # the same clip with the same caption twice: one row
            continue
        seen.add(key)
        batch_rows.append(row)
        if len(batch_rows) == args.per_device_batch_size:
            run_batch(batch_rows)
            batch_rows = []
    if batch_rows:
        run_batch(batch_rows)
    flush()
    seconds = time.perf_counter() - start

    settings = run_settings(config, processor, args.frame_sampling, args.relevance_method)
    record = {
        "teacher_name_or_path": args.teacher_name_or_path,
        **settings,
        "num_patches": (vision.image_size // vision.patch_size) ** 2,
        "mask": {name: getattr(args, name) for name in MASK_SETTINGS} if store_masks else None,
        "mask_seed": args.seed if store_masks and args.mask_strategy == "attention" else None,
        "num_clips": num_clips,
        "data": {k: v for k, v in asdict(args).items() if k not in ("output_dir", "device", "teacher_name_or_path")},
        "clusterstm_version": _package_version(),
    }
    (output_dir / TARGETS_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
    total = sum(p.stat().st_size for p in output_dir.glob("shard-*.parquet"))
    stats = {
        "num_clips": num_clips,
        "seconds": seconds,
        "clips_per_second": num_clips / max(seconds, 1e-9),
        "bytes": total,
        "bytes_per_clip": total / max(num_clips, 1),
    }
    logger.info("Wrote %d clips of teacher targets to %s (%s).", num_clips, output_dir, stats)
    return stats


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of `scripts/precompute_teacher_targets.py` and `clusterstm precompute-targets`."""
    import sys

    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    # `--batch_size` is an alias of `--per_device_batch_size`.
    argv = ["--per_device_batch_size" if a == "--batch_size" else a for a in argv]
    argv = [a.replace("--batch_size=", "--per_device_batch_size=", 1) if a.startswith("--batch_size=") else a for a in argv]
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(PrecomputeTargetsArguments).parse_args_into_dataclasses(args=argv)
    stats = write_teacher_targets(args)
    print(json.dumps(stats, indent=2))
    return stats


__all__ = [
    "CachedTargetsCollator",
    "PrecomputeTargetsArguments",
    "TeacherTargetCache",
    "clip_key",
    "dataset_keys",
    "main",
    "write_teacher_targets",
]
