# Copyright 2026 The ClusterSTM developers.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Video processor for ClusterSTM: frame sampling, PyAV decoding, resize, centre crop, normalise."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub.dataclasses import validate_typed_dict
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, validate_kwargs
from transformers.processing_utils import VideosKwargs
from transformers.video_processing_utils import BaseVideoProcessor

try:  # PIL is a transformers vision dependency; keep the import soft so array-only use still works.
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover
    _PILImage = None

SAMPLING_MODES = ("uniform", "random")

#: Default cap on the decoded pixels of one frame (4K UHD, 3840x2160): one video can never make a worker allocate more
#: than `num_frames` such frames, whatever its file size.
DEFAULT_MAX_PIXELS_PER_FRAME = 3840 * 2160
#: Default cap on a frame's long side / short side. Resizing the short side to `size["shortest_edge"]` multiplies the
#: long side by the same factor, so an extreme aspect (a 16384x2 clip) would otherwise become a multi-GB tensor.
DEFAULT_MAX_ASPECT_RATIO = 10.0


class VideoDecodingError(ValueError):
    """Raised when a video file is missing, empty, corrupt, has no decodable video frames, or frames larger than the
    processor's caps (`max_pixels_per_frame`, `max_aspect_ratio`). The message names the file."""


def check_frame_size(
    width: int,
    height: int,
    source: str,
    max_pixels_per_frame: int | None = DEFAULT_MAX_PIXELS_PER_FRAME,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
) -> None:
    """
    Refuse a frame size before anything of that size is decoded or allocated.

    Raises:
        [`VideoDecodingError`]: naming `source` and the size, when `width * height > max_pixels_per_frame` or
            `max(width, height) / min(width, height) > max_aspect_ratio` (a cap of `None` is off).
    """
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise VideoDecodingError(f"Video {source} has an invalid frame size {width}x{height}.")
    if max_pixels_per_frame is not None and width * height > max_pixels_per_frame:
        raise VideoDecodingError(
            f"Video {source} has {width}x{height} frames ({width * height} pixels), more than max_pixels_per_frame="
            f"{max_pixels_per_frame} of the video processor."
        )
    aspect = max(width, height) / min(width, height)
    if max_aspect_ratio is not None and aspect > max_aspect_ratio:
        raise VideoDecodingError(
            f"Video {source} has {width}x{height} frames (aspect ratio {aspect:.1f}), more than max_aspect_ratio="
            f"{max_aspect_ratio} of the video processor."
        )


def _is_attached_picture(stream: Any) -> bool:
    import av

    disposition = getattr(stream, "disposition", 0)
    return bool(int(disposition) & int(av.stream.Disposition.attached_pic))


def _is_default_stream(stream: Any) -> bool:
    import av

    return bool(int(getattr(stream, "disposition", 0)) & int(av.stream.Disposition.default))


def _pick_video_stream(container: Any, path: str) -> tuple[int, int]:
    """
    `(stream index, frame count)` of the video stream to read.

    Attached pictures (cover art, disposition `attached_pic`) are never chosen. Among the other video streams the one
    with the most frames wins (frames counted from packets, without decoding, when the container does not store a
    count); ties go to the stream marked default, then to the first one.
    """
    candidates = [s for s in container.streams.video if not _is_attached_picture(s)]
    if not candidates:
        if len(container.streams.video):
            raise VideoDecodingError(f"The only video stream of {path!r} is an attached picture (cover art).")
        raise VideoDecodingError(f"No video stream in file: {path!r}")
    counts = {s.index: int(s.frames or 0) for s in candidates}
    if any(count <= 0 for count in counts.values()):
        counts = _count_frames_pyav(path, [s.index for s in candidates])
    best = max(candidates, key=lambda s: (counts[s.index], _is_default_stream(s), -s.index))
    return best.index, counts[best.index]


def _random_offsets(num: int, generator: Any = None) -> np.ndarray:
    """`num` floats in [0, 1) from a torch generator, a numpy generator, an int seed, or torch's global RNG."""
    if isinstance(generator, torch.Generator):
        return torch.rand(num, generator=generator, dtype=torch.float64).numpy()
    if isinstance(generator, np.random.Generator):
        return generator.random(num)
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator)).random(num)
    if generator is None:
        # torch's global RNG is seeded per DataLoader worker, so this stays reproducible under `torch.manual_seed`.
        return torch.rand(num, dtype=torch.float64).numpy()
    raise TypeError(f"`generator` must be a torch.Generator, numpy Generator, int seed or None, got {type(generator)}")


def sample_frame_indices(
    total_frames: int, num_frames: int, sampling: str = "uniform", generator: Any = None
) -> np.ndarray:
    """
    Pick `num_frames` frame indices out of `total_frames` (TSN-style segments).

    The video is split into `num_frames` equal segments. `"uniform"` takes the middle frame of each segment
    (deterministic, for evaluation); `"random"` takes one random frame per segment (training augmentation).
    Videos shorter than `num_frames` get repeated indices, so the output always has `num_frames` sorted entries.

    Args:
        total_frames (`int`): Number of frames in the video (>= 1).
        num_frames (`int`): Number of frames to return (>= 1).
        sampling (`str`, *optional*, defaults to `"uniform"`): `"uniform"` or `"random"`.
        generator (*optional*): `torch.Generator`, `np.random.Generator` or int seed for `"random"` sampling.

    Returns:
        `np.ndarray` of shape `(num_frames,)`, dtype int64, non-decreasing, in `[0, total_frames)`.
    """
    if total_frames < 1:
        raise ValueError(f"Cannot sample frames from a video with {total_frames} frames.")
    if num_frames < 1:
        raise ValueError(f"`num_frames` must be >= 1, got {num_frames}.")
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"`sampling` must be one of {SAMPLING_MODES}, got {sampling!r}.")
    segment = total_frames / num_frames
    if sampling == "uniform":
        offsets = np.full(num_frames, 0.5)
    else:
        offsets = _random_offsets(num_frames, generator)
    indices = np.floor((np.arange(num_frames) + offsets) * segment).astype(np.int64)
    return np.clip(indices, 0, total_frames - 1)


def _check_video_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoDecodingError(f"Video file not found: {path!r}")
    if not os.path.isfile(path):
        raise VideoDecodingError(f"Video path is not a file: {path!r}")
    if os.path.getsize(path) == 0:
        raise VideoDecodingError(f"Video file is empty (0 bytes): {path!r}")


def _count_frames_pyav(path: str, stream_indices: list[int]) -> dict[int, int]:
    """Count the frames of the given video streams by demuxing packets (no decoding), in one pass over the file."""
    import av

    counts = dict.fromkeys(stream_indices, 0)
    with av.open(path) as container:
        streams = [container.streams[i] for i in stream_indices]
        for packet in container.demux(streams):
            # The flush packet at the end has no data and no pts.
            if packet.size > 0 and packet.stream.index in counts:
                counts[packet.stream.index] += 1
    return counts


def _decode_selected_pyav(
    path: str, wanted: np.ndarray, stream_index: int, limits: tuple[int | None, float | None]
) -> tuple[dict[int, np.ndarray], int]:
    """
    Decode frames in presentation order and convert only the wanted indices to RGB arrays.

    Stops right after the last wanted frame, so memory holds at most `len(set(wanted))` frames whatever the length
    of the video. Every frame's size is checked against `limits` before it is converted (a header may lie).
    Returns the kept frames by index and how many frames were decoded.
    """
    import av

    needed = set(int(i) for i in wanted)
    last = max(needed)
    kept: dict[int, np.ndarray] = {}
    count = 0
    with av.open(path) as container:
        stream = container.streams[stream_index]
        for frame in container.decode(stream):
            check_frame_size(frame.width, frame.height, repr(path), *limits)
            if count in needed:
                # rgb24 conversion also turns grayscale / yuv444 / odd-sized sources into (H, W, 3) uint8.
                kept[count] = frame.to_ndarray(format="rgb24")
            count += 1
            if count > last:
                break
    return kept, count


def read_video_pyav(
    path: str | os.PathLike,
    num_frames: int = 8,
    sampling: str = "uniform",
    generator: Any = None,
    max_pixels_per_frame: int | None = DEFAULT_MAX_PIXELS_PER_FRAME,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
) -> np.ndarray:
    """
    Decode `num_frames` frames of a video file with PyAV, sampling before decoding.

    The frame size the stream declares is checked against `max_pixels_per_frame` and `max_aspect_ratio` before
    anything is decoded (and every decoded frame again before conversion), so one small file with huge or extremely
    elongated frames cannot exhaust memory. The stream read is the video stream with the most frames (ties: the
    default stream), never an attached picture.

    Only the sampled frames are converted to arrays and decoding stops after the last one, so long videos are never
    held in memory. Frame indices come from [`sample_frame_indices`] over the container's frame count (counted from
    packets when the container does not store it); if the container claims more frames than it holds, sampling is
    redone over the frames that really decode. Indices are positions in presentation order, so variable frame rate
    video is handled.

    Args:
        path (`str` or `os.PathLike`): Video file (anything FFmpeg reads: mp4, webm, avi, mkv, ...).
        num_frames (`int`, *optional*, defaults to 8): Number of frames to return.
        sampling (`str`, *optional*, defaults to `"uniform"`): `"uniform"` (eval) or `"random"` (train).
        generator (*optional*): `torch.Generator`, `np.random.Generator` or int seed for random sampling.
        max_pixels_per_frame (`int`, *optional*, defaults to 3840*2160): cap on `width * height` (`None`: off).
        max_aspect_ratio (`float`, *optional*, defaults to 10): cap on long side / short side (`None`: off).

    Returns:
        `np.ndarray` of shape `(num_frames, H, W, 3)`, dtype uint8 (frames repeated when the video is shorter).

    Raises:
        [`VideoDecodingError`]: the file is missing, empty, corrupt, holds no decodable video stream, or its frames
            exceed the caps (the message names the file and the size).
    """
    import av

    path = os.fspath(path)
    _check_video_file(path)
    limits = (max_pixels_per_frame, max_aspect_ratio)
    try:
        with av.open(path) as container:
            stream_index, total = _pick_video_stream(container, path)
            stream = container.streams[stream_index]
            context = stream.codec_context  # None when the header is too damaged to describe the codec
            width, height = (context.width, context.height) if context is not None else (0, 0)
        if width and height:  # checked before any frame is decoded; unknown sizes are checked per decoded frame
            check_frame_size(width, height, repr(path), *limits)
        if total <= 0:
            raise VideoDecodingError(f"No decodable video frames in file: {path!r}")
        indices = sample_frame_indices(total, num_frames, sampling, generator)
        kept, decoded = _decode_selected_pyav(path, indices, stream_index, limits)
        if len(kept) < len(set(indices.tolist())):
            # The container lied about its length (truncated file, bad header): resample over what decodes.
            if decoded == 0:
                raise VideoDecodingError(f"No decodable video frames in file: {path!r}")
            indices = sample_frame_indices(decoded, num_frames, sampling, generator)
            kept, decoded = _decode_selected_pyav(path, indices, stream_index, limits)
            if len(kept) < len(set(indices.tolist())):
                raise VideoDecodingError(f"Video file {path!r} decodes inconsistently ({decoded} frames).")
    except VideoDecodingError:
        raise
    except (av.FFmpegError, OSError, EOFError, IndexError, ValueError) as error:
        raise VideoDecodingError(f"Could not decode video file {path!r}: {error}") from error

    frames = [kept[int(i)] for i in indices]
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise VideoDecodingError(f"Video file {path!r} changes frame size mid-stream ({sorted(shapes)}).")
    return np.stack(frames)


class ClusterSTMVideoProcessorKwargs(VideosKwargs, total=False):
    """
    sampling (`str`, *optional*):
        `"uniform"` (middle frame of each of `num_frames` equal segments, for evaluation) or `"random"` (one random
        frame per segment, for training).
    max_pixels_per_frame (`int`, *optional*):
        Largest `width * height` of a frame accepted (checked before decoding); `None` turns the cap off.
    max_aspect_ratio (`float`, *optional*):
        Largest long side / short side of a frame accepted (checked before decoding); `None` turns the cap off.
    """

    sampling: str | None
    max_pixels_per_frame: int | None
    max_aspect_ratio: float | None


class ClusterSTMVideoProcessor(BaseVideoProcessor):
    r"""
    Video processor for ClusterSTM.

    Every video becomes exactly `num_frames` frames (sampled with [`sample_frame_indices`]; short videos repeat
    frames), is resized so its shortest edge is `size["shortest_edge"]`, centre-cropped to `crop_size`, rescaled to
    [0, 1] and normalised with the CLIP mean/std (so a CLIP teacher can share the pixel values).

    Accepted inputs (one video or a batch): file paths (`str` / `Path`, decoded with PyAV, sampling before decoding),
    numpy arrays / torch tensors `(T, H, W, C)`, `(T, C, H, W)` or grayscale `(T, H, W)` (and 5-D batches), lists of
    PIL images, and lists of any of these.

    The output `pixel_values` has shape `(batch_size, num_frames, 3, crop_height, crop_width)`.

    Extra call arguments: `sampling="uniform" | "random"` and `generator` (`torch.Generator`,
    `np.random.Generator` or int seed) for reproducible random sampling.

    Resource caps (saved in the processor config): a video whose frames exceed `max_pixels_per_frame` pixels
    (default 3840*2160) or whose aspect ratio exceeds `max_aspect_ratio` (default 10) raises [`VideoDecodingError`]
    naming it and its size, before a file is decoded or an array is resized (`skip_bad_samples` skips such videos).

    `do_rescale` and float inputs: integer videos are pixel values in [0, 255]. A floating-point video whose values
    all lie in [0, 1] is taken as already rescaled: with `do_rescale=True` it is brought back to 8-bit pixel values
    (`round(x * 255)`, the precision of decoded video) so it gives the same `pixel_values` as the uint8 video it came
    from, instead of being divided by 255 a second time; a warning says so once per processor. Any other float video
    is taken as values in [0, 255]. With `do_rescale=False` inputs are used as given.
    """

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_sample_frames = True
    num_frames = 8
    sampling = "uniform"
    max_pixels_per_frame = DEFAULT_MAX_PIXELS_PER_FRAME
    max_aspect_ratio = DEFAULT_MAX_ASPECT_RATIO
    valid_kwargs = ClusterSTMVideoProcessorKwargs
    model_input_names = ["pixel_values"]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"`sampling` must be one of {SAMPLING_MODES}, got {self.sampling!r}.")
        if self.num_frames is None or int(self.num_frames) < 1:
            raise ValueError(f"`num_frames` must be a positive integer, got {self.num_frames!r}.")
        _check_caps(self.max_pixels_per_frame, self.max_aspect_ratio)
        self._warned_unit_float = False

    # ------------------------------------------------------------------ input handling
    @staticmethod
    def _is_frame(item: Any) -> bool:
        if _PILImage is not None and isinstance(item, _PILImage.Image):
            return True
        if isinstance(item, (np.ndarray, torch.Tensor)):
            # A single frame is (H, W) or (H, W, C) with a channel-last colour axis.
            return item.ndim == 2 or (item.ndim == 3 and item.shape[-1] in (1, 3, 4))
        return False

    def _split_batch(self, videos: Any) -> list[Any]:
        """Turn any accepted input into a list of single videos (path, array/tensor or list of frames)."""
        if isinstance(videos, (str, os.PathLike)):
            return [videos]
        if isinstance(videos, (np.ndarray, torch.Tensor)):
            if videos.ndim == 5:
                return list(videos)
            if videos.ndim in (3, 4):
                return [videos]
            raise ValueError(
                f"A video array must have 3 (T, H, W), 4 (T, H, W, C) / (T, C, H, W) or 5 (batched) dimensions, "
                f"got shape {tuple(videos.shape)}."
            )
        if _PILImage is not None and isinstance(videos, _PILImage.Image):
            return [[videos]]
        if isinstance(videos, (list, tuple)):
            if len(videos) == 0:
                raise ValueError("Received an empty list of videos.")
            if self._is_frame(videos[0]):
                return [list(videos)]
            return list(videos)
        raise ValueError(
            f"Unsupported video input of type {type(videos).__name__}; pass file paths, arrays, tensors or PIL frames."
        )

    @staticmethod
    def _array_to_tchw(video: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(T, H, W) / (T, H, W, C) / (T, C, H, W) array or tensor -> contiguous (T, C, H, W) tensor."""
        tensor = torch.from_numpy(np.ascontiguousarray(video)) if isinstance(video, np.ndarray) else video
        if tensor.ndim == 3:  # grayscale (T, H, W)
            tensor = tensor.unsqueeze(1)
        elif tensor.ndim == 4:
            if tensor.shape[-1] in (1, 3, 4) and tensor.shape[1] not in (1, 3, 4):
                tensor = tensor.permute(0, 3, 1, 2)
            elif tensor.shape[1] in (1, 3, 4):
                pass
            elif tensor.shape[-1] in (1, 3, 4):
                tensor = tensor.permute(0, 3, 1, 2)
            else:
                raise ValueError(
                    f"Cannot find the colour channel (size 1, 3 or 4) of a video with shape {tuple(tensor.shape)}."
                )
        else:
            raise ValueError(f"A video must have 3 or 4 dimensions, got shape {tuple(tensor.shape)}.")
        if tensor.shape[0] == 0:
            raise ValueError("Received a video with 0 frames.")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError("Video contains NaN or infinite values.")
        return tensor.contiguous()

    @staticmethod
    def _to_rgb(video: torch.Tensor) -> torch.Tensor:
        """(T, C, H, W) with C in (1, 3, 4) -> 3-channel RGB: grayscale repeated, alpha dropped."""
        if video.shape[1] == 1:
            return video.expand(-1, 3, -1, -1).contiguous()
        if video.shape[1] == 4:
            return video[:, :3].contiguous()
        return video

    def _load_video(
        self,
        video: Any,
        num_frames: int | None,
        sampling: str,
        generator: Any,
        limits: tuple[int | None, float | None] = (DEFAULT_MAX_PIXELS_PER_FRAME, DEFAULT_MAX_ASPECT_RATIO),
        name: str = "<in-memory video>",
    ) -> torch.Tensor:
        """Decode / sample one video to a (T, 3, H, W) tensor, refusing frames larger than `limits`."""
        if isinstance(video, (str, Path, os.PathLike)):
            if num_frames is None:
                raise ValueError("File inputs need frame sampling: set `do_sample_frames=True` and `num_frames`.")
            return self._array_to_tchw(read_video_pyav(video, num_frames, sampling, generator, *limits))
        tensor = self._load_array_video(video, num_frames, sampling, generator)
        # In-memory frames already exist, but resizing an elongated one would allocate far more.
        check_frame_size(tensor.shape[-1], tensor.shape[-2], name, *limits)
        return tensor

    def _unit_float_to_pixels(self, video: torch.Tensor) -> torch.Tensor:
        """A float video with values in [0, 1] -> uint8 pixel values (see the class docstring on `do_rescale`)."""
        if not video.is_floating_point() or video.numel() == 0 or video.min() < 0 or video.max() > 1:
            return video
        if not self._warned_unit_float:
            # The logger is looked up here: remote-code modules run nothing at import time.
            logging.getLogger(__name__).warning(
                "A floating-point video with values in [0, 1] is taken as already rescaled: it is converted to pixel "
                "values (x 255) instead of being divided by 255 again. Pass uint8 frames or values in [0, 255] to "
                "silence this, or do_rescale=False to use the values as given."
            )
            self._warned_unit_float = True
        return (video * 255).round_().clamp_(0, 255).to(torch.uint8)

    def _load_array_video(self, video: Any, num_frames: int | None, sampling: str, generator: Any) -> torch.Tensor:
        if isinstance(video, (list, tuple)):
            if len(video) == 0:
                raise ValueError("Received a video with 0 frames.")
            indices = (
                sample_frame_indices(len(video), num_frames, sampling, generator)
                if num_frames is not None
                else np.arange(len(video))
            )
            frames = []
            for i in indices:
                frame = video[int(i)]
                if _PILImage is not None and isinstance(frame, _PILImage.Image):
                    frame = np.asarray(frame.convert("RGB"))
                elif isinstance(frame, torch.Tensor):
                    frame = frame.numpy(force=True)
                frame = np.asarray(frame)
                if frame.ndim == 2:
                    frame = frame[..., None]
                frames.append(frame)
            if len({f.shape for f in frames}) != 1:
                raise ValueError(
                    f"All frames of a video must have the same shape, got {sorted({f.shape for f in frames})}."
                )
            return self._array_to_tchw(np.stack(frames))
        if isinstance(video, (np.ndarray, torch.Tensor)):
            tensor = self._array_to_tchw(video)
            if num_frames is not None:
                indices = sample_frame_indices(tensor.shape[0], num_frames, sampling, generator)
                tensor = tensor[torch.from_numpy(indices)]
            return tensor
        raise ValueError(f"Unsupported video of type {type(video).__name__}.")

    # ------------------------------------------------------------------ public API
    def preprocess(self, videos: Any, generator: Any = None, **kwargs) -> BatchFeature:
        """
        Sample, decode and preprocess one video or a batch of videos.

        Args:
            videos: file path(s), array(s)/tensor(s) or list(s) of PIL frames (see the class docstring).
            generator (*optional*): `torch.Generator`, `np.random.Generator` or int seed for `sampling="random"`.
            kwargs: any [`~processing_utils.VideosKwargs`] override (`num_frames`, `size`, `crop_size`, ...) plus
                `sampling` and `return_tensors`.

        Returns:
            [`BatchFeature`] with `pixel_values` of shape `(B, num_frames, 3, H, W)` (a list when
            `return_tensors=None`).
        """
        validate_kwargs(
            captured_kwargs=kwargs.keys(),
            valid_processor_keys=list(self.valid_kwargs.__annotations__.keys()) + ["return_tensors"],
        )
        validate_typed_dict(self.valid_kwargs, kwargs)
        for kwarg_name in self.valid_kwargs.__annotations__:
            kwargs.setdefault(kwarg_name, getattr(self, kwarg_name, None))

        do_sample_frames = kwargs.pop("do_sample_frames")
        num_frames = kwargs.pop("num_frames")
        sampling = kwargs.pop("sampling") or "uniform"
        device = kwargs.pop("device")
        do_convert_rgb = kwargs.pop("do_convert_rgb")
        for unused in ("input_data_format", "video_metadata", "fps", "return_metadata"):
            kwargs.pop(unused, None)
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"`sampling` must be one of {SAMPLING_MODES}, got {sampling!r}.")
        if do_sample_frames and (num_frames is None or int(num_frames) < 1):
            raise ValueError(f"`num_frames` must be a positive integer, got {num_frames!r}.")
        num_frames = int(num_frames) if do_sample_frames else None
        limits = (kwargs.pop("max_pixels_per_frame"), kwargs.pop("max_aspect_ratio"))
        _check_caps(*limits)
        if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
            # One stream for the whole batch, so that videos of one call get different offsets.
            generator = np.random.default_rng(int(generator))

        loaded = [
            self._load_video(v, num_frames, sampling, generator, limits, f"<in-memory video {i} of the batch>")
            for i, v in enumerate(self._split_batch(videos))
        ]
        if do_convert_rgb:
            loaded = [self._to_rgb(video) for video in loaded]
        if kwargs.get("do_rescale"):
            loaded = [self._unit_float_to_pixels(video) for video in loaded]
        if device is not None:
            loaded = [video.to(device) for video in loaded]

        kwargs = self._standardize_kwargs(**kwargs)
        self._validate_preprocess_kwargs(**kwargs)
        kwargs.pop("data_format", None)
        return_tensors = kwargs.pop("return_tensors", None)
        # Each step runs only when its flag is set (the base class's `_preprocess` gates on them).
        do_resize, do_center_crop = kwargs.pop("do_resize"), kwargs.pop("do_center_crop")
        do_rescale, do_normalize = kwargs.pop("do_rescale"), kwargs.pop("do_normalize")
        processed = self._preprocess(
            videos=loaded,
            return_tensors=None,
            do_resize=do_resize,
            do_center_crop=do_center_crop,
            do_rescale=do_rescale,
            do_normalize=do_normalize,
            **kwargs,
        )["pixel_values_videos"]
        if return_tensors in ("pt", "np"):
            if len({tuple(v.shape) for v in processed}) != 1:
                raise ValueError(
                    "Videos of one batch end with different shapes; enable frame sampling and centre cropping "
                    "(`do_sample_frames=True`, `do_center_crop=True`) to return a stacked tensor."
                )
            stacked = torch.stack(list(processed))
            return BatchFeature(data={"pixel_values": stacked if return_tensors == "pt" else stacked.numpy()})
        return BatchFeature(data={"pixel_values": list(processed)})


def _check_caps(max_pixels_per_frame: Any, max_aspect_ratio: Any) -> None:
    if max_pixels_per_frame is not None and (
        isinstance(max_pixels_per_frame, bool)
        or not isinstance(max_pixels_per_frame, (int, np.integer))
        or max_pixels_per_frame < 1
    ):
        raise ValueError(f"`max_pixels_per_frame` must be a positive integer or None, got {max_pixels_per_frame!r}.")
    if max_aspect_ratio is not None and (
        isinstance(max_aspect_ratio, bool) or not isinstance(max_aspect_ratio, (int, float)) or max_aspect_ratio < 1
    ):
        raise ValueError(f"`max_aspect_ratio` must be a number >= 1 or None, got {max_aspect_ratio!r}.")


__all__ = [
    "ClusterSTMVideoProcessor",
    "VideoDecodingError",
    "check_frame_size",
    "read_video_pyav",
    "sample_frame_indices",
]
