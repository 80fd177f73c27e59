"""CLIP-like teachers: CLIP, MetaCLIP 2, AltCLIP and Chinese-CLIP (same ViT vision tower with a CLS token, a
`post_layernorm` and a `visual_projection`)."""

from __future__ import annotations

import torch
from torch import nn

from ..dense import check_relevance_method, dense_tokens
from ..relevance import CLIPWindowPooler
from .base import TeacherAdapter, capture_attention_input, cls_attention_from_input


class CLIPAdapter(TeacherAdapter):
    """
    Patch tokens: the vision tower's last hidden states after the CLS token, before `post_layernorm`. CLS attention:
    the last layer's attention of the CLS query to every patch, averaged over heads. Window pooling: mean of the
    window's tokens, then `post_layernorm` and `visual_projection` (the path CLIP applies to its CLS token). Text:
    `get_text_features` (projected EOS / CLS state). Frames of another size interpolate the position embeddings
    (`interpolate_pos_encoding=True`).
    """

    family = "CLIP"
    model_types = ("clip", "metaclip_2", "altclip", "chinese_clip")
    hf_classes = ("CLIPModel", "MetaClip2Model", "AltCLIPModel", "ChineseCLIPModel")

    def _run_tower(self, frames: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(M, 3, H, W)` frames -> `(M, N, C)` patch tokens and `(M, N)` CLS attention."""
        tower = self.model.vision_model
        interpolate = tuple(frames.shape[-2:]) != (self.native_size, self.native_size)
        num_patches = (frames.shape[-2] // self.patch_size) * (frames.shape[-1] // self.patch_size)
        with capture_attention_input(tower.encoder.layers[-1].self_attn) as captured:
            hidden = tower(pixel_values=frames, interpolate_pos_encoding=interpolate).last_hidden_state
        attention = cls_attention_from_input(tower.encoder.layers[-1].self_attn, captured.hidden_states, num_patches)
        return hidden[:, 1 : 1 + num_patches], attention

    def encode_frames(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = frames.shape[:2]
        tokens, attention = self._run_tower(frames.flatten(0, 1), t)
        return tokens.reshape(b, t, tokens.shape[1], -1), attention.reshape(b, t, -1)

    def encode_dense_frames(self, frames: torch.Tensor, method: str) -> torch.Tensor:
        """MaskCLIP / ClearCLIP readings of the last block (see `clusterstm.teacher.dense`) in place of its output."""
        if check_relevance_method(method) == "window":
            return self.encode_frames(frames)[0]
        b, t = frames.shape[:2]
        flat = frames.flatten(0, 1)
        tower = self.model.vision_model
        attention = tower.encoder.layers[-1].self_attn
        interpolate = tuple(flat.shape[-2:]) != (self.native_size, self.native_size)
        num_patches = (flat.shape[-2] // self.patch_size) * (flat.shape[-1] // self.patch_size)
        with capture_attention_input(attention) as captured:
            tower(pixel_values=flat, interpolate_pos_encoding=interpolate)
        tokens = dense_tokens(attention, captured.hidden_states, method)[:, 1 : 1 + num_patches]
        return tokens.reshape(b, t, num_patches, -1)

    def build_pooler(self) -> nn.Module:
        return CLIPWindowPooler(self.model.vision_model.post_layernorm, self.model.visual_projection)
