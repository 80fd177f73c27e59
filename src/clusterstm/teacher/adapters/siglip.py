"""SigLIP teachers (`SiglipModel`): a ViT without CLS token whose image embedding is an attention-pooling head."""

from __future__ import annotations

import torch
from torch import nn

from ..preprocessing import ImageNormalization
from ..relevance import SiglipWindowPooler
from .base import TeacherAdapter, pooling_head_attention, repad


class SiglipAdapter(TeacherAdapter):
    """
    Patch tokens: every last hidden state (there is no CLS token), after `post_layernorm`, as the pooling head
    consumes them. CLS-attention equivalent: the attention of the pooling head's probe to every patch, averaged over
    heads. Window pooling: the pooling head itself. Text: the text tower was trained on captions padded to its full
    length (`padding="max_length"`, 64 tokens) with no attention mask and pools the last position, so ids are
    re-padded to `text_config.max_position_embeddings` on the tokenizer's padding side and the mask is dropped (a
    caption padded to the longest of its batch gets another embedding). Frames: mean = std = 0.5 unless the
    checkpoint's image processor says otherwise; other sizes interpolate the position embeddings.
    """

    family = "SigLIP"
    model_types = ("siglip",)
    hf_classes = ("SiglipModel",)
    default_normalization = ImageNormalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    @property
    def text_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def prepare_input_ids(self, input_ids, attention_mask, pad_token_id, padding_side):
        if pad_token_id is None:
            pad_token_id = getattr(self.model.config.text_config, "pad_token_id", None)
        if pad_token_id is None:
            raise ValueError(f"{self.family} pads captions to {self.text_length} tokens but no pad_token_id is known.")
        return repad(input_ids, attention_mask, self.text_length, pad_token_id, padding_side), None

    def _tower(self, frames: torch.Tensor) -> torch.Tensor:
        """`(M, 3, H, W)` -> `(M, N, C)` last hidden states after `post_layernorm`."""
        interpolate = tuple(frames.shape[-2:]) != (self.native_size, self.native_size)
        return self.model.vision_model(pixel_values=frames, interpolate_pos_encoding=interpolate).last_hidden_state

    def encode_frames(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = frames.shape[:2]
        hidden = self._tower(frames.flatten(0, 1))
        attention = pooling_head_attention(self.model.vision_model.head, hidden)
        return hidden.reshape(b, t, hidden.shape[1], -1), attention.reshape(b, t, -1)

    def build_pooler(self) -> nn.Module:
        head = getattr(self.model.vision_model, "head", None)
        if head is None:
            raise ValueError(f"{type(self.model).__name__} has no pooling head (vision_use_head=False).")
        return SiglipWindowPooler(head)
