"""End-to-end tests of `scripts/finetune.py` / `run_finetuning` on the tiny config, data formats, baselines and the
distributed-safe evaluation loops."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

from clusterstm.hub.export import init_checkpoint
from clusterstm.tasks.metrics import retrieval_metrics
from clusterstm.training.finetuning import (
    ClusterSTMDataCollator,
    ClusterSTMTrainer,
    DataArguments,
    ModelArguments,
    VideoCaptions,
    VideoQuestions,
    baseline_metrics,
    build_answer_vocabulary,
    chance_retrieval_metrics,
    load_video_captions,
    load_video_questions,
    nearest_neighbour_captions,
    run_finetuning,
    validate_arguments,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A from-scratch tiny checkpoint folder (random weights, processor, synthetic-vocabulary tokenizer)."""
    return init_checkpoint("tiny", tmp_path_factory.mktemp("tiny_init"))


def training_args(output_dir, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def synthetic_data_args(**kwargs) -> DataArguments:
    defaults = dict(dataset_name="synthetic", synthetic_num_train=8, synthetic_num_eval=6, num_frames=2)
    defaults.update(kwargs)
    return DataArguments(**defaults)


# ---------------------------------------------------------------------------------------------------------- end to end
def test_retrieval_end_to_end(tiny_checkpoint, tmp_path):
    model_args = ModelArguments(
        task="retrieval", model_name_or_path=str(tiny_checkpoint), rerank_top_k=3, dual_softmax=True
    )
    args = training_args(tmp_path, do_train=True, do_eval=True)
    results = run_finetuning(model_args, synthetic_data_args(compute_baselines=True), args)
    assert args.remove_unused_columns is False
    assert np.isfinite(results["train_loss"])
    for direction in ("t2v", "v2t"):
        for prefix in ("eval_", "eval_dsl_", "eval_rerank_"):
            for k in ("r1", "r5", "r10"):
                assert 0.0 <= results[f"{prefix}{direction}_{k}"] <= 100.0
            assert 1.0 <= results[f"{prefix}{direction}_meanr"] <= 6.0
            assert results[f"{prefix}{direction}_r5"] >= results[f"{prefix}{direction}_r1"]
    assert results["eval_num_videos"] == 6 and results["eval_num_texts"] == 6
    assert results["eval_t2v_r10"] == 100.0  # 6 videos: everything is in the top 10
    assert results["eval_baseline_chance_t2v_r1"] == pytest.approx(100.0 / 6)
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved["eval_t2v_r1"] == results["eval_t2v_r1"]
    assert all(key.startswith("eval_") or key == "epoch" for key in saved)
    all_results = json.loads((tmp_path / "all_results.json").read_text())
    assert "train_loss" in all_results and "eval_t2v_r1" in all_results
    # The fine-tuned folder reloads as the retrieval head, with the processor.
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["ClusterSTMForVideoTextRetrieval"]
    assert (tmp_path / "tokenizer.json").exists()
    # ... as a remote-code checkpoint: the flat files travel with it and AutoModel maps to the retrieval head.
    assert (tmp_path / "modeling_clusterstm.py").exists() and (tmp_path / "configuration_clusterstm.py").exists()
    assert config["auto_map"]["AutoModel"] == "modeling_clusterstm.ClusterSTMForVideoTextRetrieval"
    from clusterstm.training.finetuning import head_class

    _, info = head_class("retrieval").from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_qa_end_to_end(tiny_checkpoint, tmp_path):
    model_args = ModelArguments(task="qa", model_name_or_path=str(tiny_checkpoint))
    args = training_args(tmp_path, do_train=True, do_eval=True, do_predict=True)
    results = run_finetuning(model_args, synthetic_data_args(compute_baselines=True), args)
    assert 0.0 <= results["eval_accuracy"] <= 100.0
    assert results["eval_num_samples"] == results["eval_samples"] > 6  # several questions per clip
    assert {"eval_accuracy_count", "eval_accuracy_exists"} <= set(results)
    assert 0.0 <= results["eval_baseline_majority_accuracy"] <= 100.0
    assert 0.0 <= results["predict_accuracy"] <= 100.0
    config = json.loads((tmp_path / "config.json").read_text())
    # The answer vocabulary is stored in the config.
    assert set(config["label2id"]) <= set(json.loads(json.dumps(config["id2label"])).values())
    assert config["auto_map"]["AutoModelForVisualQuestionAnswering"].endswith("ClusterSTMForVideoQuestionAnswering")
    answers = json.loads((tmp_path / "predict_answers.json").read_text())
    assert len(answers) == results["predict_samples"]
    assert all(a["prediction"] in config["label2id"] for a in answers)
    # Evaluating the fine-tuned folder again keeps its answer vocabulary (the classifier rows follow it): same score.
    reeval = run_finetuning(
        ModelArguments(task="qa", model_name_or_path=str(tmp_path)),
        synthetic_data_args(),
        training_args(tmp_path / "reeval", do_eval=True),
    )
    assert reeval["eval_accuracy"] == pytest.approx(results["eval_accuracy"])


def test_captioning_end_to_end(tiny_checkpoint, tmp_path):
    model_args = ModelArguments(
        task="captioning",
        model_name_or_path=str(tiny_checkpoint),
        max_new_tokens=4,
        num_beams=2,
        caption_tokenizer="python",
    )
    args = training_args(tmp_path, do_train=True, do_eval=True)
    results = run_finetuning(model_args, synthetic_data_args(synthetic_num_eval=4, compute_baselines=True), args)
    for key in ("eval_bleu_4", "eval_rouge_l", "eval_cider", "eval_baseline_nn_cider"):
        assert np.isfinite(results[key]) and results[key] >= 0.0
    assert results["eval_tokenizer"] == "python"
    captions = json.loads((tmp_path / "eval_captions.json").read_text())
    assert len(captions) == 4 and all(isinstance(c["prediction"], str) for c in captions)
    assert all(len(c["references"]) == 1 for c in captions)


def test_script_zero_shot_retrieval_on_local_files(tiny_checkpoint, tmp_path):
    """`--do_eval` without `--do_train` on a checkpoint = zero-shot retrieval, here on MSR-VTT-style local files."""
    from clusterstm.data.synthetic import (
        SyntheticVideoTextConfig,
        generate_split_metadata,
        render_clips,
        write_video_pyav,
    )

    config = SyntheticVideoTextConfig(
        num_frames=4, image_size=32, num_train=0, num_val=3, num_test=0, num_compositional=0
    )
    rows = generate_split_metadata(config, "validation")
    video_root = tmp_path / "videos"
    video_root.mkdir()
    for row, clip in zip(rows, render_clips(rows, config)):
        write_video_pyav(video_root / f"{row['video_id']}.mp4", clip, fps=4)
    annotations = [
        {"video": f"{rows[0]['video_id']}.mp4", "caption": rows[0]["caption"]},
        {"video": f"{rows[0]['video_id']}.mp4", "caption": "a second caption of the first clip"},
        {"video_id": rows[1]["video_id"], "sentences": [rows[1]["caption"], "another one"]},
        {"video_id": rows[2]["video_id"], "captions": [rows[2]["caption"]]},
    ]
    annotation_file = tmp_path / "retrieval.json"
    annotation_file.write_text(json.dumps(annotations))
    output_dir = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "finetune.py"),
        "--task",
        "retrieval",
        "--model_name_or_path",
        str(tiny_checkpoint),
        "--validation_file",
        str(annotation_file),
        "--video_root",
        str(video_root),
        "--num_frames",
        "2",
        "--do_eval",
        "--per_device_eval_batch_size",
        "2",
        "--output_dir",
        str(output_dir),
        "--report_to",
        "none",
        "--use_cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["eval_num_videos"] == 3 and results["eval_num_texts"] == 5
    assert results["eval_num_captions_per_video"] == pytest.approx(5 / 3)
    for key in ("eval_t2v_r1", "eval_v2t_r1", "eval_t2v_medr", "eval_v2t_meanr"):
        assert key in results
    assert not (output_dir / "model.safetensors").exists()  # nothing trained, nothing saved


# ---------------------------------------------------------------------------------------------------------- evaluation
class OracleRetrievalModel(torch.nn.Module):
    """Embeds video `i` (its pixel value) and caption word `i` as one-hot vector `i`: a perfect retriever."""

    def __init__(self, word_ids: list[int]):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(max(word_ids) + 1, len(word_ids)), requires_grad=False)
        with torch.no_grad():
            for i, word in enumerate(word_ids):
                self.table[word, i] = 1.0
        self.num = len(word_ids)

    def encode_videos(self, pixel_values, return_tokens=False):
        index = pixel_values.flatten(1).mean(1).round().long()
        return torch.nn.functional.one_hot(index, self.num).float()

    def encode_texts(self, input_ids, attention_mask=None):
        return self.table[input_ids[:, 1]]  # the word after [CLS]


class IdentityVideoProcessor:
    num_frames = 1

    def __call__(self, videos, return_tensors="pt", **kwargs):
        return {"pixel_values": torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in videos])}


def test_retrieval_evaluation_is_exact_with_several_captions(tiny_checkpoint, tmp_path):
    """An oracle model gets R@1 = 100 both ways: batching, gathering and the caption->video map are right."""
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor

    processor = ClusterSTMProcessor.from_pretrained(tiny_checkpoint)
    words = ["red", "green", "blue", "yellow", "purple", "orange", "cyan"]
    word_ids = [processor.tokenizer.convert_tokens_to_ids(w) for w in words]
    assert processor.tokenizer.unk_token_id not in word_ids
    processor.video_processor = IdentityVideoProcessor()
    # 7 videos (odd: the last batch is short), 1-3 captions each.
    videos = [np.full((1, 1, 2), float(i)) for i in range(7)]  # (T, H, W) clips
    captions = [[f"{words[i]} thing"] * (1 + i % 3) for i in range(7)]
    data = VideoCaptions(videos, [str(i) for i in range(7)], captions)
    trainer = ClusterSTMTrainer(
        model=OracleRetrievalModel(word_ids),
        args=training_args(tmp_path, per_device_eval_batch_size=2),
        processing_class=processor,
        task="retrieval",
        eval_collator=ClusterSTMDataCollator(processor, "retrieval", training=False, keep_index=True),
    )
    metrics = trainer.evaluate(data)
    assert metrics["eval_num_texts"] == sum(len(c) for c in captions) and metrics["eval_num_videos"] == 7
    assert metrics["eval_t2v_r1"] == 100.0 and metrics["eval_v2t_r1"] == 100.0
    assert metrics["eval_t2v_meanr"] == 1.0


# ---------------------------------------------------------------------------------------------------------- data
def test_annotation_formats(tmp_path):
    msrvtt = {
        "videos": [{"video_id": "video0"}, {"video_id": "video1"}],
        "sentences": [
            {"video_id": "video0", "caption": "a man sings"},
            {"video_id": "video1", "caption": "a dog runs"},
            {"video_id": "video0", "caption": "someone performs"},
        ],
    }
    (tmp_path / "msrvtt.json").write_text(json.dumps(msrvtt))
    root = os.path.realpath(tmp_path / "root")  # paths are resolved inside --video_root (readers.resolve_video_path)
    data = load_video_captions(tmp_path / "msrvtt.json", video_root=str(tmp_path / "root"))
    assert data.videos == [os.path.join(root, "video0.mp4"), os.path.join(root, "video1.mp4")]
    assert data.captions == [["a man sings", "someone performs"], ["a dog runs"]]
    texts, text_to_video = data.texts()
    assert texts == ["a man sings", "someone performs", "a dog runs"] and text_to_video == [0, 0, 1]

    qa = [
        {"video_id": 7010, "question": "what is he doing?", "answer": "singing", "question_type": "what"},
        {"video": "clips/a.mp4", "question": "how many?", "answer": "two"},
    ]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in qa))
    questions = load_video_questions(tmp_path / "qa.jsonl", template="video{video_id}.mp4")
    here = os.path.realpath(tmp_path)  # without --video_root: the annotation file's folder
    assert questions.videos == [os.path.join(here, "video7010.mp4"), os.path.join(here, "clips", "a.mp4")]
    assert questions.answers == ["singing", "two"] and questions.question_types == ["what", ""]

    (tmp_path / "bad.json").write_text(json.dumps([{"caption": "no video"}]))
    with pytest.raises(ValueError, match="video"):
        load_video_captions(tmp_path / "bad.json")
    (tmp_path / "noanswer.json").write_text(json.dumps([{"video": "a.mp4", "question": "why?"}]))
    with pytest.raises(ValueError, match="answer"):
        load_video_questions(tmp_path / "noanswer.json")
    with pytest.raises(ValueError, match="not found"):
        load_video_captions(tmp_path / "missing.json")


def test_answer_vocabulary_most_frequent_first(tmp_path):
    assert build_answer_vocabulary(["b", "a", "b", "c", "a", "b"]) == ["b", "a", "c"]
    assert build_answer_vocabulary(["b", "a", "b", "c", "a", "b"], max_answers=2) == ["b", "a"]
    (tmp_path / "answers.txt").write_text("yes\nno\n\n")
    assert build_answer_vocabulary([], answer_list=str(tmp_path / "answers.txt")) == ["yes", "no"]
    with pytest.raises(ValueError, match="empty"):
        build_answer_vocabulary([])


def test_collator_outputs_model_inputs_only(tiny_checkpoint):
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor

    processor = ClusterSTMProcessor.from_pretrained(tiny_checkpoint)
    videos = [np.random.default_rng(i).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8) for i in range(2)]
    items = [{"video": v, "text": t, "index": i} for i, (v, t) in enumerate(zip(videos, ["a red circle", "blue"]))]
    batch = ClusterSTMDataCollator(processor, "captioning", training=True, num_frames=2)(items)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    assert batch["pixel_values"].shape == (2, 2, 3, 64, 64)
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)
    batch = ClusterSTMDataCollator(processor, "retrieval", training=True, num_frames=2)(items)
    assert batch["return_loss"] is True and "labels" not in batch
    batch = ClusterSTMDataCollator(processor, "retrieval", training=False, keep_index=True, num_frames=2)(items)
    assert batch["index"].tolist() == [0, 1] and "return_loss" not in batch


def test_finetuning_masks_training_batches_through_build_mask(tiny_checkpoint, tmp_path, monkeypatch):
    """--mask_strategy while fine-tuning: each training batch gets one mask from build_mask (cluster on the
    student's own patch embeddings); evaluation stays unmasked."""
    from clusterstm.models import masking_clusterstm
    from clusterstm.models.modeling_clusterstm import ClusterSTMVisionModel

    calls = []
    original = masking_clusterstm.MASK_STRATEGIES["cluster"]
    monkeypatch.setitem(
        masking_clusterstm.MASK_STRATEGIES, "cluster", lambda **kw: calls.append(kw["mask_ratio"]) or original(**kw)
    )
    seen = []
    hook = lambda module, args, kwargs: seen.append((module.training, kwargs.get("bool_masked_pos")))  # noqa: E731
    original_forward = ClusterSTMVisionModel.forward

    def recording_forward(self, *args, **kwargs):
        hook(self, args, kwargs)
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(ClusterSTMVisionModel, "forward", recording_forward)
    model_args = ModelArguments(
        task="retrieval", model_name_or_path=str(tiny_checkpoint), mask_strategy="cluster", mask_ratio=0.5
    )
    results = run_finetuning(model_args, synthetic_data_args(), training_args(tmp_path, do_train=True, do_eval=True))
    assert np.isfinite(results["train_loss"])
    assert calls == [0.5, 0.5]  # one mask per training step (max_steps=2)
    masked = [mask for training, mask in seen if training]
    assert len(masked) == 2 and all(m is not None and ((~m).sum(-1) == 32).all() for m in masked)  # 64 -> 32 kept
    assert all(mask is None for training, mask in seen if not training)
    with pytest.raises(ValueError, match="attention-guided masking needs a teacher"):
        validate_arguments(
            ModelArguments(task="retrieval", preset="tiny", mask_strategy="attention"),
            synthetic_data_args(),
            TrainingArguments(output_dir="unused", do_train=True, report_to="none"),
        )


def test_validate_arguments_errors():
    ok_model = ModelArguments(task="retrieval", preset="tiny")
    args = TrainingArguments(output_dir="unused", do_train=True, report_to="none")
    with pytest.raises(ValueError, match="--task"):
        validate_arguments(ModelArguments(task="detection", preset="tiny"), synthetic_data_args(), args)
    with pytest.raises(ValueError, match="exactly one"):
        validate_arguments(ModelArguments(task="qa"), synthetic_data_args(), args)
    with pytest.raises(ValueError, match="--train_file"):
        validate_arguments(ok_model, DataArguments(), args)
    with pytest.raises(ValueError, match="--eval_split"):
        validate_arguments(ok_model, synthetic_data_args(eval_split="dev"), args)
    with pytest.raises(ValueError, match="dataset_name"):
        validate_arguments(ok_model, DataArguments(dataset_name="msrvtt"), args)


# ---------------------------------------------------------------------------------------------------------- baselines
def test_chance_retrieval_matches_random_scores():
    chance = chance_retrieval_metrics(20, captions_per_video=2)
    assert chance["t2v_r1"] == 5.0 and chance["t2v_r10"] == 50.0 and chance["t2v_meanr"] == 10.5
    rng = np.random.default_rng(0)
    text_to_video = np.repeat(np.arange(20), 2)
    runs = [retrieval_metrics(rng.random((40, 20)), text_to_video) for _ in range(300)]
    for key in ("t2v_r1", "t2v_r5", "v2t_r1", "v2t_r5", "t2v_meanr", "v2t_meanr"):
        empirical = np.mean([r[key] for r in runs])
        assert empirical == pytest.approx(chance[key], rel=0.1, abs=0.6), key


def test_majority_and_nearest_neighbour_baselines():
    train = VideoQuestions([None] * 5, ["q"] * 5, ["yes", "no", "yes", "red", "yes"])
    evaluation = VideoQuestions([None] * 4, ["q"] * 4, ["yes", "no", "yes", "blue"])
    out = baseline_metrics("qa", train, evaluation)
    assert out["baseline_majority_answer"] == "yes" and out["baseline_majority_accuracy"] == 50.0

    red = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    red[..., 0] = 250
    blue = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    blue[..., 2] = 250
    train_captions = VideoCaptions([red, blue], ["r", "b"], [["a red clip"], ["a blue clip"]])
    eval_captions = VideoCaptions([blue, red], ["b2", "r2"], [["a blue clip"], ["a red clip"]])
    assert nearest_neighbour_captions(train_captions, eval_captions) == ["a blue clip", "a red clip"]
    out = baseline_metrics("captioning", train_captions, eval_captions, caption_tokenizer="python")
    assert out["baseline_nn_rouge_l"] > 0.99  # exact copies of the references


# ---------------------------------------------------------------------------------------------------------- 2 processes
DDP_SCRIPT = r"""
import json, os, sys
import numpy as np, torch
from transformers import TrainingArguments
from clusterstm.training.finetuning import ClusterSTMDataCollator, ClusterSTMTrainer, ModelArguments, VideoCaptions
from clusterstm.models.processing_clusterstm import ClusterSTMProcessor

checkpoint, out = sys.argv[1], sys.argv[2]
processor = ClusterSTMProcessor.from_pretrained(checkpoint)
words = ["red", "green", "blue", "yellow", "purple", "orange", "cyan"]
word_ids = [processor.tokenizer.convert_tokens_to_ids(w) for w in words]


class IdentityVideoProcessor:
    num_frames = 1

    def __call__(self, videos, return_tensors="pt", **kwargs):
        return {"pixel_values": torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in videos])}


class Oracle(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(max(word_ids) + 1, 7), requires_grad=False)
        with torch.no_grad():
            for i, w in enumerate(word_ids):
                self.table[w, i] = 1.0
        self.videos_seen = 0

    def encode_videos(self, pixel_values, return_tokens=False):
        self.videos_seen += pixel_values.shape[0]
        return torch.nn.functional.one_hot(pixel_values.flatten(1).mean(1).round().long(), 7).float()

    def encode_texts(self, input_ids, attention_mask=None):
        return self.table[input_ids[:, 1]]

    def generate(self, pixel_values, **kwargs):
        index = pixel_values.flatten(1).mean(1).round().long().tolist()
        return torch.stack([torch.tensor([2, word_ids[i], 3]) for i in index])


processor.video_processor = IdentityVideoProcessor()
data = VideoCaptions(
    [np.full((1, 1, 2), float(i)) for i in range(7)], [str(i) for i in range(7)], [[words[i]] * (1 + i % 3) for i in range(7)]
)
args = TrainingArguments(output_dir=out, per_device_eval_batch_size=2, report_to="none", use_cpu=True)
results = {"world_size": args.world_size}
for task in ("retrieval", "captioning"):
    model = Oracle()
    trainer = ClusterSTMTrainer(
        model=model, args=args, processing_class=processor, task=task,
        eval_collator=ClusterSTMDataCollator(processor, task, training=False, keep_index=True),
        model_args=ModelArguments(task=task, caption_tokenizer="python"),
    )
    results[task] = trainer.evaluate(data)
    results[task + "_local_videos"] = model.videos_seen
if trainer.accelerator.process_index == 0:
    results["captions"] = json.loads(open(os.path.join(out, "eval_captions.json")).read())
    open(os.path.join(out, "ddp_results.json"), "w").write(json.dumps(results))
"""


@pytest.mark.slow
def test_evaluation_under_two_processes_counts_every_sample_once(tiny_checkpoint, tmp_path):
    """torchrun with 2 CPU processes (gloo): 7 videos in batches of 2 per process leave padding duplicates in the last
    batch; the gathered retrieval metrics and generated captions must still cover every sample exactly once."""
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(tiny_checkpoint), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "ddp_results.json").read_text())
    assert results["world_size"] == 2
    assert results["retrieval_local_videos"] == 4  # rank 0 encoded 4 of the 7 videos: the work was split
    retrieval = results["retrieval"]
    assert retrieval["eval_num_videos"] == 7 and retrieval["eval_num_texts"] == 13
    assert retrieval["eval_t2v_r1"] == 100.0 and retrieval["eval_v2t_r1"] == 100.0
    captions = results["captions"]
    assert [c["video_id"] for c in captions] == [str(i) for i in range(7)]
    assert all(c["prediction"] == c["references"][0] for c in captions)
    assert results["captioning"]["eval_num_samples"] == 7


# ---------------------------------------------------------------------------------------------------------- reliability
def test_flags_are_validated_before_anything_runs(tmp_path, monkeypatch):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), do_train=True, report_to="none")
    for model_args, message in (
        (ModelArguments(task="retrieval", preset="tiny", mask_ratio=1.0), r"--mask_ratio must be in \[0, 1\)"),
        (ModelArguments(task="retrieval", preset="tiny", mask_strategy="clusters"), "--mask_strategy"),
        (ModelArguments(task="retrieval", preset="tiny", max_new_tokens=0), "--max_new_tokens"),
    ):
        with pytest.raises(ValueError, match=message):
            run_finetuning(model_args, synthetic_data_args(), args)
    assert not (tmp_path / "out").exists()  # refused before the preset checkpoint was even written
    ok = ModelArguments(task="retrieval", preset="tiny")
    with pytest.raises(ValueError, match="--num_frames"):
        validate_arguments(ok, synthetic_data_args(num_frames=0), args)
    with pytest.raises(ValueError, match="--train_file .*missing.jsonl.* is not a file"):
        validate_arguments(ok, DataArguments(train_file=str(tmp_path / "missing.jsonl")), args)
    push = TrainingArguments(output_dir="unused", do_train=True, report_to="none", push_to_hub=True, hub_model_id="x")
    with pytest.raises(ValueError, match="namespace/name"):
        validate_arguments(ok, synthetic_data_args(), push)


def test_captioning_eval_needs_pycocoevalcap_at_start_up(tmp_path, monkeypatch):
    import sys

    for name in [m for m in sys.modules if m == "pycocoevalcap" or m.startswith("pycocoevalcap.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), do_train=True, do_eval=True, report_to="none")
    with pytest.raises(ImportError, match=r"pip install 'clusterstm\[captioning\]'"):
        run_finetuning(ModelArguments(task="captioning", preset="tiny"), synthetic_data_args(), args)
    assert not (tmp_path / "out").exists()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), do_train=True, report_to="none")
    validate_arguments(ModelArguments(task="captioning", preset="tiny"), synthetic_data_args(), args)  # no eval: ok


def test_annotation_paths_stay_inside_video_root(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    for record, field in (
        ({"video": "../secret.mp4", "caption": "x"}, "video"),
        ({"video_path": "/etc/passwd", "caption": "x"}, "video_path"),
        ({"video_id": "../../x", "caption": "x"}, "video_id"),
    ):
        path = tmp_path / "ann.json"
        path.write_text(json.dumps([{"video": "ok.mp4", "caption": "fine"}, record]))
        with pytest.raises(ValueError, match=rf"ann\.json: Row 1: field '{field}' .* outside the video root"):
            load_video_captions(path, video_root=str(root))
    (tmp_path / "bad.jsonl").write_bytes(b'{"video": "a.mp4", "question": "q", "answer": "a"}\n{"video": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        load_video_questions(tmp_path / "bad.jsonl", video_root=str(root))
    (tmp_path / "latin1.json").write_bytes(b'[{"video": "a.mp4",\n "caption": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"latin1\.json: line 2 is not valid UTF-8"):
        load_video_captions(tmp_path / "latin1.json", video_root=str(root))


def test_finetune_collator_skips_bad_videos(tiny_checkpoint, tmp_path):
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
    from clusterstm.models.video_processing_clusterstm import VideoDecodingError

    processor = ClusterSTMProcessor.from_pretrained(tiny_checkpoint)
    good = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    (tmp_path / "broken.mp4").write_bytes(os.urandom(2048))
    items = [
        {"video": good, "text": "a red circle", "index": 0},
        {"video": str(tmp_path / "broken.mp4"), "text": "broken", "index": 1},
        {"video": np.zeros((2, 2, 4000, 3), np.uint8), "text": "a sliver", "index": 2},
    ]
    with pytest.raises(VideoDecodingError, match="broken.mp4"):
        ClusterSTMDataCollator(processor, "captioning", num_frames=2)(items)
    collator = ClusterSTMDataCollator(processor, "captioning", num_frames=2, skip_bad_samples=True)
    batch = collator(items)
    assert batch["pixel_values"].shape == (3, 2, 3, 64, 64) and collator.num_skipped == 2
    # replaced items carry the good item's text too
    assert (batch["input_ids"][1:] == batch["input_ids"][0]).all()
    with pytest.raises(VideoDecodingError, match="Every video"):
        collator(items[1:])


def test_disk_full_names_the_disk_and_folder(tiny_checkpoint, tmp_path, monkeypatch):
    import errno

    from clusterstm.training.errors import DiskFullError, explain_disk_full
    from clusterstm.training.finetuning import ClusterSTMTrainer

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(ClusterSTMTrainer, "save_model", full)
    model_args = ModelArguments(task="retrieval", model_name_or_path=str(tiny_checkpoint))
    with pytest.raises(
        DiskFullError, match=r"disk is full.*the fine-tuned model.*model\.safetensors.*MiB free"
    ) as info:
        run_finetuning(model_args, synthetic_data_args(), training_args(tmp_path / "out", do_train=True, max_steps=1))
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(DiskFullError, match=r"disk is full.*weights to .*out"):  # writers that raise RuntimeError
        with explain_disk_full(tmp_path / "out", "weights"):
            raise RuntimeError("safetensors: No space left on device (os error 28)")
    with pytest.raises(PermissionError):  # other errors pass through
        with explain_disk_full(tmp_path, "weights"):
            raise PermissionError(errno.EACCES, "denied")


def test_push_to_hub_goes_through_the_allow_list_with_a_clean_card(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub
    from hub_server import HubServer

    with HubServer() as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.endpoint)
        output_dir = tmp_path / "out"
        output_dir.mkdir()
        (output_dir / ".env").write_text("SECRET=1")
        args = training_args(
            output_dir, do_train=True, max_steps=1, push_to_hub=True, hub_model_id="tester/ft", hub_token=server.token
        )
        model_args = ModelArguments(task="retrieval", model_name_or_path=str(tiny_checkpoint))
        run_finetuning(model_args, synthetic_data_args(), args)
        files = server.files("tester/ft")
    assert {"config.json", "model.safetensors", "README.md", "modeling_clusterstm.py"} <= set(files)
    assert ".env" not in files and not any(name.startswith(("runs/", "checkpoint-")) for name in files)
    assert "training_args.bin" not in files and "trainer_state.json" not in files
    card = files["README.md"].decode()
    assert str(tiny_checkpoint) not in card and str(tmp_path) not in card
    assert f"{tiny_checkpoint.name} (local checkpoint)" in card and "base_model" not in card
