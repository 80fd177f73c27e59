"""The interface every teacher family implements, and helpers shared by the CLIP-like families."""

from __future__ import annotations

import contextlib
import copy
from typing import ClassVar

import torch
from torch import nn

from ..preprocessing import ImageNormalization

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TeacherAdapter:
    """
    What ClusterSTM needs to know of one family of dual-encoder teachers. A new family is one subclass in its own
    file, registered with [`register_adapter`].

    An adapter says which checkpoints it serves (`model_types`, the `model_type` of their config), how frames and
    text are prepared for the teacher (`default_normalization` when the checkpoint folder has no image processor
    file, `prepare_input_ids` for the padding convention the text tower was trained with), which hidden states are
    patch tokens and what plays the role of the CLS attention (`encode_frames`), how a window of patch tokens is
    pooled into the joint space (`build_pooler`) and how text is embedded (`encode_text`).

    Args:
        model (`nn.Module`): the teacher model, e.g. `CLIPModel`.
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    hf_classes: ClassVar[tuple[str, ...]] = ()
    default_normalization: ClassVar[ImageNormalization] = ImageNormalization(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter serves `model` (by its config's `model_type`)."""
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types

    # ---- geometry
    @property
    def vision_config(self):
        return self.model.config.vision_config

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    @property
    def native_size(self) -> int:
        """Side in pixels of the square frames the teacher was trained on."""
        return int(self.vision_config.image_size)

    @property
    def hidden_size(self) -> int:
        """Width of the patch tokens (the target width of unmasked-token alignment)."""
        return int(self.vision_config.hidden_size)

    # ---- text
    def prepare_input_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int | None, padding_side: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Brings token ids to the padding convention the text tower was trained with (default: unchanged)."""
        return input_ids, attention_mask

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings in the joint space `(batch_size, projection_dim)`."""
        output = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    # ---- vision
    def encode_frames(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            frames (`torch.Tensor` of shape `(batch_size, num_frames, 3, height, width)`): frames normalised for the
                teacher, at a size whose patch grid is the one wanted.

        Returns:
            `(patch_tokens, attention)`: `(batch_size, num_frames, num_patches, hidden_size)` patch tokens in row-major
            grid order and `(batch_size, num_frames, num_patches)` attention of the CLS token (or its equivalent).
        """
        raise NotImplementedError

    def encode_dense_frames(self, frames: torch.Tensor, method: str) -> torch.Tensor:
        """
        Patch tokens read from the last block in a training-free dense way (``"maskclip"`` or ``"clearclip"``, see
        `clusterstm.teacher.dense`), `(batch_size, num_frames, num_patches, hidden_size)`, for the window pooler.
        Families whose last block has another layout do not support it.
        """
        raise ValueError(
            f"relevance_method={method!r} is implemented for CLIP-like teachers (Hugging Face CLIP attention layout); "
            f"the {self.family} adapter supports only relevance_method='window'."
        )

    def build_pooler(self) -> nn.Module:
        """The module mapping windows of patch tokens `(M, w*w, C)` to joint-space embeddings `(M, D)`."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.family} ({type(self.model).__name__}, patch {self.patch_size}, native {self.native_size} px)"


def float32_pooler(pooler: nn.Module) -> nn.Module:
    """A float32 copy of a low-precision pooler: the relevance math stays in float32 when the teacher runs in bf16 /
    fp16 (the pooling modules are a few layers, so the copy is small)."""
    if all(p.dtype == torch.float32 for p in pooler.parameters() if p.is_floating_point()):
        return pooler
    return copy.deepcopy(pooler).float()


def cls_attention_from_input(attention: nn.Module, normed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """
    Attention of the query at position 0 (CLS) to the keys at positions `1 .. num_patches`, averaged over heads, from
    the normalised input of a CLIP-style attention module (`q_proj`, `k_proj`, `num_heads`, `head_dim`, `scale`).
    Softmax over all keys (extra tokens such as X-CLIP's message token included), not renormalised. Computed in
    float32 even under autocast: the weights drive attention-guided masking.
    """
    m, length, _ = normed.shape
    query = attention.q_proj(normed[:, :1]).view(m, 1, attention.num_heads, attention.head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(m, length, attention.num_heads, attention.head_dim).transpose(1, 2)
    with autocast_off(query):
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attention.scale
        weights = scores.softmax(dim=-1)
    return weights[:, :, 0, 1 : 1 + num_patches].mean(dim=1)


def autocast_off(tensor: torch.Tensor):
    device_type = tensor.device.type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class capture_attention_input(contextlib.AbstractContextManager):
    """Records the (normalised) `hidden_states` input of an attention module during a forward pass, so the CLS
    attention can be recomputed whatever attention backend (SDPA, flash) the model runs."""

    def __init__(self, attention: nn.Module):
        self.attention = attention
        self.hidden_states: torch.Tensor | None = None
        self._handle = None

    def __enter__(self):
        def hook(module, args, kwargs):
            self.hidden_states = args[0] if args else kwargs["hidden_states"]

        self._handle = self.attention.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def pooling_head_attention(head: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Attention of a SigLIP-style pooling head's probe to every token, averaged over heads: `(M, N)`, float32."""
    probe = head.probe.expand(hidden_states.shape[0], -1, -1)
    _, weights = head.attention(probe, hidden_states, hidden_states, need_weights=True, average_attn_weights=True)
    return weights[:, 0].float()


def repad(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    length: int,
    pad_token_id: int,
    padding_side: str = "right",
) -> torch.Tensor:
    """
    Re-pads token ids to exactly `length` (what `padding="max_length", max_length=length` gives): the real tokens
    (those with `attention_mask == 1`, in order) are kept, truncated to `length` (from the end for right padding,
    like `truncation=True`), and placed on the tokenizer's `padding_side`; the rest is `pad_token_id`.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep = attention_mask.bool()
    counts = keep.sum(dim=1)
    order = keep.long().cumsum(dim=1) - 1  # rank of each real token in its row
    keep = keep & (order < length)
    counts = counts.clamp(max=length)
    if padding_side == "left":
        position = order + (length - counts)[:, None]
    else:
        position = order
    out = torch.full((input_ids.shape[0], length), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
    out[rows[keep], position[keep]] = input_ids[keep]
    return out
