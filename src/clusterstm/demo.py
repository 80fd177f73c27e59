"""``clusterstm demo``: the whole method end to end on the embedded synthetic benchmark, with no downloads.

Stages: synthetic data -> tiny CLIP teacher -> ``clusterstm init`` -> zero-shot retrieval of the untrained
student -> ClusterSTM pretraining with Accelerate -> zero-shot retrieval again -> a short QA fine-tune -> figures,
``results.json``, a model card with the results, and a summary table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# What each figure shows and what to look for (printed at the end of the demo and used in the README).
FIGURE_NOTES: dict[str, str] = {
    "relevance.png": "teacher relevance of each patch to the caption (1x1 vs 3x3 windows, colour bar in cosine "
    "similarity units); a useful teacher is brightest on the objects the caption names.",
    "clusters.png": "per-frame DPC-KNN clusters and the one token kept per cluster; every region of the frame "
    "should keep a token, and the kept tokens should sit on the same objects from frame to frame.",
    "kept_tokens.png": "cluster-wise vs random masking at the same ratio on the same clip; random masking leaves "
    "some objects with no visible token, cluster-wise masking keeps one per region.",
    "training_curves.png": "the pretraining losses per logged step; each objective should fall below its value at "
    "step 0 (a flat line means that objective is not learning).",
}

# results.json keys that measure time (or name paths) and so differ from run to run by design.
# Timings, paths and the run id (a fresh uuid per run) are the only parts of results.json a rerun may change.
_UNREPRODUCIBLE_KEY_PARTS = (
    "runtime", "per_second", "wall_time", "seconds", "figures", "output_dir", "name_or_path", "run_id"
)


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
        # Pinned memory only helps host-to-GPU copies; on a CPU-only machine it is a warning and nothing else.
        dataloader_pin_memory=_cuda_available(),
        logging_steps=10,
        **overrides,
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def reproducible_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` without its timings, paths and run id: what a rerun with the same seed must reproduce exactly."""

    def keep(key: str) -> bool:
        return not any(part in key for part in _UNREPRODUCIBLE_KEY_PARTS)

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if keep(str(k))}
        return value

    return strip(results)


def _environment() -> dict[str, Any]:
    """What a number in ``results.json`` depends on besides the seed (see the README's reproducibility notes)."""
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """Deterministic kernels for the duration of the demo, restored afterwards.

    Why (measured on a 2-core CPU, torch 2.14): with two threads, two runs of the demo's pretraining with one seed
    differed after two steps in 47 of 180 weight tensors (by ~1e-9, first in the patch and position embeddings),
    and by whole retrieval points after 200 steps. With one thread, or with deterministic algorithms, the two runs
    were bitwise identical. ``warn_only`` keeps the demo running on a device where an operation has no
    deterministic version. The other source of run-to-run change was the offline tokenizer's vocabulary (see
    `train_wordpiece_tokenizer`).
    """
    import torch

    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    previous_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    # cuBLAS needs a fixed workspace to be deterministic; it reads this when it first initialises.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous_cudnn


@contextlib.contextmanager
def _readable_console() -> Iterator[None]:
    """Log lines go above the progress bars instead of being glued onto them; no load/save progress bars."""
    import transformers
    from tqdm.contrib.logging import logging_redirect_tqdm

    # Handlers must exist before the redirect swaps them: the root one (the training loops log through it) and
    # transformers' own (it does not propagate).
    if not logging.getLogger().handlers:
        logging.basicConfig(
            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
        )
    transformers.utils.logging.get_logger("transformers")
    bars_were_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger(), logging.getLogger("transformers")]):
            yield
    finally:
        if bars_were_enabled:
            transformers.utils.logging.enable_progress_bar()


class _Stages:
    """Prints one line when a stage starts and one with its wall time when it ends (no ETA: stages differ)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.seconds: dict[str, float] = {}

    def run(self, name: str, function: Callable[[], Any]) -> Any:
        from tqdm.auto import tqdm

        self.done += 1
        tqdm.write(f"[{self.done}/{self.total}] {name} ...", file=sys.stdout)
        start = time.perf_counter()
        value = function()
        self.seconds[name] = round(time.perf_counter() - start, 1)
        tqdm.write(f"[{self.done}/{self.total}] {name}: done in {self.seconds[name]:.1f} s", file=sys.stdout)
        return value


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


def chance_retrieval(num_candidates: int) -> dict[str, float]:
    """Expected retrieval metrics of a random ranking of ``num_candidates`` items with one correct match (from
    `clusterstm.tasks.retrieval.chance_retrieval_metrics`, text-to-video side)."""
    from .tasks.retrieval import chance_retrieval_metrics

    chance = chance_retrieval_metrics(num_candidates)
    return {key: chance[f"t2v_{key}"] for key in ("r1", "r5", "r10", "medr")}


_TABLE_ROWS = (
    ("text->video R@1 (%)", "eval_t2v_r1", "r1"),
    ("text->video R@5 (%)", "eval_t2v_r5", "r5"),
    ("video->text R@1 (%)", "eval_v2t_r1", "r1"),
    ("text->video median rank", "eval_t2v_medr", "medr"),
)


def _table_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, baseline, untrained, pretrained) cells of the results table, formatted."""
    untrained, pretrained, chance = results["zero_shot_untrained"], results["zero_shot_pretrained"], results["chance"]
    rows = [
        (
            name,
            f"{chance[chance_key]:.1f}",
            f"{untrained.get(key, float('nan')):.1f}",
            f"{pretrained.get(key, float('nan')):.1f}",
        )
        for name, key, chance_key in _TABLE_ROWS
    ]
    qa = results.get("qa_finetuned")
    if qa:
        majority = f"{qa.get('eval_baseline_majority_accuracy', float('nan')):.1f} (majority answer)"
        rows.append(
            (
                f"QA accuracy after a {results['settings']['finetune_steps']}-step fine-tune (%)",
                majority,
                "",
                f"{qa.get('eval_accuracy', float('nan')):.1f}",
            )
        )
    return rows


def _machine_line(results: dict[str, Any]) -> str:
    env = results["environment"]
    return (
        f"{env['machine']} {env['device']} ({env['cpu_count']} CPUs, {env['torch_num_threads']} torch threads, "
        f"{env['cpu_capability']}), torch {env['torch']}, transformers {env['transformers']}; seed {results['seed']}; "
        f"whole demo {results['wall_time_seconds']:.0f} s, pretraining {results['pretraining']['train_runtime']:.0f} s"
    )


def _summary_table(results: dict[str, Any]) -> str:
    """The console table printed at the end of the demo."""
    header = f"ClusterSTM ({results['pretraining']['global_step']} steps)"
    lines = [f"{'zero-shot retrieval (synthetic test)':<44}{'chance':>22}{'untrained':>12}{header:>24}"]
    for name, baseline, untrained, pretrained in _table_rows(results):
        lines.append(f"{name:<44}{baseline:>22}{untrained:>12}{pretrained:>24}")
    lines.append(f"machine: {_machine_line(results)}")
    return "\n".join(lines)


#: Peak learning rate of the demo's pretraining stage (also written into the model card).
PRETRAIN_LEARNING_RATE = 5e-4


def summary_markdown(results: dict[str, Any]) -> str:
    """The same table as Markdown (``results.md``), for a README or a model card, with machine and time."""
    header = f"ClusterSTM ({results['pretraining']['global_step']} steps)"
    lines = [
        f"| zero-shot retrieval (synthetic test, {results['settings']['eval_clips']} clips) | chance | untrained | "
        f"{header} |",
        "|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in _table_rows(results)]
    lines.append("")
    lines.append(f"Machine: {_machine_line(results)}.")
    return "\n".join(lines) + "\n"


def run_demo(output_dir: str | Path = "demo_output", seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Runs the demo and returns (and writes to ``output_dir/results.json``) what it measured.

    The run is deterministic: the same seed on the same machine and software gives the same ``results.json`` apart
    from timings (see :func:`reproducible_metrics`).
    """
    with deterministic_torch(), _readable_console():
        return _run_demo(Path(output_dir), seed, quick)


def _run_demo(output_dir: Path, seed: int, quick: bool) -> dict[str, Any]:
    from .hub.export import init_checkpoint
    from .hub.model_card import write_model_card
    from .training.pretraining import PretrainingArguments, run_pretraining
    from .training.teacher_training import TeacherTrainingArguments, run_teacher_training

    start = time.perf_counter()
    settings = DemoSettings.for_mode(quick)
    output_dir.mkdir(parents=True, exist_ok=True)
    teacher_dir, init_dir = output_dir / "teacher", output_dir / "init"
    pretrain_dir, checkpoint_dir = output_dir / "pretrain", output_dir / "checkpoint"
    results: dict[str, Any] = {"seed": seed, "quick": quick, "settings": settings.__dict__}
    results["environment"] = _environment()
    stages = _Stages(total=6)

    results["teacher"] = stages.run(
        "training the tiny CLIP teacher",
        lambda: run_teacher_training(
            TeacherTrainingArguments(
                output_dir=str(teacher_dir),
                max_steps=settings.teacher_steps,
                num_train_clips=settings.teacher_clips,
                num_eval_clips=settings.eval_clips,
                seed=seed,
                synthetic_seed=seed,
            )
        ),
    )

    def untrained() -> dict[str, Any]:
        init_checkpoint("tiny", init_dir, seed=seed)
        return _zero_shot_retrieval(init_dir, output_dir / "eval_untrained", settings, seed)

    results["zero_shot_untrained"] = stages.run("init + zero-shot retrieval of the untrained student", untrained)
    results["chance"] = chance_retrieval(settings.eval_clips)
    results["chance_t2v_r1"] = results["chance"]["r1"]  # kept for readers of the 0.1.0 results.json

    results["pretraining"] = stages.run(
        "ClusterSTM pretraining (Accelerate)",
        lambda: run_pretraining(
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
        ),
    )
    results["zero_shot_pretrained"] = stages.run(
        "zero-shot retrieval of the pretrained student",
        lambda: _zero_shot_retrieval(pretrain_dir, output_dir / "eval_pretrained", settings, seed),
    )
    results["qa_finetuned"] = stages.run(
        "QA fine-tuning with the Trainer",
        lambda: _finetune_qa(pretrain_dir, output_dir / "finetune_qa", settings, seed),
    )

    def figures_and_checkpoint() -> list[str]:
        paths = _figures(output_dir, teacher_dir, pretrain_dir, seed)
        if checkpoint_dir.exists():
            shutil.rmtree(checkpoint_dir)
        shutil.copytree(pretrain_dir, checkpoint_dir, ignore=shutil.ignore_patterns("checkpoint-*", "logs", "runs"))
        shutil.copytree(teacher_dir, checkpoint_dir / "teacher")
        return paths

    results["figures"] = stages.run("figures and checkpoint", figures_and_checkpoint)
    results["stage_seconds"] = stages.seconds
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
    (output_dir / "results.md").write_text(summary_markdown(results))
    print("\n" + _summary_table(results))
    print(f"\nCheckpoint: {checkpoint_dir}\nResults:    {output_dir / 'results.json'} (table: results.md)\nFigures:")
    for path in results["figures"]:
        print(f"  {path}: {FIGURE_NOTES.get(Path(path).name, '')}")
    return results
