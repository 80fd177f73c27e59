"""How a teacher's frames are prepared: its own normalisation, the resolution that matches the student's grid, and the
conversion of the student's normalised frames into the teacher's.

Frames are decoded once. The student's video processor resizes, crops and normalises them; the teacher's tensor is
made from that same tensor by undoing the student's normalisation (exact: it is affine), resizing to the resolution at
which the teacher's patch grid equals the student's, and normalising with the teacher's own image processor
statistics. So both models see the same field of view and every teacher patch covers exactly one student patch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# A teacher is never fed frames larger than this multiple of its native side: past it the interpolated position
# embeddings describe a grid the teacher never saw, and the features stop meaning anything.
MAX_UPSCALE = 4


@dataclass(frozen=True)
class ImageNormalization:
    """
    The pixel statistics of an image processor: `x -> (x * rescale_factor - mean) / std` per channel, each step only
    when its flag is set (the order of transformers' image processors).

    Args:
        image_mean, image_std (`tuple[float, float, float]`): per-channel statistics (on the rescaled scale).
        rescale_factor (`float`): factor from raw pixel values (0-255) to the normalised scale, usually `1 / 255`.
        do_rescale, do_normalize (`bool`): whether each step is applied.
    """

    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_processor(cls, processor: Any) -> ImageNormalization:
        """Reads the statistics of a transformers image or video processor (or a [`ClusterSTMProcessor`], through its
        `video_processor` / `image_processor`)."""
        for name in ("video_processor", "image_processor"):
            inner = getattr(processor, name, None)
            if inner is not None and getattr(processor, "image_mean", None) is None:
                processor = inner
                break
        if getattr(processor, "image_mean", None) is None or getattr(processor, "image_std", None) is None:
            raise ValueError(f"{type(processor).__name__} has no image_mean / image_std to normalise frames with.")
        keys = ("image_mean", "image_std", "rescale_factor", "do_rescale", "do_normalize")
        return cls.from_values({key: getattr(processor, key) for key in keys if getattr(processor, key, None) is not None})

    @classmethod
    def from_values(cls, values: dict[str, Any], defaults: ImageNormalization | None = None) -> ImageNormalization:
        """From a preprocessor config's keys (`image_mean`, `image_std`, `rescale_factor`, `do_rescale`,
        `do_normalize`); missing ones are taken from `defaults` (or the dataclass defaults)."""
        base = defaults if defaults is not None else cls((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        mean, std = values.get("image_mean", base.image_mean), values.get("image_std", base.image_std)
        mean = (float(mean),) * 3 if isinstance(mean, (int, float)) else tuple(float(v) for v in mean)
        std = (float(std),) * 3 if isinstance(std, (int, float)) else tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"image_mean / image_std must be 3 values with std > 0, got {mean} / {std}.")
        return cls(
            image_mean=mean,
            image_std=std,
            rescale_factor=float(values.get("rescale_factor", base.rescale_factor)),
            do_rescale=bool(values.get("do_rescale", base.do_rescale)),
            do_normalize=bool(values.get("do_normalize", base.do_normalize)),
        )

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1,) * (like.ndim - 3) + (-1, 1, 1)
        mean = torch.tensor(self.image_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.image_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw pixel values (0-255, channels at dim -3, floating point) -> this processor's normalised values."""
        if self.do_rescale:
            pixels = pixels * self.rescale_factor
        if self.do_normalize:
            mean, std = self._stats(pixels)
            pixels = (pixels - mean) / std
        return pixels

    def denormalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The inverse of [`normalize`]: normalised values -> raw pixel values (0-255)."""
        if self.do_normalize:
            mean, std = self._stats(pixel_values)
            pixel_values = pixel_values * std + mean
        if self.do_rescale:
            pixel_values = pixel_values / self.rescale_factor
        return pixel_values


@dataclass(frozen=True)
class StudentFrames:
    """
    What a teacher needs to know of the student to make its own frames from the student's `pixel_values`: their
    normalisation, the student's patch size (its grid is `height // patch_size x width // patch_size`) and tubelet
    size (the teacher sees the first frame of every tubelet).
    """

    normalization: ImageNormalization
    patch_size: int
    tubelet_size: int = 1

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size


def matched_input_size(
    student_grid: tuple[int, int],
    teacher_patch_size: int,
    teacher_native_size: int,
    *,
    teacher_name: str = "the teacher",
    student_patch_size: int | None = None,
    max_upscale: int = MAX_UPSCALE,
) -> tuple[int, int]:
    """
    The frame size `(height, width)` at which a teacher with `teacher_patch_size` patches has the student's patch
    grid: `grid * teacher_patch_size` on each side (as UMT feeds CLIP-L/14 at 196 px to match a 14x14 student grid).

    Raises:
        `ValueError`: naming both grids and patch sizes, when that size exceeds `max_upscale` times the teacher's
        native side `teacher_native_size` (the position embeddings would be stretched beyond any sensible range).
    """
    grid_h, grid_w = student_grid
    size = (grid_h * teacher_patch_size, grid_w * teacher_patch_size)
    native_grid = teacher_native_size // teacher_patch_size
    if grid_h < 1 or grid_w < 1 or max(size) > max_upscale * teacher_native_size:
        student = (
            f" (patch size {student_patch_size}, {grid_h * student_patch_size}x{grid_w * student_patch_size} px frames)"
            if student_patch_size is not None
            else ""
        )
        raise ValueError(
            f"Cannot match the student's patch grid {grid_h}x{grid_w}{student} with the teacher's grid "
            f"{native_grid}x{native_grid} (patch size {teacher_patch_size}, native {teacher_native_size} px; "
            f"{teacher_name}): the teacher would need "
            f"{size[0]}x{size[1]} px frames, over {max_upscale}x its native size. Use a student with a smaller grid "
            "(larger patches or frames) or a teacher with a larger native resolution."
        )
    return size


def resize_frames(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of raw pixel values `(..., C, H, W)` to `size`, antialiased when shrinking, clamped to 0-255
    (the range of the uint8 frames a processor would resize). A frame already at `size` is returned unchanged."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    lead = pixels.shape[:-3]
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    shrink = size[0] < flat.shape[-2] or size[1] < flat.shape[-1]
    out = F.interpolate(flat.float(), size=size, mode="bicubic", align_corners=False, antialias=shrink)
    return out.clamp_(0, 255).to(pixels.dtype).reshape(*lead, pixels.shape[-3], *size)


def uint8_to_channels_first(frames: torch.Tensor | Sequence) -> torch.Tensor:
    """Decoded uint8 frames `(B, T, H, W, C)` or `(B, T, C, H, W)` (tensor or numpy) -> float `(B, T, 3, H, W)` raw
    pixel values; grey frames are repeated to three channels."""
    video = frames if isinstance(frames, torch.Tensor) else torch.as_tensor(frames)
    if video.ndim != 5:
        raise ValueError(f"frames must be (batch, frames, height, width, channels), got shape {tuple(video.shape)}.")
    if video.shape[-1] in (1, 3) and video.shape[2] not in (1, 3):
        video = video.permute(0, 1, 4, 2, 3)
    if video.shape[2] == 1:
        video = video.expand(-1, -1, 3, -1, -1)
    if video.shape[2] != 3:
        raise ValueError(f"frames must have 1 or 3 channels, got shape {tuple(video.shape)}.")
    return video.float()


__all__ = [
    "MAX_UPSCALE",
    "ImageNormalization",
    "StudentFrames",
    "matched_input_size",
    "resize_frames",
    "uint8_to_channels_first",
]
