"""`clusterstm export-synthetic`: the embedded synthetic benchmark written in each corpus format the trainers read, so
users can see what each looks like (docs/DATA_FORMATS.md)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Any

from .synthetic import (
    SPLITS,
    SyntheticVideoTextConfig,
    _iter_chunks,
    export_synthetic_benchmark,
    generate_split_metadata,
    render_clips,
)

EXPORT_FORMATS = ("jsonl", "parquet", "webdataset")


def encode_mp4(frames: Any, fps: int = 8, crf: int = 12) -> bytes:
    """`(T, H, W, 3)` uint8 frames as the bytes of an h264 mp4 (same settings as `write_video_pyav`), in memory."""
    import av
    import numpy as np

    frames = np.asarray(frames)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _records(config: SyntheticVideoTextConfig, split: str, chunk_size: int = 128):
    rows = generate_split_metadata(config, split)
    for chunk in _iter_chunks(rows, chunk_size):
        for row, video in zip(chunk, render_clips(chunk, config)):
            yield {k: v for k, v in row.items() if k != "background"}, encode_mp4(video, config.fps)


def export_synthetic(
    output_format: str,
    output_dir: str | os.PathLike,
    config: SyntheticVideoTextConfig | None = None,
    splits: tuple[str, ...] | list[str] | None = None,
    samples_per_shard: int = 64,
) -> dict[str, list[str]]:
    """
    Write the synthetic benchmark as `output_format`:

    - `jsonl`: `DIR/<split>/metadata.jsonl` (`file_name`, `caption`, QA fields...) next to `DIR/<split>/*.mp4`
      (also a videofolder: `load_dataset("DIR")` reads it);
    - `parquet`: `DIR/<split>.parquet`, one row per clip, the mp4 bytes inside (`video`: the `{bytes, path}` struct
      of `datasets.Video`), plus `caption`, `video_id` and the QA fields;
    - `webdataset`: `DIR/<split>/<split>-{000000..}.tar` shards of `samples_per_shard` samples, members
      `<key>.mp4`, `<key>.txt` (caption) and `<key>.json` (all metadata).

    Returns:
        `dict[str, list[str]]`: split -> files written (for `jsonl`, the `metadata.jsonl`).
    """
    if output_format not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {EXPORT_FORMATS}, got {output_format!r}.")
    if samples_per_shard < 1:
        raise ValueError(f"--samples_per_shard must be >= 1, got {samples_per_shard}.")
    config = config or SyntheticVideoTextConfig()
    splits = tuple(splits) if splits is not None else SPLITS
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise ValueError(f"Unknown split(s) {unknown}; expected some of {SPLITS}.")
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if output_format == "jsonl":
        written = export_synthetic_benchmark(config, output_dir, splits=splits)
        return {split: [path] for split, path in written.items()}

    written: dict[str, list[str]] = {}
    if output_format == "parquet":
        from datasets import Dataset, Features, Value, Video

        for split in splits:
            records = [
                {
                    "video": {"bytes": data, "path": f"{row['video_id']}.mp4"},
                    "caption": row["caption"],
                    "video_id": row["video_id"],
                    "questions": row["questions"],
                    "answers": row["answers"],
                }
                for row, data in _records(config, split)
            ]
            features = Features(
                {
                    "video": Video(decode=False),
                    "caption": Value("string"),
                    "video_id": Value("string"),
                    "questions": [Value("string")],
                    "answers": [Value("string")],
                }
            )
            path = os.path.join(output_dir, f"{split}.parquet")
            Dataset.from_list(records, features=features).to_parquet(path)
            written[split] = [path]
    else:
        for split in splits:
            split_dir = os.path.join(output_dir, split)
            os.makedirs(split_dir, exist_ok=True)
            paths: list[str] = []
            archive = None
            for index, (row, data) in enumerate(_records(config, split)):
                if index % samples_per_shard == 0:
                    if archive is not None:
                        archive.close()
                    paths.append(os.path.join(split_dir, f"{split}-{len(paths):06d}.tar"))
                    archive = tarfile.open(paths[-1], "w")
                key = row["video_id"]
                for extension, payload in (
                    ("mp4", data),
                    ("txt", row["caption"].encode("utf-8")),
                    ("json", json.dumps(row).encode("utf-8")),
                ):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(payload)
                    info.mtime = 0  # reproducible shards
                    archive.addfile(info, io.BytesIO(payload))
            if archive is not None:
                archive.close()
            written[split] = paths
    with open(os.path.join(output_dir, "benchmark_config.json"), "w", encoding="utf-8") as handle:
        json.dump({**config.to_dict(), "format": output_format}, handle, indent=2)
    return written


__all__ = ["EXPORT_FORMATS", "encode_mp4", "export_synthetic"]
