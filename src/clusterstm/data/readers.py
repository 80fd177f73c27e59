"""Video-text data pipeline: the synthetic benchmark, jsonl/csv corpora (optionally streamed) and a batch collator.

Videos are kept as paths in the dataset (Arrow-backed, compact) and decoded with PyAV inside the collator, i.e. inside
the `DataLoader` worker processes, sampling frames before decoding. `datasets`' own `Video` feature decodes only through
torchcodec, which is not usable on CPU-only installs, so it is never used here.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..models.video_processing_clusterstm import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_PIXELS_PER_FRAME,
    VideoDecodingError,
    check_frame_size,
)
from .decoding import read_video
from .streaming import STREAM_POSITION_KEY

logger = logging.getLogger(__name__)

#: Column that holds the resolved video path in datasets returned by [`load_video_text_dataset`].
VIDEO_PATH_COLUMN = "video_path"
#: Where a user column that was already named `video_path` (but is not the video column) is kept.
USER_VIDEO_PATH_COLUMN = "user_video_path"
_SPLIT_ALIASES = {"validation": ("validation", "val", "valid", "dev"), "val": ("validation", "val", "valid", "dev")}


def _where(source: str | None, row: int | str) -> str:
    return f"{source}: Row {row}" if source else f"Row {row}"


def resolve_video_path(
    video_root: str, relative: str, row: int | str = "?", field: str = "file_name", source: str | None = None
) -> str:
    """
    Join `relative` to `video_root` and check that the result stays inside the root (no `..` or absolute escapes).

    This is the one path resolver of the package: pretraining corpora and fine-tuning annotations both use it.

    Args:
        source: the annotation file, named in errors.

    Raises:
        `ValueError`: naming the file, the row and the field when the value is empty or not a string, or the path
            escapes `video_root`.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise ValueError(f"{_where(source, row)}: field {field!r} is missing or empty (got {relative!r}).")
    root = os.path.realpath(video_root)
    resolved = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, resolved]) != root:
        raise ValueError(
            f"{_where(source, row)}: field {field!r} = {relative!r} points outside the video root {video_root!r}."
        )
    return resolved


def _check_caption(caption: Any, row: int | str, field: str, source: str | None = None) -> None:
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{_where(source, row)}: field {field!r} is missing or empty (got {caption!r}).")


def _decode_line(raw: bytes, path: str, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: line {number} is not valid UTF-8 (byte {error.start + 1} of the line: {raw[error.start : error.start + 4]!r}); "
            "annotation files must be UTF-8 encoded."
        ) from None


def iter_jsonl_records(path: str | os.PathLike, max_records: int | None = None):
    """
    Yield `(line number, record)` for every non-blank line of a jsonl file, with errors that name the file and the
    line: bytes that are not UTF-8 (and where), a line that is not JSON (and the column), a line that is not a
    JSON object. At most `max_records` records when given.
    """
    path = os.fspath(path)
    found = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            text = _decode_line(raw, path, number).lstrip("\ufeff" if number == 1 else "")
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}: line {number} is not valid JSON ({error.msg} at column {error.colno})."
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {number} is a JSON {type(record).__name__}, expected an object.")
            yield number, record
            found += 1
            if max_records is not None and found >= max_records:
                return


def read_jsonl_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a jsonl file (see [`iter_jsonl_records`]); an empty file is an error naming it."""
    records = [record for _, record in iter_jsonl_records(path)]
    if not records:
        raise ValueError(f"{os.fspath(path)} holds no records (the file is empty or only has blank lines).")
    return records


def _diagnose_annotation_file(path: str, builder: str, streaming: bool) -> None:
    """Raise a `ValueError` naming the file and the line of the first problem `datasets` would stumble on: bytes that
    are not UTF-8, a jsonl line that is not a JSON object, no records at all.

    One pass over the file (json files are parsed once more by `datasets`). Streaming only looks at the first record
    (the point of streaming is not to read the whole file up front); later bad lines fail while streaming.
    """
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty: an annotation file needs a header (csv) or at least one record.")
    if path.lower().endswith(".gz"):
        return
    if builder == "json":
        with open(path, "rb") as handle:
            head = handle.read(1).lstrip()
        if path.lower().endswith(".json") and head in (b"[", b"{") and not streaming:
            raw = open(path, "rb").read()
            try:
                json.loads(_decode_line(raw, path, 1))
            except json.JSONDecodeError as error:
                if "Extra data" not in error.msg:  # otherwise it is jsonl content in a .json file
                    raise ValueError(
                        f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
                    ) from None
            else:
                return
        found = sum(1 for _ in iter_jsonl_records(path, max_records=1 if streaming else None))
        if not found:
            raise ValueError(f"{path} holds no records (the file is empty or only has blank lines).")
    elif builder == "csv":
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                _decode_line(raw, path, number)
                if streaming and number > 1:
                    break


def _load_annotation_file(path: str, streaming: bool):
    from datasets import load_dataset

    builder = _builder_for(path)
    # "None", "NA", "null" ... are valid captions: no pandas NA guessing (an empty cell stays "" and is rejected).
    extra = {"keep_default_na": False} if builder == "csv" else {}
    # Checked before `datasets` reads the file: it stores invalid UTF-8 without complaint (the error only comes when a
    # row is read) and reports bad JSON without a line. Streaming checks the first record only.
    _diagnose_annotation_file(path, builder, streaming=streaming)
    try:
        return load_dataset(builder, data_files=path, split="train", streaming=streaming, **extra)
    except Exception as error:
        raise ValueError(f"Could not read annotation file {path}: {type(error).__name__}: {error}") from error


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
        dataset = _load_annotation_file(train_file, streaming)
    else:
        if video_root is None:
            raise ValueError(f"`video_root` is required to resolve video paths of dataset {dataset_name!r}.")
        root = os.fspath(video_root)
        dataset = load_dataset(dataset_name, split=split, streaming=streaming)

    if not os.path.isdir(root):
        raise ValueError(f"Video root folder not found: {root!r}")
    source = train_file if train_file is not None else dataset_name
    columns = dataset.column_names
    if columns is not None:
        for name in (video_column, caption_column):
            if name not in columns:
                raise ValueError(f"{source}: Column {name!r} not found in the annotations (columns: {columns}).")
    # A user column that happens to be called `video_path` is kept under another name: `video_path` is where the
    # resolved path goes.
    keep_user_column = video_column != VIDEO_PATH_COLUMN

    def add_path(row: dict[str, Any], index: int) -> dict[str, Any]:
        _check_caption(row.get(caption_column), index, caption_column, source)
        path = resolve_video_path(root, row.get(video_column), index, video_column, source)
        if verify_files:
            _check_video_file(path, index, video_column, source)
        if keep_user_column and VIDEO_PATH_COLUMN in row:
            return {USER_VIDEO_PATH_COLUMN: row[VIDEO_PATH_COLUMN], VIDEO_PATH_COLUMN: path}
        return {VIDEO_PATH_COLUMN: path}

    if streaming:
        return dataset.map(add_path, with_indices=True)
    # Validate everything up front (cheap: strings only) so a bad row fails before training starts.
    videos, captions = dataset[video_column], dataset[caption_column]
    paths = []
    for index, (video, caption) in enumerate(zip(videos, captions)):
        _check_caption(caption, index, caption_column, source)
        paths.append(resolve_video_path(root, video, index, video_column, source))
        if verify_files:
            _check_video_file(paths[-1], index, video_column, source)
    if VIDEO_PATH_COLUMN in dataset.column_names:
        if keep_user_column:
            if USER_VIDEO_PATH_COLUMN in dataset.column_names:
                raise ValueError(
                    f"{source}: columns {VIDEO_PATH_COLUMN!r} and {USER_VIDEO_PATH_COLUMN!r} both exist; rename one "
                    f"({VIDEO_PATH_COLUMN!r} receives the resolved path of {video_column!r})."
                )
            logger.warning(
                "%s: column %r is kept as %r; %r holds the resolved path of %r.",
                source,
                VIDEO_PATH_COLUMN,
                USER_VIDEO_PATH_COLUMN,
                VIDEO_PATH_COLUMN,
                video_column,
            )
            dataset = dataset.rename_column(VIDEO_PATH_COLUMN, USER_VIDEO_PATH_COLUMN)
        else:
            dataset = dataset.remove_columns(VIDEO_PATH_COLUMN)
    return dataset.add_column(VIDEO_PATH_COLUMN, paths)


def _check_video_file(path: str, row: int | str, field: str, source: str | None = None) -> None:
    if not os.path.isfile(path):
        raise VideoDecodingError(f"{_where(source, row)}: field {field!r}: video file not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise VideoDecodingError(f"{_where(source, row)}: field {field!r}: video file is empty (0 bytes): {path!r}")


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
        # A resolved path wins: a `video` column next to it may be an id or any other user field.
        for key in (self.video_column, VIDEO_PATH_COLUMN, "video"):
            value = row.get(key)
            if isinstance(value, dict):  # datasets Video(decode=False) gives {"path": ..., "bytes": ...}
                value = value.get("bytes") or value.get("path")
            if isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)):
                return value
        clip = row.get("video")
        # Only an array-like with frames is an in-memory clip; a scalar `video` (an id, a count) is not.
        if isinstance(clip, (np.ndarray, torch.Tensor, list, tuple)) and np.ndim(clip) in (3, 4):
            return clip
        if clip is not None:
            raise ValueError(
                f"Column 'video' holds {type(clip).__name__} {clip!r:.60}, neither a video path nor a (T, H, W[, C]) "
                f"clip, and the row has no {self.video_column!r} path; keys: {sorted(row)}."
            )
        raise ValueError(f"Row has no video (looked for 'video', {self.video_column!r}); keys: {sorted(row)}.")

    def _limits(self) -> tuple[int | None, float | None]:
        return (
            getattr(self.video_processor, "max_pixels_per_frame", DEFAULT_MAX_PIXELS_PER_FRAME),
            getattr(self.video_processor, "max_aspect_ratio", DEFAULT_MAX_ASPECT_RATIO),
        )

    def _decode(self, row: dict[str, Any]) -> np.ndarray | torch.Tensor:
        source = self._video_source(row)
        if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
            # Same frames as `read_video_pyav`, fewer decoded (see data/decoding.py); bytes decode from memory.
            return read_video(source, self.num_frames, self.sampling, name=row.get("__name__"), limits=self._limits())
        clip = source if isinstance(source, torch.Tensor) else np.asarray(source)
        if isinstance(clip, np.ndarray) and clip.dtype.kind in "iu" and clip.dtype != np.uint8:
            # Unformatted / streamed rows come back as int64 lists; pixel values are bytes.
            clip = clip.clip(0, 255).astype(np.uint8)
        if clip.ndim not in (3, 4) or clip.shape[0] == 0:
            raise ValueError(f"In-memory video must be (T, H, W[, C]) with T >= 1, got shape {tuple(clip.shape)}.")
        # (T, H, W), (T, H, W, C) or (T, C, H, W): the frame size is checked here, where a bad sample can be skipped.
        channels_first = clip.ndim == 4 and clip.shape[-1] not in (1, 3, 4) and clip.shape[1] in (1, 3, 4)
        height, width = clip.shape[2:4] if channels_first else clip.shape[1:3]
        check_frame_size(width, height, "<in-memory clip>", *self._limits())
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
        rows, pixel_values, skipped = self._videos(rows)
        captions = [row.get(self.caption_column) for row in rows]
        for i, caption in enumerate(captions):
            _check_caption(caption, f"{i} of the batch", self.caption_column)
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

    def videos(self, rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], torch.Tensor]:
        """
        The `pixel_values` `(B, T, 3, H, W)` of `rows` (decoded and sampled as in `__call__`), and the rows with any
        unreadable sample replaced (`skip_bad_samples=True`), so that a row's other fields (text, label) stay with
        its video. Fine-tuning's collator uses it and adds its own texts and labels.
        """
        if len(rows) == 0:
            raise ValueError("Cannot collate an empty batch.")
        rows, pixel_values, _ = self._videos([dict(row) for row in rows])
        return rows, pixel_values

    def _videos(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], torch.Tensor, int]:
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
        for i in bad:
            rows[i], clips[i] = self._replacement(rows, clips)
        self.num_skipped += len(bad)
        # Sampling happened at decode time for files; arrays are (re)sampled here to `num_frames`.
        extra = {"do_rescale": False, "do_normalize": False} if self.uint8_pixels else {}
        pixel_values = self.video_processor(
            clips, num_frames=self.num_frames, sampling=self.sampling, return_tensors="pt", **extra
        )["pixel_values"]
        return rows, pixel_values, len(bad)

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


__all__ = [
    "USER_VIDEO_PATH_COLUMN",
    "VIDEO_PATH_COLUMN",
    "VideoTextCollator",
    "iter_jsonl_records",
    "load_video_text_dataset",
    "read_jsonl_records",
    "resolve_video_path",
]
