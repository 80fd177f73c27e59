"""Benchmark of captioning `generate()` with and without the key/value cache, side by side in one run.

For each decoding setting (greedy, beam search) it times `ClusterSTMForVideoCaptioning.generate` on the same
pre-encoded video tokens with `use_cache=True` (an `EncoderDecoderCache`: every step runs one token through the text
layers, the video's cross-attention keys/values are projected once) and `use_cache=False` (every step re-runs the whole
prefix), checks that both return the same sequences, and prints the uncached / cached time ratio. The video tower is
outside the timed region (both settings encode the video once).

The model is random; EOS is disabled (`eos_token_id=None`), so every run decodes exactly `max_new_tokens` tokens.

Usage:

    python benchmarks/bench_generate.py                 # base-size text tower (BERT-base, 3 fusion layers), 32 tokens
    python benchmarks/bench_generate.py --quick         # tiny preset, a few seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def _time(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up (allocator, first-call paths)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset and few tokens (seconds)")
    parser.add_argument("--preset", default=None, help="model preset (default: base, or tiny with --quick)")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--num_beams", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output_dir", default=None, help="also write generate.json there")
    args = parser.parse_args()

    import torch

    from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
    from clusterstm.models.modeling_clusterstm import ClusterSTMForVideoCaptioning

    torch.set_num_threads(args.threads)
    preset = args.preset or ("tiny" if args.quick else "base")
    batch_size = args.batch_size or (2 if args.quick else 4)
    max_new_tokens = args.max_new_tokens or (8 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 3)

    torch.manual_seed(0)
    config = ClusterSTMConfig.from_preset(preset)
    model = ClusterSTMForVideoCaptioning(config).eval()
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    vision = config.vision_config
    # The video tokens the decoder cross-attends to: every token of the configured clip.
    num_video_tokens = vision.num_frames // vision.tubelet_size * (vision.image_size // vision.patch_size) ** 2
    video_embeds = torch.randn(batch_size, num_video_tokens, vision.hidden_size)

    rows = []
    print(
        f"preset={preset} batch={batch_size} video_tokens={num_video_tokens} new_tokens={max_new_tokens} "
        f"threads={args.threads} torch={torch.__version__} cpu_count={os.cpu_count()} load={os.getloadavg()[0]:.2f}"
    )
    print(f"{'decoding':<12} {'uncached s':>11} {'cached s':>9} {'ratio':>7}  same output")
    for name, beams in (("greedy", 1), (f"beam{args.num_beams}", args.num_beams)):

        def run(use_cache: bool, beams: int = beams):
            with torch.no_grad():
                return model.generate(
                    video_embeds=video_embeds,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens,
                    num_beams=beams,
                    do_sample=False,
                    use_cache=use_cache,
                )

        uncached_s, uncached = _time(lambda: run(False), repeats)
        cached_s, cached = _time(lambda: run(True), repeats)
        same = torch.equal(cached, uncached)
        ratio = uncached_s / cached_s
        rows.append(
            {"decoding": name, "uncached_s": uncached_s, "cached_s": cached_s, "ratio": ratio, "same_output": same}
        )
        print(f"{name:<12} {uncached_s:>11.3f} {cached_s:>9.3f} {ratio:>6.2f}x  {same}")
        if not same:
            raise SystemExit(f"{name}: cached and uncached generate() differ")

    if args.output_dir:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        meta = {
            "preset": preset,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.machine(),
        }
        (output_dir / "generate.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
