"""Reliability: fp32 numerics under autocast, bad input at every public entry point, masking invariants.

Every bad input must end in a `ValueError` (or its subclass `VideoDecodingError`) whose message names the problem
(the file, the field, the tensor), never in a NaN loss or an IndexError from deep inside.
"""

from __future__ import annotations

import fractions
import json
import os

import av
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_modeling import FRAMES, GRID, SIZE, inputs, small_config
from torch.utils.data import DataLoader
from transformers import CLIPConfig, CLIPModel

from clusterstm.data.readers import VideoTextCollator, load_video_text_dataset
from clusterstm.data.tokenization import train_wordpiece_tokenizer
from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
from clusterstm.models.masking_clusterstm import (
    attention_guided_mask,
    build_mask,
    cluster_wise_mask,
    dpc_knn,
    num_visible_tokens,
    random_mask,
    temporal_density,
    tube_mask,
)
from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining, ClusterSTMModel, ClusterSTMVisionModel
from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
from clusterstm.models.video_processing_clusterstm import ClusterSTMVideoProcessor, VideoDecodingError
from clusterstm.teacher.relevance import build_window_pooler, generate_relevance
from clusterstm.training.pretraining import PretrainingArguments, pretraining_forward

AUTOCAST = {"device_type": "cpu", "dtype": torch.bfloat16}

# ---------------------------------------------------------------------------------------------------------------------
# 1. Numerics: masking and relevance are computed in float32 even under autocast
# ---------------------------------------------------------------------------------------------------------------------


def test_masking_is_fp32_under_autocast():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 12)
    attention = torch.rand(2, 4, 16)
    reference = {
        "mask": cluster_wise_mask(x, 0.75),
        "single_frame": cluster_wise_mask(x[:, :1], 0.5),
        "density": temporal_density(x),
        "dpc": dpc_knn(x.reshape(8, 16, 12), 4),
        "attention": attention_guided_mask(attention, 0.75, generator=torch.Generator().manual_seed(3)),
    }
    for inputs_dtype in (torch.float32, torch.bfloat16):
        xi = x.to(inputs_dtype)
        with torch.autocast(**AUTOCAST):
            got = {
                "mask": cluster_wise_mask(xi, 0.75),
                "single_frame": cluster_wise_mask(xi[:, :1], 0.5),
                "density": temporal_density(xi),
                "dpc": dpc_knn(xi.reshape(8, 16, 12), 4),
                "attention": attention_guided_mask(attention, 0.75, generator=torch.Generator().manual_seed(3)),
            }
        assert got["density"].dtype == torch.float32
        if inputs_dtype == torch.float32:
            # bit-identical to the computation without autocast (with low-precision bmm the masks differ)
            assert torch.equal(got["mask"], reference["mask"])
            assert torch.equal(got["single_frame"], reference["single_frame"])
            assert torch.equal(got["density"], reference["density"])
            assert all(torch.equal(a, b) for a, b in zip(got["dpc"], reference["dpc"]))
            assert torch.equal(got["attention"], reference["attention"])
        else:
            # bf16 inputs: same as up-casting them first, outside autocast
            assert torch.equal(got["mask"], cluster_wise_mask(xi.float(), 0.75))
            assert torch.equal(got["density"], temporal_density(xi.float()))
    # autocast is restored afterwards
    with torch.autocast(**AUTOCAST):
        cluster_wise_mask(x, 0.75)
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def _tiny_clip() -> CLIPModel:
    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4}
    text = {**vision, "vocab_size": 99, "max_position_embeddings": 16}
    return CLIPModel(CLIPConfig(text_config=text, vision_config={**vision, "image_size": 16, "patch_size": 4})).eval()


def test_relevance_is_fp32_under_autocast():
    model = _tiny_clip()
    pooler = build_window_pooler(model)
    torch.manual_seed(1)
    tokens, text = torch.randn(2, 3, 16, 32), torch.randn(2, model.config.projection_dim)
    reference = generate_relevance(tokens, text, pooler, window_size=3)
    with torch.autocast(**AUTOCAST):
        got = generate_relevance(tokens, text, pooler, window_size=3)
        # what the pooler alone gives under autocast: low precision (the point of switching autocast off)
        low = pooler(tokens[0, 0, :9][None])
    assert low.dtype == torch.bfloat16
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)
    # a plain nn.Module pooler keeps working with autocast off (windows follow its dtype)
    linear = torch.nn.Linear(32, 8)
    with torch.autocast(**AUTOCAST):
        out = generate_relevance(tokens.bfloat16(), torch.randn(2, 8), lambda w: linear(w.float().mean(1)))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_pretraining_loss_under_bf16_autocast_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    model = ClusterSTMForPreTraining(small_config(alignment_loss_weight=1.0)).train()
    model.config.mlm_loss_weight = 0.0  # random MLM positions would differ between the two runs
    pixel_values, input_ids, attention_mask = inputs()
    generator = torch.Generator().manual_seed(1)
    teacher = {
        "teacher_patch_tokens": torch.randn(3, FRAMES, GRID, 64, generator=generator),
        "teacher_relevance": torch.rand(3, FRAMES, GRID, generator=generator),
    }
    batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask, **teacher}
    grid = dict(batch_size=3, num_frames=FRAMES, num_patches=GRID, mask_ratio=0.5)
    mask = build_mask("cluster", **grid, features=teacher["teacher_patch_tokens"])
    with torch.autocast(**AUTOCAST):
        low_mask = build_mask("cluster", **grid, features=teacher["teacher_patch_tokens"])
    # the cluster mask is computed in fp32: identical under autocast
    assert torch.equal(low_mask, mask)
    torch.manual_seed(2)
    reference = model(**batch, bool_masked_pos=mask)
    torch.manual_seed(2)
    with torch.autocast(**AUTOCAST):
        low = model(**batch, bool_masked_pos=low_mask)
    for name in ("loss", "contrastive_loss", "relevance_loss", "alignment_loss"):
        value = getattr(low, name)
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value), name
        torch.testing.assert_close(value, getattr(reference, name), rtol=0.05, atol=0.02, msg=name)
    low.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Bad input at every public entry point
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    tokenizer = train_wordpiece_tokenizer(["a red circle moves left", "a blue square grows"] * 3, vocab_size=120)
    video_processor = ClusterSTMVideoProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, num_frames=FRAMES
    )
    return ClusterSTMProcessor(video_processor=video_processor, tokenizer=tokenizer)


def ramp_frames(num_frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Frame t is a flat grey of value 20 + 25 t (decoded frames reveal their index)."""
    return np.stack([np.full((height, width, 3), 20 + 25 * t, dtype=np.uint8) for t in range(num_frames)])


def write_video(path, frames, codec="libx264", pix_fmt="yuv420p", frame_format="rgb24", pts=None) -> str:
    """Encode frames with PyAV; `pts` (milliseconds) gives every frame its own timestamp (variable frame rate)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=None if pts is not None else 10)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if pts is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for t, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=frame_format)
            if pts is not None:
                video_frame.pts, video_frame.time_base = int(pts[t]), fractions.Fraction(1, 1000)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def make_bad_file(folder, kind: str) -> str:
    path = folder / f"bad_{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path.write_text("id,caption\n1,not a video\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "audio_only":
        path = folder / "bad_audio_only.mkv"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("pcm_s16le", rate=8000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
            frame.sample_rate = 8000
            for packet in stream.encode(frame):
                container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    elif kind.startswith("truncated"):
        full = write_video(folder / f"full_{kind}.mp4", ramp_frames(8))
        data = open(full, "rb").read()
        path.write_bytes(data[: int(len(data) * float(kind.split("_")[1]))])
    elif kind != "missing":
        raise AssertionError(kind)
    return str(path)


BAD_FILES = ["missing", "empty", "corrupt", "text", "directory", "audio_only", "truncated_0.2", "truncated_0.5"]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_video_files_name_the_file_everywhere(tmp_path, processor, kind):
    path = make_bad_file(tmp_path, kind)
    name = os.path.basename(path)
    # the processor
    with pytest.raises(VideoDecodingError, match=name):
        processor(videos=[path], text=["a red circle"], return_tensors="pt")
    # the collator, directly and inside DataLoader worker processes
    rows = [{"video_path": path, "caption": "a red circle"}]
    with pytest.raises(VideoDecodingError, match=name):
        VideoTextCollator(processor)(rows)
    if kind == "corrupt":
        loader = DataLoader(rows, batch_size=1, collate_fn=VideoTextCollator(processor), num_workers=1)
        with pytest.raises(VideoDecodingError, match=name):
            next(iter(loader))


def test_truncated_files_decode_or_fail_naming_the_file(tmp_path, processor):
    """Cut a valid mp4 anywhere: either the frames that survive are used, or the error names the file."""
    full = write_video(tmp_path / "full.mp4", ramp_frames(8))
    data = open(full, "rb").read()
    outcomes = set()
    for fraction in np.linspace(0.05, 0.98, 9):
        path = tmp_path / f"cut_{int(fraction * 100)}.mp4"
        path.write_bytes(data[: int(len(data) * fraction)])
        try:
            pixel_values = processor(videos=str(path), return_tensors="pt")["pixel_values"]
        except VideoDecodingError as error:
            assert path.name in str(error)
            outcomes.add("error")
        else:
            assert pixel_values.shape == (1, FRAMES, 3, SIZE, SIZE) and torch.isfinite(pixel_values).all()
            outcomes.add("decoded")
    assert "error" in outcomes


def test_load_video_text_dataset_verify_files(tmp_path):
    good = write_video(tmp_path / "good.mp4", ramp_frames(4))
    (tmp_path / "empty.mp4").write_bytes(b"")
    rows = [
        {"file_name": os.path.basename(good), "caption": "fine"},
        {"file_name": "gone.mp4", "caption": "missing file"},
        {"file_name": "empty.mp4", "caption": "empty file"},
    ]
    annotations = tmp_path / "ann.jsonl"
    annotations.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # paths only by default (cheap); the collator then names the file
    assert len(load_video_text_dataset(train_file=annotations)) == 3
    with pytest.raises(VideoDecodingError, match="gone.mp4") as error:
        load_video_text_dataset(train_file=annotations, verify_files=True)
    assert "Row 1" in str(error.value)
    annotations.write_text("\n".join(json.dumps(r) for r in rows[::2]) + "\n")
    with pytest.raises(VideoDecodingError, match=r"Row 1.*empty\.mp4"):
        load_video_text_dataset(train_file=annotations, verify_files=True)
    annotations.write_text(json.dumps(rows[0]) + "\n")
    assert len(load_video_text_dataset(train_file=annotations, verify_files=True)) == 1


def test_awkward_but_valid_videos_are_handled(tmp_path, processor):
    rng = np.random.default_rng(0)
    videos = {
        # shorter than num_frames: frames are repeated
        "short": write_video(tmp_path / "short.mp4", ramp_frames(2)),
        "single_frame": write_video(tmp_path / "single.mp4", ramp_frames(1)),
        # grayscale stored as gray (ffv1 / mkv keeps the gray pixel format; the container stores no frame count)
        "grayscale": write_video(
            tmp_path / "gray.mkv",
            rng.integers(0, 255, (5, 32, 32), dtype=np.uint8),
            codec="ffv1",
            pix_fmt="gray",
            frame_format="gray",
        ),
        # odd sizes (yuv444p allows them in h264), not square
        "odd_size": write_video(
            tmp_path / "odd.mp4", rng.integers(0, 255, (5, 33, 47, 3), dtype=np.uint8), pix_fmt="yuv444p"
        ),
        # variable frame rate: irregular timestamps
        "vfr": write_video(tmp_path / "vfr.mp4", ramp_frames(8), pts=[0, 10, 15, 200, 210, 600, 601, 1000]),
    }
    with av.open(videos["vfr"]) as container:
        stamps = [frame.pts for frame in container.decode(video=0)]
    gaps = np.diff(stamps)
    assert gaps.max() > 10 * gaps.min()  # really variable
    with av.open(videos["grayscale"]) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "gray"
    pixel_values = processor(videos=list(videos.values()), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (5, FRAMES, 3, SIZE, SIZE) and torch.isfinite(pixel_values).all()
    mean = torch.tensor(processor.video_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.video_processor.image_std)[:, None, None]
    grey = (pixel_values * std + mean).mean(dim=(2, 3, 4)) * 255  # per-frame grey level
    # 2-frame video -> frames 0, 0, 1, 1; one frame -> 4 copies; VFR: frame indices 1, 3, 5, 7 whatever the stamps
    torch.testing.assert_close(grey[0], torch.tensor([20.0, 20.0, 45.0, 45.0]), atol=3.0, rtol=0)
    torch.testing.assert_close(grey[1], torch.full((4,), 20.0), atol=3.0, rtol=0)
    torch.testing.assert_close(grey[4], torch.tensor([45.0, 95.0, 145.0, 195.0]), atol=3.0, rtol=0)
    # grayscale: the three channels carry the same grey
    frames = pixel_values[2] * std + mean
    torch.testing.assert_close(frames[:, 0], frames[:, 1], atol=1e-5, rtol=0)
    # and the model runs on all of them
    model = ClusterSTMModel(small_config()).eval()
    with torch.no_grad():
        embeds = model.get_video_features(pixel_values=pixel_values)
    embeds = embeds if isinstance(embeds, torch.Tensor) else embeds.pooler_output
    assert torch.isfinite(embeds).all()


def test_captions_empty_rejected_long_truncated(tmp_path, processor):
    video = write_video(tmp_path / "v.mp4", ramp_frames(4))
    long_caption = " ".join(["a red circle moves left"] * 400)
    out = processor(videos=[video], text=[long_caption], return_tensors="pt")
    assert out["input_ids"].shape[1] == processor.tokenizer.model_max_length
    for bad in ("", "   \n"):
        with pytest.raises(ValueError, match="Empty text at batch position"):
            processor(videos=[video], text=[bad], return_tensors="pt")
    collator = VideoTextCollator(processor)
    batch = collator([{"video_path": video, "caption": long_caption}])
    assert batch["input_ids"].shape[1] <= processor.tokenizer.model_max_length
    short = VideoTextCollator(processor, max_length=12)([{"video_path": video, "caption": long_caption}])
    assert short["input_ids"].shape[1] == 12
    for bad in ("", None):
        with pytest.raises(ValueError, match="'caption' is missing or empty"):
            collator([{"video_path": video, "caption": bad}])
    with pytest.raises(ValueError, match="needs `videos`, `text`"):
        processor()
    with pytest.raises(ValueError, match="2 videos but 1 texts"):
        processor(videos=[video, video], text=["one"], return_tensors="pt")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"file_name": "clip.mp4"}, "'caption' is missing or empty"),
        ({"caption": "no video field"}, "'file_name' is missing or empty"),
        ({"file_name": 17, "caption": "a number"}, "'file_name' is missing or empty"),
        ({"file_name": "clip.mp4", "caption": 5}, "'caption' is missing or empty"),
        ({"file_name": "../../escape.mp4", "caption": "up"}, "outside the video root"),
        ({"file_name": "link/escape.mp4", "caption": "through a symlink"}, "outside the video root"),
    ],
)
def test_metadata_rows_rejected(tmp_path, row, message):
    root = tmp_path / "videos"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")  # a symlink inside the root pointing outside it
    annotations = root / "ann.jsonl"
    good = {"file_name": "clip.mp4", "caption": "fine"}
    annotations.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=message) as error:
        load_video_text_dataset(train_file=annotations)
    assert "Row 1" in str(error.value)
    # csv: an empty cell is a missing field
    csv = root / "ann.csv"
    csv.write_text("file_name,caption\nclip.mp4,fine\nclip.mp4,\n")
    with pytest.raises(ValueError, match="Row 1: field 'caption' is missing or empty"):
        load_video_text_dataset(train_file=csv)


def test_dataset_level_errors(tmp_path):
    with pytest.raises(ValueError, match="Annotation file not found"):
        load_video_text_dataset(train_file=tmp_path / "nope.jsonl")
    (tmp_path / "ann.txt").write_text("x")
    with pytest.raises(ValueError, match="Unsupported annotation file"):
        load_video_text_dataset(train_file=tmp_path / "ann.txt")
    (tmp_path / "ann.jsonl").write_text(json.dumps({"file_name": "a.mp4", "caption": "c"}) + "\n")
    with pytest.raises(ValueError, match="Video root folder not found"):
        load_video_text_dataset(train_file=tmp_path / "ann.jsonl", video_root=tmp_path / "missing_root")
    with pytest.raises(ValueError, match="dataset_name"):
        load_video_text_dataset()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return ClusterSTMModel(small_config()).eval()


@pytest.mark.parametrize(
    "kind, message",
    [
        ("rank3", "pixel_values must have shape"),
        ("rank6", "pixel_values must have shape"),
        ("channels_last", "channels"),
        ("uint8", "pixel_values must be a floating point tensor"),
        ("int64", "pixel_values must be a floating point tensor"),
        ("bool", "pixel_values must be a floating point tensor"),
        ("nan", "pixel_values contains non-finite"),
        ("inf", "pixel_values contains non-finite"),
        ("frame_size", "not divisible by the patch size"),
        ("ids_rank1", "input_ids"),
        ("ids_float", "input_ids"),
        ("batch_mismatch", "batch size 3 but input_ids has 2"),
    ],
)
def test_model_rejects_bad_tensors(tiny_model, kind, message):
    pixel_values, input_ids, attention_mask = inputs()
    if kind == "rank3":
        pixel_values = pixel_values[0, 0]
    elif kind == "rank6":
        pixel_values = pixel_values[None]
    elif kind == "channels_last":
        pixel_values = pixel_values.permute(0, 1, 3, 4, 2)
    elif kind == "uint8":
        pixel_values = (pixel_values * 50 + 128).clamp(0, 255).to(torch.uint8)
    elif kind in ("int64", "bool"):
        pixel_values = pixel_values > 0 if kind == "bool" else pixel_values.long()
    elif kind in ("nan", "inf"):
        pixel_values[1, 2, 0, 3, 4] = float("nan") if kind == "nan" else float("inf")
    elif kind == "frame_size":
        pixel_values = pixel_values[..., :20, :20]
    elif kind == "ids_rank1":
        input_ids, attention_mask = input_ids[0], attention_mask[0]
    elif kind == "ids_float":
        input_ids = input_ids.float()
    elif kind == "batch_mismatch":
        input_ids, attention_mask = input_ids[:2], attention_mask[:2]
    with pytest.raises(ValueError, match=message):
        tiny_model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, return_loss=True)


@pytest.mark.parametrize("kind", ["uint8", "nan"])
def test_vision_tower_and_pretraining_reject_bad_pixels(kind):
    torch.manual_seed(0)
    config = small_config()
    pixel_values, input_ids, attention_mask = inputs()
    if kind == "uint8":
        pixel_values, message = pixel_values.to(torch.uint8), "floating point"
    else:
        pixel_values[0, 0, 0, 0, 0], message = float("nan"), "non-finite"
    with pytest.raises(ValueError, match=f"pixel_values.*{message}"):
        ClusterSTMVisionModel(config.vision_config)(pixel_values=pixel_values)
    with pytest.raises(ValueError, match=f"pixel_values.*{message}"):
        ClusterSTMForPreTraining(config).train()(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            teacher_patch_tokens=torch.randn(3, FRAMES, GRID, 64),
            teacher_relevance=torch.rand(3, FRAMES, GRID),
        )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"teacher_patch_tokens": torch.randn(3, FRAMES, 64, 64)}, "teacher_patch_tokens has the token grid"),
        ({"teacher_patch_tokens": torch.randn(3, FRAMES, GRID, 10)}, "teacher_hidden_size"),
        ({"teacher_relevance": torch.rand(3, FRAMES, 9)}, "teacher_relevance has the token grid"),
        ({"teacher_relevance": torch.rand(3, GRID)}, "teacher_relevance"),
        ({"teacher_relevance": torch.rand(2, FRAMES, GRID)}, "teacher_relevance.*batch"),
        ({"teacher_patch_tokens": torch.randn(2, FRAMES, GRID, 64)}, "teacher_patch_tokens.*batch"),
        ({"teacher_patch_tokens": torch.randint(0, 5, (3, FRAMES, GRID, 64))}, "teacher_patch_tokens"),
    ],
)
def test_teacher_student_mismatch(change, message):
    torch.manual_seed(0)
    model = ClusterSTMForPreTraining(small_config(alignment_loss_weight=1.0))
    pixel_values, input_ids, attention_mask = inputs()
    batch = {
        "teacher_patch_tokens": torch.randn(3, FRAMES, GRID, 64),
        "teacher_relevance": torch.rand(3, FRAMES, GRID),
        **change,
    }
    with pytest.raises(ValueError, match=message):
        model.train()(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **batch)


def test_real_teacher_with_other_patch_grid_is_rejected():
    from clusterstm.teacher.teacher import ClusterSTMTeacher

    # CLIP teacher with 4x4 patches on 32x32 frames: 64 tokens per frame; the student has 8x8 patches (16 tokens)
    torch.manual_seed(0)
    vision = {"hidden_size": 64, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4}
    text = {**vision, "vocab_size": 100, "max_position_embeddings": 16}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config={**vision, "image_size": 32, "patch_size": 4}))
    model = ClusterSTMForPreTraining(small_config()).train()
    teacher = ClusterSTMTeacher(clip)
    pixel_values, input_ids, attention_mask = inputs()
    batch = {"pixel_values": pixel_values, "input_ids": input_ids % 100, "attention_mask": attention_mask}
    masking = PretrainingArguments(model_name_or_path="m", output_dir="o", dataset_name="synthetic", mask_ratio=0.5)
    # cluster masking on the teacher's tokens: refused by the mask door; relevance targets: refused by the model
    with pytest.raises(ValueError, match="share frames and patch grid"):
        pretraining_forward(model, batch, masking, 0, 0, teacher=teacher)
    masking.mask_strategy = "random"
    with pytest.raises(ValueError, match="same patch grid"):
        pretraining_forward(model, batch, masking, 0, 0, teacher=teacher)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_ratio": -0.1}, "mask_ratio"),
        ({"mask_ratio": float("nan")}, "mask_ratio"),
        ({"relevance_window_size": 2}, "relevance_window_size"),
        ({"relevance_window_size": 0}, "relevance_window_size"),
        ({"relevance_window_size": -3}, "relevance_window_size"),
        ({"dc_ratio": 0.0}, "dc_ratio"),
        ({"dc_ratio": 1.5}, "dc_ratio"),
        ({"dpc_k": 0}, "dpc_k"),
        ({"mask_strategy": "checkerboard"}, "mask_strategy"),
    ],
)
def test_config_ranges(kwargs, message):
    # Masking settings are pretraining arguments (validated there, once); the rest lives in the model config.
    with pytest.raises(ValueError, match=message):
        if "relevance_window_size" in kwargs:
            ClusterSTMConfig.from_preset("tiny", **kwargs)
        else:
            PretrainingArguments(model_name_or_path="m", output_dir="o", dataset_name="synthetic", **kwargs)


def test_function_ranges():
    x = torch.randn(1, 2, 9, 4)
    for ratio in (1.0, -0.01, 1.5, float("nan"), float("inf"), True, "0.5", None):
        for call in (
            lambda r: cluster_wise_mask(x, r),
            lambda r: random_mask(1, 2, 9, r),
            lambda r: tube_mask(1, 2, 9, r),
            lambda r: attention_guided_mask(x[..., 0].abs(), r),
            lambda r: num_visible_tokens(9, r),
        ):
            with pytest.raises(ValueError, match="mask_ratio"):
                call(ratio)
    for window in (0, 2, -1, 4, 1.0, True, None):
        with pytest.raises(ValueError, match="window_size"):
            generate_relevance(x, torch.randn(1, 4), lambda w: w.mean(1), window_size=window)
    with pytest.raises(ValueError, match="perfect square"):
        generate_relevance(torch.randn(1, 2, 8, 4), torch.randn(1, 4), lambda w: w.mean(1))
    with pytest.raises(ValueError, match="num_clusters"):
        dpc_knn(x[0], 10)
    with pytest.raises(ValueError, match="dc_ratio"):
        temporal_density(x, dc_ratio=1.5)
    with pytest.raises(ValueError, match="rank 4"):
        cluster_wise_mask(x[0], 0.5)
    with pytest.raises(ValueError, match="floating point"):
        cluster_wise_mask(x.long(), 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        cluster_wise_mask(x.clone().fill_(float("nan")), 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        attention_guided_mask(-x[..., 0].abs() - 1, 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Masking invariants (property-based; tests/test_masking.py covers counts and the DPC partition)
# ---------------------------------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 3),
    side=st.integers(1, 4),
    c=st.integers(1, 5),
    ratio=st.floats(0.0, 0.95),
    log2_scale=st.integers(-12, 12),
    seed=st.integers(0, 2**16),
)
def test_masking_property_invariants(b, t, side, c, ratio, log2_scale, seed):
    n, scale = side * side, 2.0**log2_scale  # powers of two scale exactly
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, n, c, generator=generator, dtype=torch.float64)
    num_keep = num_visible_tokens(n, ratio)
    mask = cluster_wise_mask(x, ratio)
    attention = torch.rand(b, t, n, generator=generator)
    masks = {
        "cluster": mask,
        "random": random_mask(b, t, n, ratio, generator=torch.Generator().manual_seed(seed)),
        "tube": tube_mask(b, t, n, ratio, generator=torch.Generator().manual_seed(seed)),
        "attention": attention_guided_mask(attention, ratio, generator=torch.Generator().manual_seed(seed)),
    }
    for name, m in masks.items():
        # exactly K kept tokens in every frame, for every strategy
        assert m.shape == (b, t, n) and m.dtype == torch.bool, name
        assert ((~m).sum(-1) == num_keep).all(), name
    # tube masks are the same in every frame
    assert (masks["tube"] == masks["tube"][:, :1]).all()
    # cluster masks only depend on the token directions: global (and per-token positive) scaling changes nothing
    assert torch.equal(cluster_wise_mask(x * scale, ratio), mask)
    per_token = torch.rand(b, t, n, 1, generator=generator, dtype=torch.float64) + 0.5
    assert torch.equal(cluster_wise_mask(x * per_token, ratio), mask)
    # batch equivalence: every video is masked on its own
    assert torch.equal(torch.cat([cluster_wise_mask(x[i : i + 1], ratio) for i in range(b)]), mask)
    assert torch.equal(cluster_wise_mask(x, ratio, max_chunk_elements=1), mask)
    # attention-guided masks with a scaled attention are the same draw
    again = attention_guided_mask(attention * scale, ratio, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(again, masks["attention"])


# ---------------------------------------------------------------------------------------------------------------------
# Resource bounds: one small file with extreme frames is a skippable decoding error, never an OOM
# ---------------------------------------------------------------------------------------------------------------------


def test_extreme_aspect_clip_is_skipped_in_the_pretraining_data_path(tmp_path, processor):
    from test_video_processing import write_extreme_clip

    good = write_video(tmp_path / "good.mp4", ramp_frames(FRAMES))
    wide = write_extreme_clip(tmp_path / "wide")
    rows = [{"file_name": os.path.basename(good), "caption": "a ramp"}, {"file_name": wide.name, "caption": "wide"}]
    annotations = tmp_path / "ann.jsonl"
    annotations.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = load_video_text_dataset(train_file=annotations)
    with pytest.raises(VideoDecodingError, match=rf"{wide.name}.*16384x2"):
        VideoTextCollator(processor)(list(dataset))
    collator = VideoTextCollator(processor, skip_bad_samples=True)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collator, num_workers=1)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (2, FRAMES, 3, SIZE, SIZE)
    assert int(batch["num_skipped_samples"]) == 1
    # In-memory clips with extreme frames are skipped the same way (before the processor resizes them).
    clips = [
        {"video": ramp_frames(FRAMES), "caption": "ok"},
        {"video": np.zeros((2, 2, 4000, 3), np.uint8), "caption": "x"},
    ]
    assert int(collator(clips)["num_skipped_samples"]) == 1
