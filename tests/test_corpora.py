"""Corpora as they ship (webdataset shards, parquet with paths or bytes, save_to_disk, videofolder, MSR-VTT csv with a
template), the fast reader (same frames as today's), bad data, export-synthetic, and streaming that ends and resumes."""

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_helpers import make_tiny_student
from safetensors.torch import load_file

from clusterstm.data.decoding import read_video
from clusterstm.data.export import encode_mp4
from clusterstm.data.readers import VideoTextCollator
from clusterstm.data.sources import BadSampleError, expand_braces, load_training_corpus, resolve_data_files
from clusterstm.models.video_processing_clusterstm import VideoDecodingError, read_video_pyav
from clusterstm.training.pretraining import main as pretrain_main

REPO = Path(__file__).resolve().parents[1]
NUM_CLIPS = 16


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_tiny_student(tmp_path_factory.mktemp("student") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The synthetic benchmark (16 clips of 4 frames at 32 px) in every format, through `clusterstm export-synthetic`."""
    from clusterstm.cli import main as cli_main

    root = tmp_path_factory.mktemp("corpora")
    common = ["--splits", "train", "--num_train", str(NUM_CLIPS), "--num_frames", "4", "--image_size", "32"]
    for fmt in ("jsonl", "parquet", "webdataset"):
        extra = ["--samples_per_shard", "4"] if fmt == "webdataset" else []
        assert cli_main(["export-synthetic", "--format", fmt, "--output_dir", str(root / fmt), *common, *extra]) == 0
    return root


def _pretrain(student, out, *data_args, steps=2, batch=4, workers=0, extra=()):
    return pretrain_main(
        [
            "--model_name_or_path", str(student), "--output_dir", str(out), *map(str, data_args),
            "--max_steps", str(steps), "--per_device_train_batch_size", str(batch),
            "--dataloader_num_workers", str(workers), "--report_to", "none", "--disable_tqdm",
            "--logging_steps", "1", *map(str, extra),
        ]
    )  # fmt: skip


def test_export_synthetic_writes_each_format(corpora):
    assert len(list((corpora / "webdataset" / "train").glob("train-*.tar"))) == NUM_CLIPS // 4
    with tarfile.open(corpora / "webdataset" / "train" / "train-000000.tar") as archive:
        names = archive.getnames()
    assert names[:3] == ["t0-clip000000.mp4", "t0-clip000000.txt", "t0-clip000000.json"]
    assert (corpora / "parquet" / "train.parquet").is_file()
    rows = (corpora / "jsonl" / "train" / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == NUM_CLIPS and json.loads(rows[0])["file_name"] == "t0-clip000000.mp4"


def test_brace_and_glob_patterns(corpora):
    assert expand_braces("s-{000000..000002}.tar") == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    assert expand_braces("{a,b}/x-{8..10}.tar") == ["a/x-8.tar", "a/x-9.tar", "a/x-10.tar", "b/x-8.tar", "b/x-9.tar", "b/x-10.tar"]  # fmt: skip
    shards = corpora / "webdataset" / "train"
    builder, files = resolve_data_files(str(shards / "train-{000000..000003}.tar"))
    assert builder == "webdataset" and [Path(f).name for f in files] == [f"train-00000{i}.tar" for i in range(4)]
    assert resolve_data_files(str(shards / "*.tar"))[1] == files
    with pytest.raises(ValueError, match="matches no file"):
        resolve_data_files(str(shards / "nothing-*.tar"))
    with pytest.raises(
        ValueError, match=r"6 of 10 file\(s\) not found, e.g. '.*train-000004\.tar' ... '.*train-000009\.tar'"
    ):
        resolve_data_files(str(shards / "train-{000000..000009}.tar"))
    with pytest.raises(ValueError, match="Unsupported --train_file"):
        resolve_data_files(str(corpora / "jsonl" / "benchmark_config.json.txt"))


def _make_formats(corpora, tmp):
    """Data arguments of scripts/pretrain.py for every format of the 'Done when' list."""
    from datasets import load_dataset

    shards = corpora / "webdataset" / "train"
    videos = corpora / "jsonl" / "train"
    rows = [json.loads(line) for line in (videos / "metadata.jsonl").read_text().splitlines()]
    # parquet whose video column holds paths relative to --video_root
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"file_name": [r["file_name"] for r in rows], "caption": [r["caption"] for r in rows]}),
        tmp / "paths.parquet",
    )
    # save_to_disk folder holding the bytes
    load_dataset("parquet", data_files=str(corpora / "parquet" / "train.parquet"), split="train").save_to_disk(
        str(tmp / "saved")
    )
    # MSR-VTT style csv: video ids without extension, captions in `sentence`
    with open(tmp / "msrvtt.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "sentence"])
        for r in rows:
            writer.writerow([r["video_id"], r["caption"]])
    return {
        "webdataset-path": ["--train_file", shards / "train-000000.tar"],
        "webdataset-glob": ["--train_file", shards / "train-*.tar"],
        "webdataset-brace": ["--train_file", shards / "train-{000000..000003}.tar"],
        "parquet-paths": ["--train_file", tmp / "paths.parquet", "--video_root", videos],
        "parquet-bytes": ["--train_file", corpora / "parquet" / "train.parquet", "--video_column", "video"],
        "save_to_disk-bytes": ["--dataset_name", tmp / "saved"],
        "videofolder": ["--dataset_name", videos],
        "msrvtt-csv-template": [
            "--train_file", tmp / "msrvtt.csv", "--video_root", videos, "--video_path_template", "{video_id}.mp4",
            "--video_column", "video_id", "--caption_column", "sentence",
        ],
    }  # fmt: skip


def test_two_step_pretraining_on_every_format(student, corpora, tmp_path):
    formats = _make_formats(corpora, tmp_path)
    for name, data_args in formats.items():
        results = _pretrain(student, tmp_path / f"run-{name}", *data_args)
        assert results["global_step"] == 2, name
        assert np.isfinite(results["train_loss"]), name
    # The same formats stream too (webdataset brace pattern, parquet bytes).
    for name in ("webdataset-brace", "parquet-bytes"):
        results = _pretrain(student, tmp_path / f"stream-{name}", *formats[name], "--streaming")
        assert results["global_step"] == 2, name


def test_streaming_ends_past_one_epoch_and_skips_bad_samples(student, corpora, tmp_path):
    """Issue 19: an 8-row jsonl, --max_steps 3 at batch 4 needs a second pass; with --skip_bad_samples too."""
    videos = corpora / "jsonl" / "train"
    lines = (videos / "metadata.jsonl").read_text().splitlines()[:8]
    broken = json.loads(lines[2])["file_name"]
    (tmp_path / "videos").mkdir()
    for line in lines:
        name = json.loads(line)["file_name"]
        target = tmp_path / "videos" / name
        target.write_bytes(b"not a video" if name == broken else (videos / name).read_bytes())
    (tmp_path / "videos" / "ann8.jsonl").write_text("\n".join(lines) + "\n")
    cmd = [
        sys.executable, "scripts/pretrain.py", "--model_name_or_path", str(student),
        "--train_file", str(tmp_path / "videos" / "ann8.jsonl"), "--streaming", "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--skip_bad_samples", "--report_to", "none", "--disable_tqdm",
        "--output_dir", str(tmp_path / "run"), "--shuffle_buffer_size", "0",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "train_results.json").read_text())
    assert results["global_step"] == 3
    # 2 workers x 4 rows (worker 0: rows 0, 2, 4, 6): one batch per worker and epoch; steps 1 and 3 are worker 0's,
    # so the broken row 2 is read (and skipped) in epoch 0 and in epoch 1.
    assert results["bad_samples_skipped"] == 2
    assert broken in result.stderr


def test_streaming_resume_gives_the_same_weights(student, corpora, tmp_path):
    """A streamed run over 4 shards with 2 workers and a shuffle buffer, resumed from step 3 (mid-epoch, worker 1
    next, its reader replayed to its position), ends with the uninterrupted run's weights."""
    shards = ["--train_file", corpora / "webdataset" / "train" / "train-{000000..000003}.tar", "--streaming"]
    common = [*shards, "--checkpointing_steps", "3", "--shuffle_buffer_size", "3"]
    reference = tmp_path / "reference"
    _pretrain(student, reference, *common, steps=6, batch=2, workers=2)
    # 16 clips, 2 workers x 8: 4 batches of 2 per worker, 8 steps per epoch; step 3 was worker 0's second batch.
    state = json.loads((reference / "checkpoint-3" / "stream_state_0.json").read_text())
    assert state["epoch"] == 0 and state["batch_offset"] == 1 and state["num_workers"] == 2
    assert {k: v["examples"] for k, v in state["workers"].items()} == {"0": 4, "1": 2}
    resumed = tmp_path / "resumed"
    _pretrain(student, resumed, *common, "--resume_from_checkpoint", reference / "checkpoint-3", steps=6, batch=2, workers=2)  # fmt: skip
    expected, got = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


def test_streaming_resume_across_epochs_without_buffer(student, corpora, tmp_path):
    """--shuffle_buffer_size 0 restores readers with `IterableDataset.load_state_dict`; 4 steps per epoch, resumed
    from step 5 (epoch 1)."""
    common = ["--train_file", corpora / "webdataset" / "train" / "train-*.tar", "--streaming",
              "--checkpointing_steps", "5", "--shuffle_buffer_size", "0"]  # fmt: skip
    reference = tmp_path / "reference"
    _pretrain(student, reference, *common, steps=6, batch=4, workers=2)
    state = json.loads((reference / "checkpoint-5" / "stream_state_0.json").read_text())
    assert state["epoch"] == 1 and all(w["state_dict"] is not None for w in state["workers"].values())
    resumed = tmp_path / "resumed"
    _pretrain(student, resumed, *common, "--resume_from_checkpoint", reference / "checkpoint-5", steps=6, batch=4, workers=2)  # fmt: skip
    expected, got = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


@pytest.mark.slow
def test_two_processes_two_workers_four_shards_read_every_sample_once_per_epoch(corpora, student, tmp_path):
    worker = REPO / "tests" / "stream_worker.py"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
        str(corpora / "webdataset" / "train" / "train-{000000..000003}.tar"), str(student), str(tmp_path),
    ]  # fmt: skip
    env = _env()
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    all_keys = {f"train-{s:06d}.tar/t0-clip{i:06d}" for s in range(4) for i in range(4 * s, 4 * s + 4)}
    for epoch in ("0", "1"):
        seen = [key for rank in ranks for key in rank[epoch]["keys"]]
        assert len(seen) == len(set(seen)) == NUM_CLIPS, epoch
        assert set(seen) == all_keys
        # Every process got its own shards (two each), every worker of a process its own shard.
        shards = [{key.split("/")[0] for key in rank[epoch]["keys"]} for rank in ranks]
        assert len(shards[0]) == len(shards[1]) == 2 and not shards[0] & shards[1]
        assert all(rank[epoch]["batches"] == 4 for rank in ranks)
    # The shuffle buffer reorders differently in each epoch.
    assert ranks[0]["0"]["keys"] != ranks[0]["1"]["keys"]


# ---------------------------------------------------------------------------------------------------------- reader


def _encode(path, frames_count, keyint, size=32, bframes=True):
    import av

    rng = np.random.default_rng(frames_count + keyint)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(keyint), "bf": "3" if bframes else "0", "preset": "veryfast"}
        for t in range(frames_count):
            frame = np.roll(base, 3 * t, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize(
    "frames_count, keyint, bframes", [(60, 10, True), (60, 250, True), (37, 7, False), (3, 10, True)]
)
def test_fast_reader_returns_todays_frames(tmp_path, frames_count, keyint, bframes):
    path = tmp_path / "clip.mp4"
    _encode(path, frames_count, keyint, bframes=bframes)
    data = path.read_bytes()
    for sampling, seeds in (("uniform", [None]), ("random", [0, 1, 2, 3, 4])):
        for seed in seeds:
            expected = read_video_pyav(path, 8, sampling, seed)
            assert np.array_equal(read_video(path, 8, sampling, seed), expected), (sampling, seed)
            assert np.array_equal(read_video(data, 8, sampling, seed), expected), (sampling, seed)


def test_fast_reader_errors_name_the_source(tmp_path):
    with pytest.raises(VideoDecodingError, match="shard 'a.tar', sample key 'k1'"):
        read_video(b"\x00\x01garbage" * 10, 4, name="shard 'a.tar', sample key 'k1'")
    with pytest.raises(VideoDecodingError, match="not found"):
        read_video(tmp_path / "missing.mp4", 4)
    with pytest.raises(VideoDecodingError, match="empty"):
        read_video(b"", 4)


# ---------------------------------------------------------------------------------------------------------- bad data


@pytest.fixture(scope="module")
def processor(student):
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor

    return ClusterSTMProcessor.from_pretrained(student)


def _write_shard(path, samples):
    with tarfile.open(path, "w") as archive:
        for key, members in samples:
            for extension, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))


def test_bad_webdataset_samples_are_named_or_skipped_and_counted(processor, tmp_path):
    clip = encode_mp4(np.full((4, 32, 32, 3), 90, dtype=np.uint8))

    def sample(key, video=clip, txt=b"a red circle", caption="a red circle"):
        members = {"mp4": video, "json": json.dumps({"caption": caption}).encode()}
        if txt is not None:
            members["txt"] = txt
        return key, members

    samples = [sample(f"good{i}") for i in range(5)]
    samples += [sample("nocaption", txt=None, caption=""), sample("garbage", video=b"\x00not a video" * 20)]
    samples += [sample("jsononly", txt=None, caption="a green star")]
    shard = tmp_path / "shard-000000.tar"
    _write_shard(shard, samples)
    corpus = load_training_corpus(train_file=str(shard), streaming=True)
    rows = list(corpus.dataset)
    assert [r["__key__"] for r in rows][5:] == ["nocaption", "garbage", "jsononly"]
    strict = VideoTextCollator(processor, resolver=corpus.resolver)
    with pytest.raises(BadSampleError, match=r"shard 'shard-000000.tar', sample key 'nocaption': no caption"):
        strict([rows[0], rows[5]])
    with pytest.raises(VideoDecodingError, match=r"shard 'shard-000000.tar', sample key 'garbage'"):
        strict([rows[0], rows[6]])
    lenient = VideoTextCollator(processor, resolver=corpus.resolver, skip_bad_samples=True)
    batch = lenient(rows[4:])
    assert int(batch["num_skipped_samples"]) == 2 and batch["pixel_values"].shape[0] == 4
    assert batch["clip_key"][0] == "shard-000000.tar/good4" and batch["clip_key"][3] == "shard-000000.tar/jsononly"
    # Members differing among the first samples (from which `datasets` infers the columns) are named too.
    mixed = tmp_path / "mixed-000000.tar"
    _write_shard(mixed, [sample("a"), sample("b", txt=None)])
    with pytest.raises(
        ValueError, match=r"mixed-000000.tar.*sample key 'a': \['json', 'mp4', 'txt'\]; sample key 'b'"
    ):
        load_training_corpus(train_file=str(mixed))


def test_corrupt_or_truncated_shard_is_named_with_the_last_good_key(tmp_path):
    clip = encode_mp4(np.full((4, 32, 32, 3), 90, dtype=np.uint8))
    good = tmp_path / "train-000000.tar"
    _write_shard(good, [(f"k{i}", {"mp4": clip, "txt": b"a clip"}) for i in range(6)])
    truncated = tmp_path / "train-000001.tar"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(
        ValueError, match=r"Corrupt or truncated webdataset shard '.*train-000001\.tar'.*after sample key 'k"
    ):
        load_training_corpus(train_file=str(tmp_path / "train-{000000..000001}.tar"))
    # --skip_bad_samples leaves the shard out of a map-style load (and says which) ...
    corpus = load_training_corpus(train_file=str(tmp_path / "train-{000000..000001}.tar"), skip_bad_shards=True)
    assert corpus.skipped_shards == [str(truncated)] and len(corpus.dataset) == 6
    # ... and a stream that hits it stops naming it.
    from clusterstm.data.streaming import ShardedStream

    corpus = load_training_corpus(train_file=str(tmp_path / "train-{000000..000001}.tar"), streaming=True)
    stream = ShardedStream(corpus.dataset, shard_files=corpus.shard_files)
    with pytest.raises(ValueError, match=r"Corrupt or truncated webdataset shard '.*train-000001\.tar'"):
        list(stream)


def test_template_naming_no_file_and_bytes_columns(processor, tmp_path):
    from datasets import Dataset

    clip = encode_mp4(np.full((4, 32, 32, 3), 40, dtype=np.uint8))
    (tmp_path / "video1.mp4").write_bytes(clip)
    (tmp_path / "msrvtt.csv").write_text("video_id,sentence\nvideo1,a man sings\nvideo2,a dog runs\n")
    corpus = load_training_corpus(
        train_file=str(tmp_path / "msrvtt.csv"), video_column="video_id", caption_column="sentence",
        video_path_template="{video_id}.mp4",
    )  # fmt: skip
    collator = VideoTextCollator(processor, caption_column="sentence", resolver=corpus.resolver)
    assert collator([corpus.dataset[0]])["pixel_values"].shape[:2] == (1, 4)
    with pytest.raises(VideoDecodingError, match=r"msrvtt\.csv: row with video_id='video2'.*video2\.mp4"):
        collator([corpus.dataset[1]])
    bad_template = load_training_corpus(
        train_file=str(tmp_path / "msrvtt.csv"), video_column="video_id", caption_column="sentence",
        video_path_template="{clip}.mp4",
    )  # fmt: skip
    with pytest.raises(BadSampleError, match="cannot be formatted.*columns"):
        bad_template.resolver(bad_template.dataset[0])
    # Raw bytes and the {bytes, path} struct both decode from memory.
    Dataset.from_dict({"video": [clip, clip], "caption": ["a", "b"]}).to_parquet(str(tmp_path / "raw.parquet"))
    raw = load_training_corpus(train_file=str(tmp_path / "raw.parquet"), video_column="video")
    batch = VideoTextCollator(processor, resolver=raw.resolver)([raw.dataset[0], raw.dataset[1]])
    assert batch["pixel_values"].shape[:2] == (2, 4) and batch["clip_key"][0].startswith("bytes-")


def test_uint8_batches_normalised_later_equal_the_float_batches(processor, corpora):
    corpus = load_training_corpus(train_file=str(corpora / "parquet" / "train.parquet"), video_column="video")
    rows = [corpus.dataset[i] for i in range(3)]
    float_batch = VideoTextCollator(processor, resolver=corpus.resolver)(rows)
    uint8_collator = VideoTextCollator(processor, resolver=corpus.resolver, uint8_pixels=True)
    uint8_batch = uint8_collator(rows)
    assert uint8_batch["pixel_values"].dtype == torch.uint8
    assert uint8_batch["pixel_values"].shape == float_batch["pixel_values"].shape
    assert torch.equal(uint8_collator.normalize_pixel_values(uint8_batch["pixel_values"]), float_batch["pixel_values"])
