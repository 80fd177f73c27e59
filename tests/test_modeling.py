"""Model tests mirroring transformers' common checks, on a very small config (fast on CPU)."""

import copy
import inspect

import pytest
import torch

from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
from clusterstm.models.masking_clusterstm import build_mask, num_visible_tokens
from clusterstm.models.modeling_clusterstm import (
    ClusterSTMModel,
    ClusterSTMTextFusionModel,
    ClusterSTMTextModel,
    ClusterSTMVisionModel,
    video_text_contrastive_loss,
)

FRAMES, SIZE, PATCH = 4, 32, 8
GRID = (SIZE // PATCH) ** 2  # 16 tokens per frame


def small_config(**kwargs) -> ClusterSTMConfig:
    return ClusterSTMConfig.from_preset(
        "tiny",
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": SIZE,
            "patch_size": PATCH,
            "num_frames": FRAMES,
        },
        text_config={
            "vocab_size": 100,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_fusion_layers": 1,
            "max_position_embeddings": 32,
            "encoder_width": 32,
        },
        projection_dim=16,
        **kwargs,
    )


def inputs(batch_size=3, frames=FRAMES, size=SIZE, seq=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, frames, 3, size, size, generator=generator)
    input_ids = torch.randint(5, 100, (batch_size, seq), generator=generator)
    input_ids[:, 0] = 2
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, seq - 2 :] = 0
    return pixel_values, input_ids, attention_mask


def explicit_mask(batch_size, frames=FRAMES, tokens=GRID, keep=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(batch_size, frames, tokens, generator=generator).argsort(-1)
    mask = torch.ones(batch_size, frames, tokens, dtype=torch.bool)
    mask.scatter_(-1, order[..., :keep], False)
    return mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ClusterSTMModel(small_config()).eval()


def test_forward_shapes_and_loss(model):
    pixel_values, input_ids, attention_mask = inputs()
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True)
    assert out.logits_per_video.shape == (3, 3) and out.logits_per_text.shape == (3, 3)
    torch.testing.assert_close(out.logits_per_video, out.logits_per_text.t())
    assert out.video_embeds.shape == (3, 16) and out.text_embeds.shape == (3, 16)
    torch.testing.assert_close(out.video_embeds.norm(dim=-1), torch.ones(3))
    assert torch.isfinite(out.loss)
    # eval: no masking by default, all tokens kept
    assert out.vision_model_output.last_hidden_state.shape == (3, FRAMES * GRID, 32)
    assert out.vision_model_output.bool_masked_pos is None and out.vision_model_output.kept_indices is None
    # the loss is CLIP's symmetric InfoNCE
    labels = torch.arange(3)
    expected = (
        torch.nn.functional.cross_entropy(out.logits_per_video, labels)
        + torch.nn.functional.cross_entropy(out.logits_per_text, labels)
    ) / 2
    torch.testing.assert_close(out.loss, expected)
    assert out.to_tuple()[0] is out.loss


def test_get_features_are_projected(model):
    pixel_values, input_ids, attention_mask = inputs()
    with torch.no_grad():
        video = model.get_video_features(pixel_values=pixel_values)
        text = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    assert video.pooler_output.shape == (3, 16) and text.pooler_output.shape == (3, 16)
    torch.testing.assert_close(torch.nn.functional.normalize(video.pooler_output, dim=-1), out.video_embeds)
    torch.testing.assert_close(torch.nn.functional.normalize(text.pooler_output, dim=-1), out.text_embeds)


@pytest.mark.parametrize("strategy", ["random", "tube", "cluster", "attention"])
def test_masking_strategies_keep_k_per_frame(strategy):
    torch.manual_seed(0)
    ratio = 0.75
    config = small_config()
    vision = ClusterSTMVisionModel(config.vision_config).train()
    pixel_values, _, _ = inputs(batch_size=2)
    with torch.no_grad():
        patch_embeds = vision.embeddings(pixel_values)[1]
    mask = build_mask(
        strategy,
        batch_size=2,
        num_frames=FRAMES,
        num_patches=GRID,
        mask_ratio=ratio,
        features=patch_embeds if strategy == "cluster" else None,
        cls_attention=torch.rand(2, FRAMES, GRID) if strategy == "attention" else None,
        generator=torch.Generator().manual_seed(1),
    )
    out = vision(pixel_values, bool_masked_pos=mask, output_hidden_states=True)
    keep = num_visible_tokens(GRID, ratio)
    assert out.last_hidden_state.shape == (2, FRAMES * keep, 32)
    assert torch.equal(out.bool_masked_pos, mask)
    assert ((~out.bool_masked_pos).sum(-1) == keep).all()
    assert out.kept_indices.shape == (2, FRAMES * keep)
    # kept indices point at the unmasked positions, frame-major
    flat_mask = out.bool_masked_pos.reshape(2, -1)
    assert not torch.gather(flat_mask, 1, out.kept_indices).any()
    assert all(h.shape == (2, FRAMES * keep, 32) for h in out.hidden_states)
    assert len(out.hidden_states) == config.vision_config.num_hidden_layers + 1
    if strategy == "tube":
        assert (out.bool_masked_pos == out.bool_masked_pos[:, :1]).all()


def test_tower_masks_only_through_bool_masked_pos():
    """The tower never draws a mask itself: without `bool_masked_pos` every token is kept, in training too."""
    vision = ClusterSTMVisionModel(small_config().vision_config).train()
    out = vision(inputs(batch_size=1)[0])
    assert out.last_hidden_state.shape[1] == FRAMES * GRID and out.bool_masked_pos is None
    parameters = inspect.signature(ClusterSTMVisionModel.forward).parameters
    assert not {"mask_features", "cls_attention", "mask_generator"} & set(parameters)


def test_explicit_mask_wins_and_matches_manual_gather(model):
    pixel_values, _, _ = inputs(batch_size=2)
    mask = explicit_mask(2)
    with torch.no_grad():
        out = model.vision_model(pixel_values, bool_masked_pos=mask)
        out_flat = model.vision_model(pixel_values, bool_masked_pos=mask.reshape(2, -1))
    assert out.last_hidden_state.shape == (2, FRAMES * 4, 32)
    torch.testing.assert_close(out.last_hidden_state, out_flat.last_hidden_state)
    assert torch.equal(out.bool_masked_pos, mask)
    expected = (~mask).reshape(2, -1).nonzero()[:, 1].reshape(2, -1)
    assert torch.equal(out.kept_indices, expected)


def test_batching_equivalence_with_explicit_mask(model):
    pixel_values, input_ids, attention_mask = inputs(batch_size=3)
    mask = explicit_mask(3)
    with torch.no_grad():
        batched = model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, bool_masked_pos=mask
        )
        for i in range(3):
            single = model(
                input_ids=input_ids[i : i + 1],
                pixel_values=pixel_values[i : i + 1],
                attention_mask=attention_mask[i : i + 1],
                bool_masked_pos=mask[i : i + 1],
            )
            torch.testing.assert_close(single.video_embeds[0], batched.video_embeds[i], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(single.text_embeds[0], batched.text_embeds[i], atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_text_features(model):
    _, input_ids, _ = inputs(batch_size=1, seq=5)
    padded = torch.cat([input_ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        a = model.get_text_features(input_ids=input_ids).pooler_output
        b = model.get_text_features(input_ids=padded, attention_mask=mask).pooler_output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_determinism_in_eval(model):
    pixel_values, input_ids, attention_mask = inputs()
    with torch.no_grad():
        a = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        b = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    assert torch.equal(a.logits_per_video, b.logits_per_video)


def test_save_load_equivalence_safetensors(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = ClusterSTMModel.from_pretrained(tmp_path).eval()
    pixel_values, input_ids, attention_mask = inputs()
    mask = explicit_mask(3)
    with torch.no_grad():
        a = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, bool_masked_pos=mask)
        b = loaded(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, bool_masked_pos=mask)
    torch.testing.assert_close(a.logits_per_video, b.logits_per_video)
    # a tower loads from the composite checkpoint's sub-folder-free weights too
    state = {k: v for k, v in model.state_dict().items() if k.startswith("vision_model.")}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())


def test_eager_and_sdpa_agree():
    torch.manual_seed(0)
    config = small_config()
    eager = ClusterSTMModel._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    sdpa = ClusterSTMModel._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.vision_model.config._attn_implementation == "eager"
    assert sdpa.text_model.config._attn_implementation == "sdpa"
    pixel_values, input_ids, attention_mask = inputs()
    mask = explicit_mask(3)
    with torch.no_grad():
        a = eager(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, bool_masked_pos=mask)
        b = sdpa(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, bool_masked_pos=mask)
        video = torch.randn(3, 10, 32)
        fusion_eager = ClusterSTMTextFusionModel(eager.text_model.config).eval()
        fusion_sdpa = ClusterSTMTextFusionModel(sdpa.text_model.config).eval()
        fusion_sdpa.load_state_dict(fusion_eager.state_dict())
        fa = fusion_eager(
            eager.text_model(input_ids=input_ids, attention_mask=attention_mask, is_causal=True).last_hidden_state,
            video,
            attention_mask=attention_mask,
            is_causal=True,
        )
        fb = fusion_sdpa(
            sdpa.text_model(input_ids=input_ids, attention_mask=attention_mask, is_causal=True).last_hidden_state,
            video,
            attention_mask=attention_mask,
            is_causal=True,
        )
    torch.testing.assert_close(a.logits_per_video, b.logits_per_video, atol=1e-4, rtol=1e-4)
    valid = attention_mask.bool()
    torch.testing.assert_close(fa[valid], fb[valid], atol=1e-4, rtol=1e-4)


def test_output_attentions_eager():
    config = small_config()
    model = ClusterSTMModel._from_config(config, attn_implementation="eager").eval()
    pixel_values, input_ids, attention_mask = inputs(batch_size=2)
    with torch.no_grad():
        out = model.vision_model(pixel_values, bool_masked_pos=explicit_mask(2), output_attentions=True)
        text = model.text_model(input_ids=input_ids[:2], attention_mask=attention_mask[:2], output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, FRAMES * 4, FRAMES * 4)
    # the text tower holds the text-only layers; the fusion layer belongs to the heads
    assert len(text.attentions) == 2 and text.attentions[0].shape == (2, 4, 7, 7)


def test_text_tower_and_fusion_layers_and_causality():
    torch.manual_seed(0)
    text_config = small_config().text_config
    text_model = ClusterSTMTextModel(text_config).eval()
    fusion_model = ClusterSTMTextFusionModel(text_config).eval()
    assert len(text_model.layer) == text_config.num_hidden_layers - text_config.num_fusion_layers
    assert len(fusion_model.layer) == text_config.num_fusion_layers
    assert all(layer.has_cross_attention for layer in fusion_model.layer)
    assert not any(layer.has_cross_attention for layer in text_model.layer)
    _, input_ids, attention_mask = inputs(batch_size=2)
    video = torch.randn(2, 6, 32)

    def full(ids, video_tokens, **kwargs):
        text = text_model(input_ids=ids, attention_mask=kwargs.get("attention_mask"), is_causal=kwargs.get("is_causal", False))
        return fusion_model(text.last_hidden_state, video_tokens, **kwargs)

    with torch.no_grad():
        fused = full(input_ids, video, attention_mask=attention_mask)
        # the fusion output depends on the video
        other = full(input_ids, video + 1, attention_mask=attention_mask)
        # causal: changing a later token does not change earlier positions
        causal_a = full(input_ids, video, is_causal=True)
        changed = input_ids.clone()
        changed[:, -1] = 7
        causal_b = full(changed, video, is_causal=True)
        bidir_b = full(changed, video)
        bidir_a = full(input_ids, video)
    assert not torch.allclose(fused, other)
    torch.testing.assert_close(causal_a[:, :-1], causal_b[:, :-1])
    assert not torch.allclose(bidir_a[:, :-1], bidir_b[:, :-1])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        fusion_model(fused, None)
    with pytest.raises(ValueError, match="fusion_model"):
        text_model(input_ids=input_ids, mode="multimodal")
    with pytest.raises(ValueError, match="mode"):
        text_model(input_ids=input_ids, mode="video")


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    config = small_config()
    reference = ClusterSTMModel(config).train()
    checkpointed = copy.deepcopy(reference)
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.vision_model.layers[0].gradient_checkpointing
    assert checkpointed.text_model.layer[0].gradient_checkpointing
    pixel_values, input_ids, attention_mask = inputs()
    for model in (reference, checkpointed):
        out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True)
        out.loss.backward()
    for (name, p), (_, q) in zip(reference.named_parameters(), checkpointed.named_parameters()):
        # the fusion (cross-attention) layers take no part in the dual encoder's loss
        assert (p.grad is None) == (q.grad is None) == name.startswith("text_model.layer.2."), name
        if p.grad is None:
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_training_decreases_contrastive_loss():
    torch.manual_seed(0)
    model = ClusterSTMModel(small_config()).train()
    model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    pixel_values, input_ids, attention_mask = inputs(batch_size=4)
    mask = build_mask(
        "random",
        batch_size=4,
        num_frames=FRAMES,
        num_patches=GRID,
        mask_ratio=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    losses = []
    for _ in range(12):
        # the same mask every step (seeded generator), so the loss can only go down by learning
        out = model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            return_loss=True,
            bool_masked_pos=mask,
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert max(losses[-3:]) < losses[0] * 0.75, losses


def test_every_weight_initialised():
    torch.manual_seed(0)
    config = small_config()
    model = ClusterSTMModel(config)
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
        if param.ndim >= 2:
            # normal(0, 0.02)-style init: not zero, not huge
            assert 1e-3 < param.std().item() < 0.1, (name, param.std().item())
        elif "LayerNorm" in name or "layer_norm" in name or name.endswith("post_layernorm.weight"):
            pass
    assert model.logit_scale.item() == pytest.approx(config.logit_scale_init_value)
    positions = model.vision_model.embeddings.spatial_position_embedding
    assert positions.abs().sum() > 0
    # uninitialised memory (torch.empty) would show up as a different draw on re-init; re-running init reproduces
    torch.manual_seed(1)
    again = ClusterSTMModel(config)
    assert not torch.equal(
        again.vision_model.embeddings.temporal_position_embedding,
        model.vision_model.embeddings.temporal_position_embedding,
    )
    assert torch.equal(model.text_model.embeddings.position_ids[0, :5], torch.arange(5))


def test_position_interpolation_other_frames_and_resolution(model):
    with torch.no_grad():
        more_frames = model.vision_model(torch.randn(1, 6, 3, SIZE, SIZE))
        larger = model.vision_model(torch.randn(1, FRAMES, 3, 48, 40))
    assert more_frames.last_hidden_state.shape == (1, 6 * GRID, 32)
    assert larger.last_hidden_state.shape == (1, FRAMES * 6 * 5, 32)
    embeddings = model.vision_model.embeddings
    from clusterstm.models.modeling_clusterstm import interpolate_spatiotemporal_positions

    same = interpolate_spatiotemporal_positions(
        embeddings.spatial_position_embedding, embeddings.temporal_position_embedding, FRAMES, 4, 4
    )
    expected = embeddings.spatial_position_embedding[:, None] + embeddings.temporal_position_embedding[:, :, None]
    torch.testing.assert_close(same, expected)


def test_images_single_frame(model):
    pixel_values, input_ids, attention_mask = inputs(batch_size=2, frames=1)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True)
        four_d = model.get_video_features(pixel_values=pixel_values[:, 0]).pooler_output
    assert out.vision_model_output.last_hidden_state.shape == (2, GRID, 32)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(four_d, model.get_video_features(pixel_values=pixel_values).pooler_output)


def test_images_single_frame_with_masking():
    vision = ClusterSTMVisionModel(small_config().vision_config).train()
    pixel_values = torch.randn(2, 1, 3, SIZE, SIZE)
    features = vision.embeddings(pixel_values[:, :, :, :, :])[1].detach()
    mask = build_mask("cluster", batch_size=2, num_frames=1, num_patches=GRID, mask_ratio=0.5, features=features)
    out = vision(pixel_values, bool_masked_pos=mask)
    assert out.last_hidden_state.shape == (2, GRID // 2, 32)


def test_bad_inputs_raise_value_error(model):
    with pytest.raises(ValueError, match="pixel_values"):
        model.vision_model(torch.randn(2, 3, SIZE))
    with pytest.raises(ValueError, match="channels"):
        model.vision_model(torch.randn(1, FRAMES, 4, SIZE, SIZE))
    with pytest.raises(ValueError, match="divisible"):
        model.vision_model(torch.randn(1, FRAMES, 3, 30, SIZE))
    with pytest.raises(ValueError, match="bool_masked_pos has shape"):
        model.vision_model(torch.randn(1, FRAMES, 3, SIZE, SIZE), bool_masked_pos=torch.zeros(1, FRAMES, 5).bool())
    uneven = explicit_mask(1)
    uneven[0, 0, :] = False
    with pytest.raises(ValueError, match="same, non-zero number"):
        model.vision_model(torch.randn(1, FRAMES, 3, SIZE, SIZE), bool_masked_pos=uneven)


def test_contrastive_loss_function_single_process():
    torch.manual_seed(0)
    video = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * video @ text.t()
    labels = torch.arange(5)
    expected = (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)
    ) / 2
    torch.testing.assert_close(video_text_contrastive_loss(video, text, scale), expected)
