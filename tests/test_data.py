"""Tests of the data pipeline: annotation loading, validation, and the decoding collator."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from clusterstm.data.readers import VideoTextCollator, load_video_text_dataset, resolve_video_path
from clusterstm.data.synthetic import SyntheticVideoTextConfig, write_video_pyav
from clusterstm.data.tokenization import train_wordpiece_tokenizer
from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
from clusterstm.models.video_processing_clusterstm import ClusterSTMVideoProcessor, VideoDecodingError


@pytest.fixture(scope="module")
def processor():
    tokenizer = train_wordpiece_tokenizer(
        ["a red circle moves left", "a blue square grows", "clip number"] * 3, vocab_size=200
    )
    video_processor = ClusterSTMVideoProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, num_frames=4
    )
    return ClusterSTMProcessor(video_processor=video_processor, tokenizer=tokenizer)


def make_corpus(root, num=4, bad=()):
    rows = []
    for i in range(num):
        name = f"clip{i}.mp4"
        if i in bad:
            (root / name).write_bytes(b"")
        else:
            frames = np.full((6, 32, 32, 3), 20 * i, dtype=np.uint8)
            write_video_pyav(root / name, frames)
        rows.append({"file_name": name, "caption": f"a red circle moves left {i}"})
    path = root / "metadata.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_load_jsonl_and_csv(tmp_path):
    path = make_corpus(tmp_path)
    dataset = load_video_text_dataset(train_file=path)
    assert len(dataset) == 4 and dataset[0]["video_path"].endswith("clip0.mp4")
    csv = tmp_path / "ann.csv"
    csv.write_text("video,text\nclip1.mp4,a blue square grows\n")
    dataset = load_video_text_dataset(train_file=csv, video_column="video", caption_column="text")
    assert dataset[0]["text"] == "a blue square grows"
    streamed = load_video_text_dataset(train_file=path, streaming=True)
    assert next(iter(streamed))["video_path"].endswith("clip0.mp4")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"file_name": "clip0.mp4", "caption": ""}, "'caption' is missing or empty"),
        ({"file_name": "", "caption": "a clip"}, "'file_name' is missing or empty"),
        ({"file_name": "../outside.mp4", "caption": "a clip"}, "outside the video root"),
        ({"file_name": "/etc/passwd", "caption": "a clip"}, "outside the video root"),
    ],
)
def test_bad_rows_rejected(tmp_path, row, message):
    root = tmp_path / "videos"
    root.mkdir()
    path = root / "ann.jsonl"
    path.write_text(json.dumps({"file_name": "clip0.mp4", "caption": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_video_text_dataset(train_file=path)
    assert "Row 1" in str(info.value)


def test_missing_column_and_escape_helper(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_text(json.dumps({"path": "a.mp4", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="Column 'file_name' not found"):
        load_video_text_dataset(train_file=path)
    with pytest.raises(ValueError, match="outside"):
        resolve_video_path(str(tmp_path), "a/../../b.mp4", row=3)


def test_collator_decodes_batches(tmp_path, processor):
    dataset = load_video_text_dataset(train_file=make_corpus(tmp_path))
    teacher = train_wordpiece_tokenizer(["another tokenizer for the teacher"], vocab_size=100)
    collator = VideoTextCollator(processor, teacher_tokenizer=teacher, sampling="random")
    torch.manual_seed(0)
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collator, num_workers=2)))
    assert batch["pixel_values"].shape == (4, 4, 3, 32, 32)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "teacher_input_ids", "teacher_attention_mask"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    # clip i is a flat grey of value 20*i: pixel order follows the rows
    means = batch["pixel_values"].mean(dim=(1, 2, 3, 4))
    assert torch.all(means[1:] > means[:-1])


def test_collator_bad_samples(tmp_path, processor):
    dataset = load_video_text_dataset(train_file=make_corpus(tmp_path, bad=(2,)))
    rows = [dataset[i] for i in range(4)]
    with pytest.raises(VideoDecodingError, match="clip2.mp4"):
        VideoTextCollator(processor)(rows)
    collator = VideoTextCollator(processor, skip_bad_samples=True)
    batch = collator(rows)
    assert batch["pixel_values"].shape[0] == 4 and int(batch["num_skipped_samples"]) == 1
    assert collator.num_skipped == 1
    with_dataset = VideoTextCollator(processor, skip_bad_samples=True, dataset=dataset)
    assert with_dataset(rows)["pixel_values"].shape[0] == 4 and with_dataset.num_skipped >= 1
    with pytest.raises(VideoDecodingError, match="Every video"):
        collator([rows[2]])


def test_synthetic_source(processor):
    config = SyntheticVideoTextConfig(num_train=6, num_val=2, num_test=2, num_compositional=2, image_size=32)
    dataset = load_video_text_dataset("synthetic", split="validation", synthetic_config=config)
    assert len(dataset) == 2
    batch = VideoTextCollator(processor)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 4, 3, 32, 32)
    streamed = load_video_text_dataset("synthetic", split="train", streaming=True, synthetic_config=config)
    assert sum(1 for _ in streamed) == 6


def test_exported_folder_source(tmp_path, processor):
    from clusterstm.data.synthetic import export_synthetic_benchmark

    config = SyntheticVideoTextConfig(num_train=3, num_val=2, num_test=0, num_compositional=0, image_size=32)
    export_synthetic_benchmark(config, tmp_path, splits=["train", "validation"])
    dataset = load_video_text_dataset(str(tmp_path), split="val")
    assert len(dataset) == 2
    batch = VideoTextCollator(processor)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 4, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------------------------
# Bad annotation files name the file, the line and the column; odd but valid rows are accepted
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"ann\.jsonl is empty"),
        (b"\n  \n", r"ann\.jsonl holds no records"),
        (
            b'{"file_name": "a.mp4", "caption": "ok"}\n{"file_name": "b.mp4", caption\n',
            r"ann\.jsonl: line 2 is not valid JSON .*column 24",
        ),
        (
            b'{"file_name": "a.mp4", "caption": "ok"}\n{"file_name": "b.mp4", "caption": "caf\xe9"}\n',
            r"ann\.jsonl: line 2 is not valid UTF-8 \(byte 39",
        ),
        (
            b'{"file_name": "a.mp4", "caption": "ok"}\n[1, 2]\n',
            r"ann\.jsonl: line 2 is a JSON list, expected an object",
        ),
    ],
)
def test_bad_annotation_files_name_file_and_line(tmp_path, content, message, streaming):
    path = tmp_path / "ann.jsonl"
    path.write_bytes(content)
    if streaming and "line 2" in message:
        content = content.split(b"\n", 1)[1]  # streaming checks the first record before training (documented)
        path.write_bytes(content)
        message = message.replace("line 2", "line 1")
    with pytest.raises(ValueError, match=message):
        load_video_text_dataset(train_file=path, streaming=streaming)


def test_odd_but_valid_rows_are_accepted(tmp_path, processor):
    corpus = make_corpus(tmp_path)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    # an integer `video` column (an id) and a user column called `video_path` next to the real video column
    for i, row in enumerate(rows):
        row.update(video=1000 + i, video_path=f"user value {i}")
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for streaming in (False, True):
        dataset = load_video_text_dataset(train_file=corpus, streaming=streaming)
        first = next(iter(dataset))
        assert (
            first["video_path"] == str(tmp_path / rows[0]["file_name"]) and first["user_video_path"] == "user value 0"
        )
        batch = VideoTextCollator(processor)([first])
        assert batch["pixel_values"].shape[0] == 1
    # CSV captions "None" / "NA" / "null" are text, not missing values; an empty cell still is missing
    csv = tmp_path / "ann.csv"
    csv.write_text(
        "file_name,caption\n" + "".join(f"{r['file_name']},{c}\n" for r, c in zip(rows, ["None", "NA", "null", "n/a"]))
    )
    assert load_video_text_dataset(train_file=csv)["caption"] == ["None", "NA", "null", "n/a"]
    csv.write_text(f"file_name,caption\n{rows[0]['file_name']},ok\n{rows[1]['file_name']},\n")
    with pytest.raises(ValueError, match=r"ann\.csv: Row 1: field 'caption' is missing"):
        load_video_text_dataset(train_file=csv)
    # a `video` column that is neither a path nor a clip is an error naming the column
    with pytest.raises(ValueError, match="Column 'video' holds int 7"):
        VideoTextCollator(processor)([{"video": 7, "caption": "x"}])
