# Copyright 2026 The ClusterSTM developers. All rights reserved.
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
"""PyTorch ClusterSTM model: a masked video tower, a BERT-style text tower with video fusion layers, and the
pretraining objectives of cluster-wise spatio-temporal masking (relevance reconstruction, contrastive, matching,
masked language modelling and unmasked-token alignment)."""

import contextlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, auto_docstring, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_clusterstm import (
    MATCHING_NEGATIVES,
    MATCHING_POOLINGS,
    ClusterSTMConfig,
    ClusterSTMTextConfig,
    ClusterSTMVisionConfig,
)

logger = logging.get_logger(__name__)

# How `ClusterSTMForVideoTextRetrieval.rerank` orders the re-scored candidates.
RERANK_FUSIONS = ("matching", "sum")


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@auto_docstring(
    custom_intro="""
    Output of the ClusterSTM video tower: the hidden states of the kept (visible) tokens only, and which tokens they are.
    """
)
@dataclass
class ClusterSTMVisionModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_frames * num_kept, hidden_size)`):
        Hidden states of the kept tokens after the final layer norm, frame-major (`num_kept` tokens per frame).
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Mean of `last_hidden_state` over the tokens. [`ClusterSTMModel.get_video_features`] replaces it with its
        projection into the joint space.
    bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_frames, num_patches)`, *optional*):
        The mask that was applied (`True` = masked/dropped), or `None` when no token was dropped.
    kept_indices (`torch.LongTensor` of shape `(batch_size, num_frames * num_kept)`, *optional*):
        Flat indices into the `num_frames * num_patches` token grid of the rows of `last_hidden_state`, or `None`
        when no token was dropped.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    bool_masked_pos: torch.BoolTensor | None = None
    kept_indices: torch.LongTensor | None = None


@auto_docstring(
    custom_intro="""
    Output of the ClusterSTM text tower.
    """
)
@dataclass
class ClusterSTMTextModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Hidden states of the last text-only layer.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        Hidden state of the first (`[CLS]`) token. [`ClusterSTMModel.get_text_features`] replaces it with its
        projection into the joint space.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@auto_docstring
@dataclass
class ClusterSTMOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss` is `True`):
        Symmetric video-text contrastive loss (negatives gathered across processes when `torch.distributed` runs).
    logits_per_video (`torch.FloatTensor` of shape `(video_batch_size, text_batch_size)`):
        Scaled cosine similarities between the video and the text embeddings.
    logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, video_batch_size)`):
        Scaled cosine similarities between the text and the video embeddings.
    text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised text embeddings.
    video_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised video embeddings.
    text_model_output (`ClusterSTMTextModelOutput`):
        Output of the text tower (`pooler_output` projected).
    vision_model_output (`ClusterSTMVisionModelOutput`):
        Output of the video tower (`pooler_output` projected).
    """

    loss: torch.FloatTensor | None = None
    logits_per_video: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    video_embeds: torch.FloatTensor | None = None
    text_model_output: ClusterSTMTextModelOutput | None = None
    vision_model_output: ClusterSTMVisionModelOutput | None = None

    def to_tuple(self) -> tuple[Any]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


@auto_docstring
@dataclass
class ClusterSTMForPreTrainingOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`):
        Weighted sum of the objectives that ran.
    contrastive_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Video-text contrastive loss, `None` when its weight is 0.
    relevance_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Relevance reconstruction loss, `None` when its weight is 0.
    matching_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Video-text matching loss, `None` when its weight is 0 or the batch has a single pair.
    mlm_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Masked language modelling loss, `None` when its weight is 0.
    alignment_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Unmasked-token alignment loss with the teacher, `None` when its weight is 0.
    logits_per_video (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
        Scaled video-text similarities of the local batch.
    logits_per_text (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
        Scaled text-video similarities of the local batch.
    predicted_relevance (`torch.FloatTensor` of shape `(batch_size, num_frames, num_patches)`, *optional*):
        Relevance predicted by the decoder for every token of the grid, `None` when the relevance loss is skipped.
    bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_frames, num_patches)`, *optional*):
        The video mask that was applied (`True` = masked), `None` when no token was dropped.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    relevance_loss: torch.FloatTensor | None = None
    matching_loss: torch.FloatTensor | None = None
    mlm_loss: torch.FloatTensor | None = None
    alignment_loss: torch.FloatTensor | None = None
    logits_per_video: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    predicted_relevance: torch.FloatTensor | None = None
    bool_masked_pos: torch.BoolTensor | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Contrastive loss across processes
# ---------------------------------------------------------------------------------------------------------------------


def _distributed_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when `torch.distributed` is not running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """
    Concatenate `tensor` from all processes along dim 0, keeping the autograd graph: the backward pass sends every
    process the gradient of its own rows summed over all processes. Without `torch.distributed` (or with one
    process) `tensor` is returned unchanged. Every process must pass the same shape (drop the last uneven batch).
    """
    _, world_size = _distributed_world()
    if world_size == 1:
        return tensor
    # Imported lazily: the functional collectives are only needed (and only importable everywhere) under distributed.
    from torch.distributed import _functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    return gather(tensor.contiguous(), 0, dist.group.WORLD)


def _autocast_disabled(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Switches autocast off on `tensor`'s device (for the few fp32-critical products)."""
    if torch.amp.is_autocast_available(tensor.device.type):
        return torch.autocast(device_type=tensor.device.type, enabled=False)
    return contextlib.nullcontext()


def video_text_contrastive_loss(
    video_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """
    Symmetric InfoNCE loss between L2-normalised `video_embeds` and `text_embeds` (both `(batch_size, dim)`, row i
    of each is a pair) with the (already exponentiated) `logit_scale`.

    Under `torch.distributed` with several processes, the embeddings of all processes are gathered WITH gradients
    and each process computes the loss of its LOCAL rows against ALL gathered columns (labels offset by
    `rank * batch_size`). DDP averages the gradients over the processes, which then equals the gradient of the
    one-process loss over the global batch (a global loss on every process would scale it by the world size).
    The returned value is the local loss; its mean over the processes is the global loss.
    """
    rank, world_size = _distributed_world()
    batch_size = video_embeds.shape[0]
    all_video_embeds = gather_with_grad(video_embeds)
    all_text_embeds = gather_with_grad(text_embeds)
    labels = torch.arange(batch_size, device=video_embeds.device) + rank * batch_size
    # Reductions in fp32: mixed precision logits with a scale up to 100 overflow half-precision softmax sums. The
    # matmul too: under autocast it would run in half precision before any up-cast (errors of ~0.4 in the logits).
    with _autocast_disabled(video_embeds):
        scale = logit_scale.float()
        logits_video_to_text = scale * torch.matmul(video_embeds.float(), all_text_embeds.float().t())
        logits_text_to_video = scale * torch.matmul(text_embeds.float(), all_video_embeds.float().t())
    video_loss = nn.functional.cross_entropy(logits_video_to_text, labels)
    text_loss = nn.functional.cross_entropy(logits_text_to_video, labels)
    return (video_loss + text_loss) / 2.0


# ---------------------------------------------------------------------------------------------------------------------
# Video tower
# ---------------------------------------------------------------------------------------------------------------------


def matching_features(fused: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """
    What the matching head reads: the mean of the fused text states over the caption's tokens (`attention_mask`),
    `(B, L, H)` -> `(B, H)`.

    Why not the fused `[CLS]` alone (BLIP's choice, with a pretrained BERT): from scratch, it is the word tokens whose
    cross-attention first finds what they name in the video, and the `[CLS]` state hardly depends on either input at
    initialisation, so a head on it sits at the 1:2 prior (entropy 0.637). Measured with
    `benchmarks/matching_probe.py` (fusion layers and head trained on fixed tower outputs): `[CLS]` stays at
    0.6366 for 150 steps at lr 5e-4 and 1e-4, the token mean leaves it (see docs/RESULTS.md).
    """
    weights = attention_mask.to(fused.dtype)[..., None]
    return (fused * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def matching_logits(
    itm_head: nn.Module, fused: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean"
) -> torch.Tensor:
    """
    Matching logits `(B, 2)` (no match / match) of fused text states `(B, L, H)`.

    `pooling="mean"`: the head scores the caption-token mean ([`matching_features`]). `pooling="softmin"`: the head
    scores every caption token, and the pair's match log-odds is a soft minimum (`-logsumexp(-x)`) of the per-token
    log-odds: a caption matches only if each of its phrases does, so one phrase the video contradicts (the wrong
    motion of an object whose colour and shape are right, the hard negatives of re-ranking) vetoes the pair instead
    of being averaged away. Measured in docs/RESULTS.md section 4.
    """
    if pooling not in MATCHING_POOLINGS:
        raise ValueError(f"pooling must be one of {MATCHING_POOLINGS}, got {pooling!r}.")
    if pooling == "mean":
        return itm_head(matching_features(fused, attention_mask)).float()
    per_token = itm_head(fused).float()
    log_odds = (per_token[..., 1] - per_token[..., 0]).masked_fill(attention_mask == 0, torch.inf)
    match = -torch.logsumexp(-log_odds, dim=1)
    return torch.stack([torch.zeros_like(match), match], dim=-1)


def video_text_matching_loss(
    fusion_model: nn.Module,
    itm_head: nn.Module,
    text_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    video_tokens: torch.Tensor,
    logits_per_text: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    negatives: str = "hard",
    pooling: str = "mean",
) -> torch.Tensor:
    """
    Video-text matching (binary) loss on the positive pairs plus one negative video per text and one negative text per
    video (the positive is never drawn). `negatives="hard"`: drawn in proportion to their contrastive similarity
    (ALBEF); `"uniform"`: uniformly among the other pairs; `"mixed"`: each query's negative is hard or uniform with
    probability 1/2, so that the head meets the easy differences it can learn first beside the hard ones re-ranking
    needs.

    With `input_ids`, a pair whose caption is identical to the positive's (token for token under the attention mask)
    is a positive too, so it is never drawn as a negative: labelling it "no match" would teach the head the opposite
    of what it should learn (synthetic and web corpora repeat captions). A row whose every other caption is identical
    falls back to drawing among all other rows.

    Args:
        fusion_model: the fusion layers ([`ClusterSTMTextFusionModel`]); they cross-attend to `video_tokens`.
        itm_head: maps fused text states to two logits (no match / match), read as `pooling` says
            ([`matching_logits`]).
        text_hidden_states: output of the text tower's text-only layers, `(B, L, H)`.
        attention_mask: text attention mask, `(B, L)`.
        video_tokens: video tower tokens, `(B, M, H_v)`.
        logits_per_text: contrastive logits, `(B, B)`, row `i` = text `i`.
        input_ids: the captions' token ids `(B, L)`, *optional*: masks duplicated captions out of the negatives.
        negatives: `"hard"`, `"uniform"` or `"mixed"` (see above).
        pooling: `"mean"` or `"softmin"` ([`matching_logits`]).
    """
    if negatives not in MATCHING_NEGATIVES:
        raise ValueError(f"negatives must be one of {MATCHING_NEGATIVES}, got {negatives!r}.")
    batch_size = text_hidden_states.shape[0]
    with torch.no_grad():
        eye = torch.eye(batch_size, dtype=torch.bool, device=logits_per_text.device)
        excluded = eye
        if input_ids is not None:
            ids = input_ids.masked_fill(attention_mask == 0, -1)
            same_caption = (ids[:, None, :] == ids[None, :, :]).all(-1).to(eye.device)
            # Rows left with no negative keep the plain rule (the diagonal only) instead of failing to sample.
            has_negative = (~same_caption).any(dim=1, keepdim=True)
            excluded = torch.where(has_negative, same_caption, eye)
        uniform = torch.ones_like(logits_per_text, dtype=torch.float32)
        if negatives == "uniform":
            weights_text_to_video = weights_video_to_text = uniform
        else:
            weights_text_to_video = logits_per_text.float().softmax(dim=1).add(1e-8)
            weights_video_to_text = logits_per_text.t().float().softmax(dim=1).add(1e-8)
            if negatives == "mixed":
                # Rows drawn uniformly: their weights are replaced by ones (per direction, independently).
                easy = torch.rand(2, batch_size, 1, device=uniform.device) < 0.5
                weights_text_to_video = torch.where(easy[0], uniform, weights_text_to_video)
                weights_video_to_text = torch.where(easy[1], uniform, weights_video_to_text)
        weights_text_to_video = weights_text_to_video.masked_fill(excluded, 0.0)
        weights_video_to_text = weights_video_to_text.masked_fill(excluded, 0.0)
        negative_videos = torch.multinomial(weights_text_to_video, 1).squeeze(1)
        negative_texts = torch.multinomial(weights_video_to_text, 1).squeeze(1)
    texts = torch.cat([text_hidden_states, text_hidden_states, text_hidden_states[negative_texts]], dim=0)
    masks = torch.cat([attention_mask, attention_mask, attention_mask[negative_texts]], dim=0)
    videos = torch.cat([video_tokens, video_tokens[negative_videos], video_tokens], dim=0)
    fused = fusion_model(texts, videos, attention_mask=masks)
    logits = matching_logits(itm_head, fused, masks, pooling)
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=logits.device)
    labels[:batch_size] = 1
    return nn.functional.cross_entropy(logits, labels)


def interpolate_spatiotemporal_positions(
    spatial: torch.Tensor, temporal: torch.Tensor, num_frames: int, height: int, width: int
) -> torch.Tensor:
    """
    Separable position embeddings for a `num_frames x height x width` token grid: the square spatial table
    `(1, L*L, D)` is resized bicubically to `height x width` and the temporal table `(1, T0, D)` linearly to
    `num_frames` (only when the sizes differ). Returns `(1, num_frames, height * width, D)`.
    """
    dim = spatial.shape[-1]
    side = int(math.sqrt(spatial.shape[1]))
    if height != side or width != side:
        grid = spatial.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False)
        spatial = grid.to(temporal.dtype).permute(0, 2, 3, 1).reshape(1, height * width, dim)
    if temporal.shape[1] != num_frames:
        frames = temporal.permute(0, 2, 1)
        frames = nn.functional.interpolate(frames.float(), size=num_frames, mode="linear", align_corners=False)
        temporal = frames.to(spatial.dtype).permute(0, 2, 1)
    return spatial[:, None, :, :] + temporal[:, :, None, :]


class ClusterSTMVisionEmbeddings(nn.Module):
    """Tubelet patch embedding over (T, H, W) plus separable, interpolatable spatial and temporal positions."""

    def __init__(self, config: ClusterSTMVisionConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.tubelet_size = config.tubelet_size
        self.patch_embedding = nn.Conv3d(
            config.num_channels,
            config.hidden_size,
            kernel_size=(config.tubelet_size, config.patch_size, config.patch_size),
            stride=(config.tubelet_size, config.patch_size, config.patch_size),
        )
        grid_size = config.image_size // config.patch_size
        self.spatial_position_embedding = nn.Parameter(torch.empty(1, grid_size * grid_size, config.hidden_size))
        self.temporal_position_embedding = nn.Parameter(
            torch.empty(1, config.num_frames // config.tubelet_size, config.hidden_size)
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `pixel_values` `(B, T, C, H, W)` -> (embeddings with positions, patch embeddings without), both
        `(B, T // tubelet_size, num_patches, hidden_size)`.
        """
        batch_size, num_frames, _, height, width = pixel_values.shape
        target_dtype = self.patch_embedding.weight.dtype
        # Conv3d wants (B, C, T, H, W)
        patch_embeds = self.patch_embedding(pixel_values.to(dtype=target_dtype).permute(0, 2, 1, 3, 4))
        grid_t, grid_h, grid_w = patch_embeds.shape[2:]
        patch_embeds = patch_embeds.flatten(3).permute(0, 2, 3, 1)  # (B, T', N, D)
        positions = interpolate_spatiotemporal_positions(
            self.spatial_position_embedding, self.temporal_position_embedding, grid_t, grid_h, grid_w
        )
        embeddings = self.dropout(patch_embeds + positions.to(patch_embeds.dtype))
        return embeddings, patch_embeds


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)

    attn_output = torch.matmul(attn_weights, value)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class ClusterSTMVisionAttention(nn.Module):
    """Multi-headed self-attention of the video tower (and of the relevance decoder, with its own width)."""

    def __init__(
        self, config: ClusterSTMVisionConfig, hidden_size: int | None = None, num_attention_heads: int | None = None
    ):
        super().__init__()
        self.config = config
        self.embed_dim = hidden_size or config.hidden_size
        self.num_heads = num_attention_heads or config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(
                f"embed_dim must be divisible by num_heads (got `embed_dim`: {self.embed_dim} and `num_heads`:"
                f" {self.num_heads})."
            )
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = False

        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        queries = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        keys = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        values = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            queries,
            keys,
            values,
            attention_mask,
            is_causal=self.is_causal,
            scaling=self.scale,
            dropout=0.0 if not self.training else self.dropout,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.out_proj(attn_output)
        return attn_output, attn_weights


class ClusterSTMVisionMLP(nn.Module):
    def __init__(
        self, config: ClusterSTMVisionConfig, hidden_size: int | None = None, intermediate_size: int | None = None
    ):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(hidden_size or config.hidden_size, intermediate_size or config.intermediate_size)
        self.fc2 = nn.Linear(intermediate_size or config.intermediate_size, hidden_size or config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = self.dropout(self.fc2(hidden_states))
        return hidden_states


def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability `drop_prob` in training."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    random_tensor = torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device)
    return hidden_states * (random_tensor < keep_prob).to(hidden_states.dtype) / keep_prob


class ClusterSTMVisionLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm ViT block. The relevance decoder reuses it with its own (optional, overriding) width."""

    def __init__(
        self,
        config: ClusterSTMVisionConfig,
        layer_idx: int = 0,
        hidden_size: int | None = None,
        num_attention_heads: int | None = None,
        intermediate_size: int | None = None,
        drop_path_rate: float | None = None,
    ):
        super().__init__()
        embed_dim = hidden_size or config.hidden_size
        self.layer_norm1 = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.self_attn = ClusterSTMVisionAttention(
            config, hidden_size=hidden_size, num_attention_heads=num_attention_heads
        )
        self.layer_norm2 = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.mlp = ClusterSTMVisionMLP(config, hidden_size=hidden_size, intermediate_size=intermediate_size)
        if drop_path_rate is None:
            # Stochastic depth grows linearly with depth, as in DeiT / VideoMAE.
            drop_path_rate = config.drop_path_rate * layer_idx / max(config.num_hidden_layers - 1, 1)
        self.drop_path_rate = drop_path_rate

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs)
        hidden_states = residual + drop_path(hidden_states, self.drop_path_rate, self.training)

        residual = hidden_states
        hidden_states = self.mlp(self.layer_norm2(hidden_states))
        hidden_states = residual + drop_path(hidden_states, self.drop_path_rate, self.training)
        return hidden_states


# ---------------------------------------------------------------------------------------------------------------------
# Text tower (BERT layout and parameter names, so BERT checkpoints map onto it)
# ---------------------------------------------------------------------------------------------------------------------


class ClusterSTMTextEmbeddings(nn.Module):
    """Word, position and token-type embeddings, as in BERT."""

    def __init__(self, config: ClusterSTMTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.position_ids = nn.Buffer(torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_length: int = 0,
    ) -> torch.Tensor:
        input_shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        seq_length = input_shape[1]
        if past_length + seq_length > self.position_ids.shape[1]:
            raise ValueError(
                f"Sequence length {past_length + seq_length} exceeds max_position_embeddings "
                f"({self.position_ids.shape[1]})."
            )
        if position_ids is None:
            # While decoding with a key/value cache, the new tokens continue the positions of the cached ones.
            position_ids = self.position_ids[:, past_length : past_length + seq_length]
        if token_type_ids is None:
            token_type_ids = torch.zeros(input_shape, dtype=torch.long, device=position_ids.device)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = (
            inputs_embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        )
        return self.dropout(self.LayerNorm(embeddings))


class ClusterSTMTextSelfAttention(nn.Module):
    """BERT attention projections; as cross-attention, keys and values come from the video tokens (`encoder_width`)."""

    def __init__(self, config: ClusterSTMTextConfig, is_cross_attention: bool = False, layer_idx: int | None = None):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"The hidden size ({config.hidden_size}) is not a multiple of the number of attention "
                f"heads ({config.num_attention_heads})"
            )
        self.config = config
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.is_causal = False
        self.is_cross_attention = is_cross_attention
        self.layer_idx = layer_idx
        key_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(key_width, config.hidden_size)
        self.value = nn.Linear(key_width, config.hidden_size)
        self.dropout = config.attention_probs_dropout_prob

    def _keys_and_values(self, source: torch.Tensor, cache: Cache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values of `source`, appended to (self-attention) or read from (cross-attention) `cache`."""
        if self.is_cross_attention and isinstance(cache, EncoderDecoderCache) and cache.is_updated.get(self.layer_idx):
            # The video tokens do not change while decoding: their keys and values are projected once.
            layer_cache = cache.cross_attention_cache.layers[self.layer_idx]
            return layer_cache.keys, layer_cache.values
        kv_shape = (*source.shape[:-1], -1, self.attention_head_size)
        key = self.key(source).view(kv_shape).transpose(1, 2)
        value = self.value(source).view(kv_shape).transpose(1, 2)
        if cache is None:
            return key, value
        if self.is_cross_attention:
            if isinstance(cache, EncoderDecoderCache):
                key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
                cache.is_updated[self.layer_idx] = True
            return key, value
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        return self_cache.update(key, value, self.layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query = self.query(hidden_states).view(*input_shape, -1, self.attention_head_size).transpose(1, 2)
        key_source = encoder_hidden_states if self.is_cross_attention else hidden_states
        key, value = self._keys_and_values(key_source, cache)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        # Causality (captioning) is carried by the mask the model builds, never by this module.
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            is_causal=False,
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.dropout,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return attn_output, attn_weights


class ClusterSTMTextSelfOutput(nn.Module):
    def __init__(self, config: ClusterSTMTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(hidden_states + input_tensor)


class ClusterSTMTextAttention(nn.Module):
    def __init__(self, config: ClusterSTMTextConfig, is_cross_attention: bool = False, layer_idx: int | None = None):
        super().__init__()
        self.self = ClusterSTMTextSelfAttention(config, is_cross_attention=is_cross_attention, layer_idx=layer_idx)
        self.output = ClusterSTMTextSelfOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attention_output, _ = self.self(hidden_states, attention_mask, encoder_hidden_states, cache=cache, **kwargs)
        return self.output(attention_output, hidden_states)


class ClusterSTMTextIntermediate(nn.Module):
    def __init__(self, config: ClusterSTMTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class ClusterSTMTextOutput(nn.Module):
    def __init__(self, config: ClusterSTMTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(hidden_states + input_tensor)


class ClusterSTMTextLayer(GradientCheckpointingLayer):
    """Post-LayerNorm BERT layer; fusion layers add cross-attention to the video tokens after self-attention."""

    def __init__(self, config: ClusterSTMTextConfig, has_cross_attention: bool = False, layer_idx: int = 0):
        super().__init__()
        # `layer_idx` numbers the layers of the whole text tower (text-only layers first, then the fusion layers), so
        # one key/value cache serves both parts while decoding.
        self.attention = ClusterSTMTextAttention(config, layer_idx=layer_idx)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:
            self.crossattention = ClusterSTMTextAttention(config, is_cross_attention=True, layer_idx=layer_idx)
        self.intermediate = ClusterSTMTextIntermediate(config)
        self.output = ClusterSTMTextOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attention_output = self.attention(hidden_states, attention_mask, cache=cache, **kwargs)
        if self.has_cross_attention:
            attention_output = self.crossattention(
                attention_output, encoder_attention_mask, encoder_hidden_states, cache=cache, **kwargs
            )
        return self.output(self.intermediate(attention_output), attention_output)


# Hub arguments of `from_pretrained` that reading the config needs as well.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def legacy_fusion_key_mapping(config: ClusterSTMConfig) -> dict[str, str]:
    """
    Key mapping (regex -> replacement, as `from_pretrained(key_mapping=...)` takes it) from the layout where the
    fusion layers were the top layers of `text_model` to the current one, where they are a `fusion_model` owned by the
    heads. A dual encoder receives the renamed keys as unexpected (and ignores them).
    """
    text_config = config.text_config
    num_text_layers = text_config.num_hidden_layers - text_config.num_fusion_layers
    return {
        rf"^(?:clusterstm\.)?text_model\.layer\.{num_text_layers + i}\.": f"fusion_model.layer.{i}."
        for i in range(text_config.num_fusion_layers)
    }


def _rename_legacy_fusion_keys(state_dict: dict[str, torch.Tensor], prefix: str, config: ClusterSTMConfig) -> None:
    """`load_state_dict` pre-hook of the fusion heads: moves old-layout fusion keys in place (see above)."""
    for pattern, replacement in legacy_fusion_key_mapping(config).items():
        compiled = re.compile(pattern)
        for key in [k for k in state_dict if k.startswith(prefix)]:
            local = key[len(prefix) :]
            if compiled.match(local):
                state_dict[prefix + compiled.sub(replacement, local, count=1)] = state_dict.pop(key)


class _LogitScaleToOneElement(ConversionOps):
    """Checkpoint conversion of `logit_scale`: a 0-d tensor (the layout before FSDP2 support) becomes shape `(1,)`."""

    @torch.no_grad()
    def convert(
        self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs
    ) -> dict[str, torch.Tensor]:
        tensors = next(iter(input_dict.values()))
        tensor = tensors[0] if isinstance(tensors, list) else tensors
        return {target_patterns[0]: tensor.reshape(1)}

    @property
    def reverse_op(self) -> ConversionOps:
        # Saving keeps the current `(1,)` layout (the reshape is idempotent).
        return _LogitScaleToOneElement()


def _register_checkpoint_conversions() -> None:
    """
    Registers the `logit_scale` conversion for `ClusterSTMModel` wherever it sits (as the model or as a head's
    `clusterstm`); called by `from_pretrained` rather than at import, so that the module only defines things.
    """
    register_checkpoint_conversion_mapping(
        "ClusterSTMModel",
        [
            WeightConverter(
                source_patterns="logit_scale", target_patterns="logit_scale", operations=[_LogitScaleToOneElement()]
            )
        ],
        overwrite=True,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained base
# ---------------------------------------------------------------------------------------------------------------------


@auto_docstring
class ClusterSTMPreTrainedModel(PreTrainedModel):
    config: ClusterSTMConfig
    base_model_prefix = "clusterstm"
    main_input_name = "pixel_values"
    input_modalities = ("video", "text")
    supports_gradient_checkpointing = True
    # Modules whose forward uses parameters of its own next to those of its children (residuals, position tables,
    # mask tokens): a device map must keep each of them on one device.
    _no_split_modules = [
        "ClusterSTMVisionEmbeddings",
        "ClusterSTMVisionLayer",
        "ClusterSTMTextEmbeddings",
        "ClusterSTMTextLayer",
        "ClusterSTMRelevanceDecoder",
        "ClusterSTMMLMHead",
    ]
    # Only what tests/test_conformance.py verifies: sdpa gives eager's outputs. Flex attention is not claimed (on CPU
    # its compiled kernel fails on the fusion layers' cross-attention), nor flash attention (no CUDA flash-attn build
    # to test with).
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": [ClusterSTMVisionLayer, ClusterSTMTextLayer],
        "attentions": [
            OutputRecorder(ClusterSTMVisionAttention, index=1),
            OutputRecorder(ClusterSTMTextSelfAttention, index=1, layer_name="attention"),
        ],
    }

    def _init_weights(self, module):
        """Initialize the weights"""
        super()._init_weights(module)
        if isinstance(module, ClusterSTMVisionEmbeddings):
            init.trunc_normal_(module.spatial_position_embedding, std=module.config.initializer_range)
            init.trunc_normal_(module.temporal_position_embedding, std=module.config.initializer_range)
        elif isinstance(module, ClusterSTMTextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        elif isinstance(module, ClusterSTMRelevanceDecoder):
            init.trunc_normal_(module.mask_token, std=0.02)
            init.trunc_normal_(module.spatial_position_embedding, std=0.02)
            init.trunc_normal_(module.temporal_position_embedding, std=0.02)
        elif isinstance(module, ClusterSTMMLMHead):
            init.zeros_(module.bias)
        elif isinstance(module, ClusterSTMModel):
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)

    def sync_objective_trainability(self) -> None:
        """Freezes the parameters that this model's own training loss never reaches (none for the towers)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """
        [`~PreTrainedModel.from_pretrained`] that also reads checkpoints written before the fusion layers moved out
        of the text tower: their `text_model.layer.{i}` keys of the top `num_fusion_layers` layers load into
        `fusion_model.layer.{i - num_text_layers}` (an upgrade on load only; saving writes the current layout).
        """
        _register_checkpoint_conversions()
        config = kwargs.get("config")
        if (
            kwargs.get("key_mapping") is None
            and pretrained_model_name_or_path is not None
            and not issubclass(cls, (ClusterSTMVisionModel, ClusterSTMTextModel))
        ):
            if not isinstance(config, ClusterSTMConfig):
                hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
                config = ClusterSTMConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
            kwargs["key_mapping"] = legacy_fusion_key_mapping(config)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # Loading replaces the parameters (requires_grad=True): re-apply which ones the model's own loss trains.
        model.sync_objective_trainability()
        if kwargs.get("key_mapping") is not None and hasattr(model, "_weight_conversions"):
            # transformers would revert a used key mapping on save; this one is an upgrade and must not be reverted.
            legacy = set(kwargs["key_mapping"])
            model._weight_conversions = [
                conversion
                for conversion in model._weight_conversions
                if not (isinstance(conversion, WeightRenaming) and set(conversion._original_source_patterns) <= legacy)
            ]
        return loaded


# ---------------------------------------------------------------------------------------------------------------------
# Video tower model
# ---------------------------------------------------------------------------------------------------------------------


@auto_docstring(
    custom_intro="""
    The ClusterSTM video tower: a ViT over (T, H, W) tubelets that drops the tokens of `bool_masked_pos` after the
    position embeddings (VideoMAE convention). Masks are built outside the model, by
    `masking_clusterstm.build_mask`, once per training step.
    """
)
class ClusterSTMVisionModel(ClusterSTMPreTrainedModel):
    config: ClusterSTMVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("video",)
    base_model_prefix = "vision_model"
    _input_embed_layer = "patch_embedding"

    def __init__(self, config: ClusterSTMVisionConfig):
        super().__init__(config)
        self.embeddings = ClusterSTMVisionEmbeddings(config)
        self.layers = nn.ModuleList(
            [ClusterSTMVisionLayer(config, layer_idx=i) for i in range(config.num_hidden_layers)]
        )
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def _check_pixel_values(self, pixel_values: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
        """
        Checks the layout of `pixel_values` (4D images become one-frame videos) and, with `check_finite`, that they
        are finite. Only the finiteness check reads a value back from the device.
        """
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if pixel_values.ndim == 4:
            # A batch of images (B, C, H, W) is a batch of one-frame videos.
            pixel_values = pixel_values[:, None]
        if pixel_values.ndim != 5:
            raise ValueError(
                "pixel_values must have shape (batch_size, num_frames, num_channels, height, width) (or "
                f"(batch_size, num_channels, height, width) for images), got shape {tuple(pixel_values.shape)}."
            )
        _, num_frames, num_channels, height, width = pixel_values.shape
        if num_channels != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {num_channels} channels in dim 2, the model expects {self.config.num_channels} "
                "(layout (batch_size, num_frames, num_channels, height, width))."
            )
        if height % self.config.patch_size or width % self.config.patch_size:
            raise ValueError(
                f"Frame size {height}x{width} is not divisible by the patch size {self.config.patch_size}."
            )
        if num_frames % self.config.tubelet_size:
            raise ValueError(
                f"num_frames ({num_frames}) is not divisible by tubelet_size ({self.config.tubelet_size})."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a floating point tensor of normalised frames (the output of "
                f"ClusterSTMVideoProcessor), got dtype {pixel_values.dtype}."
            )
        # One host sync per forward, in the tower only (the heads call it without `check_finite`): a NaN/inf frame
        # would otherwise surface as a NaN loss many layers later (CLIP4Clip#4). Skipped while compiling, where a
        # value read back would break the graph; a compiled training loop checks its batches in the data path.
        if check_finite and not torch.compiler.is_compiling() and not bool(torch.isfinite(pixel_values).all()):
            raise ValueError(
                "pixel_values contains non-finite values (NaN or inf); check the video decoding / normalisation."
            )
        return pixel_values

    @staticmethod
    def _kept_tokens_per_frame(mask: torch.Tensor, num_visible_tokens: int | None) -> int:
        """
        Number of tokens every frame keeps under `mask` `(B, T, N)` (`True` = dropped), which sets the output shape.

        Given `num_visible_tokens` (known to the caller that built the mask, e.g. `num_visible_tokens(N, ratio)` of
        the masking module), nothing is read back from the device: the check that the mask keeps exactly that many
        tokens per frame is an asynchronous device assertion, so the step stays free of host syncs and compiles
        without graph breaks. Without it, the count is read back (one sync) and checked.
        """
        kept_per_frame = (~mask).sum(-1)
        if num_visible_tokens is not None:
            num_patches = mask.shape[-1]
            if not 0 < num_visible_tokens <= num_patches:
                raise ValueError(
                    f"num_visible_tokens must be in [1, {num_patches}] (tokens per frame), got {num_visible_tokens}."
                )
            torch._assert_async(
                torch.all(kept_per_frame == num_visible_tokens),
                f"bool_masked_pos must keep exactly num_visible_tokens={num_visible_tokens} tokens in every frame.",
            )
            return num_visible_tokens
        # One host sync: the number of kept tokens sets the output shape of an explicit mask.
        most, fewest = torch.stack([kept_per_frame.amax(), kept_per_frame.amin()]).tolist()
        if most == 0 or most != fewest:
            raise ValueError(
                "bool_masked_pos must keep the same, non-zero number of tokens in every frame of every video "
                f"(got between {fewest} and {most})."
            )
        return most

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        num_visible_tokens: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ClusterSTMVisionModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, num_channels, height, width)`):
            Normalised video frames (a 4D `(batch_size, num_channels, height, width)` batch is treated as images,
            i.e. one-frame videos). Other frame counts and resolutions than the configured ones interpolate the
            position embeddings.
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_frames, num_patches)` or `(batch_size, num_frames * num_patches)`, *optional*):
            Token mask (`True` = dropped), e.g. from `build_mask`; every frame must keep the same number of tokens.
            Without it every token is kept.
        num_visible_tokens (`int`, *optional*):
            The number of tokens every frame keeps under `bool_masked_pos` (`build_mask` keeps
            `num_visible_tokens(num_patches, mask_ratio)`). Passing it avoids reading the count back from the device
            (a host sync, and a graph break under `torch.compile`); the mask is then checked asynchronously.
        """
        pixel_values = self._check_pixel_values(pixel_values)
        embeddings, _ = self.embeddings(pixel_values)
        batch_size, num_frames, num_patches, hidden_size = embeddings.shape

        mask, num_kept, kept_indices = None, num_patches, None
        if bool_masked_pos is not None:
            if bool_masked_pos.shape[0] != batch_size or bool_masked_pos[0].numel() != num_frames * num_patches:
                raise ValueError(
                    f"bool_masked_pos has shape {tuple(bool_masked_pos.shape)}, expected ({batch_size}, {num_frames}, "
                    f"{num_patches}) or ({batch_size}, {num_frames * num_patches}) for this input."
                )
            mask = bool_masked_pos.reshape(batch_size, num_frames, num_patches).to(device=embeddings.device).bool()
            num_kept = self._kept_tokens_per_frame(mask, num_visible_tokens)
            # A stable sort puts the kept (False) positions first, in their original order.
            frame_indices = torch.argsort(mask.to(torch.int8), dim=-1, stable=True)[..., :num_kept]
            embeddings = torch.gather(embeddings, 2, frame_indices[..., None].expand(-1, -1, -1, hidden_size))
            offsets = torch.arange(num_frames, device=frame_indices.device)[None, :, None] * num_patches
            kept_indices = (frame_indices + offsets).reshape(batch_size, num_frames * num_kept)

        hidden_states = embeddings.reshape(batch_size, num_frames * num_kept, hidden_size)
        for layer in self.layers:
            hidden_states = layer(hidden_states, None, **kwargs)

        last_hidden_state = self.post_layernorm(hidden_states)
        return ClusterSTMVisionModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=last_hidden_state.mean(dim=1),
            bool_masked_pos=mask,
            kept_indices=kept_indices,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Text tower model
# ---------------------------------------------------------------------------------------------------------------------


TEXT_MODES = ("text",)
# Modes of the text tower before the fusion layers moved to the heads that use them.
_FUSION_MODES = ("fusion", "multimodal")


def _text_self_attention_mask(
    config: ClusterSTMTextConfig,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    cache: Cache | None,
    layer_idx: int,
) -> torch.Tensor | None:
    """Self-attention mask of `hidden_states` (the new tokens) over the cached and the new tokens."""
    if not is_causal:
        return create_bidirectional_mask(config=config, inputs_embeds=hidden_states, attention_mask=attention_mask)
    self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    # `layer_idx` is the first layer this call runs: its cache entry does not yet hold the new tokens.
    return create_causal_mask(
        config=config,
        inputs_embeds=hidden_states,
        attention_mask=attention_mask,
        cache=self_cache,
        layer_idx=layer_idx,
        allow_is_causal_skip=False,
    )


def _cache_length(cache: Cache | None, layer_idx: int = 0) -> int:
    """Number of tokens `cache` holds for the self-attention of layer `layer_idx` (0 without a cache)."""
    if cache is None:
        return 0
    self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    return self_cache.get_seq_length(layer_idx)


@auto_docstring(
    custom_intro="""
    The ClusterSTM text tower: the text-only layers of a BERT encoder (the bottom `num_hidden_layers -
    num_fusion_layers` layers), which give the contrastive text features. The top `num_fusion_layers` layers, which
    cross-attend to video tokens, are a [`ClusterSTMTextFusionModel`] owned by the heads that use them.
    """
)
class ClusterSTMTextModel(ClusterSTMPreTrainedModel):
    config: ClusterSTMTextConfig
    main_input_name = "input_ids"
    input_modalities = ("text",)
    base_model_prefix = "text_model"

    def __init__(self, config: ClusterSTMTextConfig):
        super().__init__(config)
        self.embeddings = ClusterSTMTextEmbeddings(config)
        num_text_layers = config.num_hidden_layers - config.num_fusion_layers
        self.layer = nn.ModuleList([ClusterSTMTextLayer(config, layer_idx=i) for i in range(num_text_layers)])
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.embeddings.word_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mode: str = "text",
        is_causal: bool = False,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ClusterSTMTextModelOutput:
        r"""
        mode (`str`, *optional*, defaults to `"text"`):
            Only `"text"`. The former `"fusion"` / `"multimodal"` modes are the heads' [`ClusterSTMTextFusionModel`]
            run on this tower's output.
        is_causal (`bool`, *optional*, defaults to `False`):
            Causal self-attention (left-to-right decoding for captioning).
        cache (`Cache`, *optional*):
            Key/value cache of the decoded prefix (captioning `generate()`); `input_ids` are then the new tokens only
            and `attention_mask` covers the cached and the new tokens.
        """
        if mode in _FUSION_MODES:
            raise ValueError(
                f"mode={mode!r}: the fusion (cross-attention) layers are not part of ClusterSTMTextModel any more; run "
                "the head's `fusion_model` (ClusterSTMTextFusionModel) on this tower's `last_hidden_state`."
            )
        if mode not in TEXT_MODES:
            raise ValueError(f"mode must be one of {TEXT_MODES}, got {mode!r}.")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
        if input_ids is not None and (input_ids.ndim != 2 or input_ids.is_floating_point() or input_ids.is_complex()):
            raise ValueError(
                "input_ids must be an integer tensor of shape (batch_size, sequence_length), got shape "
                f"{tuple(input_ids.shape)} and dtype {input_ids.dtype}."
            )
        hidden_states = self.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            past_length=_cache_length(cache),
        )
        # Masks are built once here; causality lives in the mask (the attention modules never assume it).
        self_attention_mask = _text_self_attention_mask(
            self.config, hidden_states, attention_mask, is_causal, cache, layer_idx=0
        )
        for layer in self.layer:
            hidden_states = layer(hidden_states, self_attention_mask, cache=cache, **kwargs)

        return ClusterSTMTextModelOutput(last_hidden_state=hidden_states, pooler_output=hidden_states[:, 0])


class ClusterSTMTextFusionModel(nn.Module):
    """
    The top `num_fusion_layers` layers of the text tower: BERT layers with cross-attention to video tokens, run on the
    text-only layers' output. The heads that fuse text and video (matching, masked language modelling, question
    answering, captioning) own it, so that the dual encoder holds no parameter its contrastive loss cannot train.
    """

    def __init__(self, config: ClusterSTMTextConfig):
        super().__init__()
        self.config = config
        self.first_layer_idx = config.num_hidden_layers - config.num_fusion_layers
        self.layer = nn.ModuleList(
            [
                ClusterSTMTextLayer(config, has_cross_attention=True, layer_idx=self.first_layer_idx + i)
                for i in range(config.num_fusion_layers)
            ]
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
                Output of [`ClusterSTMTextModel`] (`last_hidden_state`).
            encoder_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_video_tokens, encoder_width)`):
                Video tokens the layers cross-attend to.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                Text mask (1 = attend); with a cache, over the cached and the new tokens.
            encoder_attention_mask (`torch.Tensor` of shape `(batch_size, num_video_tokens)`, *optional*):
                Mask of the video tokens (1 = attend).
            is_causal (`bool`, *optional*, defaults to `False`): Causal self-attention (captioning).
            cache (`Cache`, *optional*): The key/value cache shared with the text tower while decoding.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`: the fused text states.
        """
        if encoder_hidden_states is None:
            raise ValueError("The fusion layers cross-attend to video: pass `encoder_hidden_states`.")
        self_attention_mask = _text_self_attention_mask(
            self.config, hidden_states, attention_mask, is_causal, cache, layer_idx=self.first_layer_idx
        )
        cross_attention_mask = None
        if encoder_attention_mask is not None:
            cross_attention_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=hidden_states,
                attention_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
            )
        for layer in self.layer:
            hidden_states = layer(
                hidden_states,
                self_attention_mask,
                encoder_hidden_states,
                encoder_attention_mask=cross_attention_mask,
                cache=cache,
                **kwargs,
            )
        return hidden_states


# ---------------------------------------------------------------------------------------------------------------------
# Dual encoder
# ---------------------------------------------------------------------------------------------------------------------


@auto_docstring(
    custom_intro="""
    The ClusterSTM dual encoder: video tower, text tower, projections into a joint space and a learnable temperature.
    """
)
class ClusterSTMModel(ClusterSTMPreTrainedModel):
    # Loading the encoders from a pretraining or head checkpoint drops the heads' modules (pretraining heads, fusion
    # layers) without a warning, as BERT does.
    _keys_to_ignore_on_load_unexpected = [r"^(relevance_decoder|itm_head|mlm_head|alignment_head|fusion_model)\."]
    config: ClusterSTMConfig
    # The first input of `forward` (transformers' convention), as in CLIPModel.
    main_input_name = "input_ids"

    def __init__(self, config: ClusterSTMConfig):
        super().__init__(config)
        self.vision_model = ClusterSTMVisionModel._from_config(config.vision_config)
        self.text_model = ClusterSTMTextModel._from_config(config.text_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        # Shape (1,), not (): FSDP2's `fully_shard` cannot shard 0-d parameters. Checkpoints with the 0-d tensor
        # still load (see `_LogitScaleToOneElement` and `_load_from_state_dict`).
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.post_init()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Plain `load_state_dict` of a state dict written before `logit_scale` had shape (1,).
        key = prefix + "logit_scale"
        if key in state_dict and state_dict[key].ndim == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.text_model.embeddings.word_embeddings = value

    def scaled_logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), shape `(1,)`, clamped at 100 as in CLIP training so the temperature cannot collapse."""
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    @can_return_tuple
    @auto_docstring
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        num_visible_tokens: int | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | ClusterSTMVisionModelOutput:
        r"""
        pixel_values_videos (`torch.FloatTensor` of shape `(batch_size, num_frames, num_channels, height, width)`):
            Normalised video frames (the output of [`ClusterSTMVideoProcessor`]).
        bool_masked_pos (`torch.BoolTensor`, *optional*):
            Explicit token mask, see [`ClusterSTMVisionModel`].
        num_visible_tokens (`int`, *optional*):
            Tokens every frame keeps under `bool_masked_pos`, see [`ClusterSTMVisionModel`].
        pixel_values (`torch.FloatTensor`, *optional*):
            Alias of `pixel_values_videos` (the name this method took before).

        Returns the video tower's output whose `pooler_output` is the (unnormalised) projected video embedding,
        shape `(batch_size, projection_dim)`, as `CLIPModel.get_image_features` does.
        """
        if pixel_values_videos is not None and pixel_values is not None:
            raise ValueError("Pass the videos once: `pixel_values_videos` (or its alias `pixel_values`), not both.")
        vision_outputs: ClusterSTMVisionModelOutput = self.vision_model(
            pixel_values=pixel_values_videos if pixel_values_videos is not None else pixel_values,
            bool_masked_pos=bool_masked_pos,
            num_visible_tokens=num_visible_tokens,
            return_dict=True,
            **kwargs,
        )
        vision_outputs.pooler_output = self.visual_projection(vision_outputs.pooler_output)
        return vision_outputs

    @can_return_tuple
    @auto_docstring
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | ClusterSTMTextModelOutput:
        r"""
        Returns the text-only tower's output whose `pooler_output` is the (unnormalised) projected `[CLS]` embedding,
        shape `(batch_size, projection_dim)`, as `CLIPModel.get_text_features` does.
        """
        text_outputs: ClusterSTMTextModelOutput = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            mode="text",
            return_dict=True,
            **kwargs,
        )
        text_outputs.pooler_output = self.text_projection(text_outputs.pooler_output)
        return text_outputs

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        return_loss: bool | None = None,
        num_visible_tokens: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ClusterSTMOutput:
        r"""
        bool_masked_pos (`torch.BoolTensor`, *optional*):
            Explicit token mask, see [`ClusterSTMVisionModel`].
        return_loss (`bool`, *optional*):
            Whether to return the symmetric video-text contrastive loss.
        num_visible_tokens (`int`, *optional*):
            Tokens every frame keeps under `bool_masked_pos`, see [`ClusterSTMVisionModel`].
        """
        if pixel_values is None and input_ids is None:
            raise ValueError("Pass `pixel_values` (videos), `input_ids` (texts) or both.")
        vision_outputs = text_outputs = video_embeds = text_embeds = None
        logits_per_video = logits_per_text = loss = None
        # One modality alone gives its embeddings (e.g. the `feature-extraction` pipeline on texts); both give the
        # similarities as well.
        if pixel_values is not None:
            vision_outputs = self.get_video_features(
                pixel_values_videos=pixel_values,
                bool_masked_pos=bool_masked_pos,
                num_visible_tokens=num_visible_tokens,
                **kwargs,
            )
            video_embeds = nn.functional.normalize(vision_outputs.pooler_output, dim=-1)
        if input_ids is not None:
            text_outputs = self.get_text_features(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, **kwargs
            )
            text_embeds = nn.functional.normalize(text_outputs.pooler_output, dim=-1)

        if video_embeds is not None and text_embeds is not None:
            # Under a device map the towers may sit on different devices; the similarities live on the text side.
            video_embeds = video_embeds.to(text_embeds.device)
            logit_scale = self.scaled_logit_scale().to(text_embeds.device)
            logits_per_text = torch.matmul(text_embeds, video_embeds.t()) * logit_scale
            logits_per_video = logits_per_text.t()
        if return_loss:
            _check_video_text_batch(pixel_values, input_ids)  # the loss needs (video, text) pairs
            loss = video_text_contrastive_loss(video_embeds, text_embeds, logit_scale)

        return ClusterSTMOutput(
            loss=loss,
            logits_per_video=logits_per_video,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            video_embeds=video_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------------------------------


class ClusterSTMRelevanceDecoder(nn.Module):
    """
    Light MAE-style decoder: the kept tokens are put back on the full grid with a learned mask token at the masked
    positions, get decoder position embeddings, go through a few blocks and are projected into the joint space.
    """

    def __init__(self, config: ClusterSTMConfig):
        super().__init__()
        vision_config = config.vision_config
        self.embed = nn.Linear(vision_config.hidden_size, config.decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.empty(1, 1, config.decoder_hidden_size))
        grid_size = vision_config.image_size // vision_config.patch_size
        self.spatial_position_embedding = nn.Parameter(
            torch.empty(1, grid_size * grid_size, config.decoder_hidden_size)
        )
        self.temporal_position_embedding = nn.Parameter(
            torch.empty(1, vision_config.num_frames // vision_config.tubelet_size, config.decoder_hidden_size)
        )
        self.layers = nn.ModuleList(
            [
                ClusterSTMVisionLayer(
                    vision_config,
                    hidden_size=config.decoder_hidden_size,
                    num_attention_heads=config.decoder_num_attention_heads,
                    intermediate_size=config.decoder_intermediate_size,
                    drop_path_rate=0.0,
                )
                for _ in range(config.decoder_num_layers)
            ]
        )
        self.norm = nn.LayerNorm(config.decoder_hidden_size, eps=vision_config.layer_norm_eps)
        self.head = nn.Linear(config.decoder_hidden_size, config.projection_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        kept_indices: torch.LongTensor | None,
        grid: tuple[int, int, int],
    ) -> torch.Tensor:
        """`hidden_states` `(B, M, vision_hidden)` of the kept tokens -> `(B, T' * N, projection_dim)`."""
        num_frames, height, width = grid
        hidden_states = self.embed(hidden_states)
        batch_size, _, dim = hidden_states.shape
        num_tokens = num_frames * height * width
        if kept_indices is not None:
            full = self.mask_token.to(hidden_states.dtype).expand(batch_size, num_tokens, dim)
            hidden_states = full.scatter(1, kept_indices[..., None].expand(-1, -1, dim), hidden_states)
        positions = interpolate_spatiotemporal_positions(
            self.spatial_position_embedding, self.temporal_position_embedding, num_frames, height, width
        )
        hidden_states = hidden_states + positions.reshape(1, num_tokens, dim).to(hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, None)
        return self.head(self.norm(hidden_states))


class ClusterSTMMLMHead(nn.Module):
    """BERT masked-LM head; `decoder.weight` is tied to the text word embeddings."""

    def __init__(self, config: ClusterSTMTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.empty(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))
        return self.decoder(hidden_states) + self.bias


def relevance_reconstruction_loss(
    predicted: torch.Tensor,
    target: torch.Tensor,
    token_mask: torch.Tensor | None,
    loss_type: str,
    temperature: float = 0.1,
) -> torch.Tensor:
    """
    Loss between predicted and teacher relevance, both `(B, L)`, on the tokens where `token_mask` `(B, L)` is True
    (all tokens when `None`). `"mse"`; `"zscore_mse"`: both z-scored per video over all its tokens first;
    `"kl"`: KL(teacher || student) of softmaxes (with `temperature`) over each video's selected tokens.
    """
    predicted = predicted.float()
    target = target.float()
    if token_mask is None:
        token_mask = torch.ones_like(predicted, dtype=torch.bool)
    weights = token_mask.to(predicted.dtype)
    if loss_type == "kl":
        min_value = torch.finfo(predicted.dtype).min
        log_q = nn.functional.log_softmax((predicted / temperature).masked_fill(~token_mask, min_value), dim=-1)
        log_p = nn.functional.log_softmax((target / temperature).masked_fill(~token_mask, min_value), dim=-1)
        per_video = (log_p.exp() * (log_p - log_q) * weights).sum(-1)
        has_tokens = (weights.sum(-1) > 0).to(predicted.dtype)
        return (per_video * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)
    if loss_type == "zscore_mse":
        predicted = (predicted - predicted.mean(-1, keepdim=True)) / (predicted.std(-1, keepdim=True) + 1e-6)
        target = (target - target.mean(-1, keepdim=True)) / (target.std(-1, keepdim=True) + 1e-6)
    elif loss_type != "mse":
        raise ValueError(f"Unknown relevance loss {loss_type!r}.")
    return (((predicted - target) ** 2) * weights).sum() / weights.sum().clamp(min=1.0)


@auto_docstring(
    custom_intro="""
    ClusterSTM with its pretraining objectives: video-text contrastive (negatives across processes), relevance
    reconstruction through a light decoder, video-text matching with hard negatives and masked language modelling
    through the fusion layers, and unmasked-token alignment with a frozen teacher (UMT). A loss weight of 0 skips its
    objective. The model never holds or calls a teacher: its targets (`teacher_relevance`, `teacher_patch_tokens`)
    are inputs, computed by `clusterstm.teacher.compute_teacher_targets` or read from a target cache.
    """
)
class ClusterSTMForPreTraining(ClusterSTMPreTrainedModel):
    config: ClusterSTMConfig
    _tied_weights_keys = {"mlm_head.decoder.weight": "clusterstm.text_model.embeddings.word_embeddings.weight"}

    def __init__(self, config: ClusterSTMConfig):
        super().__init__(config)
        self.clusterstm = ClusterSTMModel(config)
        self.fusion_model = ClusterSTMTextFusionModel(config.text_config)
        self.relevance_decoder = ClusterSTMRelevanceDecoder(config)
        self.itm_head = nn.Linear(config.text_config.hidden_size, 2)
        self.mlm_head = ClusterSTMMLMHead(config.text_config)
        self.alignment_head = nn.Linear(config.vision_config.hidden_size, config.teacher_hidden_size)
        self.post_init()
        self.sync_objective_trainability()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _rename_legacy_fusion_keys(state_dict, prefix, self.config)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def objective_modules(self) -> dict[str, list[nn.Module]]:
        """The modules only each objective (by its loss-weight name) trains; shared towers are not listed."""
        return {
            "relevance_loss_weight": [self.relevance_decoder],
            "matching_loss_weight": [self.itm_head],
            "alignment_loss_weight": [self.alignment_head],
            # The MLM head's decoder is tied to the word embeddings, which every objective trains: only its own
            # transform and bias are listed.
            "mlm_loss_weight": [self.mlm_head.dense, self.mlm_head.LayerNorm],
        }

    def sync_objective_trainability(self) -> None:
        """
        Sets `requires_grad` of the modules that only a disabled objective (loss weight 0) would train to `False`,
        and back to `True` for enabled ones, so that every trainable parameter receives a gradient in the training
        loss (what DDP without `find_unused_parameters` needs; the optimizer skips the frozen ones). Runs at
        construction; call it again after changing loss weights on a built model.
        """
        config = self.config
        for name, modules in self.objective_modules().items():
            for module in modules:
                module.requires_grad_(getattr(config, name) > 0)
        self.mlm_head.bias.requires_grad_(config.mlm_loss_weight > 0)
        # The fusion layers serve matching and masked language modelling.
        self.fusion_model.requires_grad_(config.matching_loss_weight > 0 or config.mlm_loss_weight > 0)

    def get_input_embeddings(self) -> nn.Module:
        return self.clusterstm.text_model.embeddings.word_embeddings

    def get_output_embeddings(self) -> nn.Module:
        return self.mlm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.mlm_head.decoder = new_embeddings

    def _mask_text_tokens(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """BERT masking (80% [MASK], 10% random, 10% kept) of `mlm_probability` of the non-special tokens."""
        labels = input_ids.clone()
        # [CLS] (first), [SEP] (last attended) and padding are never masked.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        last = attention_mask.sum(-1, keepdim=True) - 1
        special = (attention_mask == 0) | (positions == 0) | (positions == last)
        probability = torch.full(input_ids.shape, self.config.mlm_probability, device=input_ids.device)
        masked = torch.bernoulli(probability).bool() & ~special
        labels = labels.masked_fill(~masked, -100)
        replaced = torch.bernoulli(torch.full(input_ids.shape, 0.8, device=input_ids.device)).bool() & masked
        randomised = (
            torch.bernoulli(torch.full(input_ids.shape, 0.5, device=input_ids.device)).bool() & masked & ~replaced
        )
        random_words = torch.randint_like(input_ids, self.config.text_config.vocab_size)
        masked_ids = input_ids.masked_fill(replaced, self.config.mask_token_id)
        masked_ids = torch.where(randomised, random_words, masked_ids)
        return masked_ids, labels

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        teacher_relevance: torch.Tensor | None = None,
        teacher_patch_tokens: torch.Tensor | None = None,
        num_visible_tokens: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ClusterSTMForPreTrainingOutput:
        r"""
        bool_masked_pos (`torch.BoolTensor`, *optional*):
            Video token mask (`True` = dropped), built once per training step by `build_mask`; without it every
            token is kept.
        num_visible_tokens (`int`, *optional*):
            Tokens every frame keeps under `bool_masked_pos` (pass it to keep the step free of host syncs and graph
            breaks), see [`ClusterSTMVisionModel`].
        teacher_relevance (`torch.Tensor` of shape `(batch_size, num_frames, num_patches)`, *optional*):
            Target video-text relevance of every token (needed when `relevance_loss_weight > 0`).
        teacher_patch_tokens (`torch.Tensor` of shape `(batch_size, num_frames, num_patches, teacher_hidden_size)`, *optional*):
            The teacher's patch tokens, targets of the unmasked-token alignment (needed when
            `alignment_loss_weight > 0`).
        """
        config = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Layout only: the tower checks the values (one host sync) when it runs.
        pixel_values = self.clusterstm.vision_model._check_pixel_values(pixel_values, check_finite=False)
        _check_video_text_batch(pixel_values, input_ids)
        vision_config = config.vision_config
        grid = (
            pixel_values.shape[1] // vision_config.tubelet_size,
            pixel_values.shape[3] // vision_config.patch_size,
            pixel_values.shape[4] // vision_config.patch_size,
        )
        token_grid = (grid[0], grid[1] * grid[2])

        for name, tensor in (
            ("teacher_patch_tokens", teacher_patch_tokens),
            ("teacher_relevance", teacher_relevance),
        ):
            if tensor is not None and (tensor.shape[0] != pixel_values.shape[0] or not tensor.is_floating_point()):
                raise ValueError(
                    f"{name} must be a floating point tensor with the batch size of pixel_values "
                    f"({pixel_values.shape[0]}), got shape {tuple(tensor.shape)} and dtype {tensor.dtype}."
                )
            if tensor is not None and tuple(tensor.shape[1:3]) != token_grid:
                raise ValueError(
                    f"{name} has the token grid (frames, patches) = {tuple(tensor.shape[1:3])} but the student's "
                    f"grid is {token_grid} (frames // tubelet_size, (height // patch_size) * (width // patch_size)); "
                    "the teacher must see the same frames with the same patch grid."
                )

        vision_outputs = self.clusterstm.vision_model(
            pixel_values=pixel_values,
            bool_masked_pos=bool_masked_pos,
            num_visible_tokens=num_visible_tokens,
            return_dict=True,
        )
        text_outputs = self.clusterstm.text_model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        video_tokens = vision_outputs.last_hidden_state
        video_embeds = nn.functional.normalize(self.clusterstm.visual_projection(vision_outputs.pooler_output), dim=-1)
        text_embeds = nn.functional.normalize(self.clusterstm.text_projection(text_outputs.pooler_output), dim=-1)
        logit_scale = self.clusterstm.scaled_logit_scale()
        logits_per_text = torch.matmul(text_embeds, video_embeds.t()) * logit_scale
        logits_per_video = logits_per_text.t()

        losses: dict[str, torch.Tensor] = {}
        # CODEPATH: loss weights are training settings; a weight of 0 (ablations) skips the objective.
        if config.contrastive_loss_weight > 0:
            losses["contrastive_loss"] = video_text_contrastive_loss(video_embeds, text_embeds, logit_scale)

        predicted_relevance = None
        # CODEPATH: ClusterSTM pretraining (> 0) vs UMT-style baselines without relevance reconstruction (0).
        if config.relevance_loss_weight > 0:
            if teacher_relevance is None:
                raise ValueError(
                    "relevance_loss_weight > 0 needs `teacher_relevance` (batch_size, frames, patches), e.g. from "
                    "compute_teacher_targets or a target cache; set relevance_loss_weight=0 to train without it."
                )
            decoded = self.relevance_decoder(video_tokens, vision_outputs.kept_indices, grid)
            # cosine per token (B, L) in fp32: elementwise ops are not autocast, a bf16 matmul would quantise it
            decoded = nn.functional.normalize(decoded.float(), dim=-1)
            predicted = (decoded * text_embeds.float()[:, None, :]).sum(-1)
            predicted_relevance = predicted.reshape(-1, *token_grid)
            token_mask = None
            mask = vision_outputs.bool_masked_pos
            # CODEPATH: relevance_tokens ablation ("all" default, "masked", "visible"); same weights either way.
            if mask is not None and config.relevance_tokens != "all":
                # CODEPATH: see above.
                token_mask = mask if config.relevance_tokens == "masked" else ~mask
                token_mask = token_mask.reshape(mask.shape[0], -1)
            losses["relevance_loss"] = relevance_reconstruction_loss(
                predicted,
                teacher_relevance.reshape(predicted.shape).to(predicted.device),
                token_mask,
                config.relevance_loss,
                config.relevance_temperature,
            )

        # CODEPATH: loss weight (training setting); 0 skips video-text matching.
        if config.matching_loss_weight > 0 and input_ids.shape[0] > 1:
            losses["matching_loss"] = video_text_matching_loss(
                self.fusion_model,
                self.itm_head,
                text_outputs.last_hidden_state,
                attention_mask,
                video_tokens,
                logits_per_text,
                input_ids=input_ids,
                negatives=self.config.matching_negatives,
                pooling=self.config.matching_pooling,
            )

        # CODEPATH: loss weight (training setting); 0 skips masked language modelling.
        if config.mlm_loss_weight > 0:
            masked_ids, labels = self._mask_text_tokens(input_ids, attention_mask)
            masked_text = self.clusterstm.text_model(
                input_ids=masked_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            fused = self.fusion_model(masked_text, video_tokens, attention_mask=attention_mask)
            scores = self.mlm_head(fused).float()
            token_losses = nn.functional.cross_entropy(
                scores.reshape(-1, scores.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            # Sum / count (clamped) so that a batch without masked tokens gives 0 rather than NaN.
            losses["mlm_loss"] = token_losses / (labels != -100).sum().clamp(min=1)

        # CODEPATH: UMT baseline (> 0) vs ClusterSTM default (0): unmasked-token alignment with the teacher.
        if config.alignment_loss_weight > 0:
            if teacher_patch_tokens is None:
                raise ValueError(
                    "alignment_loss_weight > 0 needs `teacher_patch_tokens` (from compute_teacher_targets with "
                    "need_patch_tokens=True)."
                )
            if teacher_patch_tokens.shape[-1] != config.teacher_hidden_size:
                raise ValueError(
                    f"teacher_patch_tokens have width {teacher_patch_tokens.shape[-1]}, the config's "
                    f"teacher_hidden_size is {config.teacher_hidden_size}."
                )
            targets = teacher_patch_tokens.reshape(teacher_patch_tokens.shape[0], -1, teacher_patch_tokens.shape[-1])
            targets = targets.to(device=video_tokens.device, dtype=video_tokens.dtype)
            if vision_outputs.kept_indices is not None:
                targets = torch.gather(
                    targets, 1, vision_outputs.kept_indices[..., None].expand(-1, -1, targets.shape[-1])
                )
            aligned = self.alignment_head(video_tokens)
            cosine = nn.functional.cosine_similarity(aligned.float(), targets.float(), dim=-1)
            losses["alignment_loss"] = (1.0 - cosine).mean()

        loss = None
        for name, value in losses.items():
            weighted = getattr(config, name + "_weight") * value
            loss = weighted if loss is None else loss + weighted

        return ClusterSTMForPreTrainingOutput(
            loss=loss,
            contrastive_loss=losses.get("contrastive_loss"),
            relevance_loss=losses.get("relevance_loss"),
            matching_loss=losses.get("matching_loss"),
            mlm_loss=losses.get("mlm_loss"),
            alignment_loss=losses.get("alignment_loss"),
            logits_per_video=logits_per_video,
            logits_per_text=logits_per_text,
            predicted_relevance=predicted_relevance,
            bool_masked_pos=vision_outputs.bool_masked_pos,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Downstream heads: text-video retrieval, video question answering, video captioning
# ---------------------------------------------------------------------------------------------------------------------


@auto_docstring
@dataclass
class ClusterSTMVideoTextRetrievalOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss` is `True`):
        Contrastive loss plus `matching_loss_weight` times the video-text matching loss.
    contrastive_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Symmetric video-text contrastive loss.
    matching_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Video-text matching loss on the positives and one hard negative per video and per text; `None` when its
        weight is 0 or the batch has a single pair.
    logits_per_video (`torch.FloatTensor` of shape `(video_batch_size, text_batch_size)`):
        Scaled cosine similarities between the video and the text embeddings.
    logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, video_batch_size)`):
        Scaled cosine similarities between the text and the video embeddings.
    text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised text embeddings.
    video_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised video embeddings.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    matching_loss: torch.FloatTensor | None = None
    logits_per_video: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    video_embeds: torch.FloatTensor | None = None


@auto_docstring
@dataclass
class ClusterSTMVideoQuestionAnsweringOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
        Cross-entropy over the answer vocabulary (labels of -100 are ignored).
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
        Scores of every answer of the vocabulary (`config.id2label`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


@auto_docstring
@dataclass
class ClusterSTMVideoCaptioningOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
        Next-token cross-entropy (teacher forcing), averaged over the tokens whose label is not -100.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        Next-token scores at every position.
    video_embeds (`torch.FloatTensor` of shape `(batch_size, num_video_tokens, hidden_size)`):
        The video tokens the decoder cross-attended to (re-usable with `video_embeds=` to skip the video tower).
    cache (`Cache`, *optional*, returned when a cache was used):
        The key/value cache holding the prefix, to continue decoding from.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    video_embeds: torch.FloatTensor | None = None
    cache: Cache | None = None


def _check_video_text_batch(pixel_values: torch.Tensor | None, input_ids: torch.Tensor | None) -> None:
    if pixel_values is None:
        raise ValueError("`pixel_values` (batch_size, num_frames, num_channels, height, width) is required.")
    if input_ids is None:
        raise ValueError("`input_ids` is required.")
    if pixel_values.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"pixel_values has batch size {pixel_values.shape[0]} but input_ids has {input_ids.shape[0]}; pass one "
            "text per video."
        )


@auto_docstring(
    custom_intro="""
    ClusterSTM for text-video retrieval: the dual encoder fine-tuned with the contrastive loss (plus the video-text
    matching loss), with a matching head that re-ranks the top-k candidates at inference (the UMT protocol) and an
    opt-in dual-softmax re-ranking.
    """
)
class ClusterSTMForVideoTextRetrieval(ClusterSTMPreTrainedModel):
    # Pretraining heads retrieval does not use (it keeps `itm_head` for re-ranking).
    _keys_to_ignore_on_load_unexpected = [r"^(relevance_decoder|mlm_head|alignment_head)\."]
    config: ClusterSTMConfig
    # Trainer must scale the (per-batch mean) loss for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: ClusterSTMConfig):
        super().__init__(config)
        self.clusterstm = ClusterSTMModel(config)
        # Same names as in `ClusterSTMForPreTraining`, so the pretrained fusion layers and matching head are loaded.
        self.fusion_model = ClusterSTMTextFusionModel(config.text_config)
        self.itm_head = nn.Linear(config.text_config.hidden_size, 2)
        self.post_init()
        self.sync_objective_trainability()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _rename_legacy_fusion_keys(state_dict, prefix, self.config)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def sync_objective_trainability(self) -> None:
        """
        With `matching_loss_weight == 0` the loss never reaches the matching path (fusion layers and head): it is
        frozen, so DDP needs no `find_unused_parameters`; it still re-ranks at inference. Call again after changing
        the weight on a built model.
        """
        trainable = self.config.matching_loss_weight > 0
        self.fusion_model.requires_grad_(trainable)
        self.itm_head.requires_grad_(trainable)

    def get_input_embeddings(self) -> nn.Module:
        return self.clusterstm.text_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.clusterstm.text_model.embeddings.word_embeddings = value

    def encode_videos(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        return_tokens: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        L2-normalised video embeddings `(batch_size, projection_dim)`; with `return_tokens`, also the video tokens
        `(batch_size, num_tokens, hidden_size)` the matching head needs for re-ranking.
        """
        vision_outputs = self.clusterstm.vision_model(
            pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, return_dict=True
        )
        embeds = nn.functional.normalize(self.clusterstm.visual_projection(vision_outputs.pooler_output), dim=-1)
        if return_tokens:
            return embeds, vision_outputs.last_hidden_state
        return embeds

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised text embeddings `(batch_size, projection_dim)` (the text-only layers, no video)."""
        text_outputs = self.clusterstm.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return nn.functional.normalize(self.clusterstm.text_projection(text_outputs.pooler_output), dim=-1)

    @staticmethod
    def similarity(
        text_embeds: torch.Tensor,
        video_embeds: torch.Tensor,
        dual_softmax: bool = False,
        temperature: float = 100.0,
        direction: str = "t2v",
    ) -> torch.Tensor:
        """
        Cosine similarities `(num_texts, num_videos)` of normalised embeddings.

        With `dual_softmax=True` (opt-in inference re-ranking, CAMoE/DSL), every score is multiplied by a softmax
        prior over the other modality: over the texts for text-to-video ranking (`direction="t2v"`), over the
        videos for video-to-text ranking (`direction="v2t"`). Report metrics with and without it.
        """
        if direction not in ("t2v", "v2t"):
            raise ValueError(f"direction must be 't2v' or 'v2t', got {direction!r}.")
        sim = text_embeds.float() @ video_embeds.float().t()
        if dual_softmax:
            sim = sim * torch.softmax(temperature * sim, dim=0 if direction == "t2v" else 1)
        return sim

    def match_scores(
        self,
        video_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Probability `(batch_size,)` that text `i` matches video `i` (the matching head on the fused text states,
        pooled as `config.matching_pooling` says, see [`matching_logits`])."""
        if video_tokens.shape[0] != input_ids.shape[0]:
            raise ValueError(f"Got {video_tokens.shape[0]} videos for {input_ids.shape[0]} texts; pass pairs.")
        text = self.clusterstm.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        fused = self.fusion_model(text, video_tokens, attention_mask=attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = matching_logits(self.itm_head, fused, attention_mask, self.config.matching_pooling)
        return logits.softmax(dim=-1)[:, 1]

    def rerank(
        self,
        similarity: torch.Tensor,
        video_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        top_k: int = 16,
        direction: str = "t2v",
        batch_size: int = 64,
        fusion: str = "matching",
    ) -> torch.Tensor:
        """
        Re-rank the `top_k` candidates of every query row with the matching head (the UMT / BLIP protocol).

        Args:
            similarity (`torch.Tensor` of shape `(num_queries, num_candidates)`): first-stage scores.
            video_tokens (`torch.Tensor`): for `"t2v"`, the tokens of all candidate videos
                `(num_candidates, num_tokens, hidden)`; for `"v2t"`, the tokens of the query videos `(num_queries, ...)`.
            input_ids, attention_mask (`torch.Tensor`): for `"t2v"`, the query texts `(num_queries, L)`; for `"v2t"`,
                all candidate texts `(num_candidates, L)`.
            top_k (`int`): candidates re-scored per query.
            direction (`str`): `"t2v"` (rows are texts) or `"v2t"` (rows are videos).
            batch_size (`int`): pairs fused at once.
            fusion (`str`): how the top-k are ordered: `"matching"`, by the matching probability alone (UMT);
                `"sum"`, by the matching log-odds plus the first-stage score (as BLIP's retrieval evaluation adds the
                contrastive similarity to the matching score), which keeps what the first stage knows.

        Returns:
            Scores with the layout of `similarity`: the top-k candidates of a row are placed above all the others
            (in the order of their new score); the others keep their first-stage scores, so ranks beyond `top_k` are
            unchanged and `top_k=1` changes no ranking.
        """
        if direction not in ("t2v", "v2t"):
            raise ValueError(f"direction must be 't2v' or 'v2t', got {direction!r}.")
        if fusion not in RERANK_FUSIONS:
            raise ValueError(f"fusion must be one of {RERANK_FUSIONS}, got {fusion!r}.")
        if similarity.ndim != 2:
            raise ValueError(f"similarity must be (num_queries, num_candidates), got {tuple(similarity.shape)}.")
        num_queries, num_candidates = similarity.shape
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        top_k = min(top_k, num_candidates)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        topk_idx = similarity.topk(top_k, dim=1).indices  # (Q, k)
        query_idx = torch.arange(num_queries, device=similarity.device)[:, None].expand(-1, top_k)
        if direction == "t2v":
            text_idx, video_idx = query_idx.reshape(-1), topk_idx.reshape(-1)
        else:
            text_idx, video_idx = topk_idx.reshape(-1), query_idx.reshape(-1)
        probs = []
        for start in range(0, text_idx.shape[0], batch_size):
            t, v = text_idx[start : start + batch_size], video_idx[start : start + batch_size]
            probs.append(
                self.match_scores(
                    video_tokens[v.to(video_tokens.device)],
                    input_ids[t.to(input_ids.device)],
                    attention_mask[t.to(attention_mask.device)],
                )
            )
        probs = torch.cat(probs).reshape(num_queries, top_k).float()
        if fusion == "sum":
            scores = torch.logit(probs, eps=1e-6) + similarity.gather(1, topk_idx).float()
        else:
            scores = probs
        # Lift the re-scored candidates above every first-stage score of their row.
        scores = scores - scores.min(dim=1, keepdim=True).values
        offset = similarity.max(dim=1, keepdim=True).values.float() + 1.0
        reranked = similarity.clone()
        reranked.scatter_(1, topk_idx, (offset + scores).to(similarity.dtype))
        return reranked

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        return_loss: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ClusterSTMVideoTextRetrievalOutput:
        r"""
        bool_masked_pos (`torch.BoolTensor`, *optional*):
            Explicit video token mask (`True` = dropped), see [`ClusterSTMVisionModel`].
        return_loss (`bool`, *optional*):
            Whether to return the contrastive (+ weighted matching) loss; row `i` of the videos and of the texts is a
            positive pair.
        """
        _check_video_text_batch(pixel_values, input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.clusterstm(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            bool_masked_pos=bool_masked_pos,
            return_loss=return_loss,
        )
        loss = contrastive_loss = outputs.loss
        matching_loss = None
        # CODEPATH: loss weight (fine-tuning setting); 0 trains the dual encoder alone.
        if return_loss and self.config.matching_loss_weight > 0 and input_ids.shape[0] > 1:
            matching_loss = video_text_matching_loss(
                self.fusion_model,
                self.itm_head,
                outputs.text_model_output.last_hidden_state,
                attention_mask,
                outputs.vision_model_output.last_hidden_state,
                outputs.logits_per_text,
                input_ids=input_ids,
                negatives=self.config.matching_negatives,
                pooling=self.config.matching_pooling,
            )
            loss = loss + self.config.matching_loss_weight * matching_loss

        return ClusterSTMVideoTextRetrievalOutput(
            loss=loss,
            contrastive_loss=contrastive_loss,
            matching_loss=matching_loss,
            logits_per_video=outputs.logits_per_video,
            logits_per_text=outputs.logits_per_text,
            text_embeds=outputs.text_embeds,
            video_embeds=outputs.video_embeds,
        )


class ClusterSTMQuestionAnsweringHead(nn.Module):
    """MLP classifier on the fused [CLS] token: dense -> activation -> LayerNorm -> answer scores."""

    def __init__(self, config: ClusterSTMConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.dense = nn.Linear(hidden_size, 2 * hidden_size)
        self.activation = ACT2FN[config.text_config.hidden_act]
        self.LayerNorm = nn.LayerNorm(2 * hidden_size, eps=config.text_config.layer_norm_eps)
        self.classifier = nn.Linear(2 * hidden_size, config.num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.LayerNorm(self.activation(self.dense(hidden_states))))


def _freeze_contrastive_parts(model: ClusterSTMModel) -> None:
    """
    Heads that fuse text and video (question answering, captioning) never use the joint-space projections and the
    temperature of their `clusterstm` dual encoder. They stay in the checkpoint (so a fine-tuned folder still loads as
    a dual encoder) but are frozen: every trainable parameter then gets a gradient from the head's loss.
    """
    model.visual_projection.requires_grad_(False)
    model.text_projection.requires_grad_(False)
    model.logit_scale.requires_grad_(False)


@auto_docstring(
    custom_intro="""
    ClusterSTM for open-ended video question answering as classification over a fixed answer vocabulary
    (`config.id2label`): the question tokens cross-attend to the video tokens in the fusion layers, and an MLP on the
    fused [CLS] token scores every answer.
    """
)
class ClusterSTMForVideoQuestionAnswering(ClusterSTMPreTrainedModel):
    # Pretraining heads QA does not use; the new `qa_head` is still reported as newly initialised.
    _keys_to_ignore_on_load_unexpected = [r"^(relevance_decoder|itm_head|mlm_head|alignment_head)\."]
    config: ClusterSTMConfig
    accepts_loss_kwargs = False

    def __init__(self, config: ClusterSTMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.clusterstm = ClusterSTMModel(config)
        self.fusion_model = ClusterSTMTextFusionModel(config.text_config)
        self.qa_head = ClusterSTMQuestionAnsweringHead(config)
        self.post_init()
        self.sync_objective_trainability()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _rename_legacy_fusion_keys(state_dict, prefix, self.config)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def sync_objective_trainability(self) -> None:
        """Freezes the dual encoder's projections and temperature, which the answer loss never reaches."""
        _freeze_contrastive_parts(self.clusterstm)

    def get_input_embeddings(self) -> nn.Module:
        return self.clusterstm.text_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.clusterstm.text_model.embeddings.word_embeddings = value

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ClusterSTMVideoQuestionAnsweringOutput:
        r"""
        bool_masked_pos (`torch.BoolTensor`, *optional*):
            Explicit video token mask (`True` = dropped), see [`ClusterSTMVisionModel`].
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Index of the answer in `config.id2label`; -100 (an answer outside the vocabulary) is ignored by the loss.
        """
        _check_video_text_batch(pixel_values, input_ids)
        video_tokens = self.clusterstm.vision_model(
            pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, return_dict=True
        ).last_hidden_state
        text = self.clusterstm.text_model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        fused = self.fusion_model(text, video_tokens.to(text.device), attention_mask=attention_mask)
        logits = self.qa_head(fused[:, 0])

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            token_losses = nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
            # Sum / count (clamped): a batch whose answers are all out of vocabulary gives 0, not NaN.
            loss = token_losses / (labels != -100).sum().clamp(min=1)
        return ClusterSTMVideoQuestionAnsweringOutput(loss=loss, logits=logits)


@auto_docstring(
    custom_intro="""
    ClusterSTM for video captioning: the text tower run left to right (causal self-attention) with every layer's
    cross-attention on the video tokens, and a language-modelling head initialised from the pretraining MLM head
    (tied to the word embeddings). Trained with teacher forcing; generates with `generate()` (greedy or beam search).
    """
)
class ClusterSTMForVideoCaptioning(ClusterSTMPreTrainedModel, GenerationMixin):
    # Pretraining heads captioning does not use (it keeps `mlm_head` as its language-model head).
    _keys_to_ignore_on_load_unexpected = [r"^(relevance_decoder|itm_head|alignment_head)\."]
    config: ClusterSTMConfig
    # Generation starts from text (a [CLS] prompt); the video is a conditioning input.
    main_input_name = "input_ids"
    _tied_weights_keys = {"mlm_head.decoder.weight": "clusterstm.text_model.embeddings.word_embeddings.weight"}

    def __init__(self, config: ClusterSTMConfig):
        super().__init__(config)
        # The class name names no loss of `LOSS_MAPPING`; the decoder is trained as a causal LM.
        self.loss_type = "ForCausalLM"
        self.clusterstm = ClusterSTMModel(config)
        self.fusion_model = ClusterSTMTextFusionModel(config.text_config)
        # Named as in `ClusterSTMForPreTraining`: the pretrained MLM head initialises the language-modelling head.
        self.mlm_head = ClusterSTMMLMHead(config.text_config)
        self.post_init()
        self.sync_objective_trainability()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _rename_legacy_fusion_keys(state_dict, prefix, self.config)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def sync_objective_trainability(self) -> None:
        """Freezes the dual encoder's projections and temperature, which the captioning loss never reaches."""
        _freeze_contrastive_parts(self.clusterstm)

    def get_input_embeddings(self) -> nn.Module:
        return self.clusterstm.text_model.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module):
        self.clusterstm.text_model.embeddings.word_embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.mlm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.mlm_head.decoder = new_embeddings

    def encode_videos(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.BoolTensor | None = None
    ) -> torch.Tensor:
        """The video tokens `(batch_size, num_tokens, hidden_size)` the decoder cross-attends to."""
        return self.clusterstm.vision_model(
            pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, return_dict=True
        ).last_hidden_state

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        video_embeds: torch.Tensor | None = None,
        video_attention_mask: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ClusterSTMVideoCaptioningOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Target tokens aligned with `input_ids` (usually `input_ids` with padding set to -100); position `t`
            is predicted from the tokens before it, so the first label is never predicted. -100 is ignored.
        video_embeds (`torch.FloatTensor` of shape `(batch_size, num_video_tokens, hidden_size)`, *optional*):
            Pre-computed video tokens ([`~ClusterSTMForVideoCaptioning.encode_videos`]); used instead of
            `pixel_values` (generation encodes the video once).
        video_attention_mask (`torch.Tensor` of shape `(batch_size, num_video_tokens)`, *optional*):
            Mask of the video tokens (1 = attend).
        bool_masked_pos (`torch.BoolTensor`, *optional*):
            Explicit video token mask (`True` = dropped), see [`ClusterSTMVisionModel`].
        cache (`Cache`, *optional*):
            Key/value cache of the decoded prefix: an [`EncoderDecoderCache`] caches the self-attention of every
            text layer and the cross-attention keys/values of the video tokens (a [`DynamicCache`] only the
            former). `input_ids` are then the new tokens only; `attention_mask` covers the prefix and them.
        use_cache (`bool`, *optional*):
            Whether to return a cache (a new [`EncoderDecoderCache`] when `cache` is not given).
        """
        if input_ids is None:
            raise ValueError("`input_ids` (the caption, starting with the [CLS] / bos token) is required.")
        if video_embeds is None:
            if pixel_values is None:
                raise ValueError("Pass `pixel_values` or pre-computed `video_embeds`.")
            video_embeds = self.encode_videos(pixel_values, bool_masked_pos=bool_masked_pos)
        if video_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"Got {video_embeds.shape[0]} videos for {input_ids.shape[0]} captions; pass one caption per video."
            )
        if use_cache is False:
            cache = None
        elif use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        text = self.clusterstm.text_model(
            input_ids=input_ids, attention_mask=attention_mask, is_causal=True, cache=cache
        ).last_hidden_state
        hidden_states = self.fusion_model(
            text,
            video_embeds.to(text.device),
            attention_mask=attention_mask,
            encoder_attention_mask=video_attention_mask,
            is_causal=True,
            cache=cache,
        )
        logits = self.mlm_head(hidden_states)

        loss = None
        if labels is not None:
            # The causal-LM loss shifts the labels itself (position t is predicted from the tokens before it);
            # `num_items_in_batch` (from Trainer) normalises over the tokens of all accumulated batches.
            loss = self.loss_function(
                logits,
                labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        return ClusterSTMVideoCaptioningOutput(loss=loss, logits=logits, video_embeds=video_embeds, cache=cache)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """
        Caption videos with [`~generation.GenerationMixin.generate`] (greedy, sampling or beam search with
        `num_beams > 1`).

        The video is encoded once; its tokens are expanded for the beams by `generate`. Decoding starts from
        `input_ids` (a prompt) or, by default, from the `bos_token_id` of the generation config (the tokenizer's
        [CLS]); it stops at `eos_token_id` ([SEP]). With `use_cache` (the default) every step runs only the new token
        against an [`EncoderDecoderCache`]: the self-attention keys/values of the prefix and the cross-attention
        keys/values of the video tokens, projected once; `use_cache=False` re-runs the whole prefix (same output).

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_frames, num_channels, height, width)`, *optional*):
                The videos (or pass `video_embeds`).
            input_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`, *optional*): A prompt.
            attention_mask (`torch.Tensor`, *optional*): Mask of the prompt.
            video_embeds (`torch.Tensor`, *optional*): Pre-computed video tokens.
            generate_kwargs: Any generation argument (`num_beams`, `max_new_tokens`, `do_sample`, `use_cache`, ...).

        Returns:
            `torch.LongTensor` of shape `(batch_size * num_return_sequences, sequence_length)`, starting with the prompt.
        """
        if video_embeds is None:
            if pixel_values is None:
                raise ValueError("generate() needs `pixel_values` or `video_embeds`.")
            video_embeds = self.encode_videos(pixel_values)
        batch_size = video_embeds.shape[0]
        if input_ids is None:
            bos_token_id = self.generation_config.bos_token_id
            if bos_token_id is None:
                bos_token_id = getattr(self.config, "bos_token_id", None)
            if bos_token_id is None:
                raise ValueError(
                    "No `bos_token_id`: set `model.generation_config.bos_token_id` (the tokenizer's [CLS] id) or pass "
                    "a prompt as `input_ids`."
                )
            input_ids = torch.full((batch_size, 1), bos_token_id, dtype=torch.long, device=video_embeds.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generation_config = generate_kwargs.get("generation_config", self.generation_config)
        use_cache = generate_kwargs.get("use_cache", generation_config.use_cache)
        if (
            use_cache
            and generate_kwargs.get("cache") is None
            and generate_kwargs.get("cache_implementation", generation_config.cache_implementation) is None
        ):
            # `generate` would create a self-attention-only DynamicCache: cache the video's keys/values as well.
            generate_kwargs["cache"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
        return super().generate(
            input_ids=input_ids, attention_mask=attention_mask, video_embeds=video_embeds, **generate_kwargs
        )


__all__ = [
    "ClusterSTMTextFusionModel",
    "ClusterSTMForPreTraining",
    "ClusterSTMForVideoCaptioning",
    "ClusterSTMForVideoQuestionAnswering",
    "ClusterSTMForVideoTextRetrieval",
    "ClusterSTMModel",
    "ClusterSTMPreTrainedModel",
    "ClusterSTMTextModel",
    "ClusterSTMVisionModel",
    "gather_with_grad",
    "video_text_contrastive_loss",
]
