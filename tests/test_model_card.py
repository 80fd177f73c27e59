"""Model card: Hub metadata parses, eval results round-trip through model-index, required sections present."""

import pytest
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from clusterstm.hub.model_card import DEFAULT_TAGS, build_model_card, write_model_card
from clusterstm.tasks.metrics import caption_metrics, qa_accuracy, retrieval_metrics


def _eval_results():
    retrieval = {
        f"eval_{k}": v
        for k, v in retrieval_metrics([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], [0, 1, 1], dual_softmax=True).items()
    }
    qa = qa_accuracy(["dog", "cat", "red"], ["dog", "car", "red"])
    caps = ["a dog runs on the beach", "a man cooks pasta"]
    captioning = caption_metrics(caps, [[c] for c in caps], tokenizer="python", meteor=False)
    return (
        [
            {
                "task": "retrieval",
                "dataset_name": "Synthetic",
                "dataset_type": "synthetic",
                "dataset_split": "test",
                "protocol": "several captions per video",
                "metrics": retrieval,
            },
            {"task": "qa", "dataset_name": "Synthetic-QA", "dataset_type": "synthetic", "metrics": qa},
            {
                "task": "captioning",
                "dataset_name": "Synthetic-Cap",
                "dataset_type": "synthetic",
                "metrics": captioning,
            },
        ],
        retrieval,
        qa,
        captioning,
    )


RUN_INFO = {
    "repo_id": "tester/clusterstm-tiny",
    "teacher": "tiny-clip",
    "mask_strategy": "cluster_wise",
    "mask_ratio": 0.8,
    "objectives": {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0, "relevance": 1.0},
    "datasets": ["synthetic"],
    "steps": 200,
}


def test_card_metadata_and_eval_results_round_trip(tmp_path):
    eval_results, retrieval, qa, captioning = _eval_results()
    path = write_model_card(tmp_path, {"vision_config": {"num_frames": 4, "image_size": 32}}, RUN_INFO, eval_results)
    assert path.name == "README.md"

    metadata = metadata_load(path)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "feature-extraction"
    assert set(DEFAULT_TAGS) <= set(metadata["tags"])
    assert metadata["datasets"] == ["synthetic"]
    assert metadata["license"] == "apache-2.0"

    card = ModelCard.load(path)
    assert card.data.eval_results  # parsed back into EvalResult objects
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "clusterstm-tiny"
    found = {(r.task_type, r.metric_type): r.metric_value for r in results}
    assert found[("text-to-video-retrieval", "recall@1")] == pytest.approx(retrieval["eval_t2v_r1"], abs=1e-3)
    assert found[("video-to-text-retrieval", "recall@1")] == pytest.approx(retrieval["eval_v2t_r1"], abs=1e-3)
    assert found[("text-to-video-retrieval", "recall@1_dsl")] == pytest.approx(retrieval["eval_dsl_t2v_r1"], abs=1e-3)
    assert found[("text-to-video-retrieval", "median_rank")] == retrieval["eval_t2v_medr"]
    assert found[("video-question-answering", "accuracy")] == pytest.approx(qa["accuracy"], abs=1e-3)
    assert found[("video-captioning", "cider")] == pytest.approx(captioning["cider"], abs=1e-3)
    assert found[("video-captioning", "bleu")] == pytest.approx(captioning["bleu_4"], abs=1e-3)
    caption_result = next(r for r in results if r.metric_type == "cider")
    assert caption_result.metric_args == {"tokenizer": "python"}
    t2v = next(r for r in results if r.task_type == "text-to-video-retrieval")
    assert t2v.dataset_args == {"protocol": "several captions per video"} and t2v.dataset_split == "test"


def test_card_body_sections():
    eval_results, *_ = _eval_results()
    text = build_model_card({}, RUN_INFO, eval_results).text
    for section in (
        "## How to use",
        "## Pretraining recipe",
        "## Evaluation results",
        "## Limitations",
        "## Citation",
    ):
        assert section in text
    assert 'AutoModel.from_pretrained("tester/clusterstm-tiny", trust_remote_code=True)' in text
    assert "AutoProcessor" in text
    assert "2603.22953" in text and "Cluster-Wise Spatio-Temporal Masking" in text
    assert "tiny-clip" in text and "cluster_wise" in text and "0.8" in text and "relevance (1.0)" in text
    assert "| Text-to-Video Retrieval | Synthetic | test | several captions per video | R@1 |" in text
    assert "Captioning tokenizer: python" in text


def test_card_without_results_and_custom_pipeline_tag():
    card = build_model_card({}, {"model_name": "m"}, None, pipeline_tag=None)
    assert "model-index" not in card.data.to_dict()
    assert "pipeline_tag" not in card.data.to_dict()
    assert "No evaluation results" in card.text


def test_card_bad_input():
    with pytest.raises(ValueError, match="task"):
        build_model_card({}, RUN_INFO, [{"task": "segmentation", "dataset_name": "x", "metrics": {"accuracy": 1}}])
    with pytest.raises(ValueError, match="no known metric"):
        build_model_card({}, RUN_INFO, [{"task": "qa", "dataset_name": "x", "metrics": {"foo": 1}}])
    with pytest.raises(ValueError, match="run_info"):
        build_model_card({}, None)


def test_card_reads_what_training_records(tmp_path):
    """The recipe table is filled from the config's `*_loss_weight`s, `train_results.json` and the demo's keys."""
    from clusterstm.models.configuration_clusterstm import ClusterSTMConfig

    config = ClusterSTMConfig.from_preset("tiny").to_dict()
    (tmp_path / "train_results.json").write_text(
        '{"global_step": 40, "train_global_batch_size": 16, "mask_strategy": "cluster", "mask_ratio": 0.5}'
    )
    path = write_model_card(tmp_path, config, {"dataset": "ClusterSTM synthetic benchmark", "learning_rate": 0.0005})
    text = path.read_text()
    assert "n/a" not in text and "? / ?" not in text
    weights = {k: config[f"{k}_loss_weight"] for k in ("contrastive", "matching", "mlm", "relevance")}
    assert "Objectives (weights) | " + ", ".join(f"{k} ({v})" for k, v in weights.items() if v) in text
    assert "| Pretraining data | ClusterSTM synthetic benchmark |" in text
    assert "| Steps | 40 |" in text
    assert "| Global batch size / learning rate | 16 / 0.0005 |" in text
    assert "| Mask ratio | 0.5 |" in text
