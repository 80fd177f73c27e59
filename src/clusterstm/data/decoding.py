"""Fast clip decoding for training workers: one open per file, jump to the keyframe before each sampled frame, decode
only what the sampled frames need; files on disk or bytes in memory.

[`read_video`] returns exactly the frames [`read_video_pyav`] (the model's remote-code reader) returns for the same
source, sampling and generator: the frame indices come from the same `sample_frame_indices` call over the same frame
count, and a frame index is mapped to a presentation timestamp by sorting the stream's packet timestamps. What is
saved:

- the file is opened and demuxed once (today's reader opens it two or three times);
- decoding starts at the last keyframe at or before each sampled frame instead of at the first frame (so with a
  1 s keyframe interval a 10 s clip decodes about a third of its frames);
- frames nobody needs that are not reference frames (most B-frames) are skipped by the decoder
  (`skip_frame="NONREF"`), which is exact because no other frame depends on them;
- bytes (a webdataset member, a parquet/Arrow binary cell) are decoded from memory, never through a temporary file.

Whenever the stream does not allow the exact mapping (no timestamps, duplicate timestamps, a container whose frame
count disagrees with its packets, a wanted frame that did not come out where expected), the reader falls back to
decoding in order from the first frame, as today's reader does.
"""

from __future__ import annotations

import bisect
import io
import os
from typing import Any

import numpy as np

from ..models.video_processing_clusterstm import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_PIXELS_PER_FRAME,
    VideoDecodingError,
    _is_attached_picture,
    _is_default_stream,
    _pick_video_stream,
    check_frame_size,
    sample_frame_indices,
)

#: Files larger than this are not held in memory as packets; they are decoded in order as by today's reader.
MAX_IN_MEMORY_FILE_BYTES = 1 << 30

VideoSource = str | os.PathLike | bytes | bytearray | memoryview


def describe_source(source: Any, name: str | None = None) -> str:
    """A short human-readable name of a video source for error messages."""
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes in memory>"
    return f"<{type(source).__name__}>"


def _open(source: VideoSource, label: str):
    import av

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise VideoDecodingError(f"Video {label} is empty (0 bytes).")
        return av.open(io.BytesIO(bytes(source)))
    path = os.fspath(source)
    if not os.path.exists(path):
        raise VideoDecodingError(f"Video file not found: {label}")
    if not os.path.isfile(path):
        raise VideoDecodingError(f"Video path is not a file: {label}")
    if os.path.getsize(path) == 0:
        raise VideoDecodingError(f"Video file is empty (0 bytes): {label}")
    return av.open(path)


def _choose_video_stream(container: Any, source: VideoSource, label: str) -> Any:
    """The stream `read_video_pyav` reads: never an attached picture; among several, the one with the most frames."""
    candidates = [s for s in container.streams.video if not _is_attached_picture(s)]
    if not candidates:
        if len(container.streams.video):
            raise VideoDecodingError(f"The only video stream of {label} is an attached picture (cover art).")
        raise VideoDecodingError(f"No video stream in {label}.")
    if len(candidates) > 1 and isinstance(source, (str, os.PathLike)):
        return container.streams[_pick_video_stream(container, os.fspath(source))[0]]
    # In-memory bytes: the declared frame counts decide (ties: the default stream, then the first).
    return max(candidates, key=lambda s: (int(s.frames or 0), _is_default_stream(s), -s.index))


def _decode_in_order(stream: Any, packets: list[Any], wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode packets from the start, keeping the frames at the wanted presentation positions (today's method)."""
    codec = stream.codec_context
    codec.skip_frame = "DEFAULT"
    last = max(wanted)
    kept: dict[int, np.ndarray] = {}
    count = 0
    for packet in [*packets, None]:
        for frame in codec.decode(packet):
            if count in wanted:
                kept[count] = frame.to_ndarray(format="rgb24")
            count += 1
            if count > last:
                return kept, count
    return kept, count


def _decode_by_timestamp(stream: Any, packets: list[Any], wanted_pts: list[int]) -> dict[int, np.ndarray] | None:
    """
    Decode the frames whose presentation timestamps are `wanted_pts` (sorted, distinct), starting each run at the last
    keyframe at or before the wanted frame. Returns `{pts: frame}` or None when a wanted frame did not come out.
    """
    codec = stream.codec_context
    wanted = set(wanted_pts)
    # Keyframes in decode order; their timestamps increase (they are never reordered).
    key_positions = [i for i, packet in enumerate(packets) if packet.is_keyframe]
    if not key_positions or key_positions[0] != 0:
        return None
    key_pts = [packets[i].pts for i in key_positions]
    if any(b <= a for a, b in zip(key_pts, key_pts[1:])):
        return None
    kept: dict[int, np.ndarray] = {}
    position = None  # next packet to feed
    start_pts = None
    j = 0
    while j < len(wanted_pts):
        target = wanted_pts[j]
        start = key_positions[max(0, bisect.bisect_right(key_pts, target) - 1)]
        if position is None or start >= position:
            # Jumping is cheaper than decoding on: everything wanted before `target` is already kept.
            if position is not None:
                codec.flush_buffers()
            position, start_pts = start, packets[start].pts
        while target not in kept:
            packet = packets[position] if position < len(packets) else None
            if packet is not None:
                # Unwanted non-reference frames are skipped by the decoder: no other frame needs them.
                codec.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
            else:
                codec.skip_frame = "DEFAULT"
            for frame in codec.decode(packet):
                pts = frame.pts
                if pts in wanted and pts not in kept and pts >= start_pts:
                    kept[pts] = frame.to_ndarray(format="rgb24")
            if packet is None:
                break
            position += 1
        if target not in kept:
            return None
        while j < len(wanted_pts) and wanted_pts[j] in kept:
            j += 1
    return kept


def read_video(
    source: VideoSource,
    num_frames: int = 8,
    sampling: str = "uniform",
    generator: Any = None,
    name: str | None = None,
    limits: tuple[int | None, float | None] = (DEFAULT_MAX_PIXELS_PER_FRAME, DEFAULT_MAX_ASPECT_RATIO),
) -> np.ndarray:
    """
    Decode `num_frames` frames of a video file or of video bytes, as [`read_video_pyav`] samples them.

    Args:
        source: A path (`str`/`os.PathLike`) or the file's bytes (`bytes`, `bytearray`, `memoryview`).
        num_frames (`int`, *optional*, defaults to 8): Frames to return.
        sampling (`str`, *optional*, defaults to `"uniform"`): `"uniform"` or `"random"` (see `sample_frame_indices`).
        generator (*optional*): `torch.Generator`, `np.random.Generator` or int seed for random sampling.
        name (`str`, *optional*): How errors name the source (e.g. `"shard-0003.tar: key 000042"`).
        limits (`tuple`, *optional*): `(max_pixels_per_frame, max_aspect_ratio)` of the video processor, checked on
            the stream's declared frame size before anything is decoded (see [`check_frame_size`]).

    Returns:
        `np.ndarray` `(num_frames, H, W, 3)` uint8.

    Raises:
        [`VideoDecodingError`]: missing/empty file, undecodable bytes, no video stream, no decodable frames.
    """
    import av

    label = describe_source(source, name)
    try:
        if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
            if os.path.getsize(source) > MAX_IN_MEMORY_FILE_BYTES:
                from ..models.video_processing_clusterstm import read_video_pyav

                return read_video_pyav(source, num_frames, sampling, generator, *limits)
        with _open(source, label) as container:
            stream = _choose_video_stream(container, source, label)
            context = stream.codec_context
            if context is not None and context.width and context.height:
                check_frame_size(context.width, context.height, label, *limits)
            declared = int(stream.frames or 0)
            packets = [packet for packet in container.demux(stream) if packet.size > 0]
            total = declared if declared > 0 else len(packets)
            if total <= 0:
                raise VideoDecodingError(f"No decodable video frames in {label}.")
            indices = sample_frame_indices(total, num_frames, sampling, generator)
            unique = sorted(set(int(i) for i in indices))
            timestamps = [packet.pts for packet in packets]
            frames_by_index = None
            if (
                total == len(packets)
                and all(pts is not None for pts in timestamps)
                and len(set(timestamps)) == len(timestamps)
            ):
                order = sorted(timestamps)
                by_pts = _decode_by_timestamp(stream, packets, [order[i] for i in unique])
                if by_pts is not None:
                    frames_by_index = {i: by_pts[order[i]] for i in unique}
            if frames_by_index is None:
                stream.codec_context.flush_buffers()
                frames_by_index, decoded = _decode_in_order(stream, packets, set(unique))
                if len(frames_by_index) < len(unique):
                    # The container claims more frames than it holds: resample over what decodes, as today.
                    if decoded == 0:
                        raise VideoDecodingError(f"No decodable video frames in {label}.")
                    indices = sample_frame_indices(decoded, num_frames, sampling, generator)
                    unique = sorted(set(int(i) for i in indices))
                    stream.codec_context.flush_buffers()
                    frames_by_index, decoded = _decode_in_order(stream, packets, set(unique))
                    if len(frames_by_index) < len(unique):
                        raise VideoDecodingError(f"Video {label} decodes inconsistently ({decoded} frames).")
    except VideoDecodingError:
        raise
    except (av.FFmpegError, OSError, EOFError, IndexError, ValueError) as error:
        raise VideoDecodingError(f"Could not decode video {label}: {error}") from error
    frames = [frames_by_index[int(i)] for i in indices]
    if len({frame.shape for frame in frames}) != 1:
        raise VideoDecodingError(f"Video {label} changes frame size mid-stream.")
    return np.stack(frames)


__all__ = ["MAX_IN_MEMORY_FILE_BYTES", "describe_source", "read_video"]
