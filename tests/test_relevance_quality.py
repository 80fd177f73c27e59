"""relevance_localization, synthetic object token masks, and the MaskCLIP / ClearCLIP relevance readings."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from clusterstm.data.synthetic import (
    SyntheticVideoTextConfig,
    generate_split_metadata,
    object_token_masks,
    render_clips,
)
from clusterstm.teacher.dense import clearclip_tokens, maskclip_tokens
from clusterstm.teacher.localization import relevance_localization
from clusterstm.teacher.targets import compute_teacher_targets
from clusterstm.teacher.teacher import ClusterSTMTeacher

VISION = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 16,
    "patch_size": 4,
}
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 99,
    "max_position_embeddings": 16,
}


# ------------------------------------------------------------------------------------------- relevance_localization
def test_localization_perfect_and_inverted_maps():
    masks = torch.zeros(2, 3, 9, dtype=torch.bool)
    masks[0, :, 4] = True
    masks[1, :, :2] = True
    perfect = masks.float() + 0.01 * torch.rand(masks.shape)  # objects strictly above background
    assert relevance_localization(perfect, masks) == {
        "pointing_game": 1.0,
        "auc": 1.0,
        "num_frames": 6,
        "num_skipped_frames": 0,
    }
    inverted = relevance_localization(-perfect, masks)
    assert inverted["pointing_game"] == 0.0 and inverted["auc"] == 0.0


def test_localization_hand_case_with_ties_and_skipped_frames():
    # One frame, tokens [0.9, 0.5, 0.5, 0.1], objects on tokens 1 and 3: argmax (0) misses; pairs (pos, neg):
    # (0.5 vs 0.9) 0, (0.5 vs 0.5) 1/2, (0.1 vs 0.9) 0, (0.1 vs 0.5) 0 -> AUC 0.5 / 4 = 0.125.
    relevance = torch.tensor([[[0.9, 0.5, 0.5, 0.1], [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 0.0]]])
    masks = torch.tensor([[[False, True, False, True], [False] * 4, [True] * 4]])
    out = relevance_localization(relevance, masks)
    assert out["num_frames"] == 1 and out["num_skipped_frames"] == 2
    assert out["pointing_game"] == 0.0
    assert out["auc"] == pytest.approx(0.125)


def test_localization_auc_matches_pairwise_reference():
    gen = torch.Generator().manual_seed(0)
    relevance = torch.randint(0, 5, (3, 4, 16), generator=gen).float()  # many ties
    masks = torch.rand(3, 4, 16, generator=gen) < 0.3
    masks[..., 0] = True
    masks[..., 1] = False
    aucs = []
    for r, m in zip(relevance.reshape(-1, 16), masks.reshape(-1, 16)):
        pos, neg = r[m], r[~m]
        diff = pos[:, None] - neg[None, :]
        aucs.append(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    assert relevance_localization(relevance, masks)["auc"] == pytest.approx(float(torch.stack(aucs).mean()))


def test_localization_bad_inputs():
    with pytest.raises(ValueError, match="object_token_masks"):
        relevance_localization(torch.zeros(1, 2, 4), torch.zeros(1, 2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="relevance"):
        relevance_localization(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        relevance_localization(torch.full((1, 1, 2), float("nan")), torch.tensor([[[True, False]]]))


# ------------------------------------------------------------------------------------------------ object token masks
def test_object_token_masks_match_the_rendered_pixels():
    config = SyntheticVideoTextConfig(num_train=6, image_size=32, num_frames=4)
    rows = generate_split_metadata(config, "train")
    video = render_clips(rows, config)
    masks = object_token_masks(rows, config, patch_size=8, tubelet_size=2, min_coverage=1.0)
    assert masks.shape == (6, 2, 16) and masks.dtype == bool
    # A token fully covered by objects has every pixel painted in an object colour; with min_coverage=1 a token
    # whose pixels all differ from the background render would be flagged, so check against the label map directly.
    from clusterstm.data.synthetic import render_object_labels

    labels, _ = render_object_labels(rows, config)
    for b in range(6):
        for t in range(2):
            for i in range(16):
                r, c = divmod(i, 4)
                patch = labels[b, 2 * t, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
                assert masks[b, t, i] == bool((patch >= 0).all())
    any_pixel = object_token_masks(rows, config, patch_size=8, min_coverage=1 / 64)
    assert any_pixel.shape == (6, 4, 16) and (any_pixel[:, ::2] >= masks).all() and any_pixel.any(axis=-1).all()
    assert video.shape[1] == 4
    with pytest.raises(ValueError, match="patch_size"):
        object_token_masks(rows, config, patch_size=5)
    with pytest.raises(ValueError, match="tubelet_size"):
        object_token_masks(rows, config, patch_size=8, tubelet_size=3)


def test_object_token_masks_hand_case():
    config = SyntheticVideoTextConfig(num_train=1, image_size=16, num_frames=2)
    obj = {"colour": "red", "shape": "square", "motion": "still", "size": "small"}
    # A square of half-side 0.85 * 4.7 ~ 4 px centred at (4, 4): the top-left 8x8 patch only.
    obj.update(x0=4.0, y0=4.0, x1=4.0, y1=4.0, r0=4.7, r1=4.7)
    masks = object_token_masks([{"objects": [obj]}], config, patch_size=8, min_coverage=0.5)
    assert masks.tolist() == [[[True, False, False, False], [True, False, False, False]]]


# ------------------------------------------------------------------------------------------- MaskCLIP / ClearCLIP
class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)


def test_maskclip_is_the_value_path_hand_case():
    attention = _Attention(2, 1)
    with torch.no_grad():
        attention.v_proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        attention.v_proj.bias.copy_(torch.tensor([0.0, 1.0]))
        attention.out_proj.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        attention.out_proj.bias.zero_()
    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])
    # v = [[1, 5], [3, -1]], out_proj swaps the two channels; no mixing between tokens.
    assert torch.equal(maskclip_tokens(attention, x), torch.tensor([[[5.0, 1.0], [-1.0, 3.0]]]))


def test_clearclip_is_query_query_attention_without_residual():
    torch.manual_seed(0)
    attention = _Attention(8, 2)
    x = torch.randn(3, 5, 8)
    q = attention.q_proj(x).reshape(3, 5, 2, 4).transpose(1, 2)
    v = attention.v_proj(x).reshape(3, 5, 2, 4).transpose(1, 2)
    mixed = torch.softmax(q @ q.transpose(-1, -2) / 2.0, dim=-1) @ v
    expected = attention.out_proj(mixed.transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(clearclip_tokens(attention, x), expected)
    # One token: the attention is trivially 1 and ClearCLIP reduces to MaskCLIP's value path.
    torch.testing.assert_close(clearclip_tokens(attention, x[:, :1]), maskclip_tokens(attention, x[:, :1]))


def _teacher(kind: str) -> ClusterSTMTeacher:
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24))
    else:
        model = SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION))
    return ClusterSTMTeacher(model.eval())


def test_relevance_methods_through_compute_teacher_targets():
    teacher = _teacher("clip")
    pixels = torch.randn(2, 3, 3, 16, 16)
    ids = torch.randint(0, 99, (2, 6))
    results = {
        method: compute_teacher_targets(teacher, pixels, ids, window_size=3, relevance_method=method).relevance
        for method in ("window", "maskclip", "clearclip")
    }
    for method, relevance in results.items():
        assert relevance.shape == (2, 3, 16) and relevance.dtype == torch.float32, method
        assert torch.isfinite(relevance).all() and relevance.abs().max() <= 1.0 + 1e-5
    assert not torch.allclose(results["window"], results["maskclip"])
    assert not torch.allclose(results["maskclip"], results["clearclip"])
    # The MaskCLIP reading, recomputed by hand from the tower: value path of the last layer's normalised input.
    tower = teacher.model.vision_model
    layer = tower.encoder.layers[-1]
    with torch.no_grad():
        hidden = tower(pixel_values=pixels.flatten(0, 1), output_hidden_states=True).hidden_states[-2]
        dense = layer.self_attn.out_proj(layer.self_attn.v_proj(layer.layer_norm1(hidden)))[:, 1:]
        text = teacher.encode_text(ids)
    expected = teacher.relevance(dense.reshape(2, 3, 16, -1), text, window_size=1)
    got = compute_teacher_targets(teacher, pixels, ids, window_size=1, relevance_method="maskclip").relevance
    torch.testing.assert_close(got, expected)


def test_relevance_method_errors():
    pixels = torch.randn(1, 2, 3, 16, 16)
    ids = torch.randint(0, 99, (1, 6))
    with pytest.raises(ValueError, match="relevance_method must be one of"):
        compute_teacher_targets(_teacher("clip"), pixels, ids, window_size=1, relevance_method="gradcam")
    with pytest.raises(ValueError, match="supports only relevance_method='window'"):
        compute_teacher_targets(_teacher("siglip"), pixels, ids, window_size=1, relevance_method="maskclip")


def test_relevance_quality_benchmark_end_to_end(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    vision = {**VISION, "image_size": 64, "patch_size": 16}
    folder = tmp_path / "teacher"
    text = {**TEXT, "max_position_embeddings": 32}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).save_pretrained(folder)
    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "[PAD]": 1, "red": 2, "circle": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "relevance_quality.py"
    spec = importlib.util.spec_from_file_location("relevance_quality", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    argv = ["--teacher", str(folder), "--num_clips", "3", "--window_sizes", "1", "3", "--output_dir", str(out)]
    report = module.main(argv)
    assert [(r["method"], r["window_size"]) for r in report["results"]] == [
        (m, w) for m in ("window", "maskclip", "clearclip") for w in (1, 3)
    ]
    for row in report["results"]:
        assert 0.0 <= row["pointing_game"] <= 1.0 and 0.0 <= row["auc"] <= 1.0
    assert json.loads((out / "relevance_quality.json").read_text())["num_clips"] == 3
    assert "| maskclip | 3x3 |" in (out / "relevance_quality.md").read_text()
    with pytest.raises(ValueError, match="native size"):
        small = tmp_path / "small"
        CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=24)).save_pretrained(small)
        PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(small)
        module.evaluate(str(small), 1, [1], ["window"])
