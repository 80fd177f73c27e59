"""Tests of relevance generation and the CLIP / SigLIP window poolers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from clusterstm.teacher.relevance import (
    CLIPWindowPooler,
    SiglipWindowPooler,
    build_window_pooler,
    generate_relevance,
)

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 16,
    "patch_size": 4,
}
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 99,
    "max_position_embeddings": 16,
}


def tiny_clip() -> CLIPModel:
    torch.manual_seed(0)
    config = CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=24)
    return CLIPModel(config).eval()


def tiny_siglip(**vision_overrides) -> SiglipModel:
    torch.manual_seed(0)
    config = SiglipConfig(text_config=TINY_TEXT, vision_config={**TINY_VISION, **vision_overrides})
    return SiglipModel(config).eval()


def ref_relevance(tokens, text, pooler, window_size):
    """Window by window, with explicit border clamping (= replicate padding)."""
    b, t, n, c = tokens.shape
    side = int(n**0.5)
    half = window_size // 2
    out = torch.zeros(b, t, n, dtype=torch.float64)
    for bi in range(b):
        for ti in range(t):
            grid = tokens[bi, ti].reshape(side, side, c)
            for r in range(side):
                for col in range(side):
                    window = [
                        grid[min(max(r + dr, 0), side - 1), min(max(col + dc, 0), side - 1)]
                        for dr in range(-half, half + 1)
                        for dc in range(-half, half + 1)
                    ]
                    pooled = pooler(torch.stack(window)[None])[0]
                    out[bi, ti, r * side + col] = F.cosine_similarity(pooled.double(), text[bi].double(), dim=0)
    return out


def test_mean_pooler_matches_literal_pseudocode():
    # Algorithm III literally (pad + unfold), with a mean pooler
    torch.manual_seed(0)
    b, t, side, c = 2, 3, 4, 6
    x = torch.randn(b, t, side * side, c, dtype=torch.float64)
    y = torch.randn(b, c, dtype=torch.float64)

    def pooler(window):
        return window.mean(dim=1)

    grid = x.permute(0, 1, 3, 2).reshape(b * t, c, side, side)
    grid = F.pad(grid, (1, 1, 1, 1), mode="replicate")
    windows = grid.unfold(2, 3, 1).unfold(3, 3, 1).permute(0, 2, 3, 4, 5, 1).reshape(-1, 9, c)
    pooled = pooler(windows).reshape(b, t * side * side, c)
    literal = torch.einsum("bnc,bc->bn", F.normalize(pooled, dim=-1), F.normalize(y, dim=-1)).reshape(b, t, -1)

    relevance = generate_relevance(x, y, pooler, window_size=3)
    assert relevance.dtype == torch.float64
    assert torch.allclose(relevance, literal, atol=1e-12)
    assert torch.allclose(relevance, ref_relevance(x, y, pooler, 3), atol=1e-12)


@pytest.mark.parametrize("window_size", [1, 3, 5])
def test_matches_window_by_window_reference(window_size):
    torch.manual_seed(1)
    x = torch.randn(1, 2, 9, 4, dtype=torch.float64)
    y = torch.randn(1, 3, dtype=torch.float64)
    weight = torch.randn(4, 3, dtype=torch.float64)

    def pooler(window):
        return window.amax(dim=1) @ weight  # order-sensitive enough to catch a wrong window

    expected = ref_relevance(x, y, pooler, window_size)
    assert torch.allclose(generate_relevance(x, y, pooler, window_size), expected, atol=1e-12)
    # chunking over frames does not change the result
    chunked = generate_relevance(x, y, pooler, window_size, max_chunk_elements=1)
    assert torch.allclose(chunked, expected, atol=1e-12)


def test_clip_pooler_single_token_is_clip_image_embedding():
    model = tiny_clip()
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pixel_values).last_hidden_state
        image_embeds = model.get_image_features(pixel_values=pixel_values).pooler_output
        pooler = build_window_pooler(model)
        assert isinstance(pooler, CLIPWindowPooler)
        # a 1x1 window of the CLS token follows CLIP's own pooling path exactly
        assert torch.allclose(pooler(hidden[:, :1]), image_embeds, atol=1e-6)
        # a window is pooled by its mean
        window = hidden[:, 1:10]
        expected = model.visual_projection(model.vision_model.post_layernorm(window.mean(dim=1)))
        assert torch.allclose(pooler(window), expected, atol=1e-6)


def test_clip_vision_with_projection_and_errors():
    torch.manual_seed(0)
    vision_config = CLIPVisionConfig(**TINY_VISION, projection_dim=24)
    tower = CLIPVisionModelWithProjection(vision_config).eval()
    pixel_values = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        output = tower(pixel_values=pixel_values)
        pooler = build_window_pooler(tower)
        assert torch.allclose(pooler(output.last_hidden_state[:, :1]), output.image_embeds, atol=1e-6)
    with pytest.raises(ValueError, match="no projection"):
        build_window_pooler(CLIPVisionModel(vision_config))
    with pytest.raises(ValueError, match="callable"):
        build_window_pooler(42)


def test_siglip_pooler_is_the_attention_head():
    # with a single patch (image = one patch) the tower pools exactly one token: the head over a 1x1 window
    model = tiny_siglip(image_size=4, patch_size=4)
    pixel_values = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        output = model.vision_model(pixel_values=pixel_values)
        pooler = build_window_pooler(model)
        assert isinstance(pooler, SiglipWindowPooler)
        assert torch.allclose(pooler(output.last_hidden_state), output.pooler_output, atol=1e-6)
        assert torch.allclose(pooler(output.last_hidden_state), model.get_image_features(pixel_values).pooler_output)

    # and for a full image, the head over all tokens is the image embedding
    model = tiny_siglip()
    tower = SiglipVisionModel(model.config.vision_config).eval()
    with torch.no_grad():
        output = tower(pixel_values=torch.randn(2, 3, 16, 16))
        assert torch.allclose(build_window_pooler(tower)(output.last_hidden_state), output.pooler_output, atol=1e-6)
    with pytest.raises(ValueError, match="no projection"):
        build_window_pooler(SiglipVisionModel(SiglipVisionConfig(**TINY_VISION, vision_use_head=False)))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_window_one_equals_per_token_computation(kind):
    model = tiny_clip() if kind == "clip" else tiny_siglip()
    torch.manual_seed(2)
    b, t, n = 2, 2, 16
    tokens = torch.randn(b, t, n, 32)
    with torch.no_grad():
        if kind == "clip":
            text = model.get_text_features(input_ids=torch.randint(0, 99, (b, 5))).pooler_output
            per_token = model.visual_projection(model.vision_model.post_layernorm(tokens))
        else:
            text = model.get_text_features(input_ids=torch.randint(0, 99, (b, 5))).pooler_output
            per_token = model.vision_model.head(tokens.reshape(-1, 1, 32)).reshape(b, t, n, -1)
        expected = F.cosine_similarity(per_token, text[:, None, None, :], dim=-1)
        relevance = generate_relevance(tokens, text, model, window_size=1)
        relevance_3 = generate_relevance(tokens, text, model, window_size=3)
    assert relevance.shape == (b, t, n) and relevance.dtype == torch.float32
    assert torch.allclose(relevance, expected, atol=1e-5)
    assert relevance_3.shape == (b, t, n) and not torch.allclose(relevance_3, relevance, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_and_gradients(dtype):
    torch.manual_seed(3)
    tokens = torch.randn(1, 2, 4, 8).to(dtype)
    text = torch.randn(1, 8).to(dtype)
    relevance = generate_relevance(tokens, text, lambda w: w.mean(dim=1), window_size=1)
    assert relevance.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert relevance.device == tokens.device
    expected = F.cosine_similarity(tokens.double(), text.double()[:, None, None], dim=-1)
    assert torch.allclose(relevance.double(), expected, atol=1e-5)

    leaf = torch.randn(1, 1, 4, 8, requires_grad=True)
    generate_relevance(leaf, torch.randn(1, 8), lambda w: w.mean(dim=1)).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_bad_inputs():
    tokens = torch.randn(1, 2, 9, 4)
    text = torch.randn(1, 4)

    def mean(window):
        return window.mean(dim=1)

    with pytest.raises(ValueError, match="rank 4"):
        generate_relevance(tokens[0], text, mean)
    with pytest.raises(ValueError, match="rank 2"):
        generate_relevance(tokens, text[0], mean)
    with pytest.raises(ValueError, match="perfect square"):
        generate_relevance(torch.randn(1, 2, 8, 4), text, mean)
    for window_size in (2, 0, -1, 1.0):
        with pytest.raises(ValueError, match="window_size"):
            generate_relevance(tokens, text, mean, window_size=window_size)
    with pytest.raises(ValueError, match="batch size"):
        generate_relevance(tokens, torch.randn(2, 4), mean)
    with pytest.raises(ValueError, match="pooler"):
        generate_relevance(tokens, text, lambda w: w)  # (M, 9, C) instead of (M, C)
    with pytest.raises(ValueError, match="pooler"):
        generate_relevance(tokens, torch.randn(1, 5), mean)  # D does not match the text embedding
    with pytest.raises(ValueError, match="pooler"):
        generate_relevance(tokens, text, lambda w: (w.mean(dim=1),))
    bad = tokens.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        generate_relevance(bad, text, mean)
