"""open_clip teachers (`pip install clusterstm[open_clip]`): OpenAI / LAION / DFN-style CLIP ViTs in open_clip's own
`VisionTransformer` (class-token pooling), loaded from a local folder with `open_clip_config.json` and safetensors."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..preprocessing import ImageNormalization
from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TeacherAdapter, autocast_off, repad


class OpenCLIPWindowPooler(nn.Module):
    """Mean of a window's tokens, then the tower's `ln_post` and `proj` (open_clip's path for its class token)."""

    def __init__(self, ln_post: nn.Module, proj: torch.Tensor | None):
        super().__init__()
        self.ln_post = ln_post
        self.proj = proj  # an nn.Parameter of the teacher: registered, so a float32 copy copies it

    def forward(self, window_tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.ln_post.weight.dtype
        pooled = self.ln_post(window_tokens.float().mean(dim=1).to(dtype))
        return pooled @ self.proj if self.proj is not None else pooled


class OpenCLIPAdapter(TeacherAdapter):
    """
    Patch tokens: the transformer's output after the class token, before `ln_post`. CLS attention: the last block's
    attention of the class token to every patch (from its `ln_1` input and the packed in-projection), averaged over
    heads. Window pooling: mean, `ln_post`, `proj`. Text: `encode_text` on ids padded with 0 to `context_length`
    (open_clip's tokenizer convention). Other frame sizes: the position embeddings are resized (bicubic) to the grid.
    Only open_clip's own `VisionTransformer` with class-token pooling is supported; timm towers (EVA-CLIP) and
    attention-pooled towers raise a clear error.
    """

    family = "open_clip"
    hf_classes = ("open_clip.model.CLIP",)
    default_normalization = ImageNormalization(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        visual = getattr(model, "visual", None)
        supported = (
            hasattr(visual, "conv1")
            and getattr(visual, "attn_pool", None) is None
            and getattr(visual, "pool_type", None) == "tok"
            and not getattr(visual, "final_ln_after_pool", False)
            and all(isinstance(block.attn, nn.MultiheadAttention) for block in visual.transformer.resblocks)
        )
        if not supported:
            raise ValueError(
                f"open_clip teacher with vision tower {type(visual).__name__}: only open_clip's VisionTransformer with "
                "class-token pooling and standard attention is supported (timm towers such as EVA-CLIP are not)."
            )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("open_clip.") and hasattr(model, "visual")

    @property
    def patch_size(self) -> int:
        return int(self.model.visual.patch_size[0])

    @property
    def native_size(self) -> int:
        return int(self.model.visual.image_size[0])

    @property
    def hidden_size(self) -> int:
        return int(self.model.visual.transformer.width)

    def prepare_input_ids(self, input_ids, attention_mask, pad_token_id, padding_side):
        length = int(self.model.context_length)
        return repad(input_ids, attention_mask, length, 0 if pad_token_id is None else pad_token_id, "right"), None

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.model.encode_text(input_ids)

    def _positions(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> torch.Tensor:
        positions = self.model.visual.positional_embedding
        cls, grid = positions[:1], positions[1:]
        side = int(round(grid.shape[0] ** 0.5))
        if (side, side) != (grid_h, grid_w):
            grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)
        return torch.cat([cls.float(), grid.float()]).to(dtype)

    def encode_frames(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.model.visual
        b, t = frames.shape[:2]
        x = visual.conv1(frames.flatten(0, 1))  # (M, C, gh, gw)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._positions(grid_h, grid_w, x.dtype)
        x = visual.ln_pre(x)
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        attention = self._cls_attention(blocks[-1], x, grid_h * grid_w)
        x = blocks[-1](x)
        tokens = x[:, 1:]
        return tokens.reshape(b, t, tokens.shape[1], -1), attention.reshape(b, t, -1)

    @staticmethod
    def _cls_attention(block: nn.Module, x: torch.Tensor, num_patches: int) -> torch.Tensor:
        attn: nn.MultiheadAttention = block.attn
        normed = block.ln_1(x)
        width, heads = normed.shape[-1], attn.num_heads
        w_q, w_k, _ = attn.in_proj_weight.split(width)
        b_q, b_k, _ = attn.in_proj_bias.split(width) if attn.in_proj_bias is not None else (None, None, None)
        m, length = normed.shape[:2]
        query = F.linear(normed[:, :1], w_q, b_q).view(m, 1, heads, -1).transpose(1, 2)
        key = F.linear(normed, w_k, b_k).view(m, length, heads, -1).transpose(1, 2)
        with autocast_off(query):
            scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) / query.shape[-1] ** 0.5
            weights = scores.softmax(dim=-1)
        return weights[:, :, 0, 1 : 1 + num_patches].mean(dim=1)

    def build_pooler(self) -> nn.Module:
        return OpenCLIPWindowPooler(self.model.visual.ln_post, self.model.visual.proj)


class OpenCLIPTokenizer:
    """open_clip's tokenizer with the call convention the collator uses (`padding`, `truncation`, `max_length`,
    `return_tensors="pt"`): ids padded with 0 to the model's `context_length`, and their attention mask."""

    padding_side = "right"
    pad_token_id = 0

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer = tokenizer
        self.model_max_length = int(context_length)

    def __call__(self, texts, padding=True, truncation=True, max_length=None, return_tensors="pt", **kwargs):
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self.tokenizer(texts, context_length=self.model_max_length)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def load_open_clip(path: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, OpenCLIPTokenizer, ImageNormalization]:
    """Loads an open_clip folder (`open_clip_config.json` + `*.safetensors`): model, tokenizer, image statistics."""
    import json

    try:
        import open_clip
    except ImportError as error:
        raise ValueError(
            f"{path} is an open_clip checkpoint: install the extra with `pip install clusterstm[open_clip]`."
        ) from error
    config = json.loads(open(os.path.join(path, "open_clip_config.json"), encoding="utf-8").read())
    model = open_clip.create_model(f"local-dir:{path}", load_weights=True, weights_only=True)
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = OpenCLIPTokenizer(open_clip.get_tokenizer(f"local-dir:{path}"), model.context_length)
    preprocess = config.get("preprocess_cfg", {})
    normalization = ImageNormalization.from_values(
        {"image_mean": preprocess.get("mean", OPENAI_CLIP_MEAN), "image_std": preprocess.get("std", OPENAI_CLIP_STD)}
    )
    return model.eval(), tokenizer, normalization
