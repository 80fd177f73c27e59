"""video_text_matching_loss: duplicated captions are never drawn as negatives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clusterstm.models.modeling_clusterstm import video_text_matching_loss


class _RecordingFusion(nn.Module):
    """Returns the video id (stored in every video token) and the text id as the fused [CLS] state."""

    def forward(self, texts, videos, attention_mask=None):
        self.pairs = torch.stack([texts[:, 0, 0], videos[:, 0, 0]], dim=-1).long()
        return torch.cat([texts[:, :1, :1], videos[:, :1, :1]], dim=-1).float()


def _inputs(batch_size: int):
    ids = torch.arange(batch_size, dtype=torch.float32)
    texts = ids[:, None, None].expand(batch_size, 3, 2).clone()
    videos = ids[:, None, None].expand(batch_size, 5, 2).clone()
    return texts, videos


def test_identical_captions_are_not_negatives():
    torch.manual_seed(0)
    texts, videos = _inputs(4)
    input_ids = torch.tensor([[1, 7, 8, 2], [1, 7, 8, 2], [1, 5, 2, 0], [1, 6, 2, 0]])
    attention_mask = (input_ids != 0).long()
    # Contrastive logits that make the duplicate the hardest negative by far (0 <-> 1), as a trained model would.
    logits = torch.zeros(4, 4)
    logits[0, 1] = logits[1, 0] = 50.0
    fusion, head = _RecordingFusion(), nn.Linear(2, 2)
    for _ in range(20):
        video_text_matching_loss(fusion, head, texts, attention_mask, videos, logits, input_ids=input_ids)
        negatives = fusion.pairs[4:]  # (text, video) of the 2 * B negative pairs
        same = {(0, 1), (1, 0), (0, 0), (1, 1), (2, 2), (3, 3)}
        assert not any(tuple(p) in same for p in negatives.tolist()), negatives.tolist()
    # Without the ids the duplicate is (almost surely) drawn: the plain rule only excludes the diagonal.
    video_text_matching_loss(fusion, head, texts, attention_mask, videos, logits)
    assert (0, 1) in [tuple(p) for p in fusion.pairs[4:].tolist()]


def test_padding_is_ignored_and_all_duplicate_rows_fall_back():
    torch.manual_seed(0)
    texts, videos = _inputs(3)
    # Rows 0 and 1 differ only under padding: the same caption. All three identical -> fall back, no error.
    input_ids = torch.tensor([[1, 5, 2, 0], [1, 5, 2, 9], [1, 6, 2, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]])
    fusion, head = _RecordingFusion(), nn.Linear(2, 2)
    for _ in range(10):
        video_text_matching_loss(fusion, head, texts, attention_mask, videos, torch.zeros(3, 3), input_ids=input_ids)
        for text, video in fusion.pairs[3:].tolist():
            assert {text, video} != {0, 1} and text != video
    same = torch.tensor([[1, 5, 2]] * 3)
    loss = video_text_matching_loss(fusion, head, texts, torch.ones(3, 3), videos, torch.zeros(3, 3), input_ids=same)
    assert torch.isfinite(loss)
    assert all(text != video for text, video in fusion.pairs[3:].tolist())


def test_matching_features_is_the_caption_token_mean():
    from clusterstm.models.modeling_clusterstm import matching_features

    fused = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [0.0, 0.0], [-9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(matching_features(fused, mask), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))


def test_softmin_pooling_is_vetoed_by_one_contradicted_token():
    from clusterstm.models.modeling_clusterstm import matching_logits

    # A head whose match log-odds for a token is that token's first feature; the third token is padding.
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    fused = torch.tensor([[[2.0, 0.0], [-3.0, 0.0], [-100.0, 0.0]], [[4.0, 0.0], [4.0, 0.0], [-100.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    logits = matching_logits(head, fused, mask, pooling="softmin")
    expected = -torch.log(torch.exp(torch.tensor([-2.0, -4.0])) + torch.exp(torch.tensor([3.0, -4.0])))
    assert torch.allclose(logits[:, 1], expected) and torch.equal(logits[:, 0], torch.zeros(2))
    # One contradicted token (-3) sinks the pair below the soft minimum of its tokens; the mean would not.
    assert logits[0, 1] < -3.0
    mean = matching_logits(head, fused, mask, pooling="mean")
    assert torch.allclose(mean[:, 1] - mean[:, 0], torch.tensor([-0.5, 4.0]))
    with pytest.raises(ValueError, match="pooling"):
        matching_logits(head, fused, mask, pooling="max")


def test_uniform_negatives_ignore_the_contrastive_similarity():
    torch.manual_seed(0)
    texts, videos = _inputs(4)
    # Logits that make pair (0, 1) the only hard negative: the hard rule draws it nearly always, uniform rarely.
    logits = torch.full((4, 4), -50.0)
    logits[0, 1] = logits[1, 0] = 50.0
    fusion, head = _RecordingFusion(), nn.Linear(2, 2)
    drawn = {"hard": set(), "uniform": set(), "mixed": []}
    for rule in drawn:
        for _ in range(60):
            video_text_matching_loss(fusion, head, texts, torch.ones(4, 3), videos, logits, negatives=rule)
            pairs = [tuple(p) for p in fusion.pairs[4:6].tolist()]  # negative videos of texts 0 and 1
            if rule == "mixed":
                drawn[rule].extend(pairs)
            else:
                drawn[rule].update(pairs)
    assert drawn["hard"] == {(0, 1), (1, 0)}
    assert len(drawn["uniform"]) == 6 and not any(t == v for t, v in drawn["uniform"])  # every other video
    # Mixed: the hard pair about half the time plus a third of the uniform half (2/3 in all), the others too.
    hard_share = sum(pair in {(0, 1), (1, 0)} for pair in drawn["mixed"]) / len(drawn["mixed"])
    assert 0.5 < hard_share < 0.85 and set(drawn["mixed"]) > {(0, 1), (1, 0)}
    assert not any(t == v for t, v in drawn["mixed"])
    with pytest.raises(ValueError, match="negatives must be"):
        video_text_matching_loss(fusion, head, texts, torch.ones(4, 3), videos, logits, negatives="semi-hard")


def test_matching_negatives_setting_is_validated():

    from clusterstm.models.configuration_clusterstm import ClusterSTMConfig

    # the default follows docs/RESULTS.md section 4 (hard negatives alone left the head at its prior)
    assert ClusterSTMConfig.from_preset("tiny").matching_negatives == "mixed"
    assert ClusterSTMConfig.from_preset("tiny").relevance_loss == "zscore_mse"  # section 3
    assert ClusterSTMConfig.from_preset("tiny", matching_negatives="uniform").matching_negatives == "uniform"
    with pytest.raises(ValueError, match="matching_negatives must be one of"):
        ClusterSTMConfig.from_preset("tiny", matching_negatives="semi-hard")
    with pytest.raises(ValueError, match="matching_pooling must be one of"):
        ClusterSTMConfig.from_preset("tiny", matching_pooling="max")


def test_matching_pooling_default_and_configs_saved_before_it(tmp_path):
    import json

    from clusterstm.models.configuration_clusterstm import ClusterSTMConfig

    config = ClusterSTMConfig.from_preset("tiny")
    assert config.matching_pooling == "softmin"  # docs/RESULTS.md section 4
    config.save_pretrained(tmp_path)
    assert ClusterSTMConfig.from_pretrained(tmp_path).matching_pooling == "softmin"
    # A config.json written before the setting existed was trained with the mean head: it keeps it.
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["matching_pooling"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert ClusterSTMConfig.from_pretrained(tmp_path).matching_pooling == "mean"
    assert ClusterSTMConfig.from_pretrained(tmp_path, matching_pooling="softmin").matching_pooling == "softmin"
