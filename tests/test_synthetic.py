"""Tests of the embedded synthetic video-text benchmark."""

import numpy as np
import pytest
from datasets import load_dataset

from clusterstm.data.synthetic import (
    COLOURS,
    SYNTHETIC_ANSWERS,
    SyntheticVideoTextConfig,
    export_synthetic_benchmark,
    generate_split_metadata,
    generate_synthetic_benchmark,
    synthetic_text_corpus,
)
from clusterstm.models.video_processing_clusterstm import read_video_pyav

SMALL = {"num_train": 40, "num_val": 8, "num_test": 8, "num_compositional": 12}


@pytest.fixture(scope="module")
def bench():
    return generate_synthetic_benchmark(SyntheticVideoTextConfig(seed=3, **SMALL))


def test_shapes_and_determinism(bench):
    assert set(bench) == {"train", "validation", "test", "compositional"}
    assert [len(bench[s]) for s in ("train", "validation", "test", "compositional")] == [40, 8, 8, 12]
    video = bench["train"][0]["video"]
    assert video.shape == (8, 64, 64, 3) and video.dtype == np.uint8
    again = generate_synthetic_benchmark(SyntheticVideoTextConfig(seed=3, **SMALL), splits=["train"])["train"]
    np.testing.assert_array_equal(again[:5]["video"], bench["train"][:5]["video"])
    assert again["caption"] == bench["train"]["caption"]
    other = generate_split_metadata(SyntheticVideoTextConfig(seed=4, **SMALL), "train")
    assert [r["caption"] for r in other] != bench["train"]["caption"]
    # splits use their own streams: a bigger train split leaves validation unchanged
    bigger = generate_split_metadata(SyntheticVideoTextConfig(seed=3, **{**SMALL, "num_train": 50}), "validation")
    assert [r["caption"] for r in bigger] == bench["validation"]["caption"]
    # frames differ over time (motion) and the background covers the frame
    assert np.abs(video[0].astype(int) - video[-1].astype(int)).sum() > 0
    big = generate_synthetic_benchmark(
        SyntheticVideoTextConfig(image_size=96, num_frames=4, num_train=2, num_val=0, num_test=0, num_compositional=0),
        splits=["train"],
    )
    assert big["train"][0]["video"].shape == (4, 96, 96, 3)


def test_captions_and_qa_match_objects(bench):
    for row in bench["train"]:
        objects = row["objects"]
        assert 1 <= len(objects) == row["num_objects"] <= 3
        for obj in objects:
            assert obj["colour"] in row["caption"] and obj["shape"] in row["caption"]
        qa = dict(zip(row["questions"], row["answers"]))
        assert all(answer in SYNTHETIC_ANSWERS for answer in row["answers"])
        assert len(row["questions"]) == len(row["answers"]) == len(row["question_types"])
        count_q = [q for q, k in zip(row["questions"], row["question_types"]) if k == "count"][0]
        assert qa[count_q] == ["one", "two", "three"][len(objects) - 1]
        for question, answer, kind in zip(row["questions"], row["answers"], row["question_types"]):
            if kind == "motion":
                matches = [o for o in objects if f"the {o['colour']} {o['shape']} " in question]
                assert [o["motion"] for o in matches] == [answer]
            if kind == "shape":
                matches = [o for o in objects if f"the {o['colour']} object" in question]
                assert [o["shape"] for o in matches] == [answer]
            if kind == "exists":
                present = any(f"a {o['colour']} {o['shape']}?" in question for o in objects)
                assert answer == ("yes" if present else "no")


def test_object_pixels_have_the_object_colour(bench):
    row = bench["train"][1]
    for obj in row["objects"]:
        x, y = int(round(obj["x0"])), int(round(obj["y0"]))
        pixel = row["video"][0, y, x].astype(int)
        # the centre of every shape is filled
        assert np.abs(pixel - np.array(COLOURS[obj["colour"]])).max() <= 1


def test_compositional_split_held_out(bench):
    config = SyntheticVideoTextConfig(seed=3, **SMALL)
    held_cs, held_sm = set(config.held_out_colour_shape), set(config.held_out_shape_motion)

    def held(o):
        return (o["colour"], o["shape"]) in held_cs or (o["shape"], o["motion"]) in held_sm

    for split in ("train", "validation", "test"):
        assert not any(held(o) for row in bench[split] for o in row["objects"])
    assert all(any(held(o) for o in row["objects"]) for row in bench["compositional"])


def test_config_validation_and_corpus():
    with pytest.raises(ValueError, match="even"):
        SyntheticVideoTextConfig(image_size=63)
    with pytest.raises(ValueError, match="num_frames"):
        SyntheticVideoTextConfig(num_frames=1)
    with pytest.raises(ValueError, match="held-out"):
        SyntheticVideoTextConfig(held_out_colour_shape=(("pink", "circle"),))
    corpus = synthetic_text_corpus(SyntheticVideoTextConfig(num_train=5, num_val=1, num_test=1, num_compositional=1))
    assert any("circle" in t for t in corpus) and all(isinstance(t, str) for t in corpus)


def test_export_and_load(tmp_path, bench):
    config = SyntheticVideoTextConfig(seed=3, **SMALL)
    written = export_synthetic_benchmark(config, tmp_path, splits=["train", "compositional"])
    train = load_dataset("json", data_files=written["train"], split="train")
    assert len(train) == 40 and train["caption"] == bench["train"]["caption"]
    assert not any(word in name for name in train["file_name"] for word in ("train", "test", "val"))
    decoded = read_video_pyav(tmp_path / "train" / train[0]["file_name"], num_frames=8)
    original = bench["train"][0]["video"]
    assert decoded.shape == original.shape
    assert np.abs(decoded.astype(float) - original.astype(float)).mean() < 6
    # videofolder sees the split folders; decode=False keeps paths (no torchcodec needed)
    from datasets import Video

    folder = load_dataset("videofolder", data_dir=str(tmp_path), split="train").cast_column(
        "video", Video(decode=False)
    )
    assert len(folder) == 40 and "caption" in folder.column_names
    assert folder[0]["video"]["path"].endswith(".mp4")
