"""``clusterstm demo``: the whole method end to end on the embedded synthetic benchmark, with no downloads.

Stages: synthetic data -> tiny CLIP teacher -> ``clusterstm init`` -> zero-shot retrieval of the untrained
student -> ClusterSTM pretraining with Accelerate -> zero-shot retrieval again -> a short QA fine-tune -> figures,
``results.json``, a model card with the results, and a summary table.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run. ``quick`` is the minutes-long smoke version the tests run."""

    teacher_steps: int
    teacher_clips: int
    pretrain_steps: int
    pretrain_clips: int
    batch_size: int
    eval_clips: int
    finetune_steps: int

    @classmethod
    def for_mode(cls, quick: bool) -> DemoSettings:
        if quick:
            return cls(
                teacher_steps=20,
                teacher_clips=64,
                pretrain_steps=6,
                pretrain_clips=64,
                batch_size=8,
                eval_clips=32,
                finetune_steps=4,
            )
        return cls(
            teacher_steps=300,
            teacher_clips=1000,
            pretrain_steps=200,
            pretrain_clips=1000,
            batch_size=32,
            eval_clips=200,
            finetune_steps=100,
        )


def _training_args(output_dir: Path, seed: int, **overrides: Any):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        seed=seed,
        report_to="none",
        save_strategy="no",
        disable_tqdm=False,
        dataloader_num_workers=0,
        logging_steps=10,
        **overrides,
    )


def _zero_shot_retrieval(checkpoint: Path, output_dir: Path, settings: DemoSettings, seed: int) -> dict[str, Any]:
    from .training.finetuning import DataArguments, ModelArguments, run_finetuning

    metrics = run_finetuning(
        ModelArguments(task="retrieval", model_name_or_path=str(checkpoint)),
        DataArguments(
            dataset_name="synthetic", eval_split="test", synthetic_num_eval=settings.eval_clips, synthetic_seed=seed
        ),
        _training_args(output_dir, seed, do_eval=True, per_device_eval_batch_size=32),
    )
    return {k: v for k, v in metrics.items() if k.startswith("eval_")}


def _finetune_qa(checkpoint: Path, output_dir: Path, settings: DemoSettings, seed: int) -> dict[str, Any]:
    from .training.finetuning import DataArguments, ModelArguments, run_finetuning

    metrics = run_finetuning(
        ModelArguments(task="qa", model_name_or_path=str(checkpoint)),
        DataArguments(
            dataset_name="synthetic",
            eval_split="test",
            synthetic_num_train=settings.pretrain_clips,
            synthetic_num_eval=settings.eval_clips,
            synthetic_seed=seed,
            compute_baselines=True,
        ),
        _training_args(
            output_dir,
            seed,
            do_train=True,
            do_eval=True,
            max_steps=settings.finetune_steps,
            per_device_train_batch_size=settings.batch_size,
            per_device_eval_batch_size=32,
            learning_rate=1e-4,
        ),
    )
    return {k: v for k, v in metrics.items() if k.startswith("eval_")}


def _figures(output_dir: Path, teacher_dir: Path, pretrain_dir: Path, seed: int) -> list[str]:
    from .data.synthetic import SyntheticVideoTextConfig, export_synthetic_benchmark, generate_split_metadata
    from .visualize import plot_training_curves, visualize_video

    figures_dir = output_dir / "figures"
    config = SyntheticVideoTextConfig(num_train=1, num_val=1, num_test=4, num_compositional=1, seed=seed)
    export_synthetic_benchmark(config, output_dir / "example_clips", splits=["test"])
    row = generate_split_metadata(config, "test")[0]
    video = next((output_dir / "example_clips" / "test").glob("*.mp4"))
    # Pointed at the pretraining output: it finds its teacher through the run's teacher_config.json.
    paths = [str(p) for p in visualize_video(pretrain_dir, video, row["caption"], output_dir=figures_dir)]
    log_file = pretrain_dir / "logs" / "train_log.jsonl"
    if log_file.is_file():
        records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
        paths.append(str(plot_training_curves(records, figures_dir / "training_curves.png")))
    return paths


def _summary_table(results: dict[str, Any]) -> str:
    untrained = results["zero_shot_untrained"]
    pretrained = results["zero_shot_pretrained"]
    rows = [
        ("text->video R@1 (%)", "eval_t2v_r1"),
        ("text->video R@5 (%)", "eval_t2v_r5"),
        ("video->text R@1 (%)", "eval_v2t_r1"),
        ("text->video median rank", "eval_t2v_medr"),
    ]
    lines = [f"{'zero-shot retrieval (synthetic test)':<38}{'chance':>10}{'untrained':>12}{'ClusterSTM':>12}"]
    chance = results["chance_t2v_r1"]
    for name, key in rows:
        chance_value = f"{chance:.1f}" if key in ("eval_t2v_r1", "eval_v2t_r1") else "-"
        lines.append(
            f"{name:<38}{chance_value:>10}{untrained.get(key, float('nan')):>12.1f}"
            f"{pretrained.get(key, float('nan')):>12.1f}"
        )
    qa = results.get("qa_finetuned")
    if qa:
        lines.append(
            f"{'QA accuracy after fine-tuning (%)':<38}{qa.get('eval_baseline_majority_accuracy', float('nan')):>10.1f}"
            f"{'':>12}{qa.get('eval_accuracy', float('nan')):>12.1f}"
        )
    lines.append(
        f"pretraining: {results['pretraining']['global_step']} steps in "
        f"{results['pretraining']['train_runtime']:.0f} s; whole demo {results['wall_time_seconds']:.0f} s"
    )
    return "\n".join(lines)


#: Peak learning rate of the demo's pretraining stage (also written into the model card).
PRETRAIN_LEARNING_RATE = 5e-4


def run_demo(output_dir: str | Path = "demo_output", seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Runs the demo and returns (and writes to ``output_dir/results.json``) what it measured."""
    from tqdm.auto import tqdm

    from .hub.export import init_checkpoint
    from .hub.model_card import write_model_card
    from .training.pretraining import PretrainingArguments, run_pretraining
    from .training.teacher_training import TeacherTrainingArguments, run_teacher_training

    start = time.perf_counter()
    settings = DemoSettings.for_mode(quick)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    teacher_dir, init_dir = output_dir / "teacher", output_dir / "init"
    pretrain_dir, checkpoint_dir = output_dir / "pretrain", output_dir / "checkpoint"
    results: dict[str, Any] = {"seed": seed, "quick": quick, "settings": settings.__dict__}

    stages = tqdm(total=6, desc="ClusterSTM demo", unit="stage")
    stages.set_postfix_str("training the tiny CLIP teacher")
    results["teacher"] = run_teacher_training(
        TeacherTrainingArguments(
            output_dir=str(teacher_dir),
            max_steps=settings.teacher_steps,
            num_train_clips=settings.teacher_clips,
            num_eval_clips=settings.eval_clips,
            seed=seed,
            synthetic_seed=seed,
        )
    )
    stages.update()

    stages.set_postfix_str("init + zero-shot retrieval of the untrained student")
    init_checkpoint("tiny", init_dir, seed=seed)
    results["zero_shot_untrained"] = _zero_shot_retrieval(init_dir, output_dir / "eval_untrained", settings, seed)
    results["chance_t2v_r1"] = 100.0 / settings.eval_clips
    stages.update()

    stages.set_postfix_str("ClusterSTM pretraining (Accelerate)")
    results["pretraining"] = run_pretraining(
        PretrainingArguments(
            model_name_or_path=str(init_dir),
            teacher_name_or_path=str(teacher_dir),
            dataset_name="synthetic",
            num_train_clips=settings.pretrain_clips,
            synthetic_seed=seed,
            output_dir=str(pretrain_dir),
            max_steps=settings.pretrain_steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=PRETRAIN_LEARNING_RATE,
            warmup_ratio=0.1,
            seed=seed,
            logging_steps=5,
            dataloader_num_workers=0,
        )
    )
    stages.update()

    stages.set_postfix_str("zero-shot retrieval of the pretrained student")
    results["zero_shot_pretrained"] = _zero_shot_retrieval(
        pretrain_dir, output_dir / "eval_pretrained", settings, seed
    )
    stages.update()

    stages.set_postfix_str("QA fine-tuning with the Trainer")
    results["qa_finetuned"] = _finetune_qa(pretrain_dir, output_dir / "finetune_qa", settings, seed)
    stages.update()

    stages.set_postfix_str("figures and checkpoint")
    results["figures"] = _figures(output_dir, teacher_dir, pretrain_dir, seed)
    if checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    shutil.copytree(pretrain_dir, checkpoint_dir, ignore=shutil.ignore_patterns("checkpoint-*", "logs", "runs"))
    shutil.copytree(teacher_dir, checkpoint_dir / "teacher")
    stages.update()
    stages.close()

    results["wall_time_seconds"] = time.perf_counter() - start
    write_model_card(
        checkpoint_dir,
        json.loads((checkpoint_dir / "config.json").read_text()),
        run_info={
            "teacher": "tiny CLIP trained by the demo (teacher/)",
            "dataset": "ClusterSTM synthetic benchmark",
            "steps": results["pretraining"]["global_step"],
            "learning_rate": PRETRAIN_LEARNING_RATE,
            "seed": seed,
        },
        eval_results=[
            {
                "task": "retrieval",
                "dataset_name": "ClusterSTM synthetic",
                "dataset_type": "synthetic",
                "dataset_split": "test",
                "protocol": "zero-shot, one caption per video",
                "metrics": results["zero_shot_pretrained"],
            }
        ],
    )
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = _summary_table(results)
    print("\n" + table)
    print(
        f"\nCheckpoint: {checkpoint_dir}\nResults:    {output_dir / 'results.json'}\nFigures:    {output_dir / 'figures'}"
    )
    return results
