"""Tests of the frozen CLIP / SigLIP teacher hook."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast, SiglipConfig, SiglipModel

from clusterstm.teacher.relevance import build_window_pooler, generate_relevance
from clusterstm.teacher.teacher import ClusterSTMTeacher, TeacherVideoOutput

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


def save_tiny(kind: str, folder, with_tokenizer: bool = False):
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24))
    else:
        model = SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION))
    model.save_pretrained(folder)
    if with_tokenizer:
        vocab = {"[UNK]": 0, "[PAD]": 1, "a": 2, "dog": 3, "runs": 4}
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny("clip", tmp_path_factory.mktemp("clip"), with_tokenizer=True)


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    return save_tiny("siglip", tmp_path_factory.mktemp("siglip"))


def video(b=2, t=3, size=16):
    torch.manual_seed(1)
    return torch.randn(b, t, 3, size, size)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_frozen_eval_and_shapes(kind, clip_folder, siglip_folder):
    teacher = ClusterSTMTeacher.from_pretrained(clip_folder if kind == "clip" else siglip_folder)
    assert teacher.image_size == 16 and teacher.patch_size == 4
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training and not teacher.model.training
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())

    output = teacher.encode_video(video())
    assert isinstance(output, TeacherVideoOutput)
    assert output.patch_tokens.shape == (2, 3, 16, 32)
    assert output.cls_attention.shape == (2, 3, 16)
    assert output.grid_size == 4
    assert (output.cls_attention >= 0).all()

    input_ids = torch.randint(0, 99, (2, 6))
    text = teacher.encode_text(input_ids, torch.ones_like(input_ids))
    expected_dim = 24 if kind == "clip" else 32
    assert text.shape == (2, expected_dim)
    relevance = teacher.relevance(output.patch_tokens, text)
    assert relevance.shape == (2, 3, 16) and (relevance.abs() <= 1 + 1e-5).all()


def test_clip_outputs_match_the_model(clip_folder):
    teacher = ClusterSTMTeacher.from_pretrained(clip_folder)
    eager = CLIPModel.from_pretrained(clip_folder, attn_implementation="eager").eval()
    pixel_values = video()
    frames = pixel_values.flatten(0, 1)
    output = teacher.encode_video(pixel_values)
    with torch.no_grad():
        reference = eager.vision_model(pixel_values=frames, output_attentions=True)
        attention = reference.attentions[-1][:, :, 0, 1:].mean(dim=1)
        input_ids = torch.randint(0, 99, (2, 5))
        text = eager.get_text_features(input_ids=input_ids).pooler_output
    assert torch.allclose(output.patch_tokens.flatten(0, 1), reference.last_hidden_state[:, 1:], atol=1e-5)
    assert torch.allclose(output.cls_attention.flatten(0, 1), attention, atol=1e-6)
    # CLS -> patch weights exclude the CLS -> CLS weight, so they sum to less than one
    assert (output.cls_attention.sum(-1) < 1).all()
    assert torch.allclose(teacher.encode_text(input_ids), text, atol=1e-6)
    expected = generate_relevance(output.patch_tokens, text, build_window_pooler(eager), window_size=3)
    assert torch.allclose(teacher.relevance(output.patch_tokens, text), expected, atol=1e-5)


def test_siglip_attention_is_the_pooling_head(siglip_folder):
    teacher = ClusterSTMTeacher.from_pretrained(siglip_folder)
    model = SiglipModel.from_pretrained(siglip_folder).eval()
    output = teacher.encode_video(video(b=1, t=2))
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=video(b=1, t=2).flatten(0, 1)).last_hidden_state
        head = model.vision_model.head
        # probe -> patch attention by hand from the packed in-projection
        c, heads = 32, head.attention.num_heads
        w_q, w_k, _ = head.attention.in_proj_weight.split(c)
        b_q, b_k, _ = head.attention.in_proj_bias.split(c)
        q = (head.probe @ w_q.T + b_q).view(1, heads, c // heads)
        k = (hidden @ w_k.T + b_k).view(hidden.shape[0], -1, heads, c // heads)
        scores = torch.einsum("mhd,mnhd->mhn", q.expand(hidden.shape[0], -1, -1), k) / (c // heads) ** 0.5
        expected = scores.softmax(dim=-1).mean(dim=1)
    assert torch.allclose(output.patch_tokens.flatten(0, 1), hidden, atol=1e-5)
    assert torch.allclose(output.cls_attention.flatten(0, 1), expected, atol=1e-6)
    assert torch.allclose(output.cls_attention.sum(-1), torch.ones(1, 2), atol=1e-5)


def test_gradients_never_flow(clip_folder):
    teacher = ClusterSTMTeacher.from_pretrained(clip_folder)
    pixel_values = video().requires_grad_(True)
    with torch.enable_grad():
        output = teacher(pixel_values)
        text = teacher.encode_text(torch.randint(0, 99, (2, 4)))
        relevance = teacher.relevance(output.patch_tokens, text)
    for tensor in (output.patch_tokens, output.cls_attention, text, relevance):
        assert not tensor.requires_grad and tensor.grad_fn is None


def test_tokenizer_model_instance_and_dtype(clip_folder, siglip_folder):
    teacher = ClusterSTMTeacher.from_pretrained(clip_folder)
    assert teacher.tokenizer is not None
    assert teacher.tokenizer("a dog runs")["input_ids"] == [2, 3, 4]
    assert ClusterSTMTeacher.from_pretrained(siglip_folder).tokenizer is None

    model = SiglipModel.from_pretrained(siglip_folder)
    wrapped = ClusterSTMTeacher.from_pretrained(model)
    assert wrapped.model is model and not model.training

    half = ClusterSTMTeacher.from_pretrained(clip_folder, dtype=torch.bfloat16)
    output = half.encode_video(video(b=1, t=2))  # float32 pixels are cast to the teacher's dtype
    assert output.patch_tokens.dtype == torch.bfloat16
    assert torch.isfinite(half.relevance(output.patch_tokens, half.encode_text(torch.tensor([[2, 3, 4]])))).all()


def test_bad_inputs(clip_folder, tmp_path):
    teacher = ClusterSTMTeacher.from_pretrained(clip_folder)
    with pytest.raises(ValueError, match="pixel_values"):
        teacher.encode_video(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="pixel_values"):
        teacher.encode_video(torch.randn(1, 2, 1, 16, 16))
    with pytest.raises(ValueError, match="not found"):
        ClusterSTMTeacher.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="dual-encoder"):
        ClusterSTMTeacher(nn.Linear(2, 2))
