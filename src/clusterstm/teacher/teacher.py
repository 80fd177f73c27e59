# Copyright 2026 The ClusterSTM Authors.
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
"""The frozen teacher of ClusterSTM pretraining: a thin facade over one family adapter (`teacher/adapters/`).

The teacher provides, per video: its patch tokens (what cluster-wise masking and relevance generation consume), the
CLS-to-patch attention or its equivalent (attention-guided masking, as in Unmasked Teacher), and text embeddings in
its joint space. It is never trained and never belongs to a student: a training stage calls it through
`clusterstm.teacher.targets.compute_teacher_targets` and hands the targets to the student as inputs.

Each family (CLIP and friends, SigLIP, SigLIP2, X-CLIP) prepares frames with its own image statistics (read from the
checkpoint's `preprocessor_config.json`) and text with its own padding convention; once matched to a student
(`check_teacher_compatibility`), the teacher makes its frames from the student's at the resolution that gives it the
student's patch grid.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import TeacherAdapter, adapter_for
from .adapters.base import float32_pooler
from .preprocessing import (
    ImageNormalization,
    StudentFrames,
    matched_input_size,
    resize_frames,
    uint8_to_channels_first,
)
from .relevance import generate_relevance

logger = logging.getLogger(__name__)

# The image-statistics keys of a transformers preprocessor file that the teacher reads.
_NORMALIZATION_KEYS = ("image_mean", "image_std", "rescale_factor", "do_rescale", "do_normalize")


@dataclass
class TeacherVideoOutput:
    """
    Teacher features of a batch of videos.

    Args:
        patch_tokens (`torch.Tensor` of shape `(batch_size, num_frames, num_patches, hidden_size)`):
            the vision tower's last-layer patch tokens, before pooling (CLIP-like: before `post_layernorm`, which the
            CLIP window pooler applies; SigLIP: after `post_layernorm`, as its pooling head consumes them). No CLS.
        cls_attention (`torch.Tensor` of shape `(batch_size, num_frames, num_patches)`):
            CLIP-like: last-layer attention of the CLS query to every patch, averaged over heads (weights as in the
            softmax over all tokens, not renormalised). SigLIP (no CLS): attention of the pooling head's probe to
            every patch, averaged over heads.
        grid_size (`int`): number of patch rows (`num_patches = grid_size * grid_width`; square grids in practice).
    """

    patch_tokens: torch.Tensor
    cls_attention: torch.Tensor
    grid_size: int


class ClusterSTMTeacher(nn.Module):
    """
    Frozen dual-encoder teacher: always in eval mode, no parameter requires grad, every method runs under
    `torch.no_grad()`. The family-specific work is done by `self.adapter` (see `clusterstm.teacher.adapters`).

    Args:
        model (`nn.Module`): the dual-encoder teacher (`CLIPModel`, `MetaClip2Model`, `AltCLIPModel`,
            `ChineseCLIPModel`, `SiglipModel`, `Siglip2Model`, `XCLIPModel`).
        tokenizer (*optional*): the teacher's own tokenizer (separate from the student's).
        normalization ([`ImageNormalization`], *optional*): the teacher's image statistics; by default the family's
            (e.g. OpenAI CLIP mean / std, SigLIP 0.5 / 0.5).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, normalization: ImageNormalization | None = None):
        super().__init__()
        adapter = adapter_for(model)
        self.model = model
        self.tokenizer = tokenizer
        # kept out of the module tree: the adapter and pooler only reference the teacher's own layers
        self.__dict__["adapter"] = adapter
        self.__dict__["_pooler"] = None
        self.normalization = normalization if normalization is not None else adapter.default_normalization
        self.student_frames: StudentFrames | None = None
        self.model.requires_grad_(False)
        self.train(False)

    # ---- loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | nn.Module,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        tokenizer: Any = None,
        *,
        torch_dtype: torch.dtype | str | None = None,
        normalization: ImageNormalization | None = None,
    ) -> ClusterSTMTeacher:
        """
        Loads a teacher from a local checkpoint folder (safetensors weights, local files only; the family is picked
        from its `config.json`) or wraps an existing model instance.

        Args:
            pretrained_model_name_or_path (`str`, `os.PathLike` or `nn.Module`): checkpoint folder or model.
            dtype / torch_dtype (`torch.dtype` or `str`, *optional*): dtype to load / cast the teacher to, e.g.
                `torch.bfloat16` for a bf16 run (relevance and CLS attention are still computed in float32).
            device (`torch.device` or `str`, *optional*): device to move the teacher to.
            tokenizer (*optional*): tokenizer to use; by default the folder's tokenizer if it has one.
            normalization ([`ImageNormalization`], *optional*): image statistics; by default those of the folder's
                `preprocessor_config.json`, else the family's defaults.
        """
        if dtype is not None and torch_dtype is not None and _as_dtype(dtype) != _as_dtype(torch_dtype):
            raise ValueError(f"Pass one of dtype={dtype!r} and torch_dtype={torch_dtype!r}.")
        dtype = _as_dtype(dtype if dtype is not None else torch_dtype)
        if isinstance(pretrained_model_name_or_path, nn.Module):
            model = pretrained_model_name_or_path
            if dtype is not None:
                model = model.to(dtype)
        else:
            from transformers import AutoModel

            path = os.fspath(pretrained_model_name_or_path)
            if not os.path.isdir(path):
                raise ValueError(
                    f"Teacher checkpoint folder not found: {path!r} (the teacher loads local files only)."
                )
            if not any(
                name.endswith(".safetensors") or name.endswith(".safetensors.index.json") for name in os.listdir(path)
            ):
                # `.bin` weights are pickles: loading them can run code, so a teacher is only read from safetensors
                raise ValueError(
                    f"Teacher checkpoint folder {path!r} has no safetensors weights (model.safetensors); pickle-based "
                    "weights (.bin, .pt) are refused. Convert them once with `save_pretrained` on a trusted machine."
                )
            if os.path.isfile(os.path.join(path, "open_clip_config.json")):
                from .adapters.open_clip import load_open_clip

                model, own_tokenizer, own_normalization = load_open_clip(path, dtype)
                tokenizer = tokenizer if tokenizer is not None else own_tokenizer
                normalization = normalization if normalization is not None else own_normalization
            else:
                kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
                if dtype is not None:
                    kwargs["dtype"] = dtype
                model = AutoModel.from_pretrained(path, **kwargs)
                if tokenizer is None:
                    tokenizer = _load_local_tokenizer(path)
                if normalization is None:
                    normalization = _load_local_normalization(path, adapter_for(model))
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer=tokenizer, normalization=normalization)

    def train(self, mode: bool = True) -> ClusterSTMTeacher:
        """The teacher is frozen: it stays in eval mode whatever `mode` is."""
        return super().train(False)

    # ---- description
    @property
    def adapter(self) -> TeacherAdapter:
        return self.__dict__["adapter"]

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def model_kind(self) -> str:
        """Short family name: `clip`, `xclip`, `siglip` or `siglip2`."""
        return self.adapter.family.lower().replace("-", "")

    @property
    def image_size(self) -> int:
        """Native side in pixels of the teacher's frames."""
        return self.adapter.native_size

    @property
    def patch_size(self) -> int:
        return self.adapter.patch_size

    @property
    def hidden_size(self) -> int:
        """Width of the patch tokens."""
        return self.adapter.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def pooler(self) -> nn.Module:
        """The window pooler into the joint space, in float32 whatever the teacher's dtype (a float32 copy of the
        pooling layers for a bf16 / fp16 teacher, rebuilt if the teacher moves)."""
        key = (self.device, self.dtype)
        if self.__dict__.get("_pooler_key") != key:
            self.__dict__["_pooler"] = float32_pooler(self.adapter.build_pooler())
            self.__dict__["_pooler_key"] = key
        return self.__dict__["_pooler"]

    # ---- grid matching
    def input_size_for_grid(self, grid: tuple[int, int], student_patch_size: int | None = None) -> tuple[int, int]:
        """The frame size `(height, width)` at which the teacher's patch grid is `grid` (see `matched_input_size`).

        Raises:
            `ValueError`: naming both grids and patch sizes when no sensible size matches.
        """
        return matched_input_size(
            grid,
            self.patch_size,
            self.image_size,
            teacher_name=self.adapter.describe(),
            student_patch_size=student_patch_size,
        )

    def match_student(self, student_frames: StudentFrames) -> None:
        """Makes the teacher build its frames from a student's `pixel_values` (see [`frames_from_student`])."""
        self.student_frames = student_frames

    def frames_from_student(self, pixel_values: torch.Tensor, student_frames: StudentFrames | None = None) -> torch.Tensor:
        """
        The teacher's frames made from the student's normalised frames `(B, T, 3, H, W)`: the first frame of every
        tubelet, the student's normalisation undone (exact: it is affine), resized (bicubic) to the size at which the
        teacher's patch grid equals the student's, normalised with the teacher's own statistics. Returns
        `(B, T // tubelet_size, 3, height, width)` on the teacher's device, float32.
        """
        spec = student_frames if student_frames is not None else self.student_frames
        if spec is None:
            raise ValueError("frames_from_student needs the student's frame settings: call check_teacher_compatibility.")
        _check_video(pixel_values)
        frames = pixel_values[:, :: spec.tubelet_size].to(device=self.device, dtype=torch.float32)
        size = self.input_size_for_grid(spec.grid(*frames.shape[-2:]), spec.patch_size)
        raw = spec.normalization.denormalize(frames)
        return self.normalization.normalize(resize_frames(raw, size))

    # ---- preprocessing from decoded frames / captions
    def prepare_frames(self, frames: Any, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """
        The teacher's tensor for decoded uint8 frames `(B, T, H, W, C)` (or `(B, T, C, H, W)`): shortest edge resized
        to `size`, centre-cropped to `size x size` (default: the teacher's native size), normalised with the teacher's
        own image statistics. Returns float32 `(B, T, 3, size, size)` on the teacher's device.
        """
        video = uint8_to_channels_first(frames).to(self.device)
        height, width = (size, size) if isinstance(size, int) else (size or (self.image_size, self.image_size))
        scale = max(height / video.shape[-2], width / video.shape[-1])
        resized = (max(height, round(video.shape[-2] * scale)), max(width, round(video.shape[-1] * scale)))
        video = resize_frames(video, resized)
        top, left = (resized[0] - height) // 2, (resized[1] - width) // 2
        return self.normalization.normalize(video[..., top : top + height, left : left + width])

    def prepare_text(self, captions: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenises captions with the teacher's tokenizer and its padding convention (SigLIP: padded to the length it
        was trained with, no attention mask). Returns `input_ids` and, where the family uses it, `attention_mask`."""
        if self.tokenizer is None:
            raise ValueError("The teacher has no tokenizer: pass one to ClusterSTMTeacher.from_pretrained.")
        model_max = getattr(self.tokenizer, "model_max_length", None)
        if max_length is None:
            max_length = model_max if isinstance(model_max, int) and 0 < model_max <= 4096 else 77
        tokens = self.tokenizer(list(captions), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        input_ids, attention_mask = self._prepare_ids(tokens["input_ids"], tokens.get("attention_mask"))
        return {"input_ids": input_ids} if attention_mask is None else {"input_ids": input_ids, "attention_mask": attention_mask}

    def _prepare_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        pad_token_id = getattr(self.tokenizer, "pad_token_id", None)
        padding_side = getattr(self.tokenizer, "padding_side", "right") or "right"
        return self.adapter.prepare_input_ids(input_ids, attention_mask, pad_token_id, padding_side)

    # ---- encoders
    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> TeacherVideoOutput:
        return self.encode_video(pixel_values)

    @torch.no_grad()
    def encode_video(self, pixel_values: torch.Tensor) -> TeacherVideoOutput:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_frames, 3, height, width)`): frames normalised
                for the teacher (see [`frames_from_student`] / [`prepare_frames`]); another size than the native one
                interpolates the position embeddings.

        Returns:
            [`TeacherVideoOutput`].
        """
        _check_video(pixel_values)
        height, width = pixel_values.shape[-2:]
        if height < self.patch_size or width < self.patch_size:
            raise ValueError(
                f"`pixel_values` frames of {height}x{width} px are smaller than one teacher patch ({self.patch_size})."
            )
        frames = pixel_values.to(device=self.device, dtype=self.dtype)
        patch_tokens, attention = self.adapter.encode_frames(frames)
        return TeacherVideoOutput(
            patch_tokens=patch_tokens, cls_attention=attention.float(), grid_size=height // self.patch_size
        )

    @torch.no_grad()
    def encode_dense(self, pixel_values: torch.Tensor, method: str) -> torch.Tensor:
        """
        Patch tokens `(batch_size, num_frames, num_patches, hidden_size)` read from the last block by a training-free
        dense method (``"maskclip"``, ``"clearclip"``; ``"window"`` returns the ordinary patch tokens), see
        `clusterstm.teacher.dense`. Raises `ValueError` for families that do not support it.
        """
        _check_video(pixel_values)
        frames = pixel_values.to(device=self.device, dtype=self.dtype)
        return self.adapter.encode_dense_frames(frames, method)

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Text embeddings in the teacher's joint space, shape `(batch_size, projection_dim)`. The ids are first brought
        to the family's padding convention (SigLIP: re-padded to its trained length, mask dropped).
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        input_ids, attention_mask = self._prepare_ids(input_ids, attention_mask)
        return self.adapter.encode_text(input_ids, attention_mask)

    @torch.no_grad()
    def relevance(self, patch_tokens: torch.Tensor, text_embeds: torch.Tensor, window_size: int = 3) -> torch.Tensor:
        """Video-text relevance `(batch_size, num_frames, num_patches)` with the teacher's own window pooler (see
        `generate_relevance`), computed in float32 whatever the teacher's dtype."""
        return generate_relevance(patch_tokens.float(), text_embeds.float(), self.pooler, window_size=window_size)


def _check_video(pixel_values: Any) -> None:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 5 or pixel_values.shape[2] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(f"`pixel_values` must have shape (batch_size, num_frames, 3, height, width), got {shape}.")


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r} (use e.g. 'float32', 'bfloat16', 'float16').")
    return resolved


def _load_local_normalization(path: str, adapter: TeacherAdapter) -> ImageNormalization:
    """The image statistics of the folder's `preprocessor_config.json` (keys it lacks take the family's defaults)."""
    defaults = adapter.default_normalization
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(file):
        logger.warning(
            "Teacher folder %s has no preprocessor_config.json: using the %s defaults mean=%s std=%s.",
            path,
            adapter.family,
            defaults.image_mean,
            defaults.image_std,
        )
        return defaults
    try:
        data = json.loads(open(file, encoding="utf-8").read())
    except (OSError, ValueError) as error:
        raise ValueError(f"{file}: unreadable preprocessor config ({error}).") from error
    data = data.get("image_processor", data) if isinstance(data, dict) else {}
    values = {key: data[key] for key in _NORMALIZATION_KEYS if data.get(key) is not None}
    try:
        return ImageNormalization.from_values(values, defaults)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: invalid image statistics {values} ({error}).") from error


def _load_local_tokenizer(path: str):
    """The folder's tokenizer, or `None` when it has none."""
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model")
    if not any(os.path.isfile(os.path.join(path, name)) for name in tokenizer_files):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None
