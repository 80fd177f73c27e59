"""Tests of the retrieval / video QA / captioning metrics (plain functions and offline `evaluate` modules)."""

import math

import numpy as np
import pytest
import torch

from clusterstm.tasks.metrics import (
    RetrievalRankAccumulator,
    caption_metrics,
    java_available,
    load_metric,
    python_tokenize,
    qa_accuracy,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
)

# ---------------------------------------------------------------- retrieval


def test_identity_similarity_is_perfect():
    out = retrieval_metrics(np.eye(12))
    for direction in ("t2v", "v2t"):
        assert out[f"{direction}_r1"] == 100.0
        assert out[f"{direction}_medr"] == 1.0
        assert out[f"{direction}_meanr"] == 1.0
    assert out["num_texts"] == 12 and out["num_videos"] == 12


def test_hand_computed_ranks():
    sim = np.array(
        [
            [0.1, 0.9, 0.5],
            [0.8, 0.7, 0.2],
            [0.05, 0.4, 0.6],
        ]
    )
    out = retrieval_metrics(sim, [0, 1, 2])
    # t2v ranks: text0 -> 3, text1 -> 2, text2 -> 1 ; v2t ranks: video0 -> 2, video1 -> 2, video2 -> 1
    assert out["t2v_r1"] == pytest.approx(100 / 3)
    assert out["t2v_r5"] == 100.0
    assert out["t2v_medr"] == 2.0
    assert out["t2v_meanr"] == 2.0
    assert out["v2t_r1"] == pytest.approx(100 / 3)
    assert out["v2t_medr"] == 2.0
    assert out["v2t_meanr"] == pytest.approx(5 / 3)


def test_permuted_ground_truth_and_recall_at_k():
    # Text i's best video is i, but the ground truth says (i + 1) % n: its rank is the position of (i+1) in the row.
    n = 12
    sim = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            sim[i, j] = -((j - i) % n)  # video i best, then i+1, i+2, ...
    out = retrieval_metrics(sim, [(i + 1) % n for i in range(n)])
    assert out["t2v_r1"] == 0.0
    assert out["t2v_r5"] == 100.0
    assert out["t2v_medr"] == 2.0
    # Ground truth shifted by 6: rank 7 for every text -> R@5 = 0, R@10 = 100
    out = retrieval_metrics(sim, [(i + 6) % n for i in range(n)])
    assert out["t2v_r5"] == 0.0 and out["t2v_r10"] == 100.0 and out["t2v_meanr"] == 7.0


def test_ties_count_against_the_ground_truth():
    out = retrieval_metrics(np.ones((5, 5)))
    assert out["t2v_r1"] == 0.0
    assert out["t2v_medr"] == 5.0
    assert out["v2t_medr"] == 5.0


def test_several_captions_per_video():
    sim = np.array([[0.9, 0.1], [0.2, 0.3], [0.4, 0.8], [0.7, 0.6]])
    out = retrieval_metrics(sim, [0, 0, 1, 1])
    # t2v ranks [1, 2, 1, 2]; v2t: the best-ranked own caption counts, the other own caption is no error.
    assert out["t2v_r1"] == 50.0
    assert out["t2v_medr"] == 1.5
    assert out["v2t_r1"] == 100.0
    assert out["num_texts"] == 4 and out["num_videos"] == 2


def test_video_without_text_is_not_a_v2t_query():
    sim = np.array([[0.9, 0.1, 0.95], [0.2, 0.8, 0.0]])
    out = retrieval_metrics(sim, [0, 1])
    assert out["t2v_r1"] == 50.0  # text0 is beaten by the caption-less video 2
    assert out["v2t_r1"] == 100.0  # only videos 0 and 1 are queries


def test_dual_softmax_changes_ranks_and_is_reported_separately():
    sim = np.array([[0.5, 0.6], [0.1, 0.9]])
    out = retrieval_metrics(sim, [0, 1], dual_softmax=True, dual_softmax_temperature=10.0)
    # plain: text0 prefers video1 -> t2v R@1 = 50
    assert out["t2v_r1"] == 50.0
    # by hand: prior over texts for video0 = softmax([5, 1]) ~ [0.982, 0.018], video1 = softmax([6, 9]) ~ [0.047, 0.953]
    # text0: 0.5 * 0.982 = 0.491 > 0.6 * 0.047 = 0.028 -> rank 1
    assert out["dsl_t2v_r1"] == 100.0
    assert "dsl_v2t_r1" in out
    assert "dsl_t2v_r1" not in retrieval_metrics(sim, [0, 1])


def test_chunked_accumulator_matches_full_matrix():
    rng = np.random.default_rng(0)
    num_texts, num_videos = 37, 23
    sim = rng.normal(size=(num_texts, num_videos))
    gt = rng.integers(0, num_videos, size=num_texts)
    full = retrieval_metrics(sim, gt)

    acc = RetrievalRankAccumulator()
    order = rng.permutation(num_texts)
    for start in range(0, num_texts, 5):
        idx = order[start : start + 5]
        acc.add_batch(torch.tensor(sim[idx]), torch.tensor(gt[idx]), text_indices=idx)
    # Duplicated rows (padding of a distributed sampler) are counted once.
    acc.add_batch(sim[:3], gt[:3], text_indices=[0, 1, 2])
    owned = sorted(set(gt.tolist()))
    v2t = [[t for t in range(num_texts) if gt[t] == v] for v in owned]
    half = len(owned) // 2
    other = RetrievalRankAccumulator()
    acc.add_video_batch(sim[:, owned[:half]].T, v2t[:half], video_indices=owned[:half])
    other.add_video_batch(sim[:, owned[half:]].T, v2t[half:], video_indices=owned[half:])
    chunked = acc.merge(other).compute()
    for key, value in chunked.items():
        assert value == pytest.approx(full[key]), key
    assert len(acc.t2v_ranks) == num_texts


def test_embeddings_path_matches_matrix_including_dual_softmax():
    torch.manual_seed(0)
    text, video = torch.randn(19, 8), torch.randn(11, 8)
    gt = torch.randint(0, 11, (19,))
    tn = torch.nn.functional.normalize(text, dim=-1)
    vn = torch.nn.functional.normalize(video, dim=-1)
    full = retrieval_metrics((tn @ vn.T).double(), gt, dual_softmax=True, dual_softmax_temperature=20.0)
    chunked = retrieval_metrics_from_embeddings(
        text, video, gt, chunk_size=4, dual_softmax=True, dual_softmax_temperature=20.0
    )
    assert set(chunked) == set(full)
    for key in full:
        assert chunked[key] == pytest.approx(full[key], abs=1e-6), key


@pytest.mark.parametrize(
    "sim, gt, match",
    [
        (np.ones(3), None, "2-D"),
        (np.ones((2, 3)), None, "text_to_video is required"),
        (np.ones((2, 3)), [0, 3], "out of range"),
        (np.ones((2, 3)), [0], "entries"),
        (np.array([[0.0, np.nan]]), [0], "NaN"),
    ],
)
def test_retrieval_bad_input(sim, gt, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(sim, gt)


def test_accumulator_compute_without_data():
    with pytest.raises(ValueError, match="before any add_batch"):
        RetrievalRankAccumulator().compute()


def test_retrieval_evaluate_module_offline():
    metric = load_metric("retrieval")
    sim = np.array([[0.1, 0.9, 0.5], [0.8, 0.7, 0.2], [0.05, 0.4, 0.6]])
    metric.add_batch(predictions=sim[:2].tolist(), references=[0, 1])
    metric.add_batch(predictions=sim[2:].tolist(), references=[2])
    out = metric.compute(dual_softmax=True)
    expected = retrieval_metrics(sim, [0, 1, 2], dual_softmax=True)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-4), key


# ---------------------------------------------------------------- video QA


def test_qa_accuracy_overall_and_per_type():
    preds = ["Dog", "cat ", "two", "red", "yes"]
    refs = ["dog", "car", "two", "blue", "yes"]
    types = ["what", "what", "how many", "what color", "yes/no"]
    out = qa_accuracy(preds, refs, question_types=types)
    assert out["accuracy"] == pytest.approx(60.0)
    assert out["accuracy_what"] == 50.0
    assert out["accuracy_how many"] == 100.0
    assert out["accuracy_what color"] == 0.0
    assert out["num_samples_what"] == 2
    assert qa_accuracy(preds, refs, normalize=False)["accuracy"] == pytest.approx(40.0)
    assert qa_accuracy([1, 2, 3], [1, 2, 0])["accuracy"] == pytest.approx(200 / 3)


def test_qa_bad_input():
    with pytest.raises(ValueError, match="references"):
        qa_accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="question types"):
        qa_accuracy(["a"], ["a"], question_types=["x", "y"])


def test_qa_evaluate_module_offline():
    metric = load_metric("video_qa")
    out = metric.compute(predictions=["a", "b", "c"], references=["a", "b", "d"], question_types=["x", "y", "y"])
    assert out["accuracy"] == pytest.approx(200 / 3)
    assert out["accuracy_y"] == 50.0


# ---------------------------------------------------------------- captioning

_CAPTIONS = [
    "a man is slicing a tomato in the kitchen.",
    "two dogs are running on the beach",
    "a girl doesn't stop singing a song!",
    "people ride bicycles down a busy street",
]


def test_python_tokenizer():
    assert python_tokenize("A girl doesn't stop, singing!") == "a girl does n't stop singing"
    assert python_tokenize("It's 3 p.m.") == "it 's 3 p m"


def test_identical_captions_score_one_and_disjoint_zero():
    refs = [[c, c.replace("a ", "one ", 1)] for c in _CAPTIONS]
    same = caption_metrics(_CAPTIONS, refs, tokenizer="python", meteor=False)
    assert same["tokenizer"] == "python"
    assert same["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert same["bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert same["rouge_l"] == pytest.approx(1.0)
    assert same["cider"] > 1.0
    assert "meteor" not in same and same["num_samples"] == 4

    disjoint = caption_metrics(["zebra xylophone quantum"] * 4, refs, tokenizer="python", meteor=False)
    assert disjoint["bleu_1"] == pytest.approx(0.0, abs=1e-6)
    assert disjoint["bleu_4"] == pytest.approx(0.0, abs=1e-6)
    assert disjoint["rouge_l"] == 0.0
    assert disjoint["cider"] == 0.0

    partial = caption_metrics(["a man is slicing a potato", *_CAPTIONS[1:]], refs, tokenizer="python", meteor=False)
    assert 0.0 < partial["cider"] < same["cider"]
    assert 0.0 < partial["bleu_4"] < 1.0


def test_caption_bad_input():
    with pytest.raises(ValueError, match="reference lists"):
        caption_metrics(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one reference"):
        caption_metrics(["a"], [[]])
    with pytest.raises(ValueError, match="tokenizer"):
        caption_metrics(["a"], [["a"]], tokenizer="spacy")


def test_ptb_requires_java(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert not java_available()
    with pytest.raises(ValueError, match="java"):
        caption_metrics(["a"], [["a"]], tokenizer="ptb")
    # auto falls back to the python tokenizer and says so
    assert caption_metrics(["a b c d"], [["a b c d"]])["tokenizer"] == "python"


def test_captioning_evaluate_module_offline():
    metric = load_metric("captioning")
    refs = [[c] for c in _CAPTIONS]
    metric.add_batch(predictions=_CAPTIONS[:2], references=refs[:2])
    metric.add_batch(predictions=_CAPTIONS[2:], references=refs[2:])
    out = metric.compute(tokenizer="python", meteor=False)
    expected = caption_metrics(_CAPTIONS, refs, tokenizer="python", meteor=False)
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == value if isinstance(value, str) else math.isclose(out[key], value), key


@pytest.mark.skipif(not java_available(), reason="PTB tokenizer and METEOR need Java")
def test_ptb_tokenizer_and_meteor_with_java():
    refs = [[c] for c in _CAPTIONS]
    out = caption_metrics(_CAPTIONS, refs, tokenizer="auto", meteor=True)
    assert out["tokenizer"] == "ptb"
    assert out["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert out["meteor"] == pytest.approx(1.0, abs=1e-6)
    worse = caption_metrics(["a man is slicing a potato", *_CAPTIONS[1:]], refs, tokenizer="ptb", meteor=False)
    assert worse["tokenizer"] == "ptb" and worse["cider"] < out["cider"]


# every line-break class str.splitlines() knows, inside a caption
_BREAKS = ["\r", "\n", "\r\n", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85"]
_PERFECT = ["a man is singing on stage", "a dog runs on the grass", "two people cook pasta", "a red car drives fast"]


def _fake_line_tokenizer(monkeypatch, extra_lines: int = 0):
    """A stand-in for the Java PTB tokenizer that, like it, reads one sentence per line of the input file."""
    import shutil
    import subprocess

    from clusterstm.tasks.metrics.captioning import captioning

    def run(cmd, capture_output, check, timeout):
        text = open(cmd[-1], encoding="utf-8", newline="").read()
        lines = [line.lower() for line in text.splitlines()] + ["extra"] * extra_lines
        return subprocess.CompletedProcess(cmd, 0, stdout=("\n".join(lines) + "\n").encode())

    monkeypatch.setattr(captioning.subprocess, "run", run)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/java" if name == "java" else None)


@pytest.mark.parametrize("brk", _BREAKS)
def test_line_breaks_in_captions_never_shift_references(monkeypatch, brk):
    _fake_line_tokenizer(monkeypatch)
    clean = caption_metrics(_PERFECT, [[c] for c in _PERFECT], tokenizer="ptb", meteor=False)
    broken = [_PERFECT[0].replace("is ", "is" + brk), *_PERFECT[1:]]
    shifted = caption_metrics(broken, [[c] for c in broken], tokenizer="ptb", meteor=False)
    assert shifted["cider"] == pytest.approx(clean["cider"]) and clean["cider"] > 9.9
    assert shifted["bleu_4"] == pytest.approx(clean["bleu_4"])


@pytest.mark.parametrize("extra", [1, -1])
def test_ptb_line_count_is_checked_both_ways(monkeypatch, extra):
    from clusterstm.tasks.metrics.captioning import captioning

    _fake_line_tokenizer(monkeypatch, extra_lines=max(extra, 0))
    if extra < 0:
        original = captioning.subprocess.run

        def fewer(cmd, **kwargs):
            result = original(cmd, **kwargs)
            result.stdout = b"\n".join(result.stdout.split(b"\n")[:-3]) + b"\n"
            return result

        monkeypatch.setattr(captioning.subprocess, "run", fewer)
    with pytest.raises(RuntimeError, match="lines for 8 sentences"):
        captioning._ptb_tokenize(_PERFECT * 2)


@pytest.mark.skipif(not java_available(), reason="the real PTB tokenizer needs Java")
def test_carriage_return_caption_with_the_real_ptb_tokenizer():
    clean = caption_metrics(_PERFECT, [[c] for c in _PERFECT], tokenizer="ptb", meteor=False)
    broken = [_PERFECT[0].replace("is ", "is\r"), *_PERFECT[1:]]
    with_cr = caption_metrics(broken, [[c] for c in broken], tokenizer="ptb", meteor=False)
    assert with_cr["cider"] == pytest.approx(clean["cider"])
