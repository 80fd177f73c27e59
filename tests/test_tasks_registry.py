"""The downstream-task registry (`clusterstm.tasks.TASKS`) and the modules that read it."""

import pytest

from clusterstm.tasks import TASKS, get_task
from clusterstm.tasks.base import DownstreamTask


def test_registry_lists_every_task_with_its_head():
    assert list(TASKS) == ["retrieval", "qa", "captioning"]
    names = {name: task.head_class().__name__ for name, task in TASKS.items()}
    assert names == {
        "retrieval": "ClusterSTMForVideoTextRetrieval",
        "qa": "ClusterSTMForVideoQuestionAnswering",
        "captioning": "ClusterSTMForVideoCaptioning",
    }
    with pytest.raises(ValueError, match="retrieval"):
        get_task("segmentation")


def test_readers_of_the_registry_agree_with_it():
    from clusterstm.hub.export import MODEL_AUTO_MAP
    from clusterstm.hub.model_card import TASKS as CARD_TASKS
    from clusterstm.training.finetuning import TASKS as FINETUNE_TASKS
    from clusterstm.training.finetuning import baseline_metrics, head_class

    assert FINETUNE_TASKS == tuple(TASKS)
    for task in TASKS.values():
        assert head_class(task.name) is task.head_class()
        if task.auto_class:
            assert MODEL_AUTO_MAP[task.auto_class] == f"modeling_clusterstm.{task.head_class_name}"
        assert set(task.card_tasks) <= set(CARD_TASKS)
    assert baseline_metrics.__doc__ and get_task("qa").baseline is not None


def test_card_entries_by_hand():
    retrieval = get_task("retrieval").card_entries({"eval_t2v_r1": 10.0, "eval_dsl_v2t_r5": 20.0, "eval_loss": 1.0})
    assert retrieval == [("t2v", "recall@1", "R@1", 10.0), ("v2t", "recall@5_dsl", "R@5 (dual-softmax)", 20.0)]
    assert get_task("qa").card_entries({"eval_accuracy": 50.0}) == [("qa", "accuracy", "Accuracy", 50.0)]


def test_a_task_with_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="evaluation"):
        DownstreamTask(
            name="x",
            head_class_name="ClusterSTMModel",
            records="captions",
            training_targets="contrastive",
            evaluation="bleu",
            pipeline_tag="feature-extraction",
            baseline=lambda *_: {},
        )
