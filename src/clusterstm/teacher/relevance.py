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
"""Video-text relevance generation (Algorithm III) and pooling adapters for CLIP-like and SigLIP teachers.

Every grid position of every frame is represented by the teacher's own pooling of the `w x w` window of patch tokens
around it (replicate padding at the borders), which lands it in the teacher's joint vision-text space; its relevance
to the caption is the cosine similarity with the teacher's text embedding.

The file is Hub remote code: it only imports torch and never the ``clusterstm`` package itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.masking_clusterstm import _autocast_disabled, _check_tokens, _compute_dtype

DEFAULT_MAX_CHUNK_ELEMENTS = 2**25


class CLIPWindowPooler(nn.Module):
    """
    Pools windows of CLIP-like vision tokens into the joint space: mean over the window, then the tower's
    post-layernorm and visual projection (the path CLIP applies to its CLS token).

    Args:
        post_layernorm (`nn.Module`): the vision tower's final layer norm (`vision_model.post_layernorm`).
        visual_projection (`nn.Module`, *optional*): projection to the joint space (`visual_projection`); identity
            when `None`.
    """

    def __init__(self, post_layernorm: nn.Module, visual_projection: nn.Module | None = None):
        super().__init__()
        self.post_layernorm = post_layernorm
        self.visual_projection = visual_projection if visual_projection is not None else nn.Identity()

    def forward(self, window_tokens: torch.Tensor) -> torch.Tensor:
        """`window_tokens` `(M, w*w, C)` -> pooled embeddings `(M, D)`."""
        dtype = _module_dtype(self.post_layernorm, window_tokens.dtype)
        # the mean is taken in float32 (or float64) to keep the window average exact, then cast to the tower's dtype
        pooled = window_tokens.to(_compute_dtype(window_tokens.dtype)).mean(dim=1).to(dtype)
        return self.visual_projection(self.post_layernorm(pooled))


class SiglipWindowPooler(nn.Module):
    """
    Pools windows of SigLIP vision tokens with the tower's multi-head attention pooling head (its pooled image
    embedding is already the joint-space embedding).

    Args:
        head (`nn.Module`): the vision tower's pooling head (`vision_model.head`), mapping `(M, L, C)` to `(M, C)`.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, window_tokens: torch.Tensor) -> torch.Tensor:
        """`window_tokens` `(M, w*w, C)` -> pooled embeddings `(M, C)`."""
        return self.head(window_tokens.to(_module_dtype(self.head, window_tokens.dtype)))


def _module_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return default


def build_window_pooler(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """
    Returns the window pooler matching a teacher model.

    * CLIP-like models with a visual projection (`CLIPModel`, `CLIPVisionModelWithProjection`, or anything exposing
      `vision_model.post_layernorm` and `visual_projection`) -> [`CLIPWindowPooler`];
    * SigLIP models with a pooling head (`SiglipModel`, `SiglipVisionModel`, or anything exposing `head` or
      `vision_model.head` with a `probe`) -> [`SiglipWindowPooler`];
    * [`CLIPWindowPooler`] / [`SiglipWindowPooler`] instances and any other callable that is not one of the towers
      above are returned unchanged (they must map `(M, w*w, C)` to `(M, D)`).

    Raises:
        `ValueError`: for a vision tower that has no route to the joint space (e.g. `CLIPVisionModel` without
        projection, SigLIP without head) or an object that is not callable.
    """
    if isinstance(model, (CLIPWindowPooler, SiglipWindowPooler)):
        return model
    tower = getattr(model, "vision_model", model)

    # SigLIP: multi-head attention pooling head with a learned probe
    head = getattr(tower, "head", None)
    if isinstance(head, nn.Module) and hasattr(head, "probe"):
        return SiglipWindowPooler(head)

    post_layernorm = getattr(tower, "post_layernorm", None)
    projection = getattr(model, "visual_projection", None)
    if isinstance(post_layernorm, nn.Module) and isinstance(projection, nn.Module):
        return CLIPWindowPooler(post_layernorm, projection)
    if isinstance(post_layernorm, nn.Module) or hasattr(tower, "use_head"):
        raise ValueError(
            f"{type(model).__name__} has no projection to the joint vision-text space (no `visual_projection` or "
            "pooling `head`); pass a CLIPModel / CLIPVisionModelWithProjection / SiglipModel / SiglipVisionModel with "
            "head, or a callable pooler."
        )
    if not callable(model):
        raise ValueError(f"`pooler` must be a teacher model or a callable, got {type(model).__name__}.")
    return model


def _window_index(grid_size: int, window_size: int, device: torch.device) -> torch.Tensor:
    """`(L*L, w*w)` indices of the `w x w` window around every grid position, clamped at the borders (the same as
    replicate padding by `w // 2`)."""
    half = window_size // 2
    coords = torch.arange(grid_size, device=device)
    offsets = torch.arange(-half, half + 1, device=device)
    # rows[r, a] = clamp(r + a): the padded-and-unfolded row coordinate
    rows = (coords[:, None] + offsets[None, :]).clamp_(0, grid_size - 1)
    index = rows[:, None, :, None] * grid_size + rows[None, :, None, :]  # (L, L, w, w)
    return index.reshape(grid_size * grid_size, window_size * window_size)


def generate_relevance(
    vision_tokens: torch.Tensor,
    text_embeds: torch.Tensor,
    pooler: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    window_size: int = 3,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """
    Video-text relevance of every token (Algorithm III).

    Patch tokens are laid on their `L x L` grid, replicate-padded by `window_size // 2`, and every `w x w` window is
    pooled by the teacher's pooling module into the joint space; relevance is the cosine similarity between that
    embedding and the video's text embedding. `window_size=1` pools each token alone (the 1x1 ablation).

    Args:
        vision_tokens (`torch.Tensor` of shape `(batch_size, num_frames, num_tokens, hidden_size)`): the teacher's
            patch tokens (no CLS), `num_tokens` a perfect square.
        text_embeds (`torch.Tensor` of shape `(batch_size, projection_dim)`): the teacher's text embeddings.
        pooler (`nn.Module` or callable): maps `(M, w*w, hidden_size)` to `(M, projection_dim)`; a CLIP / SigLIP
            model is turned into one by [`build_window_pooler`].
        window_size (`int`, *optional*, defaults to 3): odd window size `w`.
        max_chunk_elements (`int`, *optional*): bound on the size of the gathered windows of one chunk of frames.

    Returns:
        `torch.Tensor` of shape `(batch_size, num_frames, num_tokens)`, cosine similarities in float32 (float64 for
        float64 inputs), on the input's device, also under `torch.autocast` (switched off inside, pooler included).
        Gradients flow when the inputs and pooler require them.
    """
    _check_tokens(vision_tokens, "vision_tokens", 4, "(batch_size, num_frames, num_tokens, hidden_size)")
    _check_tokens(text_embeds, "text_embeds", 2, "(batch_size, projection_dim)")
    b, t, n, c = vision_tokens.shape
    if text_embeds.shape[0] != b:
        raise ValueError(
            f"`text_embeds` has batch size {text_embeds.shape[0]} but `vision_tokens` has batch size {b}."
        )
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"`window_size` must be a positive odd integer, got {window_size!r}.")
    if isinstance(max_chunk_elements, bool) or not isinstance(max_chunk_elements, int) or max_chunk_elements < 1:
        raise ValueError(f"`max_chunk_elements` must be a positive integer, got {max_chunk_elements!r}.")
    grid_size = math.isqrt(n)
    if grid_size * grid_size != n:
        raise ValueError(f"`num_tokens` must be a perfect square (an L x L patch grid), got {n}.")
    pooler = build_window_pooler(pooler)

    # Autocast is switched off for the whole computation, pooler included: under bf16/fp16 autocast its projection and
    # the cosine would run in low precision again after the float32 up-cast (a low-precision pooler keeps its dtype).
    with _autocast_disabled(vision_tokens):
        return _generate_relevance(vision_tokens, text_embeds, pooler, window_size, max_chunk_elements, grid_size)


def _generate_relevance(
    vision_tokens: torch.Tensor,
    text_embeds: torch.Tensor,
    pooler: Callable[[torch.Tensor], torch.Tensor],
    window_size: int,
    max_chunk_elements: int,
    grid_size: int,
) -> torch.Tensor:
    b, t, n, c = vision_tokens.shape
    compute_dtype = _compute_dtype(torch.promote_types(vision_tokens.dtype, text_embeds.dtype))
    dim = text_embeds.shape[-1]
    text = F.normalize(text_embeds.to(compute_dtype), dim=-1)
    index = _window_index(grid_size, window_size, vision_tokens.device)
    window_area = window_size * window_size

    frames = vision_tokens.reshape(b * t, n, c)
    frame_text = text.repeat_interleave(t, dim=0)  # (B*T, D)
    frames_per_chunk = max(1, max_chunk_elements // (n * window_area * c))
    relevance = []
    for start in range(0, b * t, frames_per_chunk):
        end = min(start + frames_per_chunk, b * t)
        windows = frames[start:end, index]  # (f, N, w*w, C)
        num_windows = (end - start) * n
        windows = windows.reshape(num_windows, window_area, c)
        if isinstance(pooler, nn.Module) and not isinstance(pooler, (CLIPWindowPooler, SiglipWindowPooler)):
            # with autocast off, a module pooler needs its own dtype (autocast used to reconcile the two)
            windows = windows.to(_module_dtype(pooler, windows.dtype))
        pooled = pooler(windows)
        if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (num_windows, dim):
            shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
            raise ValueError(
                f"`pooler` must map ({num_windows}, {window_area}, {c}) window tokens to ({num_windows}, {dim}) "
                f"embeddings matching `text_embeds`, got {shape}."
            )
        pooled = F.normalize(pooled.to(compute_dtype).reshape(end - start, n, dim), dim=-1)
        relevance.append(torch.einsum("fnd,fd->fn", pooled, frame_text[start:end]))
    return torch.cat(relevance, dim=0).reshape(b, t, n)
