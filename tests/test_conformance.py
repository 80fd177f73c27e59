"""What transformers' common model tests and a transformers user expect of the ClusterSTM classes.

transformers' own `ModelTesterMixin` is not installed with the library and cannot be fetched here, so these are the
project's own checks of the same conventions: input names, gradients of every trainable parameter in each model's
own loss, attention implementations, gradient checkpointing, checkpoint compatibility and `torch.compile`.
"""

import copy
import inspect
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.cache_utils import EncoderDecoderCache

from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
from clusterstm.models.masking_clusterstm import num_visible_tokens
from clusterstm.models.modeling_clusterstm import (
    ClusterSTMForPreTraining,
    ClusterSTMForVideoCaptioning,
    ClusterSTMForVideoQuestionAnswering,
    ClusterSTMForVideoTextRetrieval,
    ClusterSTMModel,
    ClusterSTMPreTrainedModel,
    ClusterSTMTextModel,
    ClusterSTMVisionModel,
    legacy_fusion_key_mapping,
)

torch.set_num_threads(1)

FRAMES, SIDE = 2, 32  # 2 frames of 32x32 (the tower interpolates its position tables): 32 tokens
BATCH = 3


def tiny_config(**kwargs) -> ClusterSTMConfig:
    config = ClusterSTMConfig.from_preset("tiny", **kwargs)
    config.id2label = {0: "red", 1: "green", 2: "blue"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    return config


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 200, (BATCH, 6), generator=generator)
    input_ids[:, 0] = 2
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    input_ids[0, -2:] = 0
    return {
        "pixel_values": torch.randn(BATCH, FRAMES, 3, SIDE, SIDE, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
    }


def grid_tokens(config: ClusterSTMConfig) -> int:
    return (SIDE // config.vision_config.patch_size) ** 2


def random_mask(num_tokens: int, keep: int, seed: int = 1) -> torch.Tensor:
    """A (BATCH, FRAMES, num_tokens) mask keeping `keep` random tokens per frame."""
    order = torch.rand(BATCH, FRAMES, num_tokens, generator=torch.Generator().manual_seed(seed)).argsort(-1)
    return torch.ones(BATCH, FRAMES, num_tokens, dtype=torch.bool).scatter(-1, order[..., :keep], False)


def training_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own training loss on `inputs` (each class's documented objective)."""
    if isinstance(model, ClusterSTMForPreTraining):
        # A pretraining step drops tokens (here half of every frame) and reconstructs the teacher's relevance.
        num_tokens = grid_tokens(model.config)
        relevance = torch.randn(BATCH, FRAMES, num_tokens, generator=torch.Generator().manual_seed(3))
        mask = random_mask(num_tokens, num_tokens // 2)
        return model(**inputs, teacher_relevance=relevance, bool_masked_pos=mask).loss
    if isinstance(model, ClusterSTMForVideoQuestionAnswering):
        return model(**inputs, labels=torch.tensor([0, 2, 1])).loss
    if isinstance(model, ClusterSTMForVideoCaptioning):
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        return model(**inputs, labels=labels).loss
    return model(**inputs, return_loss=True).loss


AUTO_CLASSES = [
    ClusterSTMModel,
    ClusterSTMForPreTraining,
    ClusterSTMForVideoTextRetrieval,
    ClusterSTMForVideoQuestionAnswering,
    ClusterSTMForVideoCaptioning,
]
# What each class deliberately freezes because its own loss never reaches it (documented in the classes).
CONTRASTIVE_PARTS = {
    "clusterstm.visual_projection.weight",
    "clusterstm.text_projection.weight",
    "clusterstm.logit_scale",
}
EXPECTED_FROZEN = {
    ClusterSTMModel: set(),
    ClusterSTMForPreTraining: {"alignment_head.weight", "alignment_head.bias"},  # alignment_loss_weight = 0
    ClusterSTMForVideoTextRetrieval: set(),
    ClusterSTMForVideoQuestionAnswering: CONTRASTIVE_PARTS,
    ClusterSTMForVideoCaptioning: CONTRASTIVE_PARTS,
}


# ------------------------------------------------------------------------------------------------ input conventions
@pytest.mark.parametrize("model_class", AUTO_CLASSES + [ClusterSTMVisionModel, ClusterSTMTextModel])
def test_main_input_name_is_the_first_forward_input(model_class):
    first = list(inspect.signature(model_class.forward).parameters)[1]
    assert model_class.main_input_name == first


def test_get_video_features_takes_pixel_values_videos_and_the_old_alias():
    torch.manual_seed(0)
    model = ClusterSTMModel(tiny_config()).eval()
    pixel_values = batch()["pixel_values"]
    with torch.no_grad():
        new = model.get_video_features(pixel_values_videos=pixel_values).pooler_output
        alias = model.get_video_features(pixel_values=pixel_values).pooler_output
        positional = model.get_video_features(pixel_values).pooler_output
    assert new.shape == (BATCH, model.config.projection_dim)
    torch.testing.assert_close(new, alias)
    torch.testing.assert_close(new, positional)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model.get_video_features(pixel_values_videos=pixel_values, pixel_values=pixel_values)


def test_no_split_modules_name_real_modules():
    model = ClusterSTMForPreTraining(tiny_config())
    present = {type(module).__name__ for module in model.modules()}
    assert set(ClusterSTMPreTrainedModel._no_split_modules) <= present


# ------------------------------------------------------------------------------------- every parameter gets a grad
@pytest.mark.parametrize("model_class", AUTO_CLASSES, ids=lambda c: c.__name__)
def test_training_step_reaches_every_trainable_parameter(model_class):
    torch.manual_seed(0)
    model = model_class(tiny_config()).train()
    training_loss(model, batch()).backward()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == EXPECTED_FROZEN[model_class]
    no_grad = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    # The dual encoder holds no fusion (cross-attention) layer any more.
    if model_class is ClusterSTMModel:
        assert not any("crossattention" in name for name, _ in model.named_parameters())


def test_frozen_objectives_follow_the_loss_weights(tmp_path):
    config = tiny_config(matching_loss_weight=0.0)
    retrieval = ClusterSTMForVideoTextRetrieval(config).train()
    training_loss(retrieval, batch()).backward()
    assert (
        not retrieval.itm_head.weight.requires_grad
        and not retrieval.fusion_model.layer[0].output.dense.weight.requires_grad
    )
    assert all(p.grad is not None for p in retrieval.parameters() if p.requires_grad)
    # from_pretrained re-applies it (loading replaces the parameters)
    retrieval.save_pretrained(tmp_path)
    loaded = ClusterSTMForVideoTextRetrieval.from_pretrained(tmp_path)
    assert not loaded.itm_head.weight.requires_grad
    # a weight changed on a built model takes effect after `sync_objective_trainability`
    pretraining = ClusterSTMForPreTraining(tiny_config())
    assert not pretraining.alignment_head.weight.requires_grad
    pretraining.config.alignment_loss_weight = 1.0
    pretraining.config.relevance_loss_weight = 0.0
    pretraining.sync_objective_trainability()
    assert pretraining.alignment_head.weight.requires_grad
    assert not any(p.requires_grad for p in pretraining.relevance_decoder.parameters())
    # the tied MLM decoder (= word embeddings) is never frozen
    pretraining.config.mlm_loss_weight = 0.0
    pretraining.sync_objective_trainability()
    assert pretraining.mlm_head.decoder.weight.requires_grad and not pretraining.mlm_head.bias.requires_grad


# ---------------------------------------------------------------------------------------- attention implementations
def _outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Deterministic outputs of each class (no sampled objectives), compared across attention implementations."""
    with torch.no_grad():
        if isinstance(model, ClusterSTMForPreTraining):
            out = model(**inputs, teacher_relevance=torch.zeros(BATCH, FRAMES, grid_tokens(model.config)))
            return [out.logits_per_text, out.predicted_relevance]
        if isinstance(model, ClusterSTMForVideoTextRetrieval):
            out = model(**inputs)
            video_tokens = model.encode_videos(inputs["pixel_values"], return_tokens=True)[1]
            return [
                out.logits_per_text,
                model.match_scores(video_tokens, inputs["input_ids"], inputs["attention_mask"]),
            ]
        if isinstance(model, ClusterSTMForVideoCaptioning):
            valid = inputs["attention_mask"].bool()
            return [model(**inputs).logits[valid]]
        if isinstance(model, ClusterSTMForVideoQuestionAnswering):
            return [model(**inputs).logits]
        out = model(**inputs)
        return [out.logits_per_text, out.text_embeds, out.video_embeds]


@pytest.mark.parametrize("implementation", ["sdpa"])
@pytest.mark.parametrize("model_class", AUTO_CLASSES, ids=lambda c: c.__name__)
def test_attention_implementations_agree_with_eager(model_class, implementation):
    torch.manual_seed(0)
    config = tiny_config()
    eager = model_class._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    other = model_class._from_config(copy.deepcopy(config), attn_implementation=implementation).eval()
    other.load_state_dict(eager.state_dict())
    dual_encoder = other if isinstance(other, ClusterSTMModel) else other.clusterstm
    assert dual_encoder.text_model.config._attn_implementation == implementation
    inputs = batch()
    # transformers' common tests compare eager and sdpa in fp32 within 1e-4.
    for a, b in zip(_outputs(eager, inputs), _outputs(other, inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention"])
def test_unverified_attention_implementations_are_not_claimed(implementation):
    assert not getattr(
        ClusterSTMPreTrainedModel,
        {"flash_attention_2": "_supports_flash_attn"}.get(implementation, "_supports_flex_attn"),
    )
    with pytest.raises((ValueError, ImportError)):
        ClusterSTMModel._from_config(tiny_config(), attn_implementation=implementation)


# --------------------------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("model_class", AUTO_CLASSES, ids=lambda c: c.__name__)
def test_gradient_checkpointing_training_step(model_class, use_reentrant):
    torch.manual_seed(0)
    # No dropout and no sampled objectives, so the two runs see the same computation.
    config = tiny_config(matching_loss_weight=0.0, mlm_loss_weight=0.0)
    config.text_config.hidden_dropout_prob = config.text_config.attention_probs_dropout_prob = 0.0
    reference = model_class(config).train()
    checkpointed = copy.deepcopy(reference)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert checkpointed.is_gradient_checkpointing
    dual_encoder = checkpointed if isinstance(checkpointed, ClusterSTMModel) else checkpointed.clusterstm
    assert all(layer.gradient_checkpointing for layer in dual_encoder.vision_model.layers)
    if hasattr(checkpointed, "fusion_model"):
        assert all(layer.gradient_checkpointing for layer in checkpointed.fusion_model.layer)
    inputs = batch()
    losses = []
    for model in (reference, checkpointed):
        loss = training_loss(model, inputs)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), (_, b) in zip(reference.named_parameters(), checkpointed.named_parameters(), strict=True):
        if a.requires_grad:
            assert b.grad is not None, name
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------- checkpoint compatibility
def _to_legacy_layout(model: ClusterSTMPreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict `model` would have had before the fusion layers moved and `logit_scale` became (1,)."""
    prefix = "" if isinstance(model, ClusterSTMModel) else "clusterstm."
    num_text_layers = model.config.text_config.num_hidden_layers - model.config.text_config.num_fusion_layers
    legacy = {}
    for key, value in model.state_dict().items():
        if key == "mlm_head.decoder.weight":
            continue  # tied to the word embeddings, not saved
        if key.startswith("fusion_model.layer."):
            index, rest = key[len("fusion_model.layer.") :].split(".", 1)
            key = f"{prefix}text_model.layer.{num_text_layers + int(index)}.{rest}"
        if key.endswith("logit_scale"):
            value = value.reshape(())
        legacy[key] = value.clone().contiguous()
    return legacy


@pytest.mark.parametrize(
    "model_class", [ClusterSTMForPreTraining, ClusterSTMForVideoCaptioning], ids=lambda c: c.__name__
)
def test_checkpoints_in_the_old_layout_still_load(model_class, tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    model = model_class(config).eval()
    legacy = _to_legacy_layout(model)
    assert legacy["clusterstm.logit_scale"].shape == ()
    assert any(".crossattention." in key and key.startswith("clusterstm.text_model.") for key in legacy)
    config.save_pretrained(tmp_path)
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    loaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)
    assert loaded.clusterstm.logit_scale.shape == (1,)
    # plain torch `load_state_dict` of the old layout
    fresh = model_class(config)
    result = fresh.load_state_dict(legacy, strict=False)
    assert result.missing_keys == ["mlm_head.decoder.weight"] and result.unexpected_keys == []  # tied, not saved
    for name, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, msg=name)
    # saving writes the current layout, not the old one back
    loaded.save_pretrained(tmp_path / "resaved")
    resaved = load_file(str(tmp_path / "resaved" / "model.safetensors"))
    assert resaved["clusterstm.logit_scale"].shape == (1,)
    assert "fusion_model.layer.0.crossattention.self.key.weight" in resaved
    assert not any(".crossattention." in key for key in resaved if key.startswith("clusterstm."))


def test_dual_encoder_loads_head_checkpoints_quietly(tmp_path, caplog):
    torch.manual_seed(0)
    config = tiny_config()
    head = ClusterSTMForVideoTextRetrieval(config)
    save_file(_to_legacy_layout(head), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp_path)
    model, info = ClusterSTMModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # old fusion keys are renamed to `fusion_model.*`, which the dual encoder ignores
    assert not any(key.startswith("fusion_model.") or "text_model.layer" in key for key in info["unexpected_keys"])
    torch.testing.assert_close(model.logit_scale, head.clusterstm.logit_scale)
    mapping = legacy_fusion_key_mapping(config)
    assert len(mapping) == config.text_config.num_fusion_layers


def test_logit_scale_is_a_one_element_parameter():
    """FSDP2's fully_shard refuses 0-d parameters."""
    for model_class in AUTO_CLASSES:
        model = model_class(tiny_config())
        owner = model if isinstance(model, ClusterSTMModel) else model.clusterstm
        assert owner.logit_scale.shape == (1,)
        assert all(p.ndim >= 1 for p in model.parameters())


# ------------------------------------------------------------------------------------------------- torch.compile
def test_pretraining_step_compiles_without_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = tiny_config()
    model = ClusterSTMForPreTraining(config).train()
    inputs = batch()
    num_tokens = grid_tokens(config)
    keep = num_visible_tokens(num_tokens, 0.5)
    mask = random_mask(num_tokens, keep)
    relevance = torch.randn(BATCH, FRAMES, num_tokens)

    def step(pixel_values, input_ids, attention_mask, bool_masked_pos, teacher_relevance):
        return model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            bool_masked_pos=bool_masked_pos,
            teacher_relevance=teacher_relevance,
            num_visible_tokens=keep,
        ).loss

    # fullgraph=True raises on any graph break; the "eager" backend keeps the test fast (capture, not codegen).
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    loss = compiled(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], mask, relevance)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    torch._dynamo.reset()


def test_num_visible_tokens_is_checked_against_the_mask():
    model = ClusterSTMVisionModel(tiny_config().vision_config).eval()
    pixel_values = batch()["pixel_values"]
    num_tokens = FRAMES * grid_tokens(tiny_config())
    mask = torch.zeros(BATCH, num_tokens, dtype=torch.bool)
    mask[:, ::2] = True  # keeps 8 of 16 tokens in every frame
    with torch.no_grad():
        synced = model(pixel_values, bool_masked_pos=mask)
        given = model(pixel_values, bool_masked_pos=mask, num_visible_tokens=8)
    torch.testing.assert_close(synced.last_hidden_state, given.last_hidden_state)
    assert given.last_hidden_state.shape[1] == FRAMES * 8
    with pytest.raises(RuntimeError, match="num_visible_tokens=7"):
        model(pixel_values, bool_masked_pos=mask, num_visible_tokens=7)
    with pytest.raises(ValueError, match="num_visible_tokens must be in"):
        model(pixel_values, bool_masked_pos=mask, num_visible_tokens=0)


# ---------------------------------------------------------------------------------------------------------- generation
def _captioner() -> ClusterSTMForVideoCaptioning:
    torch.manual_seed(0)
    model = ClusterSTMForVideoCaptioning(tiny_config()).eval()
    model.generation_config.bos_token_id = 2
    model.generation_config.eos_token_id = 3
    model.generation_config.pad_token_id = 0
    return model


def test_cached_decoding_step_equals_the_full_forward():
    model = _captioner()
    inputs = batch()
    input_ids = inputs["input_ids"][1:]  # unpadded captions
    video = model.encode_videos(inputs["pixel_values"][1:])
    with torch.no_grad():
        full = model(input_ids=input_ids, video_embeds=video).logits
        prefix = model(input_ids=input_ids[:, :-1], video_embeds=video, use_cache=True)
        cache = prefix.cache
        assert isinstance(cache, EncoderDecoderCache)
        assert cache.get_seq_length() == input_ids.shape[1] - 1
        # the video's cross-attention keys/values were projected once, for the fusion layers only
        first_fusion = model.fusion_model.first_layer_idx
        assert set(cache.is_updated) == set(range(first_fusion, first_fusion + len(model.fusion_model.layer)))
        step = model(input_ids=input_ids[:, -1:], video_embeds=video, cache=cache, use_cache=True)
    torch.testing.assert_close(prefix.logits, full[:, :-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.logits[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_cache_equals_without(num_beams):
    model = _captioner()
    pixel_values = batch()["pixel_values"]
    seen_lengths = []
    hook = model.clusterstm.text_model.embeddings.register_forward_hook(
        lambda module, args, kwargs_output: seen_lengths.append(kwargs_output.shape[1])
    )
    try:
        cached = model.generate(pixel_values=pixel_values, max_new_tokens=6, min_new_tokens=6, num_beams=num_beams)
        cached_lengths, seen_lengths[:] = list(seen_lengths), []
        uncached = model.generate(
            pixel_values=pixel_values, max_new_tokens=6, min_new_tokens=6, num_beams=num_beams, use_cache=False
        )
    finally:
        hook.remove()
    assert cached.tolist() == uncached.tolist()
    assert cached.shape[1] == 7
    # with the cache every step after the first runs one new token; without it the whole prefix
    assert cached_lengths == [1] * 6
    assert seen_lengths == list(range(1, 7))


def test_generate_benchmark_quick_runs(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [
            sys.executable,
            str(repo / "benchmarks" / "bench_generate.py"),
            "--quick",
            "--repeats",
            "1",
            "--output_dir",
            str(tmp_path),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(repo / "src")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "generate.json").read_text())["rows"]
    assert [row["decoding"] for row in rows] == ["greedy", "beam3"] and all(row["same_output"] for row in rows)


def test_init_and_saved_checkpoints_carry_a_generation_config(tmp_path):
    import json

    from transformers import AutoModelForImageTextToText

    from clusterstm.hub.export import init_checkpoint, save_checkpoint
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor

    folder = init_checkpoint("tiny", tmp_path / "init", seed=0)
    processor = ClusterSTMProcessor.from_pretrained(folder)
    tokenizer = processor.tokenizer
    expected = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id}
    expected["pad_token_id"] = tokenizer.pad_token_id
    generation = json.loads((folder / "generation_config.json").read_text())
    assert {k: generation[k] for k in expected} == expected
    # the captioning head generates from the init folder without any token set by hand
    captioner = AutoModelForImageTextToText.from_pretrained(folder).eval()
    sequences = captioner.generate(pixel_values=batch()["pixel_values"], max_new_tokens=3)
    assert sequences[:, 0].tolist() == [tokenizer.cls_token_id] * BATCH
    # every checkpoint save (fine-tuning's final save goes through save_checkpoint) writes it, for any head
    retrieval = ClusterSTMForVideoTextRetrieval.from_pretrained(folder)
    saved = save_checkpoint(retrieval, tmp_path / "retrieval", processor)
    generation = json.loads((saved / "generation_config.json").read_text())
    assert {k: generation[k] for k in expected} == expected


_FSDP2_SCRIPT = r"""
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
from clusterstm.models.modeling_clusterstm import ClusterSTMModel

dist.init_process_group("gloo", store=dist.FileStore(sys.argv[1], 1), rank=0, world_size=1)
torch.manual_seed(0)
model = ClusterSTMModel(ClusterSTMConfig.from_preset("tiny"))
for layer in model.vision_model.layers:
    fully_shard(layer)
fully_shard(model)  # refused a 0-d logit_scale
input_ids = torch.randint(5, 100, (2, 6))
loss = model(input_ids=input_ids, pixel_values=torch.randn(2, 2, 3, 32, 32), return_loss=True).loss
loss.backward()
assert model.logit_scale.grad is not None
print("FSDP2_OK", float(loss))
dist.destroy_process_group()
"""


def test_dual_encoder_trains_under_fsdp2_on_one_cpu_process(tmp_path):
    """FSDP2's `fully_shard` (gloo, one process) accepts every parameter and runs a contrastive step."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "fsdp2.py"
    script.write_text(_FSDP2_SCRIPT)
    src = Path(__file__).resolve().parents[1] / "src"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2_OK" in done.stdout
