"""The one retrieval evaluator (`clusterstm.tasks.retrieval`) and its one tie rule, on hand-checkable cases."""

import numpy as np
import pytest
import torch

from clusterstm.tasks.retrieval import (
    TIE_RULE,
    chance_retrieval_metrics,
    encode_retrieval_batches,
    retrieval_scores,
    zero_shot_retrieval,
)


def test_ties_count_against_the_ground_truth_by_hand():
    # texts 0 and 1 score videos 0 and 1 equally: both ground truths tie with one other video -> rank 2.
    # text 2 scores its video 2 strictly best -> rank 1.
    texts = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    videos = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    metrics = retrieval_scores(texts, videos, normalize=False)
    assert ">=" in TIE_RULE
    assert metrics["t2v_r1"] == pytest.approx(100 / 3)  # only text 2 at rank 1
    assert metrics["t2v_r5"] == 100.0
    assert metrics["t2v_meanr"] == pytest.approx((2 + 2 + 1) / 3)
    assert metrics["t2v_medr"] == 2.0
    # video->text: videos 0 and 1 tie with both texts 0 and 1 -> rank 2; video 2 -> rank 1.
    assert metrics["v2t_meanr"] == pytest.approx((2 + 2 + 1) / 3)


def test_constant_scorer_gets_the_worst_rank_through_the_model_path():
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(2))

        def get_video_features(self, pixel_values):
            return self.weight.expand(pixel_values.shape[0], 2)

        def get_text_features(self, input_ids, attention_mask):
            return self.weight.expand(input_ids.shape[0], 2)

    model = Constant().train()
    batches = [
        {
            "pixel_values": torch.zeros(3, 1),
            "input_ids": torch.zeros(3, 4, dtype=torch.long),
            "attention_mask": torch.ones(3, 4, dtype=torch.long),
        },
        {
            "pixel_values": torch.zeros(2, 1),
            "input_ids": torch.zeros(2, 4, dtype=torch.long),
            "attention_mask": torch.ones(2, 4, dtype=torch.long),
        },
    ]
    metrics = zero_shot_retrieval(model, batches)
    assert metrics["t2v_r1"] == 0.0 and metrics["t2v_medr"] == 5.0 and metrics["v2t_meanr"] == 5.0
    assert metrics["chance_r1"] == pytest.approx(20.0) and metrics["num_videos"] == 5
    assert model.training  # mode restored
    text, video = encode_retrieval_batches(model, batches[:1])
    assert text.shape == video.shape == (3, 2) and torch.allclose(text.norm(dim=-1), torch.ones(3))


def test_chance_metrics_by_hand():
    chance = chance_retrieval_metrics(4)
    assert chance["t2v_r1"] == 25.0 and chance["t2v_r5"] == 100.0
    assert chance["t2v_medr"] == chance["t2v_meanr"] == 2.5
    assert chance["v2t_r1"] == pytest.approx(25.0)
