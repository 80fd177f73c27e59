"""Benchmark of one ClusterSTM pretraining step against the mask ratio.

For the tiny preset and the base shape (ViT-B/16 at 224 px with 4 frames + BERT-base, a CLIP ViT-B/16-shaped
teacher), it prints side by side, in one run, for mask ratios 0 (unmasked), 0.5, 0.75, 0.8 and 0.9:

* ``step``: wall time of a full pretraining step (teacher forward + cluster-wise masking + student forward/backward
  over all objectives + AdamW), and its speedup over the unmasked step;
* ``student``: the same step without the teacher forward (teacher targets precomputed), and its speedup;
* ``ideal``: the token-count speedup of the video tower, N / K (N tokens per frame, K kept), and the ratio of the
  measured student speedup to it;
* ``teacher %`` and ``mask %``: shares of the full step spent in the teacher forward (video tokens, text,
  relevance) and in computing the cluster-wise masks;
* ``activations MB``: bytes of the distinct tensors autograd saves for backward in the student forward;
* ``peak MB``: peak resident memory added by one step (`VmHWM` of `/proc/self/status`, reset through
  `/proc/self/clear_refs` before the step; on CUDA, `torch.cuda.max_memory_allocated`).

Random weights (timing does not depend on them). Usage:

    python benchmarks/bench_pretrain.py            # tiny + base, writes docs/benchmarks/pretrain.{md,json}
    python benchmarks/bench_pretrain.py --quick    # tiny only, 1 timed step, < 60 s (CI); prints only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
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


def build(preset: str, num_frames: int, batch_size: int, seed: int = 0):
    import torch
    from transformers import CLIPConfig, CLIPModel

    from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining
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
    teacher = ClusterSTMTeacher.from_pretrained(CLIPModel(teacher_config))
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, num_frames, 3, vision.image_size, vision.image_size, generator=generator)
    input_ids = torch.randint(5, config.text_config.vocab_size, (batch_size, 32), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 2, 3
    teacher_ids = torch.randint(5, 1000, (batch_size, 32), generator=generator)
    teacher_ids[:, -1] = 3
    batch = {
        "pixel_values": pixel_values,
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "teacher_input_ids": teacher_ids,
        "teacher_attention_mask": torch.ones_like(teacher_ids),
    }
    return model, teacher, batch


def teacher_targets(teacher, batch, window_size: int) -> dict:
    video = teacher.encode_video(batch["pixel_values"])
    text = teacher.encode_text(batch["teacher_input_ids"], batch["teacher_attention_mask"])
    return {
        "teacher_patch_tokens": video.patch_tokens,
        "teacher_cls_attention": video.cls_attention,
        "teacher_relevance": teacher.relevance(video.patch_tokens, text, window_size),
    }


def bench_preset(preset: str, num_frames: int, batch_size: int, steps: int, ratios=RATIOS) -> list[dict]:
    import torch

    import clusterstm.models.modeling_clusterstm as modeling
    from clusterstm.models.masking_clusterstm import num_visible_tokens

    model, teacher, batch = build(preset, num_frames, batch_size)
    config = model.config
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    mask_timer = _Timer()
    original_mask = modeling.cluster_wise_mask
    modeling.cluster_wise_mask = mask_timer.wrap(original_mask)
    num_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    samples = {
        ratio: {key: [] for key in ("full", "student", "teacher", "mask", "peak", "activations")} for ratio in ratios
    }

    def one_step(ratio: float, record: bool) -> None:
        config.mask_strategy = "cluster" if ratio > 0 else "none"
        config.mask_ratio = ratio
        mask_timer.seconds = 0.0
        before = _rss_kb("VmRSS:")
        reset = _reset_peak()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.no_grad():
            targets = teacher_targets(teacher, batch, config.relevance_window_size)
        teacher_done = time.perf_counter()
        saved = _SavedTensors()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            outputs = model(**batch, **targets)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        end = time.perf_counter()
        if not record:
            return
        row = samples[ratio]
        row["full"].append(end - start)
        row["teacher"].append(teacher_done - start)
        row["student"].append(end - teacher_done)
        row["mask"].append(mask_timer.seconds)
        if torch.cuda.is_available():
            row["peak"].append(torch.cuda.max_memory_allocated() / 2**20)
        else:
            row["peak"].append((_rss_kb("VmHWM:") - before) / 1024 if reset else float("nan"))
        row["activations"].append(saved.bytes / 2**20)

    rows = []
    try:
        for ratio in ratios:  # warm-up, not counted
            one_step(ratio, record=False)
        # Ratios are interleaved so that a change of load on a shared machine affects all of them alike.
        for _ in range(steps):
            for ratio in ratios:
                one_step(ratio, record=True)
        for ratio in ratios:
            kept = num_visible_tokens(num_tokens, ratio)
            measured = samples[ratio]
            rows.append(
                {
                    "preset": preset,
                    "num_frames": num_frames,
                    "batch_size": batch_size,
                    "mask_ratio": ratio,
                    "tokens_per_frame": num_tokens,
                    "kept_per_frame": kept,
                    "step_s": statistics.median(measured["full"]),
                    "student_step_s": statistics.median(measured["student"]),
                    "teacher_s": statistics.median(measured["teacher"]),
                    "mask_s": statistics.median(measured["mask"]),
                    "peak_mb": statistics.median(measured["peak"]),
                    "activation_mb": statistics.median(measured["activations"]),
                    "ideal_speedup": num_tokens / kept,
                }
            )
    finally:
        modeling.cluster_wise_mask = original_mask
    base_full, base_student = rows[0]["step_s"], rows[0]["student_step_s"]
    for row in rows:
        row["speedup"] = base_full / row["step_s"]
        row["student_speedup"] = base_student / row["student_step_s"]
        row["fraction_of_ideal"] = row["student_speedup"] / row["ideal_speedup"]
        row["teacher_share"] = row["teacher_s"] / row["step_s"]
        row["mask_share"] = row["mask_s"] / row["step_s"]
    return rows


def bench_decode(num_clips: int = 32, batch_size: int = 8) -> dict:
    """PyAV decoding + preprocessing throughput of the training collator on exported tiny-preset mp4 clips, in one
    process (what one DataLoader worker delivers)."""
    import tempfile

    from clusterstm.data.readers import VideoTextCollator, load_video_text_dataset
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
    from clusterstm.data.synthetic import SyntheticVideoTextConfig, export_synthetic_benchmark
    from clusterstm.data.tokenization import train_wordpiece_tokenizer
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
        "| preset | frames x batch | mask ratio | kept/frame | step (s) | speedup | student step (s) | student speedup "
        "| ideal (N/K) | student / ideal | teacher % | mask % | activations MB | peak MB |"
    )
    lines = [header, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['num_frames']} x {r['batch_size']} | {r['mask_ratio']:.2f} | "
            f"{r['kept_per_frame']}/{r['tokens_per_frame']} | {r['step_s']:.3f} | {r['speedup']:.2f}x | "
            f"{r['student_step_s']:.3f} | {r['student_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
            f"{r['fraction_of_ideal']:.2f} | {100 * r['teacher_share']:.0f}% | {100 * r['mask_share']:.1f}% | "
            f"{r['activation_mb']:.0f} | {r['peak_mb']:.0f} |"
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
    for row in rows:
        if row["mask_ratio"] == 0.8:
            lines.append(
                f"- {row['preset']} at mask ratio 0.8: full step {row['speedup']:.2f}x faster than unmasked, "
                f"student step (teacher targets precomputed) {row['student_speedup']:.2f}x, ideal {row['ideal_speedup']:.2f}x; "
                f"the online teacher forward is {100 * row['teacher_share']:.0f}% of the masked step and does not "
                f"shrink with the mask ratio; activations {row['activation_mb']:.0f} MB vs "
                f"{next(r['activation_mb'] for r in rows if r['preset'] == row['preset'] and r['mask_ratio'] == 0):.0f} MB."
            )
    return "\n".join(lines)


def write_report(out: Path, meta: dict, rows: list[dict], decode: dict) -> None:
    """Writes `pretrain.json` and `pretrain.md` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain.json").write_text(json.dumps({"meta": meta, "rows": rows, "decode": decode}, indent=2) + "\n")
    (out / "pretrain.md").write_text(
        "# Pretraining step vs. mask ratio\n\n"
        f"`{meta['command']}` on {meta['device']} ({meta['torch_threads']} torch thread(s), {meta['cpu_count']} "
        f"cores shared with other jobs, torch {meta['torch']}), median of {meta['steps']} step(s) per ratio after one "
        "warm-up each, ratios interleaved, random weights. Absolute times on a loaded shared CPU are noisy; the "
        "ratios between columns are the point.\n\n"
        "*step*: teacher forward + cluster-wise masking + student forward/backward over all objectives "
        "(contrastive, relevance, matching, MLM) + AdamW. *student*: the same without the teacher forward. "
        "*ideal*: video-tower token-count speedup N/K. *activations MB*: distinct tensors saved for backward by the "
        "student forward. *peak MB*: peak resident memory added by one step (CPU: glibc reuses freed memory, so "
        "after the first ratio this often reads ~0; on CUDA: `max_memory_allocated`).\n\n"
        + render(rows)
        + "\n\n"
        + speedup_summary(rows)
        + "\n\n"
        + decode_summary(decode)
        + "\n"
    )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset only, 1 timed step (CI, < 60 s)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per ratio (after one warm-up step)")
    parser.add_argument("--base_batch_size", type=int, default=2)
    parser.add_argument("--base_frames", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
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
    rows = bench_preset("tiny", 8, 8, steps)
    print(render(rows), flush=True)
    if not args.quick:
        rows += bench_preset("base", args.base_frames, args.base_batch_size, steps)
    table = render(rows)
    print()
    print(table)
    decode = bench_decode()
    tiny_08 = next(r for r in rows if r["preset"] == "tiny" and r["mask_ratio"] == 0.8)
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
