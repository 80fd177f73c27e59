"""ClusterSTMForPreTraining: every objective, weights of 0 skip; targets are inputs, the teacher is a separate stage."""

import inspect
from types import SimpleNamespace

import pytest
import torch
from test_modeling import FRAMES, GRID, explicit_mask, inputs, small_config

from clusterstm.models.masking_clusterstm import build_mask
from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining, relevance_reconstruction_loss
from clusterstm.training.pretraining import pretraining_forward

TEACHER_DIM = 64  # tiny preset teacher_hidden_size


class FakeTeacher:
    """Test double with the ClusterSTMTeacher interface: deterministic tokens, counts its calls."""

    def __init__(self, grid_tokens=GRID, dim=TEACHER_DIM):
        self.grid_tokens = grid_tokens
        self.dim = dim
        self.calls = {"encode_video": 0, "encode_text": 0, "relevance": 0}
        self.weight = torch.nn.Parameter(torch.ones(1))  # must never end up in the student's state_dict
        self.tokenizer = None

    def eval(self):
        return self

    def encode_video(self, pixel_values):
        self.calls["encode_video"] += 1
        batch, frames = pixel_values.shape[:2]
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randn(batch, frames, self.grid_tokens, self.dim, generator=generator) * self.weight
        return SimpleNamespace(
            patch_tokens=tokens, cls_attention=tokens.abs().mean(-1), grid_size=int(self.grid_tokens**0.5)
        )

    def encode_text(self, input_ids, attention_mask):
        self.calls["encode_text"] += 1
        return torch.nn.functional.normalize(torch.ones(input_ids.shape[0], self.dim), dim=-1)

    def relevance(self, patch_tokens, text_embeds, window_size):
        self.calls["relevance"] += 1
        return torch.nn.functional.cosine_similarity(patch_tokens, text_embeds[:, None, None, :], dim=-1)


def pretraining_model(**kwargs):
    torch.manual_seed(0)
    defaults = {"alignment_loss_weight": 1.0}
    defaults.update(kwargs)
    return ClusterSTMForPreTraining(small_config(**defaults)).train()


def masking(strategy="random", ratio=0.5, features="teacher", seed=0):
    """The masking settings the training step reads (as on `PretrainingArguments`)."""
    return SimpleNamespace(
        mask_strategy=strategy, mask_ratio=ratio, dc_ratio=0.02, dpc_k=5, mask_features=features, seed=seed
    )


def random_mask(batch_size=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return build_mask(
        "random", batch_size=batch_size, num_frames=FRAMES, num_patches=GRID, mask_ratio=0.5, generator=generator
    )


def teacher_tensors(batch_size=3):
    generator = torch.Generator().manual_seed(1)
    return {
        "teacher_patch_tokens": torch.randn(batch_size, FRAMES, GRID, TEACHER_DIM, generator=generator),
        "teacher_relevance": torch.rand(batch_size, FRAMES, GRID, generator=generator),
    }


@pytest.mark.parametrize("relevance_loss", ["mse", "zscore_mse", "kl"])
@pytest.mark.parametrize("relevance_tokens", ["all", "masked", "visible"])
def test_all_losses_finite_and_backward(relevance_loss, relevance_tokens):
    model = pretraining_model(relevance_loss=relevance_loss, relevance_tokens=relevance_tokens)
    pixel_values, input_ids, attention_mask = inputs()
    out = model(
        pixel_values=pixel_values,
        input_ids=input_ids,
        attention_mask=attention_mask,
        bool_masked_pos=random_mask(),
        **teacher_tensors(),
    )
    for name in ("loss", "contrastive_loss", "relevance_loss", "matching_loss", "mlm_loss", "alignment_loss"):
        value = getattr(out, name)
        assert value is not None and value.ndim == 0 and torch.isfinite(value), name
    expected = out.contrastive_loss + out.relevance_loss + out.matching_loss + out.mlm_loss + out.alignment_loss
    torch.testing.assert_close(out.loss, expected)
    assert out.predicted_relevance.shape == (3, FRAMES, GRID)
    assert out.bool_masked_pos.shape == (3, FRAMES, GRID)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_zero_weights_skip_computation():
    model = pretraining_model(
        relevance_loss_weight=0.0, matching_loss_weight=0.0, mlm_loss_weight=0.0, alignment_loss_weight=0.0
    )
    calls = {"decoder": 0, "itm": 0, "mlm": 0}
    model.relevance_decoder.register_forward_hook(lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))
    model.itm_head.register_forward_hook(lambda *a: calls.__setitem__("itm", calls["itm"] + 1))
    model.mlm_head.register_forward_hook(lambda *a: calls.__setitem__("mlm", calls["mlm"] + 1))
    pixel_values, input_ids, attention_mask = inputs()
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    assert calls == {"decoder": 0, "itm": 0, "mlm": 0}
    assert out.relevance_loss is None and out.matching_loss is None and out.mlm_loss is None
    assert out.alignment_loss is None and out.predicted_relevance is None
    torch.testing.assert_close(out.loss, out.contrastive_loss)


def test_missing_relevance_target_raises():
    model = pretraining_model(alignment_loss_weight=0.0)
    pixel_values, input_ids, attention_mask = inputs()
    with pytest.raises(ValueError, match="teacher_relevance"):
        model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)


def test_explicit_mask_and_relevance_token_selection():
    model = pretraining_model(relevance_loss="mse", relevance_tokens="masked", alignment_loss_weight=0.0).eval()
    pixel_values, input_ids, attention_mask = inputs()
    mask = explicit_mask(3)
    targets = teacher_tensors()
    with torch.no_grad():
        out = model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            bool_masked_pos=mask,
            **targets,
        )
    assert torch.equal(out.bool_masked_pos, mask)
    expected = relevance_reconstruction_loss(
        out.predicted_relevance.reshape(3, -1), targets["teacher_relevance"].reshape(3, -1), mask.reshape(3, -1), "mse"
    )
    torch.testing.assert_close(out.relevance_loss, expected)
    only_masked = ((out.predicted_relevance - targets["teacher_relevance"]) ** 2)[mask].mean()
    torch.testing.assert_close(out.relevance_loss, only_masked)


def test_relevance_loss_forms():
    target = torch.tensor([[0.1, 0.5, 0.9, 0.3]])
    assert relevance_reconstruction_loss(target, target, None, "mse") == 0
    # z-scored MSE ignores affine changes of the prediction; KL of identical distributions is 0
    assert relevance_reconstruction_loss(2 * target + 1, target, None, "zscore_mse") < 1e-8
    assert relevance_reconstruction_loss(target, target, None, "kl").abs() < 1e-6
    assert relevance_reconstruction_loss(target.flip(-1), target, None, "kl") > 0


def test_forward_with_explicit_targets_uses_them():
    """The targets are plain inputs: the relevance loss is computed against exactly the given map."""
    model = pretraining_model(relevance_loss="mse", alignment_loss_weight=0.0).eval()
    pixel_values, input_ids, attention_mask = inputs()
    targets = teacher_tensors()
    with torch.no_grad():
        out = model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            teacher_relevance=targets["teacher_relevance"],
        )
        shifted = model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            teacher_relevance=targets["teacher_relevance"] + 1.0,
        )
    expected = ((out.predicted_relevance - targets["teacher_relevance"]) ** 2).mean()
    torch.testing.assert_close(out.relevance_loss, expected)
    assert shifted.relevance_loss > out.relevance_loss
    assert out.bool_masked_pos is None  # no mask given: nothing dropped, in training or eval


def test_model_never_holds_a_teacher():
    model = pretraining_model()
    for name in ("set_teacher", "teacher", "_teacher_targets"):
        assert not hasattr(model, name), name
    parameters = inspect.signature(ClusterSTMForPreTraining.forward).parameters
    assert {"teacher_relevance", "teacher_patch_tokens", "bool_masked_pos"} <= set(parameters)
    assert not {"teacher_input_ids", "teacher_pixel_values", "teacher_cls_attention", "mask_generator"} & set(
        parameters
    )


def test_teacher_stage_computes_targets_once_and_nothing_is_saved(tmp_path):
    model = pretraining_model()
    teacher = FakeTeacher()
    pixel_values, input_ids, attention_mask = inputs()
    batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
    out = pretraining_forward(model, batch, masking("cluster"), step=0, sample_offset=0, teacher=teacher)
    # one teacher pass serves the relevance, the alignment targets and the cluster mask's features
    assert teacher.calls == {"encode_video": 1, "encode_text": 1, "relevance": 1}
    assert torch.isfinite(out.relevance_loss) and torch.isfinite(out.alignment_loss)
    assert ((~out.bool_masked_pos).sum(-1) == GRID // 2).all()
    assert teacher.weight.grad is None  # computed under no_grad
    # the cluster mask is the one build_mask computes from the teacher's tokens
    tokens = teacher.encode_video(pixel_values).patch_tokens
    expected = build_mask(
        "cluster", batch_size=3, num_frames=FRAMES, num_patches=GRID, mask_ratio=0.5, features=tokens
    )
    assert torch.equal(out.bool_masked_pos, expected)
    # targets already in the batch (a cache) are used instead of calling the teacher
    calls = dict(teacher.calls)
    pretraining_forward(model, {**batch, **teacher_tensors()}, masking("random"), 0, 0, teacher=teacher)
    assert teacher.calls == calls

    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    assert not any("teacher" in key for key in saved)
    loaded = ClusterSTMForPreTraining.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    assert loaded.mlm_head.decoder.weight.data_ptr() == (
        loaded.clusterstm.text_model.embeddings.word_embeddings.weight.data_ptr()
    )


def test_teacher_grid_mismatch_names_both_grids():
    model = pretraining_model(alignment_loss_weight=0.0)
    pixel_values, input_ids, attention_mask = inputs()
    batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
    with pytest.raises(ValueError, match=r"\(4, 9\).*\(4, 16\)"):
        pretraining_forward(model, batch, masking("random"), 0, 0, teacher=FakeTeacher(grid_tokens=9))
    with pytest.raises(ValueError, match=r"cluster.*features.*\(3, 4, 9, 64\).*\(3, 4, 16\)"):
        pretraining_forward(model, batch, masking("cluster"), 0, 0, teacher=FakeTeacher(grid_tokens=9))


def test_attention_strategy_uses_teacher_cls_attention():
    model = pretraining_model(alignment_loss_weight=0.0)
    pixel_values, input_ids, attention_mask = inputs()
    batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
    out = pretraining_forward(model, batch, masking("attention"), 0, 0, teacher=FakeTeacher())
    assert ((~out.bool_masked_pos).sum(-1) == GRID // 2).all()
    with pytest.raises(ValueError, match="attention"):
        pretraining_forward(model, {**batch, **teacher_tensors()}, masking("attention"), 0, 0, teacher=None)


def test_images_train_through_the_same_path():
    model = pretraining_model()
    pixel_values, input_ids, attention_mask = inputs(frames=1)
    targets = {
        "teacher_patch_tokens": torch.randn(3, 1, GRID, TEACHER_DIM),
        "teacher_relevance": torch.rand(3, 1, GRID),
    }
    batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask, **targets}
    out = pretraining_forward(model, batch, masking("cluster", features="patch"), 0, 0)
    assert torch.isfinite(out.loss) and out.predicted_relevance.shape == (3, 1, GRID)
    assert ((~out.bool_masked_pos).sum(-1) == GRID // 2).all()
    out.loss.backward()


def test_mlm_masks_only_content_tokens():
    model = pretraining_model()
    _, input_ids, attention_mask = inputs(batch_size=64, seq=10)
    masked_ids, labels = model._mask_text_tokens(input_ids, attention_mask)
    assert (labels[:, 0] == -100).all()  # [CLS]
    assert (labels[attention_mask == 0] == -100).all()
    chosen = labels != -100
    assert 0.05 < chosen.float().mean() < 0.25
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert (masked_ids[chosen] == model.config.mask_token_id).float().mean() > 0.6
    assert torch.equal(masked_ids[~chosen], input_ids[~chosen])


def test_single_pair_batch_skips_matching():
    model = pretraining_model()
    pixel_values, input_ids, attention_mask = inputs(batch_size=1)
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **teacher_tensors(1))
    assert out.matching_loss is None and torch.isfinite(out.loss)


def test_pretraining_loss_decreases():
    model = pretraining_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    pixel_values, input_ids, attention_mask = inputs(batch_size=4)
    targets = teacher_tensors(4)
    losses = []
    for _ in range(10):
        torch.manual_seed(0)  # same MLM masking and hard negatives every step
        out = model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            bool_masked_pos=random_mask(4),
            **targets,
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert max(losses[-3:]) < losses[0] * 0.9, losses
