"""Training-free dense features from the last block of a CLIP-like vision tower, beside Algorithm III's window pooling.

The last layer of CLIP-like models is trained to serve the pooled (CLS) embedding, and its per-token outputs are known
to be poorly localised. Two published training-free readings of the last block give better dense features; both map
the normalised input `x` of the last attention layer (after its pre-norm, CLS included) to replacement "patch
tokens", which then go through the teacher's own window pooler (post-layernorm + visual projection for CLIP), so that
window size and the joint space stay those of Algorithm III:

* ``"maskclip"`` -- Zhou, Loy and Dai, "Extract Free Dense Labels from CLIP", ECCV 2022 (MaskCLIP): the value path of
  the last attention layer, each token's value embedding passed through the output projection, with no query-key
  mixing, no residual and no feed-forward: `out_proj(v_proj(x))`.
* ``"clearclip"`` -- Lan et al., "ClearCLIP: Decomposing CLIP Representations for Dense Vision-Language Inference",
  ECCV 2024: the last block without its residual connection and without its feed-forward network, with the
  attention computed query-to-query (self-self attention, the paper's third change): `out_proj(softmax(q q^T /
  sqrt(d)) v)` per head.

``"window"`` (the default everywhere) keeps the tower's last hidden states, Algorithm III as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

RELEVANCE_METHODS = ("window", "maskclip", "clearclip")


def check_relevance_method(method: str) -> str:
    """Returns `method` or raises a `ValueError` naming the valid choices."""
    if method not in RELEVANCE_METHODS:
        raise ValueError(f"relevance_method must be one of {RELEVANCE_METHODS}, got {method!r}.")
    return method


def _split_heads(states: torch.Tensor, num_heads: int) -> torch.Tensor:
    m, length, width = states.shape
    return states.reshape(m, length, num_heads, width // num_heads).transpose(1, 2)  # (M, h, L, d)


def maskclip_tokens(attention: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """
    MaskCLIP dense tokens (Zhou et al., ECCV 2022): `out_proj(v_proj(x))` for every token of `normed` `(M, L, C)`,
    the input of the last attention layer after its layer norm. `attention` must expose `v_proj` and `out_proj`
    (the Hugging Face CLIP attention layout). Returns `(M, L, C)`.
    """
    return attention.out_proj(attention.v_proj(normed))


def clearclip_tokens(attention: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """
    ClearCLIP dense tokens (Lan et al., ECCV 2024): the last attention layer's output alone (no residual, no
    feed-forward), with query-query attention: `out_proj(softmax(q q^T * scale) v)` per head, for `normed`
    `(M, L, C)` (the layer's normalised input). `attention` must expose `q_proj`, `v_proj`, `out_proj` and
    `num_heads` (the Hugging Face CLIP attention layout). Returns `(M, L, C)`.
    """
    num_heads = attention.num_heads
    query = _split_heads(attention.q_proj(normed), num_heads)
    value = _split_heads(attention.v_proj(normed), num_heads)
    scale = query.shape[-1] ** -0.5
    weights = torch.softmax(torch.matmul(query, query.transpose(-1, -2)).float() * scale, dim=-1).to(value.dtype)
    mixed = torch.matmul(weights, value).transpose(1, 2).reshape(normed.shape)
    return attention.out_proj(mixed)


def dense_tokens(attention: nn.Module, normed: torch.Tensor, method: str) -> torch.Tensor:
    """Dispatches `method` (``"maskclip"`` or ``"clearclip"``) to [`maskclip_tokens`] / [`clearclip_tokens`]."""
    check_relevance_method(method)
    if method == "maskclip":
        return maskclip_tokens(attention, normed)
    if method == "clearclip":
        return clearclip_tokens(attention, normed)
    raise ValueError("dense_tokens computes the 'maskclip' and 'clearclip' readings; 'window' uses the patch tokens.")


__all__ = ["RELEVANCE_METHODS", "check_relevance_method", "clearclip_tokens", "dense_tokens", "maskclip_tokens"]
