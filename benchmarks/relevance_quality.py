"""How well the teacher's relevance points at the objects a caption names, per window size and relevance method.

On test clips of the embedded synthetic benchmark (which knows every object's pixels) the relevance targets are
computed exactly as pretraining computes them (`clusterstm.teacher.compute_teacher_targets`), for each window size and
each `relevance_method` ("window" = Algorithm III; "maskclip"; "clearclip"), and scored with `relevance_localization`
against `object_token_masks` (every object of a synthetic clip is named by its caption):

* pointing game: fraction of frames whose relevance maximum is on an object token (chance: the mean fraction of
  object tokens per frame, printed as the `random map` row);
* AUC: how well relevance separates object tokens from the rest within a frame (0.5 = chance, < 0.5 = relevance is
  higher on the background).

The teacher's own zero-shot frame->caption R@1 (from the `teacher_results.json` that `scripts/train_teacher.py`
writes) is published beside it.

Usage:

    python scripts/train_teacher.py --output_dir teacher --max_steps 150 --num_train_clips 1000 --num_eval_clips 200
    python benchmarks/relevance_quality.py --teacher teacher --num_clips 100 --output_dir docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from clusterstm.data.synthetic import (
    SyntheticVideoTextConfig,
    generate_split_metadata,
    object_token_masks,
    render_clips,
)
from clusterstm.teacher.dense import RELEVANCE_METHODS
from clusterstm.teacher.localization import relevance_localization
from clusterstm.teacher.targets import compute_teacher_targets
from clusterstm.teacher.teacher import ClusterSTMTeacher


def evaluate(
    teacher_path: str,
    num_clips: int,
    window_sizes: list[int],
    methods: list[str],
    split: str = "test",
    batch_size: int = 16,
    min_coverage: float = 0.25,
    seed: int = 0,
    max_text_length: int = 32,
) -> dict:
    """Scores every (method, window size) on the first `num_clips` clips of `split`."""
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
    masks = torch.from_numpy(object_token_masks(rows, config, patch_size=teacher.patch_size, min_coverage=min_coverage))
    relevance = {(m, w): [] for m in methods for w in window_sizes}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        frames = teacher.prepare_frames(torch.from_numpy(render_clips(chunk, config)))
        text = teacher.prepare_text([row["caption"] for row in chunk], max_length=max_text_length)
        for method in methods:
            for window in window_sizes:
                targets = compute_teacher_targets(
                    teacher,
                    frames,
                    window_size=window,
                    teacher_pixel_values=frames,
                    teacher_input_ids=text["input_ids"],
                    teacher_attention_mask=text.get("attention_mask"),
                    relevance_method=method,
                )
                relevance[(method, window)].append(targets.relevance.cpu())
    results = []
    for (method, window), parts in relevance.items():
        maps = torch.cat(parts)
        scores = relevance_localization(maps, masks)
        on, off = maps[masks], maps[~masks]
        results.append(
            {
                "method": method,
                "window_size": window,
                **scores,
                "mean_relevance_objects": float(on.mean()),
                "mean_relevance_background": float(off.mean()),
            }
        )
    per_frame = masks.float().mean(-1).reshape(-1)
    scored = (per_frame > 0) & (per_frame < 1)
    chance = {"pointing_game": float(per_frame[scored].mean()), "auc": 0.5}
    return {"results": results, "chance": chance, "object_token_fraction": float(masks.float().mean())}


def _teacher_summary(teacher_path: str) -> dict:
    path = Path(teacher_path) / "teacher_results.json"
    if not path.is_file():
        return {}
    log = json.loads(path.read_text())
    after = log.get("eval_after", {})
    return {
        "steps": log.get("global_step"),
        "train_runtime_s": log.get("train_runtime"),
        "frame_to_caption_R@1": after.get("image_to_text_R@1"),
        "caption_to_frame_R@1": after.get("text_to_image_R@1"),
        "chance_R@1": after.get("chance_R@1"),
        "args": log.get("args"),
    }


def to_markdown(report: dict) -> str:
    teacher = report["teacher"]
    lines = [
        "# Relevance quality: does the teacher's relevance point at the named objects?",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}; load average before/after {report['load_before']} / {report['load_after']}; "
        f"wall time {report['wall_time_s']:.0f} s.",
        "",
        f"Teacher: `{report['teacher_path_name']}`, {teacher.get('steps')} training steps "
        f"({teacher.get('train_runtime_s', 0) or 0:.0f} s), zero-shot frame->caption R@1 "
        f"{teacher.get('frame_to_caption_R@1')} %, caption->frame R@1 {teacher.get('caption_to_frame_R@1')} % "
        f"(chance {teacher.get('chance_R@1')} %) on its own evaluation clips.",
        "",
        f"{report['num_clips']} synthetic {report['split']} clips, object tokens = patches at least "
        f"{report['min_coverage']:.0%} covered by an object ({report['object_token_fraction']:.1%} of all tokens); "
        "every object is named by its caption.",
        "",
        "| method | window | pointing game | AUC | mean relevance on objects | on background |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['method']} | {row['window_size']}x{row['window_size']} | {row['pointing_game']:.3f} | "
            f"{row['auc']:.3f} | {row['mean_relevance_objects']:+.3f} | {row['mean_relevance_background']:+.3f} |"
        )
    chance = report["chance"]
    lines.append(f"| random map (chance) | – | {chance['pointing_game']:.3f} | {chance['auc']:.3f} | – | – |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="Teacher folder (e.g. from scripts/train_teacher.py).")
    parser.add_argument("--num_clips", type=int, default=100)
    parser.add_argument("--split", default="test")
    parser.add_argument("--window_sizes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--methods", nargs="+", default=list(RELEVANCE_METHODS), choices=RELEVANCE_METHODS)
    parser.add_argument("--min_coverage", type=float, default=0.25)
    parser.add_argument("--max_text_length", type=int, default=32, help="Caption tokens (the tiny teacher's 32).")
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--output_dir", default=None, help="Writes relevance_quality.{md,json} there.")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    report = evaluate(
        args.teacher, args.num_clips, args.window_sizes, args.methods, args.split,
        min_coverage=args.min_coverage, max_text_length=args.max_text_length,
    )
    report.update(
        command="python benchmarks/relevance_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        wall_time_s=time.perf_counter() - start,
        load_before=load_before,
        load_after=[round(x, 2) for x in os.getloadavg()],
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        teacher=_teacher_summary(args.teacher),
        teacher_path_name=Path(args.teacher).name,
        num_clips=args.num_clips,
        split=args.split,
        min_coverage=args.min_coverage,
    )
    markdown = to_markdown(report)
    print(markdown)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "relevance_quality.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "relevance_quality.md").write_text(markdown)
    return report


if __name__ == "__main__":
    main()
