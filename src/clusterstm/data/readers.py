"""Video-text data pipeline: the synthetic benchmark, jsonl/csv corpora (optionally streamed) and a batch collator.

Videos are kept as paths in the dataset (Arrow-backed, compact) and decoded with PyAV inside the collator, i.e. inside
the `DataLoader` worker processes, sampling frames before decoding. `datasets`' own `Video` feature decodes only through
torchcodec, which is not usable on CPU-only installs, so it is never used here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..models.video_processing_clusterstm import VideoDecodingError
from .decoding import read_video
from .streaming import STREAM_POSITION_KEY

logger = logging.getLogger(__name__)

#: Column that holds the resolved video path in datasets returned by [`load_video_text_dataset`].
VIDEO_PATH_COLUMN = "video_path"
_SPLIT_ALIASES = {"validation": ("validation", "val", "valid", "dev"), "val": ("validation", "val", "valid", "dev")}


def resolve_video_path(video_root: str, relative: str, row: int | str = "?", field: str = "file_name") -> str:
    """
    Join `relative` to `video_root` and check that the result stays inside the root (no `..` or absolute escapes).

    Raises:
        `ValueError`: naming the row and field when the value is empty or the path escapes `video_root`.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise ValueError(f"Row {row}: field {field!r} is missing or empty (got {relative!r}).")
    root = os.path.realpath(video_root)
    resolved = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, resolved]) != root:
        raise ValueError(f"Row {row}: field {field!r} = {relative!r} points outside the video root {video_root!r}.")
    return resolved


def _check_caption(caption: Any, row: int | str, field: str) -> None:
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"Row {row}: field {field!r} is missing or empty (got {caption!r}).")


def _builder_for(path: str) -> str:
    lowered = path.lower()
    if lowered.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "json"
    if lowered.endswith((".csv", ".csv.gz")):
        return "csv"
    if lowered.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"Unsupported annotation file {path!r}: use .jsonl/.json, .csv or .parquet.")


def _find_split_file(folder: str, split: str) -> str | None:
    for name in _SPLIT_ALIASES.get(split, (split,)):
        candidate = os.path.join(folder, name, "metadata.jsonl")
        if os.path.isfile(candidate):
            return candidate
    return None


def load_video_text_dataset(
    dataset_name: str | None = None,
    train_file: str | os.PathLike | None = None,
    video_root: str | os.PathLike | None = None,
    video_column: str = "file_name",
    caption_column: str = "caption",
    split: str = "train",
    streaming: bool = False,
    synthetic_config: Any = None,
    verify_files: bool = False,
):
    """
    Load a video-text corpus as a `datasets.Dataset` (or `IterableDataset` when `streaming`).

    Sources:
        - `dataset_name="synthetic"`: the embedded benchmark, in memory (column `video`: uint8 `(T, H, W, 3)`), split
          `train` / `validation` / `test` / `compositional`, settings from `synthetic_config`.
        - `train_file`: a jsonl/csv/parquet annotation file, one row per clip, with `video_column` (a path relative to
          `video_root`, default: the annotation file's folder) and `caption_column`.
        - `dataset_name=<folder>`: a folder written by `export_synthetic_benchmark` (or any `<split>/metadata.jsonl`
          layout); `video_root` defaults to the split folder.
        - any other `dataset_name` is passed to `datasets.load_dataset` (video paths are then resolved against
          `video_root`).

    Rows from files get a `video_path` column (resolved path) and keep `caption_column`; rows with a missing/empty
    video or caption field, or a path escaping `video_root`, raise a `ValueError` naming the row and the field (for
    streaming datasets, when the row is read). With `verify_files=True` every resolved file is also checked to exist
    and be non-empty (one `stat` per row, no decoding), raising [`VideoDecodingError`] naming the row and the file;
    corrupt content is only found when decoding (the collator names the file, or skips it with `skip_bad_samples`).
    """
    from datasets import load_dataset

    if dataset_name is None and train_file is None:
        raise ValueError("Pass `dataset_name` (e.g. 'synthetic' or a folder) or `train_file` (jsonl/csv).")
    if dataset_name == "synthetic":
        from .synthetic import SyntheticVideoTextConfig, generate_synthetic_benchmark

        split_name = "validation" if split in ("val", "valid", "dev") else split
        config = synthetic_config or SyntheticVideoTextConfig()
        dataset = generate_synthetic_benchmark(config, splits=(split_name,))[split_name]
        return dataset.with_format(None).to_iterable_dataset() if streaming else dataset

    if train_file is None and dataset_name is not None and os.path.isdir(dataset_name):
        train_file = _find_split_file(dataset_name, split)
        if train_file is None:
            raise ValueError(f"No {split}/metadata.jsonl in dataset folder {dataset_name!r}.")

    if train_file is not None:
        train_file = os.fspath(train_file)
        if not os.path.isfile(train_file):
            raise ValueError(f"Annotation file not found: {train_file!r}")
        root = os.fspath(video_root) if video_root is not None else os.path.dirname(os.path.abspath(train_file))
        dataset = load_dataset(_builder_for(train_file), data_files=train_file, split="train", streaming=streaming)
    else:
        if video_root is None:
            raise ValueError(f"`video_root` is required to resolve video paths of dataset {dataset_name!r}.")
        root = os.fspath(video_root)
        dataset = load_dataset(dataset_name, split=split, streaming=streaming)

    if not os.path.isdir(root):
        raise ValueError(f"Video root folder not found: {root!r}")
    columns = dataset.column_names
    if columns is not None:
        for name in (video_column, caption_column):
            if name not in columns:
                raise ValueError(f"Column {name!r} not found in the annotations (columns: {columns}).")

    def add_path(row: dict[str, Any], index: int) -> dict[str, Any]:
        _check_caption(row.get(caption_column), index, caption_column)
        path = resolve_video_path(root, row.get(video_column), index, video_column)
        if verify_files:
            _check_video_file(path, index, video_column)
        return {VIDEO_PATH_COLUMN: path}

    if streaming:
        return dataset.map(add_path, with_indices=True)
    # Validate everything up front (cheap: strings only) so a bad row fails before training starts.
    videos, captions = dataset[video_column], dataset[caption_column]
    paths = []
    for index, (video, caption) in enumerate(zip(videos, captions)):
        _check_caption(caption, index, caption_column)
        paths.append(resolve_video_path(root, video, index, video_column))
        if verify_files:
            _check_video_file(paths[-1], index, video_column)
    return dataset.add_column(VIDEO_PATH_COLUMN, paths)


def _check_video_file(path: str, row: int | str, field: str) -> None:
    if not os.path.isfile(path):
        raise VideoDecodingError(f"Row {row}: field {field!r}: video file not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise VideoDecodingError(f"Row {row}: field {field!r}: video file is empty (0 bytes): {path!r}")


class VideoTextCollator:
    """
    Turn a list of dataset rows into model inputs, decoding videos on the fly (run it inside `DataLoader` workers).

    Each row needs a caption (`caption_column`) and either a decoded clip (`video`: array/tensor `(T, H, W, C)`) or a
    file (`video_path`, or `video_column`), which is decoded here with PyAV, sampling `num_frames` frames before
    decoding. The returned batch holds `pixel_values` `(B, T, 3, H, W)`, `input_ids`, `attention_mask` and, with a
    `teacher_tokenizer`, `teacher_input_ids` / `teacher_attention_mask`.

    Unreadable videos raise [`VideoDecodingError`] naming the file, unless `skip_bad_samples=True`: then the sample
    is replaced (by a random row of `dataset` when given, otherwise by another good sample of the same batch, so the
    batch size never changes), a warning names the file, `self.num_skipped` counts replacements made in this process,
    and the batch carries `num_skipped_samples` (a 0-dim tensor, since workers' attributes are not visible to the
    training loop: pop it from the batch before calling the model).

    Args:
        processor: A [`ClusterSTMProcessor`] (uses its `video_processor` and `tokenizer`).
        teacher_tokenizer (*optional*): The teacher's own tokenizer.
        num_frames (`int`, *optional*): Frames per clip (default: the video processor's `num_frames`).
        sampling (`str`, defaults to `"uniform"`): `"random"` for training, `"uniform"` for evaluation.
        skip_bad_samples (`bool`, defaults to `False`): Replace unreadable samples instead of raising.
        max_length (`int`, *optional*): Student text truncation length (default: the tokenizer's).
        teacher_max_length (`int`, *optional*): Teacher text truncation length (default 77 when the teacher
            tokenizer has no sensible `model_max_length`).
        caption_column (`str`, defaults to `"caption"`), video_column (`str`, defaults to `"video_path"`).
        dataset (*optional*): Map-style dataset to draw replacements from.
        max_retries (`int`, defaults to 10): Replacement attempts per bad sample.
    """

    def __init__(
        self,
        processor: Any,
        teacher_tokenizer: Any = None,
        num_frames: int | None = None,
        sampling: str = "uniform",
        skip_bad_samples: bool = False,
        max_length: int | None = None,
        teacher_max_length: int | None = None,
        caption_column: str = "caption",
        video_column: str = VIDEO_PATH_COLUMN,
        dataset: Any = None,
        max_retries: int = 10,
        resolver: Any = None,
        uint8_pixels: bool = False,
    ) -> None:
        if sampling not in ("uniform", "random"):
            raise ValueError(f"`sampling` must be 'uniform' or 'random', got {sampling!r}.")
        self.processor = processor
        self.video_processor = processor.video_processor
        self.tokenizer = processor.tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.num_frames = int(num_frames if num_frames is not None else self.video_processor.num_frames)
        if self.num_frames < 1:
            raise ValueError(f"`num_frames` must be >= 1, got {self.num_frames}.")
        self.sampling = sampling
        self.skip_bad_samples = skip_bad_samples
        self.max_length = max_length
        if teacher_max_length is None and teacher_tokenizer is not None:
            model_max = getattr(teacher_tokenizer, "model_max_length", None)
            teacher_max_length = model_max if isinstance(model_max, int) and 0 < model_max <= 4096 else 77
        self.teacher_max_length = teacher_max_length
        self.caption_column = caption_column
        self.video_column = video_column
        self.dataset = dataset
        self.max_retries = max_retries
        self.num_skipped = 0
        # Corpus rows (webdataset samples, bytes columns, templates) are turned into {video, caption, clip_key} by a
        # `clusterstm.data.sources.ClipResolver`; its errors are bad samples like unreadable videos.
        self.resolver = resolver
        # Workers hand over resized/cropped uint8 frames (4x less to copy between processes); the main process or
        # the device finishes with `normalize_pixel_values`, the processor's own fused rescale + normalise.
        self.uint8_pixels = uint8_pixels

    def _prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.resolver is None:
            return row
        clip = self.resolver(row)
        return {"video": clip["video"], self.caption_column: clip["caption"], "clip_key": clip["clip_key"],
                "__name__": clip["name"]}

    def _video_source(self, row: dict[str, Any]) -> Any:
        if "video" in row and row["video"] is not None and not isinstance(row["video"], (str, dict)):
            return row["video"]
        for key in (self.video_column, VIDEO_PATH_COLUMN, "video"):
            value = row.get(key)
            if isinstance(value, dict):  # datasets Video(decode=False) gives {"path": ..., "bytes": ...}
                value = value.get("bytes") or value.get("path")
            if isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)):
                return value
        raise ValueError(f"Row has no video (looked for 'video', {self.video_column!r}); keys: {sorted(row)}.")

    def _decode(self, row: dict[str, Any]) -> np.ndarray | torch.Tensor:
        source = self._video_source(row)
        if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
            # Same frames as `read_video_pyav`, fewer decoded (see data/decoding.py); bytes decode from memory.
            return read_video(source, self.num_frames, self.sampling, name=row.get("__name__"))
        clip = source if isinstance(source, torch.Tensor) else np.asarray(source)
        if isinstance(clip, np.ndarray) and clip.dtype.kind in "iu" and clip.dtype != np.uint8:
            # Unformatted / streamed rows come back as int64 lists; pixel values are bytes.
            clip = clip.clip(0, 255).astype(np.uint8)
        if clip.ndim not in (3, 4) or clip.shape[0] == 0:
            raise ValueError(f"In-memory video must be (T, H, W[, C]) with T >= 1, got shape {tuple(clip.shape)}.")
        return clip

    def _describe(self, row: dict[str, Any]) -> str:
        try:
            source = self._video_source(row)
        except ValueError:
            return "<no video>"
        if row.get("__name__"):
            return row["__name__"]
        return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "<in-memory clip>"

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if len(rows) == 0:
            raise ValueError("Cannot collate an empty batch.")
        rows = [dict(row) for row in rows]
        # Streamed rows carry their reader's position; the last row's is the reader's position after this batch.
        positions = [row.pop(STREAM_POSITION_KEY, None) for row in rows]
        clips: list[Any] = [None] * len(rows)
        bad: list[int] = []
        for i, row in enumerate(rows):
            try:
                rows[i] = row = self._prepare(row)
                clips[i] = self._decode(row)
            except VideoDecodingError as error:
                if not self.skip_bad_samples:
                    raise
                logger.warning("Skipping bad sample (replaced by another sample): %s", error)
                bad.append(i)
        skipped = len(bad)
        for i in bad:
            rows[i], clips[i] = self._replacement(rows, clips)
        self.num_skipped += skipped

        captions = [row.get(self.caption_column) for row in rows]
        for i, caption in enumerate(captions):
            _check_caption(caption, f"{i} of the batch", self.caption_column)
        # Sampling happened at decode time for files; arrays are (re)sampled here to `num_frames`.
        extra = {"do_rescale": False, "do_normalize": False} if self.uint8_pixels else {}
        pixel_values = self.video_processor(
            clips, num_frames=self.num_frames, sampling=self.sampling, return_tensors="pt", **extra
        )["pixel_values"]
        text = self.tokenizer(
            captions,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        batch = {
            "pixel_values": pixel_values,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
        }
        if self.teacher_tokenizer is not None:
            teacher = self.teacher_tokenizer(
                captions, padding=True, truncation=True, max_length=self.teacher_max_length, return_tensors="pt"
            )
            batch["teacher_input_ids"] = teacher["input_ids"]
            batch["teacher_attention_mask"] = teacher["attention_mask"]
        if self.skip_bad_samples:
            batch["num_skipped_samples"] = torch.tensor(skipped)
        keys = [row.get("clip_key") for row in rows]
        if all(isinstance(key, str) for key in keys):
            # A stable per-clip key (file/shard + key + caption digest), e.g. for caches of teacher targets.
            batch["clip_key"] = keys
        if positions[-1] is not None:
            batch["stream_position"] = positions[-1]
        return batch

    def normalize_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Finish uint8 `pixel_values` of a `uint8_pixels` batch (on any device): the video processor's fused
        rescale + normalise, so the result equals what the processor returns in one go. Float input is returned
        unchanged."""
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        processor = self.video_processor
        return processor.rescale_and_normalize(
            pixel_values,
            processor.do_rescale,
            processor.rescale_factor,
            processor.do_normalize,
            processor.image_mean,
            processor.image_std,
        )

    def _replacement(self, rows: list[dict[str, Any]], clips: list[Any]) -> tuple[dict[str, Any], Any]:
        if self.dataset is not None and hasattr(self.dataset, "__len__") and len(self.dataset) > 0:
            for _ in range(self.max_retries):
                index = int(torch.randint(len(self.dataset), (1,)).item())
                row = self.dataset[index]
                try:
                    row = self._prepare(row)
                    return row, self._decode(row)
                except VideoDecodingError:
                    logger.warning("Replacement video %s is unreadable too.", self._describe(row))
                    self.num_skipped += 1
        good = [i for i, clip in enumerate(clips) if clip is not None]
        if not good:
            files = ", ".join(self._describe(row) for row in rows)
            raise VideoDecodingError(f"Every video of the batch is unreadable: {files}")
        pick = good[int(torch.randint(len(good), (1,)).item())]
        return rows[pick], clips[pick]


__all__ = ["VIDEO_PATH_COLUMN", "VideoTextCollator", "load_video_text_dataset", "resolve_video_path"]
