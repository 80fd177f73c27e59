"""Benchmark of one ClusterSTM pretraining step: unmasked vs masked, online teacher vs cached targets.

For the tiny preset and the base shape (ViT-B/16 at 224 px with 4 frames + BERT-base, a CLIP ViT-B/16-shaped
teacher), it measures side by side, in one run, for mask ratios 0 (unmasked), 0.5, 0.75, 0.8 and 0.9, each with

* **online** targets: the teacher runs inside the step (`compute_teacher_targets`), as with `--teacher_name_or_path`;
* **cached** targets: the step reads the relevance (and the cluster masks) from a target cache written beforehand by
  `write_teacher_targets` (what `clusterstm precompute-targets` runs) and joined by `CachedTargetsCollator`, as with
  `--teacher_targets`; no teacher runs.

Every step goes through the product's training step, `clusterstm.training.pretraining.pretraining_forward` (teacher
stage, one mask through `build_mask`, the student), then backward and AdamW. Columns:

* ``step``: wall time of the step, and its speedup over the unmasked step with the online teacher;
* ``ideal``: the token-count speedup of the video tower, N / K (N tokens per frame, K kept);
* ``teacher %`` and ``mask %``: shares of the step spent in `compute_teacher_targets` and in the cluster-wise masks;
* ``activations MB``: bytes of the distinct tensors autograd saves for backward in the step;
* ``peak MB``: peak resident memory added by one step (`VmHWM` of `/proc/self/status`, reset through
  `/proc/self/clear_refs` before the step; on CUDA, `torch.cuda.max_memory_allocated`).

It also reports, per preset and mask ratio, the cache's bytes per clip (parquet on disk) and the precompute rate
(clips/s of `write_teacher_targets`, including the collator's preprocessing of in-memory clips).

Random weights (timing does not depend on them). Usage:

    python benchmarks/bench_pretrain.py            # tiny + base, writes docs/benchmarks/pretrain.{md,json}
    python benchmarks/bench_pretrain.py --quick    # tiny only, 1 timed step, ratios 0 and 0.8 (CI); prints only
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

REPO_ROOT = Path(__file__).resolve().parent.parent
RATIOS = (0.0, 0.5, 0.75, 0.8, 0.9)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class _SavedTensors:
    """Counts the bytes of the distinct tensors autograd saves for backward (the activation memory of a step)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[tuple[int, int]] = set()

    def pack(self, tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in self._seen and tensor.device.type != "meta":
            self._seen.add(key)
            self.bytes += key[1]
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor


class _Timer:
    """Accumulates the wall time of wrapped callables."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def build(preset: str, num_frames: int, batch_size: int, work_dir: Path, seed: int = 0):
    """The student (random weights), a CLIP teacher of the matching shape, an in-memory corpus of `2 * batch_size`
    clips, a student folder (config + processor, what the cache writer reads) and one collated batch."""
    import numpy as np
    import torch
    from transformers import CLIPConfig, CLIPModel

    from clusterstm.data.readers import VideoTextCollator
    from clusterstm.data.tokenization import train_wordpiece_tokenizer
    from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
    from clusterstm.models.video_processing_clusterstm import ClusterSTMVideoProcessor
    from clusterstm.teacher.teacher import ClusterSTMTeacher

    torch.manual_seed(seed)
    config = ClusterSTMConfig.from_preset(preset, vision_config={"num_frames": num_frames})
    vision = config.vision_config
    model = ClusterSTMForPreTraining(config)
    if preset == "base":
        # CLIP ViT-B/16 shapes (hidden 768, projection 512); a short text tower suffices for the targets' cost.
        vision_teacher = {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        }
        text_teacher = {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
        }
    else:
        vision_teacher = {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
        }
        text_teacher = dict(vision_teacher)
    teacher_config = CLIPConfig(
        vision_config={**vision_teacher, "image_size": vision.image_size, "patch_size": vision.patch_size},
        text_config={**text_teacher, "vocab_size": 1000, "max_position_embeddings": 77, "eos_token_id": 3},
        projection_dim=config.teacher_projection_dim,
    )
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "circle", "square", "moves", "left", "right", "up", "down", "a", "the", "and"]
    captions = [" ".join(rng.choice(words, size=12)) for _ in range(2 * batch_size)]
    tokenizer = train_wordpiece_tokenizer(captions, vocab_size=200)
    teacher = ClusterSTMTeacher.from_pretrained(CLIPModel(teacher_config), tokenizer=tokenizer)
    size = vision.image_size
    video_processor = ClusterSTMVideoProcessor(
        num_frames=num_frames, size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor = ClusterSTMProcessor(video_processor=video_processor, tokenizer=tokenizer)
    student_dir = work_dir / f"{preset}-student"
    config.save_pretrained(student_dir)
    processor.save_pretrained(student_dir)
    # A plain list of rows is a map-style dataset (an Arrow dataset of nested lists would time its own formatting).
    corpus = [
        {
            "video_id": f"clip{i:04d}",
            "caption": caption,
            "video": rng.integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8),
        }
        for i, caption in enumerate(captions)
    ]
    rows = [corpus[i] for i in range(batch_size)]
    batch = VideoTextCollator(processor, teacher_tokenizer=tokenizer, num_frames=num_frames)(rows)
    return model, teacher, processor, student_dir, corpus, rows, batch


def _masking(ratio: float, seed: int = 0):
    from clusterstm.training.pretraining import PretrainingArguments

    return PretrainingArguments(
        model_name_or_path="unused",
        output_dir="unused",
        dataset_name="synthetic",
        mask_strategy="cluster" if ratio > 0 else "none",
        mask_ratio=ratio,
        seed=seed,
    )


def bench_preset(
    preset: str,
    num_frames: int,
    batch_size: int,
    steps: int,
    ratios=RATIOS,
    device: str = "cpu",
    mixed_precision: str = "no",
) -> list[dict]:
    """Times every variant of one preset side by side; `device`/`mixed_precision` ("no" or "bf16") as a run would."""
    import torch

    import clusterstm.models.masking_clusterstm as masking
    import clusterstm.teacher.targets as targets_module
    from clusterstm.models.masking_clusterstm import num_visible_tokens
    from clusterstm.teacher.cache import PrecomputeTargetsArguments, TeacherTargetCache, write_teacher_targets
    from clusterstm.training.pretraining import pretraining_forward

    work = tempfile.TemporaryDirectory()
    work_dir = Path(work.name)
    model, teacher, processor, student_dir, corpus, rows, batch = build(preset, num_frames, batch_size, work_dir)
    config = model.config
    device = torch.device(device)
    autocast_dtype = torch.bfloat16 if mixed_precision == "bf16" else None
    model.train()
    num_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2

    # ---- the caches: one per mask ratio (the stored cluster masks depend on it), written by the product's writer
    caches, precompute = {}, {}
    for ratio in ratios:
        args = _masking(ratio)
        folder = work_dir / f"{preset}-targets-{ratio:g}"
        stats = write_teacher_targets(
            PrecomputeTargetsArguments(
                model_name_or_path=str(student_dir),
                teacher_name_or_path=f"bench {preset} CLIP teacher",
                output_dir=str(folder),
                dataset_name="synthetic",
                mask_strategy=args.mask_strategy,
                mask_ratio=ratio,
                per_device_batch_size=batch_size,
            ),
            dataset=corpus,
            teacher=teacher,
        )
        cache = TeacherTargetCache(folder)
        cache.check_run(args, config, processor)
        # The collator's decoding/preprocessing is the same for every variant (see bench_decode): only the cache join
        # is part of the timed step.
        caches[ratio] = cache.collator(lambda _rows: dict(batch), caption_column="caption")
        precompute[ratio] = stats

    model.to(device)
    teacher.to(device=device, dtype=autocast_dtype or torch.float32)  # the teacher in the run's precision
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def on_device(step_batch: dict) -> dict:
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in step_batch.items()}

    timers = {"teacher": _Timer(), "mask": _Timer()}
    original_targets = targets_module.compute_teacher_targets
    original_cluster = masking.MASK_STRATEGIES["cluster"]
    targets_module.compute_teacher_targets = timers["teacher"].wrap(original_targets)
    masking.MASK_STRATEGIES["cluster"] = timers["mask"].wrap(original_cluster)
    variants = [(ratio, source) for ratio in ratios for source in ("online", "cached")]
    samples = {v: {key: [] for key in ("full", "teacher", "mask", "peak", "activations")} for v in variants}

    def one_step(variant, step: int, record: bool) -> None:
        ratio, source = variant
        for timer in timers.values():
            timer.seconds = 0.0
        before = _rss_kb("VmRSS:")
        reset = _reset_peak()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step_batch = on_device(caches[ratio](rows) if source == "cached" else batch)
        saved = _SavedTensors()
        with (
            torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack),
            torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None),
        ):
            outputs = pretraining_forward(
                model, step_batch, _masking(ratio), step, 0, teacher if source == "online" else None
            )
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        end = time.perf_counter()
        if not record:
            return
        row = samples[variant]
        row["full"].append(end - start)
        row["teacher"].append(timers["teacher"].seconds)
        row["mask"].append(timers["mask"].seconds)
        if torch.cuda.is_available():
            row["peak"].append(torch.cuda.max_memory_allocated() / 2**20)
        else:
            row["peak"].append((_rss_kb("VmHWM:") - before) / 1024 if reset else float("nan"))
        row["activations"].append(saved.bytes / 2**20)

    rows_out = []
    try:
        for variant in variants:  # warm-up, not counted
            one_step(variant, 0, record=False)
        # Variants are interleaved so that a change of load on a shared machine affects all of them alike.
        for step in range(steps):
            for variant in variants:
                one_step(variant, step + 1, record=True)
    finally:
        targets_module.compute_teacher_targets = original_targets
        masking.MASK_STRATEGIES["cluster"] = original_cluster
        work.cleanup()
    for ratio, source in variants:
        measured = samples[(ratio, source)]
        kept = num_visible_tokens(num_tokens, ratio)
        rows_out.append(
            {
                "preset": preset,
                "num_frames": num_frames,
                "batch_size": batch_size,
                "mask_ratio": ratio,
                "targets": source,
                "tokens_per_frame": num_tokens,
                "kept_per_frame": kept,
                "step_s": statistics.median(measured["full"]),
                "teacher_s": statistics.median(measured["teacher"]),
                "mask_s": statistics.median(measured["mask"]),
                "peak_mb": statistics.median(measured["peak"]),
                "activation_mb": statistics.median(measured["activations"]),
                "ideal_speedup": num_tokens / kept,
                "cache_bytes_per_clip": precompute[ratio]["bytes_per_clip"],
                "precompute_clips_per_second": precompute[ratio]["clips_per_second"],
            }
        )
    baseline = next(r for r in rows_out if r["mask_ratio"] == 0 and r["targets"] == "online")["step_s"]
    for row in rows_out:
        row["speedup"] = baseline / row["step_s"]
        row["teacher_share"] = row["teacher_s"] / row["step_s"]
        row["mask_share"] = row["mask_s"] / row["step_s"]
    return rows_out


def bench_decode(num_clips: int = 32, batch_size: int = 8) -> dict:
    """PyAV decoding + preprocessing throughput of the training collator on exported tiny-preset mp4 clips, in one
    process (what one DataLoader worker delivers)."""
    import tempfile

    from clusterstm.data.readers import VideoTextCollator, load_video_text_dataset
    from clusterstm.data.synthetic import SyntheticVideoTextConfig, export_synthetic_benchmark
    from clusterstm.data.tokenization import train_wordpiece_tokenizer
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
    from clusterstm.models.video_processing_clusterstm import ClusterSTMVideoProcessor

    config = SyntheticVideoTextConfig(num_train=num_clips, num_val=0, num_test=0, num_compositional=0)
    with tempfile.TemporaryDirectory() as tmp:
        metadata = export_synthetic_benchmark(config, tmp, splits=("train",))["train"]
        dataset = load_video_text_dataset(train_file=metadata)
        video_processor = ClusterSTMVideoProcessor(
            num_frames=8, size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
        )
        tokenizer = train_wordpiece_tokenizer(list(dataset["caption"]), vocab_size=200)
        collator = VideoTextCollator(ClusterSTMProcessor(video_processor=video_processor, tokenizer=tokenizer))
        rows = [dataset[i] for i in range(len(dataset))]
        collator(rows[:batch_size])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(rows), batch_size):
            collator(rows[i : i + batch_size])
        seconds = time.perf_counter() - start
    return {"clips": len(rows), "clips_per_second_per_worker": len(rows) / seconds}


def render(rows: list[dict]) -> str:
    header = (
        "| preset | frames x batch | mask ratio | targets | kept/frame | step (s) | speedup vs unmasked+online "
        "| ideal (N/K) | teacher % | mask % | activations MB | peak MB | cache B/clip | precompute clips/s |"
    )
    lines = [header, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['num_frames']} x {r['batch_size']} | {r['mask_ratio']:.2f} | {r['targets']} | "
            f"{r['kept_per_frame']}/{r['tokens_per_frame']} | {r['step_s']:.3f} | {r['speedup']:.2f}x | "
            f"{r['ideal_speedup']:.2f}x | {100 * r['teacher_share']:.0f}% | {100 * r['mask_share']:.1f}% | "
            f"{r['activation_mb']:.0f} | {r['peak_mb']:.0f} | {r['cache_bytes_per_clip']:.0f} | "
            f"{r['precompute_clips_per_second']:.1f} |"
        )
    return "\n".join(lines)


def decode_summary(decode: dict) -> str:
    need, rate = decode["tiny_step_need_clips_per_second"], decode["clips_per_second_per_worker"]
    return (
        f"PyAV decode + preprocessing (8 frames of 64x64 mp4, collator in one process): {rate:.1f} clips/s per "
        f"worker; the tiny step at mask ratio 0.8 consumes {need:.1f} clips/s -> "
        f"{max(1, math.ceil(need / rate))} worker(s) keep up."
    )


def speedup_summary(rows: list[dict]) -> str:
    lines = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        pick = {(r["mask_ratio"], r["targets"]): r for r in rows if r["preset"] == preset}
        if (0.8, "online") not in pick:
            continue
        unmasked, online, cached = pick[(0.0, "online")], pick[(0.8, "online")], pick[(0.8, "cached")]
        lines.append(
            f"- {preset} at mask ratio 0.8: masked + online teacher {online['speedup']:.2f}x, masked + cached targets "
            f"{cached['speedup']:.2f}x faster than unmasked + online teacher (ideal token ratio "
            f"{cached['ideal_speedup']:.2f}x); the online teacher is {100 * online['teacher_share']:.0f}% of the masked "
            f"step; cached over online (masked): {online['step_s'] / cached['step_s']:.2f}x. Cache: "
            f"{cached['cache_bytes_per_clip']:.0f} bytes per clip (relevance + cluster mask), precompute "
            f"{cached['precompute_clips_per_second']:.1f} clips/s; activations {cached['activation_mb']:.0f} MB vs "
            f"{unmasked['activation_mb']:.0f} MB unmasked."
        )
    return "\n".join(lines)


def write_report(out: Path, meta: dict, rows: list[dict], decode: dict) -> None:
    """Writes `pretrain.json` and `pretrain.md` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain.json").write_text(json.dumps({"meta": meta, "rows": rows, "decode": decode}, indent=2) + "\n")
    (out / "pretrain.md").write_text(
        "# Pretraining step vs. mask ratio\n\n"
        f"`{meta['command']}` on {meta['device']} ({meta['torch_threads']} torch thread(s), {meta['cpu_count']} "
        f"cores shared with other jobs, torch {meta['torch']}), median of {meta['steps']} step(s) per variant after one "
        "warm-up each, variants interleaved, random weights. Absolute times on a loaded shared CPU are noisy; the "
        "ratios between columns are the point.\n\n"
        "*step*: the product's training step (`pretraining_forward`: teacher stage, `build_mask`, student "
        "forward over all objectives: contrastive, relevance, matching, MLM) + backward + AdamW. *online*: the "
        "teacher runs in the step (`compute_teacher_targets`); *cached*: targets and cluster masks come from a cache "
        "written by `write_teacher_targets` and joined by `CachedTargetsCollator`, no teacher. "
        "*ideal*: video-tower token-count speedup N/K. *activations MB*: distinct tensors saved for backward. "
        "*peak MB*: peak resident memory added by one step (CPU: glibc reuses freed memory, so after the first "
        "variant this often reads ~0; on CUDA: `max_memory_allocated`). *cache B/clip*: parquet bytes per clip; "
        "*precompute clips/s*: `write_teacher_targets` over the in-memory clips (one process).\n\n"
        + render(rows)
        + "\n\n"
        + speedup_summary(rows)
        + "\n\n"
        + decode_summary(decode)
        + "\n"
    )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny preset only, ratios 0 and 0.8, 1 timed step (CI, < 60 s)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per ratio (after one warm-up step)")
    parser.add_argument("--base_batch_size", type=int, default=2)
    parser.add_argument("--base_frames", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where the model, teacher and batch live (e.g. cuda)")
    parser.add_argument(
        "--mixed_precision", choices=["no", "bf16"], default="no", help="bf16 autocast and a bf16 teacher, as a run"
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where pretrain.md/.json go (default docs/benchmarks, not written with --quick unless given)",
    )
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (1 if args.quick else 2)
    placement = {"device": args.device, "mixed_precision": args.mixed_precision}
    rows = bench_preset("tiny", 8, 8, steps, ratios=(0.0, 0.8) if args.quick else RATIOS, **placement)
    print(render(rows), flush=True)
    if not args.quick:
        rows += bench_preset("base", args.base_frames, args.base_batch_size, steps, **placement)
    table = render(rows)
    print()
    print(table)
    decode = bench_decode()
    tiny_08 = next(r for r in rows if r["preset"] == "tiny" and r["mask_ratio"] == 0.8 and r["targets"] == "cached")
    need = tiny_08["batch_size"] / tiny_08["step_s"]
    decode["tiny_step_need_clips_per_second"] = need
    decode_line = decode_summary(decode)
    print(decode_line)
    print(speedup_summary(rows))
    output_dir = args.output_dir or (None if args.quick else str(REPO_ROOT / "docs" / "benchmarks"))
    if output_dir:
        out = Path(output_dir)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
        meta = {
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "steps": steps,
            "command": " ".join(
                ["python", "benchmarks/bench_pretrain.py", *(argv if argv is not None else sys.argv[1:])]
            ),
        }
        write_report(out, meta, rows, decode)
        print(f"\nwrote {out / 'pretrain.md'} and {out / 'pretrain.json'}")
    return rows


if __name__ == "__main__":
    main()
