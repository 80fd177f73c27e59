"""Tests of ClusterSTMProcessor and the offline WordPiece tokenizer."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from clusterstm.data.synthetic import write_video_pyav
from clusterstm.data.tokenization import SPECIAL_TOKENS, load_local_tokenizer, train_wordpiece_tokenizer
from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
from clusterstm.models.video_processing_clusterstm import ClusterSTMVideoProcessor

CORPUS = [
    "a red circle moves left",
    "the small blue square is growing while a green triangle stays still",
    "what colour is the diamond that moves up?",
    "two shapes: a yellow cross falls and an orange circle shrinks",
] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture
def processor(tokenizer):
    video_processor = ClusterSTMVideoProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, num_frames=4
    )
    return ClusterSTMProcessor(video_processor=video_processor, tokenizer=tokenizer)


def test_tokenizer_special_tokens_and_template(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == SPECIAL_TOKENS
    assert tokenizer.pad_token_id == 0 and tokenizer.mask_token_id == 4
    ids = tokenizer("A RED Circle moves left")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["[CLS]", "a", "red", "circle", "moves", "left", "[SEP]"]
    unknown = tokenizer.convert_ids_to_tokens(tokenizer("zebra")["input_ids"])
    assert tokens[0] == "[CLS]" and unknown[-1] == "[SEP]" and len(unknown) >= 3


def test_tokenizer_vocabulary_is_deterministic():
    # The tokenizers trainer gave a different vocabulary on every call (huggingface/tokenizers#1794), which made
    # seeded runs irreproducible: the vocabulary is now characters then words by count, ties alphabetical.
    vocabularies = {tuple(sorted(train_wordpiece_tokenizer(CORPUS, vocab_size=300).get_vocab().items())) for _ in range(5)}
    assert len(vocabularies) == 1
    small = train_wordpiece_tokenizer(["ba ab ab"], vocab_size=11)
    assert small.convert_ids_to_tokens(list(range(11))) == SPECIAL_TOKENS + ["a", "b", "##a", "##b", "ab", "ba"]
    assert small.tokenize("aab") == ["a", "##a", "##b"]
    assert train_wordpiece_tokenizer(["ba ab ab"], vocab_size=10).tokenize("ba") == ["b", "##a"]


def test_tokenizer_save_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), load_local_tokenizer(tmp_path)):
        assert loaded("a green triangle")["input_ids"] == tokenizer("a green triangle")["input_ids"]
        assert loaded.decode(loaded("a green triangle")["input_ids"], skip_special_tokens=True) == "a green triangle"
    with pytest.raises(ValueError, match="not found"):
        load_local_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="empty corpus"):
        train_wordpiece_tokenizer([])
    with pytest.raises(ValueError, match=r"text #1 is a int, expected str"):
        train_wordpiece_tokenizer(["a red circle", 7])


def test_processor_outputs(processor, tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (10, 40, 40, 3), dtype=np.uint8)
    path = tmp_path / "clip.mp4"
    write_video_pyav(path, frames)
    out = processor(
        videos=[frames, str(path)], text=["a red circle", "the blue square moves left fast"], return_tensors="pt"
    )
    assert set(out.keys()) == {"pixel_values", "input_ids", "attention_mask"}
    assert out["pixel_values"].shape == (2, 4, 3, 32, 32)
    assert out["input_ids"].shape == out["attention_mask"].shape and out["input_ids"].shape[0] == 2
    assert out["attention_mask"][0].sum() < out["attention_mask"][1].sum()  # padded shorter caption
    truncated = processor(text=["a red circle moves left " * 20], max_length=8, return_tensors="pt")
    assert truncated["input_ids"].shape == (1, 8) and set(truncated.keys()) == {"input_ids", "attention_mask"}
    assert processor.batch_decode(out["input_ids"], skip_special_tokens=True)[0] == "a red circle"
    with pytest.raises(ValueError, match="one text per video"):
        processor(videos=[frames], text=["a", "b"], return_tensors="pt")
    with pytest.raises(ValueError, match="Empty text"):
        processor(text=["  "], return_tensors="pt")


def test_processor_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = ClusterSTMProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.video_processor, ClusterSTMVideoProcessor)
    assert loaded.video_processor.num_frames == 4
    frames = np.random.default_rng(1).integers(0, 255, (6, 36, 36, 3), dtype=np.uint8)
    kwargs = {"videos": frames, "text": "a green triangle", "return_tensors": "pt"}
    a, b = processor(**kwargs), loaded(**kwargs)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
