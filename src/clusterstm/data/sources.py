"""Training corpora as they ship: annotation files (jsonl/json/csv/parquet), webdataset tar shards, `save_to_disk`
folders, local dataset folders (videofolder with `metadata.jsonl`) and Hub datasets.

Everything is read with `datasets`' own builders (`json`, `csv`, `parquet`, `webdataset`, `load_from_disk`,
`load_dataset(<folder or id>)`), map-style or streamed. Video columns are never decoded by `datasets` (its `Video`
feature decodes only through torchcodec): `Video` features are cast to `decode=False`, so a row holds a path, the
file's bytes, or the `{"bytes", "path"}` struct. [`ClipResolver`] turns a raw row into what the collator decodes
(a confined path or bytes), its caption, and a stable `clip_key`; it runs in the `DataLoader` workers.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

from ..models.video_processing_clusterstm import VideoDecodingError
from .readers import resolve_video_path

logger = logging.getLogger(__name__)

#: Video members of a webdataset sample, in order of preference.
WEBDATASET_VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi")
_BUILDERS = (
    ((".jsonl", ".json", ".jsonl.gz", ".json.gz"), "json"),
    ((".csv", ".csv.gz"), "csv"),
    ((".parquet",), "parquet"),
    ((".tar", ".tar.gz", ".tgz"), "webdataset"),
)
_BRACE = re.compile(r"\{([^{}]*)\}")


class BadSampleError(VideoDecodingError):
    """A sample that cannot be used (no caption, a template naming no file, undecodable bytes). The message names the
    file or shard and the sample's key; `--skip_bad_samples` skips and counts it like an unreadable video."""


def expand_braces(pattern: str) -> list[str]:
    """
    Expand webdataset brace patterns: `{000000..000127}` (zero-padded numeric range) and `{a,b,c}` (alternatives),
    possibly several per pattern. A pattern without braces is returned as is.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        first, last = range_match.groups()
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        start, stop = int(first), int(last)
        if stop < start:
            raise ValueError(f"Brace range {{{body}}} in {pattern!r} is empty (end before start).")
        options = [str(i).zfill(width) for i in range(start, stop + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return list(itertools.chain.from_iterable(expand_braces(head + option + tail) for option in options))


def _is_remote(path: str) -> bool:
    return "://" in path


def builder_for_file(path: str) -> str:
    """The `datasets` builder reading an annotation file or shard, from its extension."""
    lowered = path.lower()
    for suffixes, builder in _BUILDERS:
        if lowered.endswith(suffixes):
            return builder
    raise ValueError(
        f"Unsupported --train_file {path!r}: use .jsonl/.json, .csv, .parquet, or webdataset .tar shards "
        "(a path, a glob or a brace pattern such as shards/train-{000000..000127}.tar)."
    )


def resolve_data_files(train_file: str) -> tuple[str, list[str]]:
    """
    Expand `train_file` (a path, a glob, or a brace pattern; local or a URL `datasets` understands) into the list of
    files and the builder that reads them. Local patterns that match nothing raise `ValueError` naming the pattern.
    """
    files: list[str] = []
    missing: list[str] = []
    builder_for_file(os.fspath(train_file))  # unsupported extensions fail before any file access
    for pattern in expand_braces(os.fspath(train_file)):
        if _is_remote(pattern):
            files.append(pattern)
        elif glob.has_magic(pattern):
            matched = sorted(glob.glob(pattern))
            if not matched:
                raise ValueError(f"--train_file pattern {pattern!r} matches no file.")
            files.extend(matched)
        else:
            if not os.path.isfile(pattern):
                missing.append(pattern)
            files.append(pattern)
    if missing:
        raise ValueError(
            f"--train_file {os.fspath(train_file)!r}: {len(missing)} of {len(files)} file(s) not found, e.g. "
            f"{missing[0]!r}" + (f" ... {missing[-1]!r}" if len(missing) > 1 else "")
        )
    builders = {builder_for_file(path) for path in files}
    if len(builders) != 1:
        raise ValueError(f"--train_file {train_file!r} mixes formats ({sorted(builders)}); use one format.")
    return builders.pop(), files


def find_corrupt_shard(files: list[str]) -> tuple[str, str, str | None] | None:
    """
    Read the members of every local tar shard (headers and data, no decoding) and return `(shard, error, last good
    sample key)` for the first one that is corrupt or truncated, or None when all read.
    """
    for path in files:
        if _is_remote(path):
            continue
        last_key = None
        try:
            with tarfile.open(path, "r:*") as archive:
                for member in archive:
                    if member.isfile():
                        handle = archive.extractfile(member)
                        if handle is not None:
                            handle.read()
                        last_key = member.name.split("/")[-1].split(".")[0]
        except (tarfile.TarError, OSError, EOFError) as error:
            return path, str(error) or type(error).__name__, last_key
    return None


def _corrupt_shard_error(files: list[str], error: BaseException) -> ValueError | None:
    found = find_corrupt_shard(files)
    if found is None:
        return None
    shard, message, last_key = found
    after = f" after sample key {last_key!r}" if last_key else " before its first sample"
    return ValueError(f"Corrupt or truncated webdataset shard {shard!r}: {message}{after} ({type(error).__name__}).")


def _mixed_members_error(shard: str, error: BaseException) -> ValueError | None:
    """`datasets`' webdataset builder infers columns from the first 5 samples of the first shard and refuses samples
    with different members there; name the samples that differ."""
    if _is_remote(shard) or "don't share the same prefix or the same types" not in str(error):
        return None
    samples: dict[str, list[str]] = {}
    with tarfile.open(shard, "r:*") as archive:
        for member in archive:
            key, _, extension = member.name.partition(".")
            if key not in samples and len(samples) == 5:
                break
            samples.setdefault(key, []).append(extension)
    layouts = {key: sorted(extensions) for key, extensions in samples.items()}
    first_key, first = next(iter(layouts.items()))
    different = {key: value for key, value in layouts.items() if value != first}
    return ValueError(
        f"Webdataset shard {shard!r}: the first samples do not have the same members (sample key {first_key!r}: "
        f"{first}; " + "; ".join(f"sample key {k!r}: {v}" for k, v in different.items()) + "). Columns are inferred "
        "from the first 5 samples of the first shard, so these must all carry the same members "
        "(e.g. mp4 + txt + json)."
    )


@dataclass
class ClipResolver:
    """
    Turns a raw corpus row into `{"video": path or bytes, "caption": str, "clip_key": str, "name": str}`.

    Args:
        source: The annotation file, shard pattern or dataset name (named in errors).
        video_column: Column holding a path, bytes, or a `{"bytes", "path"}` struct (webdataset: ignored, the video
            member `mp4`/`webm`/`mkv`/`avi` is used).
        caption_column: Column holding the caption (webdataset: the `txt` member, else this key of the `json` member).
        video_root: Folder relative paths are resolved against (paths may not escape it); None for absolute paths
            produced by a `datasets` loader (videofolder).
        video_path_template: `str.format` template applied to the row (e.g. `"{video_id}.mp4"`) to build the path.
        webdataset: Rows come from tar shards (`__key__`, `__url__`, one member per extension).
    """

    source: str
    video_column: str = "file_name"
    caption_column: str = "caption"
    video_root: str | None = None
    video_path_template: str | None = None
    webdataset: bool = False

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.webdataset:
            return self._resolve_webdataset(row)
        return self._resolve_table(row)

    def _resolve_webdataset(self, row: dict[str, Any]) -> dict[str, Any]:
        shard = os.path.basename(str(row.get("__url__") or self.source))
        key = str(row.get("__key__"))
        name = f"shard {shard!r}, sample key {key!r}"
        video = None
        for extension in WEBDATASET_VIDEO_EXTENSIONS:
            value = row.get(extension)
            if value is not None:
                video = value.get("bytes") if isinstance(value, dict) else value
                break
        if not video:
            members = sorted(k for k, v in row.items() if not k.startswith("__") and v is not None)
            raise BadSampleError(
                f"{name}: no video member ({'/'.join(WEBDATASET_VIDEO_EXTENSIONS)}); members: {members}."
            )
        caption = row.get("txt")
        if caption is None and isinstance(row.get("json"), dict):
            caption = row["json"].get(self.caption_column)
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8", errors="replace")
        if not isinstance(caption, str) or not caption.strip():
            raise BadSampleError(
                f"{name}: no caption (a non-empty `txt` member or key {self.caption_column!r} of the `json` member)."
            )
        return {"video": video, "caption": caption.strip(), "clip_key": f"{shard}/{key}", "name": name}

    def _resolve_table(self, row: dict[str, Any]) -> dict[str, Any]:
        value = row.get(self.video_column)
        caption = row.get(self.caption_column)
        described = f"{self.video_column}={_short(value)}"
        name = f"{os.path.basename(self.source) or self.source}: row with {described}"
        if not isinstance(caption, str) or not caption.strip():
            raise BadSampleError(f"{name}: field {self.caption_column!r} is missing or empty (got {caption!r}).")
        data = None
        reference = None
        if self.video_path_template is not None:
            try:
                reference = self.video_path_template.format(**row)
            except (KeyError, IndexError, ValueError) as error:
                raise BadSampleError(
                    f"{name}: --video_path_template {self.video_path_template!r} cannot be formatted with this row "
                    f"({type(error).__name__}: {error}); columns: {sorted(row)}."
                ) from error
        elif isinstance(value, dict):  # datasets' Video/Image struct
            data, reference = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        elif isinstance(value, str):
            reference = value
        if data:
            digest = hashlib.sha1(data).hexdigest()[:16]
            key = f"{reference or 'bytes-' + digest}|{_caption_digest(caption)}"
            return {"video": data, "caption": caption, "clip_key": key, "name": f"{name} (video bytes)"}
        if not isinstance(reference, str) or not reference.strip():
            raise BadSampleError(
                f"{name}: field {self.video_column!r} holds no video path or bytes (got {_short(value)})."
            )
        if self.video_root is None and os.path.isabs(reference):
            path = reference  # produced by a datasets loader (videofolder), not by the annotation author
        else:
            try:
                path = resolve_video_path(self.video_root or ".", reference, row=described, field=self.video_column)
            except ValueError as error:
                raise BadSampleError(f"{os.path.basename(self.source)}: {error}") from error
        return {
            "video": path,
            "caption": caption,
            "clip_key": f"{reference}|{_caption_digest(caption)}",
            "name": f"{name} -> {path!r}",
        }


def _short(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_short(v)}" for k, v in value.items()) + "}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _caption_digest(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()[:12]


def _undecoded_videos(dataset: Any) -> Any:
    """Cast every `Video`/`Image`-typed column to `decode=False` (a `{"bytes", "path"}` struct)."""
    from datasets import Video

    features = dataset.features
    if features is None:
        return dataset
    for column, feature in features.items():
        if isinstance(feature, Video) and feature.decode:
            dataset = dataset.cast_column(column, Video(decode=False))
    return dataset


def _pick_video_column(dataset: Any, video_column: str, default: str = "file_name") -> str:
    from datasets import Video

    columns = dataset.column_names or []
    if video_column in columns or video_column != default:
        return video_column
    features = dataset.features or {}
    for column in columns:
        if isinstance(features.get(column), Video):
            return column
    for column in ("video", "video_path", "path"):
        if column in columns:
            return column
    return video_column


@dataclass
class Corpus:
    """A training corpus: the `datasets` object (map-style or streamed) and the resolver its rows need."""

    dataset: Any
    resolver: ClipResolver
    num_shards: int = 1
    #: Webdataset shards (to name a corrupt one when a stream fails), else empty.
    shard_files: list[str] = field(default_factory=list)
    #: Corrupt shards left out (map-style loads with `skip_bad_shards=True`).
    skipped_shards: list[str] = field(default_factory=list)


def load_training_corpus(
    dataset_name: str | None = None,
    train_file: str | None = None,
    video_root: str | None = None,
    video_column: str = "file_name",
    caption_column: str = "caption",
    video_path_template: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    streaming: bool = False,
    validate: bool = True,
    skip_bad_shards: bool = False,
) -> Corpus:
    """
    Open a training corpus with `datasets`, without decoding any video.

    Args:
        dataset_name: A folder written by `save_to_disk`, a folder in the `<split>/metadata.jsonl` layout written by
            `clusterstm export-synthetic`, or any local folder / Hub id `datasets.load_dataset` reads (videofolder).
        train_file: `.jsonl`/`.json`/`.csv`/`.parquet` annotations, or webdataset `.tar` shards (path, glob or
            brace pattern; URLs are passed to `datasets`).
        video_root: Folder relative video paths are resolved against (default: the annotation file's folder).
        video_column / caption_column / video_path_template: See [`ClipResolver`].
        dataset_config_name / split: For `load_dataset` and `DatasetDict` folders.
        streaming: Return an `IterableDataset` (nothing is loaded up front).
        validate: For map-style annotation rows holding paths, check every row's caption and path up front (strings
            only, no file access), so a bad row fails before training.
        skip_bad_shards: Map-style webdataset loads leave corrupt or truncated shards out (a warning names each,
            `Corpus.skipped_shards` lists them) instead of raising.

    Raises:
        `ValueError`: a missing file or column, an unsupported format, a corrupt shard (named, with the last good key).
    """
    from datasets import load_dataset

    if (dataset_name is None) == (train_file is None):
        raise ValueError("Pass exactly one of `dataset_name` and `train_file`.")
    num_shards = 1
    if train_file is not None:
        builder, files = resolve_data_files(train_file)
        skipped: list[str] = []
        while True:
            try:
                dataset = load_dataset(builder, data_files={split: files}, split=split, streaming=streaming)
                break
            except Exception as error:
                if builder != "webdataset":
                    raise
                found = find_corrupt_shard(files)
                if found is not None and skip_bad_shards and not streaming and len(files) > 1:
                    logger.warning("Leaving out %s", _corrupt_shard_error([found[0]], error))
                    skipped.append(found[0])
                    files = [path for path in files if path != found[0]]
                    continue
                explained = _corrupt_shard_error(files, error) or _mixed_members_error(files[0], error)
                if explained is not None:
                    raise explained from error
                raise
        num_shards = len(files)
        source = train_file
        if builder == "webdataset":
            dataset = _undecoded_videos(dataset)
            resolver = ClipResolver(source=source, caption_column=caption_column, webdataset=True)
            return Corpus(dataset, resolver, num_shards, shard_files=files, skipped_shards=skipped)
        local = not _is_remote(files[0])
        root = (
            video_root if video_root is not None else (os.path.dirname(os.path.abspath(files[0])) if local else None)
        )
    else:
        source = dataset_name
        if os.path.isdir(dataset_name) and (
            os.path.isfile(os.path.join(dataset_name, "dataset_info.json"))
            or os.path.isfile(os.path.join(dataset_name, "dataset_dict.json"))
        ):
            from datasets import DatasetDict, load_from_disk

            dataset = load_from_disk(dataset_name)
            if isinstance(dataset, DatasetDict):
                if split not in dataset:
                    raise ValueError(f"Split {split!r} not in {dataset_name!r} (splits: {list(dataset)}).")
                dataset = dataset[split]
            num_shards = max(1, len(dataset.cache_files))
            if streaming:
                dataset = dataset.to_iterable_dataset(num_shards=max(num_shards, 4))
                num_shards = dataset.num_shards
            root = video_root if video_root is not None else dataset_name
        elif os.path.isdir(dataset_name) and os.path.isfile(os.path.join(dataset_name, split, "metadata.jsonl")):
            # `clusterstm export-synthetic --format jsonl` layout: one metadata.jsonl per split folder.
            metadata = os.path.join(dataset_name, split, "metadata.jsonl")
            dataset = load_dataset("json", data_files={split: metadata}, split=split, streaming=streaming)
            root = video_root if video_root is not None else os.path.dirname(metadata)
        else:
            dataset = load_dataset(dataset_name, dataset_config_name, split=split, streaming=streaming)
            num_shards = getattr(dataset, "num_shards", 1)
            root = video_root
    dataset = _undecoded_videos(dataset)
    video_column = _pick_video_column(dataset, video_column)
    columns = dataset.column_names
    if columns is not None:
        for name in (video_column, caption_column):
            if name not in columns:
                raise ValueError(f"Column {name!r} not found in {source!r} (columns: {columns}).")
    if root is not None and not _is_remote(root) and not os.path.isdir(root):
        raise ValueError(f"Video root folder not found: {root!r}")
    resolver = ClipResolver(
        source=str(source),
        video_column=video_column,
        caption_column=caption_column,
        video_root=root,
        video_path_template=video_path_template,
    )
    if validate and not streaming and video_path_template is None:
        _validate_path_rows(dataset, resolver)
    return Corpus(dataset, resolver, num_shards)


def _validate_path_rows(dataset: Any, resolver: ClipResolver) -> None:
    """Resolve every row whose video column holds a string (cheap: no file access); raise on the first bad one."""
    from datasets import Value

    feature = dataset.features.get(resolver.video_column) if dataset.features else None
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        return
    videos, captions = dataset[resolver.video_column], dataset[resolver.caption_column]
    for index, (video, caption) in enumerate(zip(videos, captions)):
        try:
            resolver({resolver.video_column: video, resolver.caption_column: caption})
        except BadSampleError as error:
            raise ValueError(f"Row {index}: {error}") from error


__all__ = [
    "WEBDATASET_VIDEO_EXTENSIONS",
    "BadSampleError",
    "ClipResolver",
    "Corpus",
    "builder_for_file",
    "expand_braces",
    "find_corrupt_shard",
    "load_training_corpus",
    "resolve_data_files",
]
