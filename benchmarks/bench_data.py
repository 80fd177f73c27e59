"""Benchmark of clip decoding per data-loader worker: today's reader vs the new one, side by side in one run.

Readers (8 frames per clip, uniform sampling, one process = one worker, clips read one after another; rates per CPU-second):

* ``today``: `read_video_pyav` (models/video_processing_clusterstm.py): opens the file twice (three times without a
  frame count), decodes every frame from the first to the last sampled one;
* ``new (file)`` / ``new (bytes)``: `clusterstm.data.decoding.read_video` on the path, and on the file's bytes in
  memory (a webdataset member or a parquet cell): one open, a jump to the keyframe before each sampled frame,
  unwanted non-reference frames skipped by the decoder; returns the same frames as ``today`` (checked here);
* ``decord`` / ``torchcodec``: when they import and run here (not dependencies of the package).

Clip sets, generated with PyAV (libx264, yuv420p, crf 23, preset veryfast) in a temporary folder: the synthetic
benchmark's 64x64 clips (8 frames at 8 fps); 224x224, 10 s at 30 fps with a keyframe every 30 frames (1 s) and every
250 frames (x264's default); 640x360, 10 s at 30 fps, default keyframe interval. Content: moving shapes over a
drifting gradient (compresses like real footage, unlike noise).

The worker estimate: a data-loader worker runs the collator (decode + resize/crop/normalise of the video processor)
at the measured ``collate clips/s``; a GPU consuming `batch / step_time` clips/s is kept busy a fraction 0.8 of the
time by `ceil(0.8 * batch / step_time / per_worker)` workers. No GPU here: the step time is the base shape's step
FLOPs (counted with `torch.utils.flop_counter` on CPU for this run's base-shape model, mask ratio 0.8, no teacher)
divided by an assumed sustained throughput (`--gpu_tflops`, default 400 TFLOP/s = ~40% of an H100's dense bf16 peak).

    python benchmarks/bench_data.py            # writes docs/benchmarks/data.{md,json}
    python benchmarks/bench_data.py --quick    # small clips, ~30 s, prints only (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

NUM_FRAMES = 8


def _frames(num: int, height: int, width: int, seed: int) -> np.ndarray:
    """Moving discs and bars over a drifting colour gradient, uint8 (T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    colours = rng.integers(40, 255, (4, 3))
    starts = rng.random((4, 2)) * [height, width]
    speeds = (rng.random((4, 2)) - 0.5) * [height, width] / 40
    radius = min(height, width) / 8
    out = np.empty((num, height, width, 3), dtype=np.uint8)
    for t in range(num):
        frame = np.stack(
            [
                (xx + 2 * t) % width / width * 160,
                (yy + t) % height / height * 160,
                np.full_like(xx, 60 + 40 * math.sin(t / 15)),
            ],
            axis=-1,
        )
        for (cy, cx), (vy, vx), colour in zip(starts, speeds, colours):
            y, x = (cy + vy * t) % height, (cx + vx * t) % width
            frame[(yy - y) ** 2 + (xx - x) ** 2 < radius**2] = colour
        out[t] = frame.astype(np.uint8)
    return out


def _encode(path: Path, frames: np.ndarray, fps: int, keyint: int | None) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        options = {"crf": "23", "preset": "veryfast"}
        if keyint is not None:
            options["g"] = str(keyint)
        stream.options = options
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def clip_sets(quick: bool) -> list[dict]:
    seconds = 2 if quick else 10
    sets = [
        {"name": "synthetic 64x64, 8 frames", "size": (64, 64), "frames": 8, "fps": 8, "keyint": None, "clips": 8},
        {"name": f"224p {seconds} s 30 fps, keyframe 1 s", "size": (224, 224), "frames": 30 * seconds, "fps": 30,
         "keyint": 30, "clips": 2 if quick else 4},
        {"name": f"224p {seconds} s 30 fps, keyframe 250 (default)", "size": (224, 224), "frames": 30 * seconds,
         "fps": 30, "keyint": None, "clips": 2 if quick else 4},
    ]  # fmt: skip
    if not quick:
        sets.append(
            {"name": "640x360 10 s 30 fps, keyframe 250 (default)", "size": (360, 640), "frames": 300, "fps": 30,
             "keyint": None, "clips": 3}
        )  # fmt: skip
    return sets


def _optional_readers() -> dict:
    readers = {}
    try:
        import decord

        def read_decord(path, data):
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
            from clusterstm.models.video_processing_clusterstm import sample_frame_indices

            return reader.get_batch(sample_frame_indices(len(reader), NUM_FRAMES).tolist()).asnumpy()

        readers["decord"] = read_decord
    except Exception as error:  # ImportError, or a wheel that does not load here
        readers["decord"] = f"not available here ({type(error).__name__}: {error})"
    try:
        from torchcodec.decoders import VideoDecoder

        def read_torchcodec(path, data):
            decoder = VideoDecoder(str(path), device="cpu", num_ffmpeg_threads=1)
            from clusterstm.models.video_processing_clusterstm import sample_frame_indices

            indices = sample_frame_indices(decoder.metadata.num_frames, NUM_FRAMES).tolist()
            return decoder.get_frames_at(indices).data.permute(0, 2, 3, 1).numpy()

        readers["torchcodec"] = read_torchcodec
    except Exception as error:
        readers["torchcodec"] = f"not available here ({type(error).__name__}: {error})"
    return readers


def measure_readers(folder: Path, quick: bool, rounds: int) -> list[dict]:
    from clusterstm.data.decoding import read_video
    from clusterstm.models.video_processing_clusterstm import read_video_pyav

    readers = {
        "today": lambda path, data: read_video_pyav(path, NUM_FRAMES, "uniform"),
        "new (file)": lambda path, data: read_video(path, NUM_FRAMES, "uniform"),
        "new (bytes)": lambda path, data: read_video(data, NUM_FRAMES, "uniform"),
    }
    unavailable = {}
    for name, reader in _optional_readers().items():
        if callable(reader):
            readers[name] = reader
        else:
            unavailable[name] = reader
    rows = []
    for index, spec in enumerate(clip_sets(quick)):
        paths = []
        for c in range(spec["clips"]):
            path = folder / f"set{index}-clip{c}.mp4"
            _encode(path, _frames(spec["frames"], *spec["size"], seed=c), spec["fps"], spec["keyint"])
            paths.append(path)
        blobs = [path.read_bytes() for path in paths]
        reference = [readers["today"](p, b) for p, b in zip(paths, blobs)]
        times: dict[str, list[float]] = {name: [] for name in readers}
        walls: dict[str, list[float]] = {name: [] for name in readers}
        identical = {}
        failed = {}
        for name, reader in readers.items():  # warm-up + correctness
            try:
                outputs = [reader(p, b) for p, b in zip(paths, blobs)]
                identical[name] = all(np.array_equal(o, r) for o, r in zip(outputs, reference))
            except Exception as error:
                failed[name] = f"{type(error).__name__}: {error}"
        for _ in range(rounds):  # interleaved, so load changes hit every reader alike
            for name, reader in readers.items():
                if name in failed:
                    continue
                start, wall = time.process_time(), time.perf_counter()
                for p, b in zip(paths, blobs):
                    reader(p, b)
                times[name].append(time.process_time() - start)
                walls[name].append(time.perf_counter() - wall)
        row = {
            "set": spec["name"],
            "clips": spec["clips"],
            "file_kb": round(sum(map(len, blobs)) / len(blobs) / 1024, 1),
        }
        base = len(paths) / statistics.median(times["today"])
        for name in readers:
            if name in failed:
                row[name] = {"error": failed[name]}
                continue
            rate = len(paths) / statistics.median(times[name])
            wall_rate = len(paths) / statistics.median(walls[name])
            row[name] = {
                "clips_per_s": rate,
                "ratio": rate / base,
                "wall_clips_per_s": wall_rate,
                "wall_ratio": wall_rate / (len(paths) / statistics.median(walls["today"])),
                "identical": identical[name],
            }
        rows.append(row)
        print(
            f"{spec['name']:<45} "
            + "  ".join(
                f"{name} {row[name]['clips_per_s']:7.1f}/s ({row[name]['ratio']:.2f}x{'' if row[name]['identical'] else ', frames differ'})"
                if "clips_per_s" in row[name]
                else f"{name} failed"
                for name in readers
            ),
            flush=True,
        )
    for name, why in unavailable.items():
        print(f"{name}: {why}")
    return rows, unavailable


def collate_rate(folder: Path, quick: bool, image_size: int, num_frames: int) -> dict:
    """Clips/s of the whole worker job (decode with the new reader + the video processor), 224p clips at 1 s GOP."""
    from clusterstm.data.decoding import read_video
    from clusterstm.models.video_processing_clusterstm import ClusterSTMVideoProcessor

    processor = ClusterSTMVideoProcessor(
        num_frames=num_frames,
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    seconds = 2 if quick else 10
    path = folder / "collate.mp4"
    _encode(path, _frames(30 * seconds, 224, 224, seed=7), 30, 30)
    repeats = 3 if quick else 8
    times = []
    for _ in range(repeats + 1):
        start = time.process_time()
        clip = read_video(path, num_frames, "uniform")
        processor([clip], num_frames=num_frames, return_tensors="pt")
        times.append(time.process_time() - start)
    return {"clips_per_s": 1 / statistics.median(times[1:]), "num_frames": num_frames, "image_size": image_size}


def base_step_flops(num_frames: int, batch: int, mask_ratio: float) -> float:
    """FLOPs of one base-shape training step (forward + backward), counted on CPU with `FlopCounterMode`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining

    config = ClusterSTMConfig.from_preset("base", vision_config={"num_frames": num_frames}, mask_ratio=mask_ratio)
    for name in ("relevance_loss_weight", "alignment_loss_weight"):
        setattr(config, name, 0.0)  # teacher objectives need a teacher; its forward would add ~20-40% (bench_pretrain)
    torch.manual_seed(0)
    model = ClusterSTMForPreTraining(config).train()
    vision = config.vision_config
    pixel_values = torch.randn(batch, num_frames, 3, vision.image_size, vision.image_size)
    input_ids = torch.randint(5, config.text_config.vocab_size, (batch, 32))
    with FlopCounterMode(display=False) as counter:
        outputs = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        outputs.loss.backward()
    return float(counter.get_total_flops())


def teacher_forward_flops(num_frames: int) -> float:
    """FLOPs of the online teacher's forward for one clip: a CLIP ViT-B/16 at 224 px over every frame, unmasked."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=16)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=torch.randn(num_frames, 3, 224, 224))
    return float(counter.get_total_flops())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small clips, one round, no FLOP count (~30 s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output_dir", default=None, help="default: docs/benchmarks (nothing written with --quick)")
    parser.add_argument("--gpu_tflops", type=float, default=400.0, help="assumed sustained GPU throughput, TFLOP/s")
    parser.add_argument("--batch_per_gpu", type=int, default=32)
    parser.add_argument("--num_frames", type=int, default=8)
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rows, unavailable = measure_readers(Path(tmp), args.quick, rounds)
        collate = collate_rate(Path(tmp), args.quick, 224, args.num_frames)
    print(f"worker job (new reader + video processor, 224p -> {args.num_frames} x 224 x 224): "
          f"{collate['clips_per_s']:.1f} clips/s")  # fmt: skip
    estimate = None
    if not args.quick:
        student = base_step_flops(args.num_frames, 1, 0.8)
        teacher = teacher_forward_flops(args.num_frames)
        estimate = {"batch_per_gpu": args.batch_per_gpu, "assumed_gpu_tflops": args.gpu_tflops, "cases": {}}
        for case, flops_per_clip in (("student only (teacher targets cached)", student),
                                     ("student + online teacher", student + teacher)):  # fmt: skip
            step_s = flops_per_clip * args.batch_per_gpu / (args.gpu_tflops * 1e12)
            consumed = args.batch_per_gpu / step_s
            row = {
                "step_flops_per_clip": flops_per_clip,
                "step_s": step_s,
                "gpu_clips_per_s": consumed,
                "workers_for_0.8_busy": math.ceil(0.8 * consumed / collate["clips_per_s"]),
                "workers_for_1.0_busy": math.ceil(consumed / collate["clips_per_s"]),
            }
            estimate["cases"][case] = row
            print(
                f"base shape, {args.num_frames} frames, mask 0.8, {case}: {flops_per_clip / 1e12:.2f} TFLOP per clip; "
                f"at {args.gpu_tflops:.0f} TFLOP/s a batch of {args.batch_per_gpu} takes {step_s * 1000:.0f} ms = "
                f"{consumed:.0f} clips/s -> {row['workers_for_0.8_busy']} workers per GPU for 0.8 busy "
                f"({row['workers_for_1.0_busy']} to be compute-bound)"
            )
    result = {
        "meta": {
            "command": "python benchmarks/bench_data.py" + (" --quick" if args.quick else ""),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs",
            "python": platform.python_version(),
            "num_frames": NUM_FRAMES,
            "rounds": rounds,
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "versions": _versions(),
        },
        "readers": rows,
        "unavailable": unavailable,
        "collate": collate,
        "estimate": estimate,
    }
    if not args.quick or args.output_dir:
        out = Path(args.output_dir or REPO_ROOT / "docs" / "benchmarks")
        out.mkdir(parents=True, exist_ok=True)
        (out / "data.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "data.md").write_text(_markdown(result))
    return result


def _versions() -> dict:
    versions = {}
    for module in ("av", "decord", "torchcodec"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # not installed / does not load
            continue
    return versions


def _markdown(result: dict) -> str:
    names = [k for k in result["readers"][0] if k not in ("set", "clips", "file_kb")]
    lines = [
        "# Clip decoding per data-loader worker",
        "",
        f"`{result['meta']['command']}` on {result['meta']['machine']} (1-min load average "
        f"{result['meta']['load_average_before_after'][0]} before, {result['meta']['load_average_before_after'][1]} "
        f"after); {NUM_FRAMES} frames per clip, uniform sampling, median of {result['meta']['rounds']} interleaved "
        "rounds. Rates are clips per CPU-second of the process (= one worker on a dedicated core; CPU time because "
        "the shared machine's wall clock depends on the other jobs; wall-clock rates and ratios are in data.json). "
        "*x*: ratio to today's reader in the same run; *frames differ* marks a reader whose frames are not "
        "byte-identical to today's.",
        "",
        "| clips | KB/clip | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for row in result["readers"]:
        cells = []
        for name in names:
            value = row[name]
            if "clips_per_s" in value:
                same = "" if value["identical"] else ", frames differ"
                cells.append(f"{value['clips_per_s']:.1f}/s ({value['ratio']:.2f}x{same})")
            else:
                cells.append(f"failed: {value['error']}")
        lines.append(f"| {row['set']} | {row['file_kb']} | " + " | ".join(cells) + " |")
    for name, why in result["unavailable"].items():
        lines.append(f"\n{name}: {why}")
    versions = ", ".join(f"{k} {v}" for k, v in result["meta"].get("versions", {}).items())
    lines.append(f"\nVersions: {versions} (decord and torchcodec are not dependencies of the package).")
    collate = result["collate"]
    lines += [
        "",
        f"Worker job (new reader + video processor to {collate['num_frames']} x {collate['image_size']}^2, 224p 10 s "
        f"clip, 1 s keyframes): {collate['clips_per_s']:.1f} clips/s.",
    ]
    estimate = result["estimate"]
    if estimate:
        lines += [
            "",
            "Workers per GPU, an estimate (no GPU was available): step time = FLOPs of the base-shape step "
            f"(ViT-B/16 + BERT-base, {collate['num_frames']} frames at 224 px, mask ratio 0.8; forward + backward "
            "counted with `torch.utils.flop_counter` on CPU; the online teacher is a CLIP ViT-B/16 forward over all "
            f"frames) / an assumed {estimate['assumed_gpu_tflops']:.0f} TFLOP/s sustained (`--gpu_tflops`), batch "
            f"{estimate['batch_per_gpu']} per GPU; workers = ceil(0.8 x GPU clips/s / worker-job clips/s above). "
            "The worker rate is per CPU-second (one dedicated core per worker); longer, larger or more frequently "
            "keyframed clips change it as in the table above.",
            "",
            "| step | TFLOP/clip | step ms | GPU clips/s | workers for 0.8 busy | compute-bound |",
            "|---|---|---|---|---|---|",
        ]
        for case, row in estimate["cases"].items():
            lines.append(
                f"| {case} | {row['step_flops_per_clip'] / 1e12:.2f} | {row['step_s'] * 1000:.0f} | "
                f"{row['gpu_clips_per_s']:.0f} | {row['workers_for_0.8_busy']} | {row['workers_for_1.0_busy']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
