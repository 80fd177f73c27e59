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
"""Frozen CLIP / SigLIP teacher hook for ClusterSTM pretraining.

The teacher provides, per video: its patch tokens (what cluster-wise masking and relevance generation consume), the
CLS-to-patch attention (for attention-guided masking, as in Unmasked Teacher), and text embeddings in its joint space.
It is never trained and never belongs to a student: a training stage calls it through
`clusterstm.teacher.targets.compute_teacher_targets` and hands the targets to the student as inputs.

The file is Hub remote code: it only imports torch / transformers and its sibling ``relevance_clusterstm``.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from .relevance import build_window_pooler, generate_relevance


@dataclass
class TeacherVideoOutput:
    """
    Teacher features of a batch of videos.

    Args:
        patch_tokens (`torch.Tensor` of shape `(batch_size, num_frames, num_patches, hidden_size)`):
            the vision tower's last-layer patch tokens, before pooling (CLIP: before `post_layernorm`, which the CLIP
            window pooler applies; SigLIP: after `post_layernorm`, as its pooling head consumes them). No CLS token.
        cls_attention (`torch.Tensor` of shape `(batch_size, num_frames, num_patches)`):
            CLIP: last-layer attention of the CLS query to every patch, averaged over heads (weights as in the softmax
            over CLS + patches, not renormalised). SigLIP (no CLS): attention of the pooling head's probe to every
            patch, averaged over heads.
        grid_size (`int`): side `L` of the `L x L` patch grid (`num_patches = L * L`).
    """

    patch_tokens: torch.Tensor
    cls_attention: torch.Tensor
    grid_size: int


class ClusterSTMTeacher(nn.Module):
    """
    Frozen CLIP-like or SigLIP teacher: always in eval mode, no parameter requires grad, every method runs under
    `torch.no_grad()`.

    Args:
        model (`transformers.CLIPModel` or `transformers.SiglipModel`): the dual-encoder teacher.
        tokenizer (*optional*): the teacher's own tokenizer (separate from the student's).
    """

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__()
        self.model_kind = _model_kind(model)
        self.model = model
        self.tokenizer = tokenizer
        vision_config = model.config.vision_config
        self.image_size: int = vision_config.image_size
        self.patch_size: int = vision_config.patch_size
        self.model.requires_grad_(False)
        # kept out of the module tree: the pooler only references the teacher's own layers
        self.__dict__["pooler"] = build_window_pooler(model)
        self.train(False)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | nn.Module,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tokenizer=None,
    ) -> ClusterSTMTeacher:
        """
        Loads a teacher from a local checkpoint folder (`CLIPModel` / `SiglipModel`, local files only) or wraps an
        existing model instance.

        Args:
            pretrained_model_name_or_path (`str`, `os.PathLike` or `nn.Module`): checkpoint folder or model.
            dtype (`torch.dtype`, *optional*): dtype to load / cast the teacher to.
            device (`torch.device` or `str`, *optional*): device to move the teacher to.
            tokenizer (*optional*): tokenizer to use; by default the folder's tokenizer if it has one.
        """
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
            kwargs = {"local_files_only": True, "use_safetensors": True}
            if dtype is not None:
                kwargs["dtype"] = dtype
            model = AutoModel.from_pretrained(path, **kwargs)
            if tokenizer is None:
                tokenizer = _load_local_tokenizer(path)
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer=tokenizer)

    def train(self, mode: bool = True) -> ClusterSTMTeacher:
        """The teacher is frozen: it stays in eval mode whatever `mode` is."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> TeacherVideoOutput:
        return self.encode_video(pixel_values)

    @torch.no_grad()
    def encode_video(self, pixel_values: torch.Tensor) -> TeacherVideoOutput:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_frames, 3, height, width)`): frames normalised
                with the teacher's image mean / std.

        Returns:
            [`TeacherVideoOutput`].
        """
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 5 or pixel_values.shape[2] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(
                f"`pixel_values` must have shape (batch_size, num_frames, 3, height, width), got {shape}."
            )
        b, t = pixel_values.shape[:2]
        frames = pixel_values.reshape(b * t, *pixel_values.shape[2:]).to(device=self.device, dtype=self.dtype)
        interpolate = tuple(frames.shape[-2:]) != (self.image_size, self.image_size)

        if self.model_kind == "clip":
            patch_tokens, attention = self._clip_vision(frames, interpolate)
        else:
            hidden = self.model.vision_model(
                pixel_values=frames, interpolate_pos_encoding=interpolate
            ).last_hidden_state
            patch_tokens, attention = hidden, _pooling_head_attention(self.model.vision_model.head, hidden)

        n = patch_tokens.shape[1]
        grid_size = math.isqrt(n)
        return TeacherVideoOutput(
            patch_tokens=patch_tokens.reshape(b, t, n, -1),
            cls_attention=attention.reshape(b, t, n),
            grid_size=grid_size,
        )

    def _clip_vision(self, frames: torch.Tensor, interpolate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        last_layer = self.model.vision_model.encoder.layers[-1]
        captured = {}

        def capture_input(module, args, kwargs):
            captured["hidden_states"] = args[0] if args else kwargs["hidden_states"]

        # the CLS attention is recomputed from the last layer's input, so any attention backend (SDPA, flash) works
        handle = last_layer.register_forward_pre_hook(capture_input, with_kwargs=True)
        try:
            hidden = self.model.vision_model(
                pixel_values=frames, interpolate_pos_encoding=interpolate
            ).last_hidden_state
        finally:
            handle.remove()
        attention = _cls_attention(last_layer, captured["hidden_states"])
        return hidden[:, 1:], attention

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Text embeddings in the teacher's joint space (CLIP: `text_projection` of the EOS state; SigLIP: its pooled
        text embedding), shape `(batch_size, projection_dim)`.
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        output = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def relevance(self, patch_tokens: torch.Tensor, text_embeds: torch.Tensor, window_size: int = 3) -> torch.Tensor:
        """Video-text relevance `(batch_size, num_frames, num_patches)` with the teacher's own window pooler (see
        `generate_relevance`)."""
        return generate_relevance(patch_tokens, text_embeds, self.pooler, window_size=window_size)


def _model_kind(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vision_config") or not hasattr(model, "get_text_features"):
        raise ValueError(
            f"The teacher must be a dual-encoder such as CLIPModel or SiglipModel, got {type(model).__name__}."
        )
    tower = getattr(model, "vision_model", None)
    if hasattr(model, "visual_projection") and hasattr(tower, "post_layernorm") and hasattr(tower, "encoder"):
        return "clip"
    if hasattr(getattr(tower, "head", None), "probe"):
        return "siglip"
    raise ValueError(f"Unsupported teacher {type(model).__name__}: expected a CLIP-like or SigLIP model.")


def _cls_attention(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Attention of the CLS query to every patch key in a CLIP encoder layer, averaged over heads: `(M, N)`."""
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden_states)
    m, length, _ = normed.shape
    query = attn.q_proj(normed[:, :1]).view(m, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(m, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    # in float32 even under autocast: the attention weights drive attention-guided masking
    device_type = query.device.type
    no_autocast = (
        torch.autocast(device_type=device_type, enabled=False)
        if torch.amp.is_autocast_available(device_type)
        else contextlib.nullcontext()
    )
    with no_autocast:
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale  # (M, heads, 1, 1 + N)
        weights = scores.softmax(dim=-1)
    return weights[:, :, 0, 1:].mean(dim=1)


def _pooling_head_attention(head: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Attention of SigLIP's pooling probe to every patch, averaged over heads: `(M, N)`."""
    probe = head.probe.expand(hidden_states.shape[0], -1, -1)
    _, weights = head.attention(probe, hidden_states, hidden_states, need_weights=True, average_attn_weights=True)
    return weights[:, 0].float()


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
