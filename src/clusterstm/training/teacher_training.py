"""Training the small CLIP teacher of the synthetic benchmark.

ClusterSTM needs a frozen image-text teacher (CLIP-like) for its clustering features and relevance targets. Real users
pass any CLIP or SigLIP checkpoint; for the embedded synthetic benchmark, `run_teacher_training` trains a small
transformers `CLIPModel` on single frames of the synthetic train split with CLIP's image-text contrastive loss and
saves it as an ordinary CLIP checkpoint folder (model + `CLIPImageProcessor` + tokenizer), loadable with
`CLIPModel.from_pretrained` and `ClusterSTMTeacher.from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, HfArgumentParser, get_scheduler
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

logger = logging.getLogger(__name__)


@dataclass
class TeacherTrainingArguments:
    """Command-line arguments of `scripts/train_teacher.py`."""

    output_dir: str = field(metadata={"help": "Where the CLIP checkpoint folder is written."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Frames (with their captions) per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (cosine schedule; the first tenth of the steps warm up)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=0, metadata={"help": "Seed of the weights, the frame sampling and the data order."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic benchmark's clips."})
    num_train_clips: int = field(
        default=1000, metadata={"help": "Synthetic training clips (frames are drawn from them)."}
    )
    num_eval_clips: int = field(default=200, metadata={"help": "Validation clips for the zero-shot retrieval check."})
    image_size: int = field(default=64, metadata={"help": "Frame size of the synthetic clips and of the teacher."})
    num_frames: int = field(default=8, metadata={"help": "Frames per synthetic clip."})
    patch_size: int = field(
        default=8, metadata={"help": "Teacher ViT patch size (8 gives the tiny student's 8x8 grid)."}
    )
    hidden_size: int = field(default=64, metadata={"help": "Width of both towers (the tiny preset expects 64)."})
    projection_dim: int = field(default=64, metadata={"help": "Joint space size (the tiny preset expects 64)."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Layers of each tower."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads of each tower."})
    max_text_length: int = field(default=32, metadata={"help": "Maximum caption length in tokens."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})
    eval_steps: int = field(
        default=0,
        metadata={
            "help": "Also evaluate the zero-shot retrieval every N steps (`eval_curve` in teacher_results.json), to "
            "see whether the teacher has plateaued; 0: before and after training only."
        },
    )

    def __post_init__(self) -> None:
        if self.eval_steps < 0:
            raise ValueError(f"--eval_steps must be >= 0, got {self.eval_steps}.")
        for name in (
            "max_steps",
            "per_device_train_batch_size",
            "num_train_clips",
            "num_eval_clips",
            "patch_size",
            "hidden_size",
            "projection_dim",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.per_device_train_batch_size < 2:
            raise ValueError("--per_device_train_batch_size must be >= 2 (the contrastive loss needs negatives).")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"--image_size ({self.image_size}) must be a multiple of --patch_size ({self.patch_size})."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"--hidden_size ({self.hidden_size}) must be a multiple of --num_attention_heads "
                f"({self.num_attention_heads})."
            )


def build_teacher_config(args: TeacherTrainingArguments, tokenizer: Any) -> CLIPConfig:
    """A small `CLIPConfig` for the synthetic frames and the given WordPiece tokenizer."""
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": args.hidden_size,
        "intermediate_size": 4 * args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "max_position_embeddings": max(args.max_text_length, 16),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        # The text tower pools at the first [SEP]; any id but 2 selects that (id 2 is CLIP's legacy argmax path).
        "eos_token_id": tokenizer.sep_token_id,
    }
    vision_config = {
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": 4 * args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=args.projection_dim)


def build_image_processor(image_size: int) -> CLIPImageProcessor:
    """The teacher's image processor: resize/crop to `image_size`, CLIP mean/std normalisation."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def normalize_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 frames `(..., H, W, 3)` -> CLIP-normalised float `(..., 3, H, W)` (what `CLIPImageProcessor` outputs
    for frames already at the teacher's size)."""
    frames = torch.as_tensor(np.asarray(frames)).float().div_(255.0)
    frames = frames.movedim(-1, -3)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (frames - mean) / std


@torch.no_grad()
def evaluate_frame_text_retrieval(
    model: CLIPModel, tokenizer: Any, videos: np.ndarray, captions: Sequence[str], max_text_length: int = 32
) -> dict[str, float]:
    """Zero-shot retrieval between the middle frame of each clip and the clips' captions.

    Returns image->text and text->image R@1/R@5 in percent and the chance R@1, ranked by the package's one evaluator
    (`clusterstm.tasks.retrieval`; ties count against the ground truth). A caption is counted as correct only for its
    own clip (identical captions of other clips count as misses, so this is a lower bound).
    """
    from ..tasks.retrieval import encode_retrieval_batches, retrieval_scores

    middle = videos[:, videos.shape[1] // 2]

    def batches():
        for start in range(0, len(captions), 128):
            tokens = tokenizer(
                list(captions[start : start + 128]),
                padding=True,
                truncation=True,
                max_length=max_text_length,
                return_tensors="pt",
            )
            yield {"pixel_values": normalize_frames(middle[start : start + 128]), **tokens}

    encoder = _FrameEncoder(model)
    encoder.training = model.training  # so the model's mode is restored afterwards
    text_embeds, image_embeds = encode_retrieval_batches(encoder, batches())
    # The package's one evaluator and tie rule (`clusterstm.tasks.retrieval.TIE_RULE`): frames play the videos.
    metrics = retrieval_scores(text_embeds, image_embeds)
    results = {}
    for name, direction in (("image_to_text", "v2t"), ("text_to_image", "t2v")):
        results[f"{name}_R@1"] = float(metrics[f"{direction}_r1"])
        results[f"{name}_R@5"] = float(metrics[f"{direction}_r5"])
    results["chance_R@1"] = 100.0 / len(captions)
    return results


class _FrameEncoder(torch.nn.Module):
    """A `CLIPModel` seen as a video-text dual encoder: a "video" is one frame (for `encode_retrieval_batches`)."""

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model

    def get_video_features(self, pixel_values: torch.Tensor) -> Any:
        return self.model.get_image_features(pixel_values=pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)


def run_teacher_training(args: TeacherTrainingArguments) -> dict[str, Any]:
    """
    Trains the small CLIP teacher on synthetic frames and saves it to `args.output_dir`.

    Returns:
        `dict` with the training loss, runtime, steps and the zero-shot frame<->caption retrieval of the validation
        split before and after training (also written to `output_dir/teacher_results.json`).
    """
    from ..data.synthetic import SyntheticVideoTextConfig, generate_synthetic_benchmark, synthetic_text_corpus
    from ..data.tokenization import train_wordpiece_tokenizer

    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    data_config = SyntheticVideoTextConfig(
        num_frames=args.num_frames,
        image_size=args.image_size,
        num_train=args.num_train_clips,
        num_val=args.num_eval_clips,
        num_test=0,
        num_compositional=0,
        seed=args.synthetic_seed,
    )
    benchmark = generate_synthetic_benchmark(data_config, splits=("train", "validation"))
    train_videos = np.asarray(benchmark["train"]["video"])  # (N, T, H, W, 3) uint8
    train_captions = list(benchmark["train"]["caption"])
    val_videos = np.asarray(benchmark["validation"]["video"])
    val_captions = list(benchmark["validation"]["caption"])

    tokenizer = train_wordpiece_tokenizer(synthetic_text_corpus(data_config), model_max_length=args.max_text_length)
    # Captions are tokenised once: the corpus is small and fixed.
    train_tokens = tokenizer(
        train_captions, padding="max_length", truncation=True, max_length=args.max_text_length, return_tensors="pt"
    )
    model = CLIPModel(build_teacher_config(args, tokenizer))
    before = evaluate_frame_text_retrieval(model, tokenizer, val_videos, val_captions, args.max_text_length)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=max(1, args.max_steps // 10), num_training_steps=args.max_steps
    )
    generator = torch.Generator().manual_seed(args.seed)
    num_clips, num_frames = train_videos.shape[:2]
    batch_size = min(args.per_device_train_batch_size, num_clips)

    model.train()
    start = time.perf_counter()
    losses = []
    curve: list[dict[str, float]] = []
    order = torch.randperm(num_clips, generator=generator)
    cursor = 0
    progress = tqdm(range(args.max_steps), desc="teacher training", unit="step", disable=args.disable_tqdm)
    for step in progress:
        if cursor + batch_size > num_clips:
            order = torch.randperm(num_clips, generator=generator)
            cursor = 0
        clip_ids = order[cursor : cursor + batch_size]
        cursor += batch_size
        # One random frame per clip: single frames see colours, shapes and sizes (not motion).
        frame_ids = torch.randint(0, num_frames, (batch_size,), generator=generator)
        pixel_values = normalize_frames(train_videos[clip_ids.numpy(), frame_ids.numpy()])
        outputs = model(
            input_ids=train_tokens["input_ids"][clip_ids],
            attention_mask=train_tokens["attention_mask"][clip_ids],
            pixel_values=pixel_values,
            return_loss=True,
        )
        loss = outputs.loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"Teacher training: non-finite loss at step {step}; lower --learning_rate.")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            # CLIP clamps the temperature at 100.
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if args.eval_steps and (step + 1) % args.eval_steps == 0 and step + 1 < args.max_steps:
            metrics = evaluate_frame_text_retrieval(model, tokenizer, val_videos, val_captions, args.max_text_length)
            curve.append({"step": step + 1, "train_loss": float(np.mean(losses[-args.eval_steps :])), **metrics})
            logger.info("teacher step %d: %s", step + 1, metrics)
        if (step + 1) % 50 == 0 or step + 1 == args.max_steps:
            logger.info(
                "teacher step %d/%d loss %.4f", step + 1, args.max_steps, sum(losses[-50:]) / len(losses[-50:])
            )
    runtime = time.perf_counter() - start

    after = evaluate_frame_text_retrieval(model, tokenizer, val_videos, val_captions, args.max_text_length)
    model.save_pretrained(output_dir)
    build_image_processor(args.image_size).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    results = {
        "train_loss": float(np.mean(losses)),
        "initial_loss": float(np.mean(losses[:10])),
        "final_loss": float(np.mean(losses[-20:])),
        "train_runtime": runtime,
        "train_steps_per_second": args.max_steps / runtime,
        "global_step": args.max_steps,
        "eval_before": before,
        "eval_after": after,
        # Validation retrieval during training (with `eval_steps`), ending with the final evaluation.
        "eval_curve": [*curve, {"step": args.max_steps, "train_loss": float(np.mean(losses[-20:])), **after}],
        "args": asdict(args),
    }
    (output_dir / "teacher_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of `scripts/train_teacher.py`."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = HfArgumentParser(TeacherTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    results = run_teacher_training(args)
    after = results["eval_after"]
    print(
        f"teacher saved to {args.output_dir}: loss {results['final_loss']:.3f}, zero-shot frame->caption "
        f"R@1 {after['image_to_text_R@1']:.1f}% (chance {after['chance_R@1']:.1f}%, untrained "
        f"{results['eval_before']['image_to_text_R@1']:.1f}%), {results['train_runtime']:.0f}s",
        file=sys.stderr,
    )
    return results
