"""Tests of ClusterSTMVideoProcessor and the PyAV decoding helpers on real mp4 files written in tmp_path."""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from clusterstm.data.synthetic import write_video_pyav
from clusterstm.models.video_processing_clusterstm import (
    ClusterSTMVideoProcessor,
    VideoDecodingError,
    read_video_pyav,
    sample_frame_indices,
)


def coloured_frames(num_frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Frame t is a flat colour whose red channel encodes t (so decoded frames reveal their index)."""
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = 10 + t * (240 // max(num_frames, 1))
        frames[t, ..., 1] = 200 - t * (180 // max(num_frames, 1))
        frames[t, ..., 2] = 90
    return frames


def decoded_index(frame: np.ndarray, num_frames: int) -> int:
    step = 240 // num_frames
    return int(round((float(frame[..., 0].mean()) - 10) / step))


@pytest.fixture
def processor():
    return ClusterSTMVideoProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, num_frames=8)


def test_sample_frame_indices_uniform_and_random():
    np.testing.assert_array_equal(sample_frame_indices(16, 8), [1, 3, 5, 7, 9, 11, 13, 15])
    short = sample_frame_indices(3, 8)
    assert len(short) == 8 and set(short.tolist()) == {0, 1, 2} and np.all(np.diff(short) >= 0)
    a = sample_frame_indices(100, 8, "random", generator=torch.Generator().manual_seed(3))
    b = sample_frame_indices(100, 8, "random", generator=torch.Generator().manual_seed(3))
    c = sample_frame_indices(100, 8, "random", generator=torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # one frame per segment of 12.5 frames
    assert all(int(i * 12.5) <= idx < int((i + 1) * 12.5) + 1 for i, idx in enumerate(a))
    with pytest.raises(ValueError, match="sampling"):
        sample_frame_indices(10, 4, "middle")


def test_read_video_pyav_frame_order(tmp_path):
    frames = coloured_frames(24)
    path = tmp_path / "clip.mp4"
    write_video_pyav(path, frames)
    video = read_video_pyav(path, num_frames=8)
    assert video.shape == (8, 32, 32, 3) and video.dtype == np.uint8
    expected = sample_frame_indices(24, 8)
    assert [decoded_index(f, 24) for f in video] == expected.tolist()
    np.testing.assert_allclose(video.astype(float), frames[expected].astype(float), atol=6)


def test_read_video_random_sampling_deterministic(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video_pyav(path, coloured_frames(24))
    a = read_video_pyav(path, 8, "random", generator=7)
    b = read_video_pyav(path, 8, "random", generator=7)
    np.testing.assert_array_equal(a, b)
    indices = [decoded_index(f, 24) for f in a]
    assert indices == sample_frame_indices(24, 8, "random", generator=7).tolist()


def test_short_video_repeats_frames(tmp_path):
    path = tmp_path / "short.mp4"
    write_video_pyav(path, coloured_frames(3))
    video = read_video_pyav(path, num_frames=8)
    assert video.shape[0] == 8
    assert [decoded_index(f, 3) for f in video] == sample_frame_indices(3, 8).tolist()


def test_grayscale_and_odd_sizes(processor, tmp_path):
    gray = np.random.default_rng(0).integers(0, 255, (5, 37, 51), dtype=np.uint8)
    out = processor(gray, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 8, 3, 32, 32)
    assert torch.allclose(out[:, :, 0] * 0.26862954 + 0.48145466, out[:, :, 1] * 0.26130258 + 0.4578275, atol=1e-5)
    # odd-sized grayscale file (yuv444p allows odd sizes in x264)
    path = tmp_path / "gray.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 33, 27, "yuv444p"
        for frame in gray[:, :27, :33]:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="gray")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = read_video_pyav(path, 4)
    assert video.shape == (4, 27, 33, 3)
    out = processor(str(path), return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 8, 3, 32, 32)


def test_variable_frame_rate(tmp_path):
    frames = coloured_frames(16)
    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = __import__("fractions").Fraction(1, 1000)
        pts = np.cumsum([0] + [10 if t % 2 else 70 for t in range(15)])
        for t, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts, vf.time_base = int(pts[t]), __import__("fractions").Fraction(1, 1000)
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = read_video_pyav(path, 8)
    assert [decoded_index(f, 16) for f in video] == sample_frame_indices(16, 8).tolist()


def test_input_types_agree(processor, tmp_path):
    # smooth content, so that the lossy codec keeps it close
    yy, xx = np.mgrid[0:40, 0:48]
    frames = (
        np.stack([np.stack([xx * 5 + t * 8, yy * 6, 255 - xx * 4 - t * 5], axis=-1) for t in range(12)])
        .clip(0, 255)
        .astype(np.uint8)
    )
    ref = processor(frames, return_tensors="pt")["pixel_values"]
    assert ref.shape == (1, 8, 3, 32, 32) and ref.dtype == torch.float32
    as_tensor = processor(torch.from_numpy(frames), return_tensors="pt")["pixel_values"]
    as_tchw = processor(torch.from_numpy(frames).permute(0, 3, 1, 2), return_tensors="pt")["pixel_values"]
    as_pil = processor([Image.fromarray(f) for f in frames], return_tensors="pt")["pixel_values"]
    for other in (as_tensor, as_tchw, as_pil):
        torch.testing.assert_close(other, ref)
    path = tmp_path / "v.mp4"
    write_video_pyav(path, frames)
    decoded = read_video_pyav(path, 8)
    from_path = processor(path, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_path, processor(decoded, return_tensors="pt")["pixel_values"])
    # lossy codec: close to the in-memory result on average
    assert (from_path - ref).abs().mean() < 0.1
    batch = processor([frames, str(path)], return_tensors="pt")["pixel_values"]
    assert batch.shape == (2, 8, 3, 32, 32)
    torch.testing.assert_close(batch[0], ref[0])


def test_normalisation_and_clip_defaults():
    processor = ClusterSTMVideoProcessor()
    assert processor.crop_size["height"] == 224 and processor.num_frames == 8
    white = np.full((8, 224, 224, 3), 255, dtype=np.uint8)
    out = processor(white, return_tensors="pt")["pixel_values"]
    expected = (1 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    torch.testing.assert_close(out[0, 0, :, 0, 0], expected.float())


def test_random_sampling_in_processor_is_seeded(processor):
    frames = coloured_frames(64)
    a = processor(frames, sampling="random", generator=torch.Generator().manual_seed(0), return_tensors="pt")
    b = processor(frames, sampling="random", generator=torch.Generator().manual_seed(0), return_tensors="pt")
    u = processor(frames, return_tensors="pt")
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    assert not torch.equal(a["pixel_values"], u["pixel_values"])


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt", "truncated"])
def test_bad_files_name_the_file(tmp_path, processor, kind):
    path = tmp_path / f"{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"this is not a video" * 50)
    elif kind == "truncated":
        write_video_pyav(tmp_path / "full.mp4", coloured_frames(16))
        data = (tmp_path / "full.mp4").read_bytes()
        path.write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoDecodingError, match=kind):
        processor(str(path), return_tensors="pt")
    assert issubclass(VideoDecodingError, ValueError)


def test_bad_arrays_rejected(processor):
    with pytest.raises(ValueError, match="dimensions"):
        processor(np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        processor(np.full((4, 8, 8, 3), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="0 frames"):
        processor(np.zeros((0, 8, 8, 3), dtype=np.uint8))


def test_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = ClusterSTMVideoProcessor.from_pretrained(tmp_path)
    assert loaded.num_frames == 8 and loaded.sampling == "uniform"
    frames = coloured_frames(10)
    torch.testing.assert_close(
        loaded(frames, return_tensors="pt")["pixel_values"], processor(frames, return_tensors="pt")["pixel_values"]
    )


# ------------------------------------------------------------------ resource caps, float inputs, stream choice
def write_extreme_clip(path, width: int = 16384, height: int = 2, frames: int = 4):
    """A tiny file (a few KB) whose frames are `width` x `height`: resized to a 224 short side it would need GBs."""
    for codec, suffix in (("libx264", ".mp4"), ("ffv1", ".mkv")):
        target = path.with_suffix(suffix)
        try:
            with av.open(str(target), "w") as container:
                stream = container.add_stream(codec, rate=4)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                for t in range(frames):
                    frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 40 * t, np.uint8), format="rgb24")
                    for packet in stream.encode(frame):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            return target
        except av.FFmpegError:
            continue
    pytest.skip("no PyAV encoder for extreme frame sizes")  # pragma: no cover


def test_extreme_aspect_clip_is_refused_before_decoding(tmp_path, monkeypatch):
    from clusterstm.models import video_processing_clusterstm as vp

    path = write_extreme_clip(tmp_path / "wide")
    assert path.stat().st_size < 50_000
    base = ClusterSTMVideoProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})

    def never(*args, **kwargs):
        raise AssertionError("frames were decoded before the size check")

    monkeypatch.setattr(vp, "_decode_selected_pyav", never)
    with pytest.raises(VideoDecodingError, match=r"wide\.(mp4|mkv).*16384x2.*aspect ratio 8192") as info:
        base([str(path)], return_tensors="pt")
    assert "max_aspect_ratio=10.0" in str(info.value)
    with pytest.raises(VideoDecodingError, match="16384x2"):
        read_video_pyav(path, 4)


def test_pixel_cap_is_configurable_and_saved(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video_pyav(path, coloured_frames(8, 64, 64), fps=8)
    small = ClusterSTMVideoProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, max_pixels_per_frame=1000
    )
    with pytest.raises(
        VideoDecodingError, match=r"clip\.mp4.*64x64 frames \(4096 pixels\).*max_pixels_per_frame=1000"
    ):
        small([str(path)])
    with pytest.raises(VideoDecodingError, match=r"in-memory video 0.*64x64"):
        small(coloured_frames(8, 64, 64))
    assert small([str(path)], max_pixels_per_frame=None, return_tensors="pt")["pixel_values"].shape[0] == 1
    small.save_pretrained(tmp_path / "proc")
    loaded = ClusterSTMVideoProcessor.from_pretrained(tmp_path / "proc")
    assert (loaded.max_pixels_per_frame, loaded.max_aspect_ratio) == (1000, 10.0)
    default = ClusterSTMVideoProcessor()
    assert (default.max_pixels_per_frame, default.max_aspect_ratio) == (3840 * 2160, 10.0)
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        ClusterSTMVideoProcessor(max_aspect_ratio=0.5)


def test_float_unit_range_video_is_not_rescaled_twice(processor, caplog):
    clip = np.random.default_rng(0).integers(0, 256, (8, 40, 48, 3), dtype=np.uint8)
    reference = processor(clip, return_tensors="pt")["pixel_values"]
    with caplog.at_level("WARNING"):
        unit = processor(clip.astype(np.float32) / 255, return_tensors="pt")["pixel_values"]
        processor(torch.from_numpy(clip).double() / 255, return_tensors="pt")
    torch.testing.assert_close(unit, reference, rtol=0, atol=1e-6)
    assert sum("already rescaled" in r.message for r in caplog.records) == 1  # warned once
    # Floats beyond 1 keep [0, 255] semantics; do_rescale=False uses the values as given.
    byte_range = processor(clip.astype(np.float32), return_tensors="pt")["pixel_values"]
    assert (byte_range - reference).abs().mean() < 0.05
    raw = processor(clip.astype(np.float32) / 255, do_rescale=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(raw, byte_range, rtol=0, atol=1e-4)  # the same float pipeline, scaled


def test_still_image_stream_is_not_read(tmp_path):
    """A 2-stream mkv whose first stream is a single still picture: the moving stream is decoded."""
    path = tmp_path / "two_streams.mkv"
    moving = coloured_frames(8)
    with av.open(str(path), "w") as container:
        still = container.add_stream("mjpeg", rate=1)
        still.width, still.height, still.pix_fmt = 32, 32, "yuvj420p"
        video = container.add_stream("libx264", rate=8)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        for packet in still.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
            container.mux(packet)
        for packet in still.encode():
            container.mux(packet)
        for frame in moving:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    frames = read_video_pyav(path, 8)
    assert [decoded_index(f, 8) for f in frames] == list(range(8))


def test_attached_picture_is_never_chosen():
    from types import SimpleNamespace

    from clusterstm.models.video_processing_clusterstm import _pick_video_stream

    attached, default = int(av.stream.Disposition.attached_pic), int(av.stream.Disposition.default)
    cover = SimpleNamespace(index=0, frames=500, disposition=attached)
    short = SimpleNamespace(index=1, frames=10, disposition=0)
    longer = SimpleNamespace(index=2, frames=30, disposition=0)
    tied = SimpleNamespace(index=3, frames=30, disposition=default)
    container = SimpleNamespace(streams=SimpleNamespace(video=[cover, short, longer]))
    assert _pick_video_stream(container, "x.mp4") == (2, 30)
    container.streams.video.append(tied)
    assert _pick_video_stream(container, "x.mp4") == (3, 30)
    with pytest.raises(VideoDecodingError, match="attached picture"):
        _pick_video_stream(SimpleNamespace(streams=SimpleNamespace(video=[cover])), "cover.mp4")
