"""Downstream comparison: a ClusterSTM-pretrained checkpoint vs the same architecture from scratch, fine-tuned
identically with the transformers Trainer on the synthetic benchmark's three tasks, next to simple baselines.

    python benchmarks/downstream.py --pretrained PRETRAINED_DIR [--steps 150] [--quick] [--output_dir docs/benchmarks]

PRETRAINED_DIR is any ClusterSTM checkpoint (e.g. ``demo_output/checkpoint`` from ``clusterstm demo``). The
from-scratch model is ``clusterstm init --preset tiny`` with the same tokenizer and seed. Writes
``downstream.md`` / ``downstream.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from clusterstm.tasks import TASKS as TASK_REGISTRY

REPO_ROOT = Path(__file__).resolve().parents[1]

# (task, metric key, metric label, baseline key, baseline label), from each registered task's `headline`; all in
# the units finetuning reports.
TASKS = tuple(
    (task.name, f"eval_{key}", label, f"eval_{baseline_key}", baseline_label)
    for task in TASK_REGISTRY.values()
    if task.headline is not None
    for key, label, baseline_key, baseline_label in (task.headline,)
)


def finetune(task: str, checkpoint: Path, output_dir: Path, steps: int, num_train: int, num_eval: int, seed: int):
    """One Trainer fine-tune + evaluation on the synthetic test split; returns the eval metrics."""
    from transformers import TrainingArguments

    from clusterstm.training.finetuning import DataArguments, ModelArguments, run_finetuning

    metrics = run_finetuning(
        ModelArguments(task=task, model_name_or_path=str(checkpoint), caption_tokenizer="python"),
        DataArguments(
            dataset_name="synthetic",
            eval_split="test",
            synthetic_num_train=num_train,
            synthetic_num_eval=num_eval,
            synthetic_seed=seed,
            compute_baselines=True,
        ),
        TrainingArguments(
            output_dir=str(output_dir),
            do_train=True,
            do_eval=True,
            max_steps=steps,
            per_device_train_batch_size=32,
            per_device_eval_batch_size=32,
            learning_rate=5e-4,
            warmup_steps=max(1, steps // 10),
            lr_scheduler_type="cosine",
            weight_decay=0.02,
            seed=seed,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        ),
    )
    return {k: v for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, (int, float))}


def render(results: dict, settings: dict) -> str:
    lines = [
        "# Downstream: ClusterSTM-pretrained vs from scratch",
        "",
        f"`{settings['command']}` — {settings['machine']}; wall time {settings['wall_time_s']:.0f} s.",
        "",
        f"Tiny config, identical Trainer fine-tuning for both rows: {settings['steps']} steps, batch 32, lr 5e-4 "
        f"cosine, {settings['num_train']} synthetic training clips, evaluated on {settings['num_eval']} test clips; "
        f"seed {settings['seed']}. Pretrained checkpoint: `{settings['pretrained_name']}`.",
        "",
        "| task | metric | baseline | from scratch | ClusterSTM-pretrained |",
        "|---|---|---|---|---|",
    ]
    for task, key, label, baseline_key, baseline_label in TASKS:
        scratch, pretrained = results[task]["scratch"], results[task]["pretrained"]
        lines.append(
            f"| {task} | {label} | {scratch.get(baseline_key, float('nan')):.3g} ({baseline_label}) | "
            f"{scratch.get(key, float('nan')):.3g} | {pretrained.get(key, float('nan')):.3g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="a ClusterSTM checkpoint folder")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--num_train", type=int, default=1000)
    parser.add_argument("--num_eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps on little data (CI smoke run)")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "docs" / "benchmarks"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.num_train, args.num_eval = 2, 32, 16

    from clusterstm.hub.export import init_checkpoint

    start = time.perf_counter()
    pretrained = Path(args.pretrained)
    if not (pretrained / "config.json").is_file():
        raise SystemExit(f"--pretrained {pretrained} is not a checkpoint folder (no config.json)")
    results: dict = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        # Same preset, seed and (default) tokenizer as `clusterstm init`: only the pretraining differs.
        scratch = init_checkpoint("tiny", work / "scratch", seed=args.seed)
        for task, *_ in TASKS:
            results[task] = {
                init: finetune(
                    task, path, work / f"{task}-{init}", args.steps, args.num_train, args.num_eval, args.seed
                )
                for init, path in (("scratch", scratch), ("pretrained", pretrained))
            }
            print(task, json.dumps(results[task], default=str)[:400], flush=True)
    settings = {
        "command": " ".join(["python benchmarks/downstream.py", *(argv or [])]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared)",
        "wall_time_s": time.perf_counter() - start,
        "steps": args.steps,
        "num_train": args.num_train,
        "num_eval": args.num_eval,
        "seed": args.seed,
        "pretrained_name": args.pretrained,
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "downstream.json").write_text(
        json.dumps({"settings": settings, "results": results}, indent=2) + "\n"
    )
    (output_dir / "downstream.md").write_text(render(results, settings))
    print(render(results, settings))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
