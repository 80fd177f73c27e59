"""Tests of the downstream heads: retrieval (with matching re-ranking and dual-softmax), video QA, captioning."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
from clusterstm.models.modeling_clusterstm import (
    ClusterSTMForPreTraining,
    ClusterSTMForVideoCaptioning,
    ClusterSTMForVideoQuestionAnswering,
    ClusterSTMForVideoTextRetrieval,
)

torch.set_num_threads(1)

RetrievalHead = ClusterSTMForVideoTextRetrieval
QAHead = ClusterSTMForVideoQuestionAnswering
CaptionHead = ClusterSTMForVideoCaptioning
HEADS = {"retrieval": RetrievalHead, "qa": QAHead, "captioning": CaptionHead}

BOS, EOS, PAD = 2, 3, 0


def tiny_config(**kwargs) -> ClusterSTMConfig:
    config = ClusterSTMConfig.from_preset("tiny", **kwargs)
    config.id2label = {0: "red", 1: "green", 2: "blue", 3: "yes", 4: "no"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    return config


def video_batch(batch_size: int = 3, seed: int = 0) -> torch.Tensor:
    # Two frames of 32x32 (the tower interpolates its 8x64x64 position tables): 32 tokens, fast on a CPU.
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 2, 3, 32, 32, generator=generator)


def text_batch(batch_size: int = 3, length: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 200, (batch_size, length), generator=generator)
    input_ids[:, 0] = BOS
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0  # one padded caption
    input_ids[0, -2:] = PAD
    return input_ids, attention_mask


def caption_model(config=None) -> torch.nn.Module:
    model = CaptionHead(config or tiny_config())
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    return model.eval()


# ---------------------------------------------------------------------------------------------------------- retrieval
def test_retrieval_forward_loss_and_backward():
    torch.manual_seed(0)
    model = RetrievalHead(tiny_config(matching_loss_weight=0.5))
    pixel_values = video_batch()
    input_ids, attention_mask = text_batch()
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True)
    assert out.logits_per_text.shape == (3, 3) and out.logits_per_video.shape == (3, 3)
    assert out.video_embeds.shape == (3, 64) and out.text_embeds.shape == (3, 64)
    torch.testing.assert_close(out.video_embeds.norm(dim=-1), torch.ones(3))
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.contrastive_loss + 0.5 * out.matching_loss)
    out.loss.backward()
    assert model.itm_head.weight.grad is not None and model.itm_head.weight.grad.abs().sum() > 0
    assert model.clusterstm.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0

    # Without return_loss there is no loss; with a zero matching weight the matching head is skipped.
    assert model(pixel_values=pixel_values, input_ids=input_ids).loss is None
    model.config.matching_loss_weight = 0.0
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True)
    assert out.matching_loss is None
    torch.testing.assert_close(out.loss, out.contrastive_loss)


def test_retrieval_bad_batch_raises():
    model = RetrievalHead(tiny_config())
    input_ids, _ = text_batch(2)
    with pytest.raises(ValueError, match="batch size"):
        model(pixel_values=video_batch(3), input_ids=input_ids)


def test_retrieval_encoders_match_forward():
    torch.manual_seed(0)
    model = RetrievalHead(tiny_config()).eval()
    pixel_values = video_batch()
    input_ids, attention_mask = text_batch()
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        video_embeds, tokens = model.encode_videos(pixel_values, return_tokens=True)
        text_embeds = model.encode_texts(input_ids, attention_mask)
    torch.testing.assert_close(video_embeds, out.video_embeds)
    torch.testing.assert_close(text_embeds, out.text_embeds)
    assert tokens.shape == (3, 2 * 16, 128)
    sim = model.similarity(text_embeds, video_embeds)
    torch.testing.assert_close(sim * model.clusterstm.scaled_logit_scale(), out.logits_per_text)


def test_rerank_top1_changes_nothing_and_topk_follows_matching_head():
    torch.manual_seed(0)
    model = RetrievalHead(tiny_config()).eval()
    pixel_values = video_batch(4)
    input_ids, attention_mask = text_batch(4)
    with torch.no_grad():
        video_embeds, tokens = model.encode_videos(pixel_values, return_tokens=True)
        sim = model.similarity(model.encode_texts(input_ids, attention_mask), video_embeds)
        top1 = model.rerank(sim, tokens, input_ids, attention_mask, top_k=1)
        full = model.rerank(sim, tokens, input_ids, attention_mask, top_k=4)
        v2t = model.rerank(sim.t(), tokens, input_ids, attention_mask, top_k=2, direction="v2t")
        # Matching probabilities of every (text, video) pair, computed pair by pair.
        probs = torch.stack(
            [
                model.match_scores(tokens, input_ids[t : t + 1].expand(4, -1), attention_mask[t : t + 1].expand(4, -1))
                for t in range(4)
            ]
        )
    assert torch.equal(top1.argsort(dim=1, descending=True), sim.argsort(dim=1, descending=True))
    # top_k = all candidates: the order is the matching head's order.
    assert torch.equal(full.argsort(dim=1, descending=True), probs.argsort(dim=1, descending=True))
    # v2t: the two best texts of each video are lifted above the rest, the rest keep their scores.
    assert v2t.shape == (4, 4)
    top2 = sim.t().topk(2, dim=1).indices
    for v in range(4):
        lifted = set(top2[v].tolist())
        rest = [t for t in range(4) if t not in lifted]
        assert v2t[v, list(lifted)].min() > v2t[v, rest].max()
        torch.testing.assert_close(v2t[v, rest], sim.t()[v, rest])
    # Fusion "sum": the top-k ordered by matching log-odds + first-stage score.
    with torch.no_grad():
        summed = model.rerank(sim, tokens, input_ids, attention_mask, top_k=4, fusion="sum")
    expected = torch.logit(probs, eps=1e-6) + sim
    assert torch.equal(summed.argsort(dim=1, descending=True), expected.argsort(dim=1, descending=True))
    with pytest.raises(ValueError, match="fusion"):
        model.rerank(sim, tokens, input_ids, attention_mask, top_k=2, fusion="product")
    with pytest.raises(ValueError, match="direction"):
        model.rerank(sim, tokens, input_ids, attention_mask, top_k=2, direction="both")
    with pytest.raises(ValueError, match="top_k"):
        model.rerank(sim, tokens, input_ids, attention_mask, top_k=0)


def test_dual_softmax_flag():
    # Video 0 is a "hub": texts 0 and 1 both score it highest, but text 1 is also the best text of video 1.
    # With identity video embeddings, the similarity rows are the text embeddings themselves.
    text_embeds = torch.tensor([[0.9, 0.1, 0.1], [0.85, 0.8, 0.1], [0.1, 0.1, 0.9]])
    video_embeds = torch.eye(3)
    plain = RetrievalHead.similarity(text_embeds, video_embeds)
    dsl = RetrievalHead.similarity(text_embeds, video_embeds, dual_softmax=True, temperature=100.0)
    torch.testing.assert_close(dsl, plain * torch.softmax(100.0 * plain, dim=0))
    dsl_v2t = RetrievalHead.similarity(text_embeds, video_embeds, dual_softmax=True, direction="v2t")
    torch.testing.assert_close(dsl_v2t, plain * torch.softmax(100.0 * plain, dim=1))
    assert not torch.equal(plain.argmax(dim=1), dsl.argmax(dim=1))
    assert torch.equal(dsl.argmax(dim=1), torch.arange(3))
    with pytest.raises(ValueError, match="direction"):
        RetrievalHead.similarity(text_embeds, video_embeds, direction="x")


# ---------------------------------------------------------------------------------------------------------- QA
def test_qa_forward_loss_ignores_out_of_vocabulary_labels():
    torch.manual_seed(0)
    model = QAHead(tiny_config())
    assert model.qa_head.classifier.out_features == 5
    pixel_values = video_batch()
    input_ids, attention_mask = text_batch()
    labels = torch.tensor([0, 4, -100])
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (3, 5)
    expected = torch.nn.functional.cross_entropy(out.logits[:2], labels[:2])
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.qa_head.classifier.weight.grad.abs().sum() > 0
    # Cross-attention to the video: the video changes the answer scores.
    with torch.no_grad():
        other = model(pixel_values=video_batch(seed=1), input_ids=input_ids, attention_mask=attention_mask)
    assert not torch.allclose(other.logits, out.logits.detach())
    # All labels out of vocabulary: a zero (finite) loss, not NaN.
    out = model(pixel_values=pixel_values, input_ids=input_ids, labels=torch.full((3,), -100))
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0


# ---------------------------------------------------------------------------------------------------------- captioning
def test_captioning_teacher_forcing_loss_and_causality():
    torch.manual_seed(0)
    model = CaptionHead(tiny_config())
    pixel_values = video_batch()
    input_ids, attention_mask = text_batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (3, 6, 1000)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 1000), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.clusterstm.text_model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    # The LM head is tied to the word embeddings.
    assert model.mlm_head.decoder.weight is model.clusterstm.text_model.embeddings.word_embeddings.weight

    model.eval()
    with torch.no_grad():
        changed = input_ids.clone()
        changed[:, 4] = 7
        a = model(pixel_values=pixel_values, input_ids=input_ids).logits
        b = model(pixel_values=pixel_values, input_ids=changed).logits
    # Causal: positions before the change see the same prefix.
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_generate_greedy_equals_manual_argmax_loop():
    torch.manual_seed(0)
    model = caption_model()
    pixel_values = video_batch(2)
    steps = 5
    with torch.no_grad():
        generated = model.generate(pixel_values=pixel_values, max_new_tokens=steps, min_new_tokens=steps)
        video_embeds = model.encode_videos(pixel_values)
        sequence = torch.full((2, 1), BOS)
        for _ in range(steps):
            logits = model(input_ids=sequence, video_embeds=video_embeds).logits[:, -1]
            logits[:, EOS] = -float("inf")  # min_new_tokens forbids stopping early
            sequence = torch.cat([sequence, logits.argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)


def test_generate_beam_search_returns_valid_sequences():
    torch.manual_seed(0)
    model = caption_model()
    pixel_values = video_batch(2)
    with torch.no_grad():
        beams = model.generate(pixel_values=pixel_values, num_beams=3, num_return_sequences=2, max_new_tokens=4)
        out = model.generate(
            pixel_values=pixel_values, num_beams=3, max_new_tokens=4, output_scores=True, return_dict_in_generate=True
        )
    assert beams.shape[0] == 4 and 2 <= beams.shape[1] <= 5
    assert torch.all(beams[:, 0] == BOS)
    assert beams.min() >= 0 and beams.max() < 1000
    # The best beam's score is the length-normalised log-probability of its tokens under the model.
    sequence = out.sequences[:1]
    with torch.no_grad():
        logprobs = model(pixel_values=pixel_values[:1], input_ids=sequence).logits.log_softmax(-1)
    tokens = sequence[0, 1:]
    keep = tokens != PAD
    total = logprobs[0, :-1].gather(-1, tokens[:, None])[:, 0][keep].sum()
    torch.testing.assert_close(out.sequences_scores[0], total / keep.sum(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pixel_values"):
        model.generate(max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("task", ["retrieval", "qa", "captioning"])
def test_save_load_equivalence(task, tmp_path):
    torch.manual_seed(0)
    cls = HEADS[task]
    model = cls(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path).eval()
    pixel_values = video_batch(2)
    input_ids, attention_mask = text_batch(2)
    with torch.no_grad():
        a = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        b = reloaded(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    key = "logits_per_text" if task == "retrieval" else "logits"
    torch.testing.assert_close(a[key], b[key])
    if task == "qa":
        assert reloaded.config.id2label[2] == "blue"


def test_heads_load_pretraining_checkpoint_and_initialise_new_weights(tmp_path):
    torch.manual_seed(0)
    pretrained = ClusterSTMForPreTraining(tiny_config())
    pretrained.save_pretrained(tmp_path)
    retrieval = RetrievalHead.from_pretrained(tmp_path)
    torch.testing.assert_close(retrieval.itm_head.weight, pretrained.itm_head.weight)
    torch.testing.assert_close(
        retrieval.clusterstm.visual_projection.weight, pretrained.clusterstm.visual_projection.weight
    )
    caption = CaptionHead.from_pretrained(tmp_path)
    torch.testing.assert_close(caption.mlm_head.dense.weight, pretrained.mlm_head.dense.weight)
    qa = QAHead.from_pretrained(tmp_path, config=tiny_config())
    torch.testing.assert_close(
        qa.fusion_model.layer[-1].crossattention.self.query.weight,
        pretrained.fusion_model.layer[-1].crossattention.self.query.weight,
    )
    # The new QA head is initialised by _init_weights (normal(0, 0.02) linears, unit LayerNorm), not left empty.
    head = qa.qa_head
    assert torch.equal(head.LayerNorm.weight, torch.ones_like(head.LayerNorm.weight))
    assert torch.equal(head.classifier.bias, torch.zeros_like(head.classifier.bias))
    assert 0.01 < head.dense.weight.std().item() < 0.03
    for model in (retrieval, caption, qa):
        for name, param in model.named_parameters():
            assert torch.isfinite(param).all(), name


_REMOTE_SCRIPT = r"""
import json, sys


class BlockClusterSTM:
    # The package must not be importable: the checkpoint's own flat files are the only source of the classes.
    def find_spec(self, name, path=None, target=None):
        if name == "clusterstm" or name.startswith("clusterstm."):
            raise ImportError("clusterstm is blocked in this process")


sys.meta_path.insert(0, BlockClusterSTM())
import torch
from transformers import AutoModelForImageTextToText

model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
pixel_values = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    sequences = model.generate(pixel_values=pixel_values, max_new_tokens=4, num_beams=2)
print("RESULT=" + json.dumps({"module": type(model).__module__, "sequences": sequences.tolist()}))
"""


def test_captioning_head_generates_as_remote_code(tmp_path):
    """A saved captioning checkpoint loads through AutoModelForImageTextToText as remote code (package blocked) and
    beam-searches the same captions."""
    import json
    import subprocess
    import sys

    from clusterstm.hub.export import save_checkpoint

    torch.manual_seed(0)
    model = caption_model()
    save_checkpoint(model, tmp_path / "ckpt")
    pixel_values = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.generate(pixel_values=pixel_values, max_new_tokens=4, num_beams=2).tolist()
    script = tmp_path / "load.py"
    script.write_text(_REMOTE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT=", 1)[1])
    assert result["module"].startswith("transformers_modules")
    assert result["sequences"] == expected
