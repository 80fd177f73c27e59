"""Does a masking strategy keep every object visible? Cluster-wise vs random, tube and attention masking.

The paper's premise (Sec. 3.2): random masking at 75-90 % drops whole objects, while keeping one token per
density-peak cluster gives every semantic region a representative in every frame. The embedded synthetic benchmark
knows every object's pixels, so this is measured directly: on test clips, the masks are built exactly as pretraining
builds them (`compute_teacher_targets` for the teacher's patch tokens and CLS attention, then `build_mask`), and
scored with `clusterstm.data.synthetic.kept_object_coverage` against `per_object_token_masks`:

* object-frames kept: of all (clip, frame, object) triples, the fraction in which the object keeps >= 1 token;
* clips fully kept: the fraction of clips in which every object keeps a token in every frame;
* object tokens kept: the keep rate on object tokens (1 - ratio for a content-blind mask).

Usage (the teacher is any CLIP-like folder whose patch grid lies on the 64 px synthetic frames, e.g. the demo's):

    clusterstm demo --output_dir demo_output         # writes demo_output/teacher
    python benchmarks/object_coverage.py --teacher demo_output/teacher --num_clips 200 --output_dir docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from clusterstm.data.synthetic import (
    SyntheticVideoTextConfig,
    generate_split_metadata,
    kept_object_coverage,
    per_object_token_masks,
    render_clips,
)
from clusterstm.models.masking_clusterstm import build_mask
from clusterstm.teacher.targets import compute_teacher_targets
from clusterstm.teacher.teacher import ClusterSTMTeacher

STRATEGIES = ("cluster", "random", "tube", "attention")


def evaluate(
    teacher_path: str,
    num_clips: int,
    ratios: list[float],
    strategies: list[str],
    split: str = "test",
    batch_size: int = 16,
    min_coverage: float = 0.25,
    seed: int = 0,
) -> list[dict]:
    """Coverage of every (strategy, ratio) on the first `num_clips` clips of `split` (random draws seeded by `seed`)."""
    teacher = ClusterSTMTeacher.from_pretrained(teacher_path).eval()
    config = SyntheticVideoTextConfig(seed=seed)
    rows = generate_split_metadata(config, split)[:num_clips]
    if len(rows) < num_clips:
        raise ValueError(f"--num_clips {num_clips}: the {split} split has only {len(rows)} clips.")
    if teacher.image_size != config.image_size:
        raise ValueError(
            f"The teacher's native size ({teacher.image_size} px) must be the synthetic frame size "
            f"({config.image_size} px) so that its patch grid is the one the object masks are laid on."
        )
    objects = per_object_token_masks(rows, config, patch_size=teacher.patch_size, min_coverage=min_coverage)
    masks: dict[tuple[str, float], list[np.ndarray]] = {(s, r): [] for s in strategies for r in ratios}
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        frames = teacher.prepare_frames(torch.from_numpy(render_clips(chunk, config)))
        text = teacher.prepare_text([row["caption"] for row in chunk])
        targets = compute_teacher_targets(
            teacher,
            frames,
            window_size=1,
            need_relevance=False,
            need_patch_tokens=True,
            need_cls_attention="attention" in strategies,
            teacher_pixel_values=frames,
            teacher_input_ids=text["input_ids"],
            teacher_attention_mask=text.get("attention_mask"),
        )
        b, t, n = targets.patch_tokens.shape[:3]
        for strategy in strategies:
            for ratio in ratios:
                mask = build_mask(
                    strategy,
                    batch_size=b,
                    num_frames=t,
                    num_patches=n,
                    mask_ratio=ratio,
                    features=targets.patch_tokens,
                    cls_attention=targets.cls_attention,
                    generator=generator,
                )
                masks[(strategy, ratio)].append(mask.cpu().numpy())
    return [
        {"strategy": strategy, "mask_ratio": ratio, **kept_object_coverage(np.concatenate(parts), objects)}
        for (strategy, ratio), parts in masks.items()
    ]


def to_markdown(report: dict) -> str:
    lines = [
        "# Object coverage: does a mask keep every object visible?",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}; wall time {report['wall_time_s']:.0f} s. Teacher: `{report['teacher_name']}` "
        f"(its patch tokens drive cluster masking, its CLS attention attention masking). {report['num_clips']} "
        f"synthetic {report['split']} clips of 8 frames; an object's tokens are the patches at least "
        f"{report['min_coverage']:.0%} covered by it; random draws seeded with {report['seed']}.",
        "",
        "| strategy | mask ratio | object-frames kept | clips with every object kept in every frame | object tokens kept |",
        "|---|---|---|---|---|",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['strategy']} | {row['mask_ratio']:g} | {row['object_frames_kept']:.3f} | "
            f"{row['clips_all_kept']:.3f} | {row['object_tokens_kept']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="A CLIP-like teacher folder (e.g. demo_output/teacher).")
    parser.add_argument("--num_clips", type=int, default=200, help="Synthetic test clips to score.")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.9], help="Mask ratios.")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES), help="Strategies.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the clips and of the random masks.")
    parser.add_argument("--output_dir", default=None, help="Write object_coverage.{json,md} here.")
    args = parser.parse_args(argv)
    if not all(0.0 <= r < 1.0 for r in args.ratios):
        parser.error("--ratios must be in [0, 1)")
    start = time.perf_counter()
    results = evaluate(args.teacher, args.num_clips, args.ratios, args.strategies, seed=args.seed)
    report = {
        "command": "python benchmarks/object_coverage.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "teacher_name": Path(args.teacher).name,
        "num_clips": args.num_clips,
        "split": "test",
        "min_coverage": 0.25,
        "seed": args.seed,
        "wall_time_s": time.perf_counter() - start,
        "results": results,
    }
    markdown = to_markdown(report)
    print(markdown)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "object_coverage.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "object_coverage.md").write_text(markdown)
    return report


if __name__ == "__main__":
    main()
