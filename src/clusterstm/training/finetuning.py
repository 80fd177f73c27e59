"""Downstream fine-tuning and evaluation of ClusterSTM with the transformers `Trainer`.

Three tasks share one entry point, [`run_finetuning`] (wrapped by `scripts/finetune.py`):

- `retrieval`: [`ClusterSTMForVideoTextRetrieval`], contrastive (+ matching) fine-tuning; evaluation ranks every
  caption against every video from embeddings encoded in batches, with a streaming rank accumulator (no logits dump),
  optional top-k re-ranking with the matching head (UMT protocol) and opt-in dual-softmax.
- `qa`: [`ClusterSTMForVideoQuestionAnswering`], classification over the answer vocabulary stored in the config.
- `captioning`: [`ClusterSTMForVideoCaptioning`], teacher forcing; evaluation generates with `generate()` and scores
  BLEU-4 / ROUGE-L / CIDEr-D with pycocoevalcap.

Data: the embedded synthetic benchmark or local annotation files (see `docs/DATA_FORMATS.md`). Metrics land in
`all_results.json` / `eval_results.json` with `eval_`-prefixed keys, as in the transformers example scripts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import speed_metrics

from ..tasks import TASKS as _TASK_REGISTRY
from ..tasks import get_task
from ..tasks.captioning import (  # noqa: F401  (kept importable from here)
    CAPTIONING_INSTALL,
    check_captioning_dependencies,
    nearest_neighbour_captions,
    video_colour_features,
)
from ..tasks.retrieval import chance_retrieval_metrics  # noqa: F401  (kept importable from here)
from .errors import explain_disk_full

logger = logging.getLogger(__name__)

TASKS = tuple(_TASK_REGISTRY)  # the registered downstream tasks (`clusterstm.tasks.TASKS`)
_EVAL_SPLITS = ("validation", "test", "compositional")
_PATH_KEYS = ("video", "video_path", "file_name", "path")
_CAPTION_KEYS = ("caption", "captions", "sentences", "sentence", "text")


# ================================================================================================ arguments
@dataclass
class ModelArguments:
    """Which model to fine-tune and how the heads behave at evaluation time."""

    task: str = field(default="retrieval", metadata={"help": f"Downstream task: one of {TASKS}."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A `clusterstm init` folder or a pretrained ClusterSTM checkpoint folder. The task head is loaded "
            "on top; head weights missing from the checkpoint are initialised."
        },
    )
    preset: str | None = field(
        default=None,
        metadata={"help": "Start from scratch with a config preset (`tiny`/`base`) instead of --model_name_or_path."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to `from_pretrained`."})
    mask_strategy: str | None = field(
        default="none",
        metadata={
            "help": "Video token masking of the training batches (cluster|random|tube|none), built per step by "
            "`build_mask`; `none` (or an empty value) by default. Cluster masking clusters the student's own patch "
            "embeddings (no teacher while fine-tuning)."
        },
    )
    mask_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of tokens dropped per frame with --mask_strategy (default 0.8)."}
    )
    matching_loss_weight: float | None = field(
        default=None, metadata={"help": "Retrieval: weight of the video-text matching loss (default: the config's)."}
    )
    rerank_top_k: int = field(
        default=0, metadata={"help": "Retrieval eval: re-rank the top-k candidates with the matching head (0: off)."}
    )
    rerank_fusion: str = field(
        default="matching",
        metadata={
            "help": "Retrieval eval: order the re-ranked top-k by the matching probability (`matching`, UMT) or by "
            "the matching log-odds plus the contrastive similarity (`sum`, as BLIP's evaluation)."
        },
    )
    dual_softmax: bool = field(
        default=False, metadata={"help": "Retrieval eval: also report dual-softmax re-ranked metrics (`dsl_*`)."}
    )
    dual_softmax_temperature: float = field(default=100.0, metadata={"help": "Inverse temperature of dual-softmax."})
    num_beams: int = field(default=1, metadata={"help": "Captioning eval: beam size of `generate()` (1: greedy)."})
    max_new_tokens: int = field(default=20, metadata={"help": "Captioning eval: maximum generated tokens."})
    caption_tokenizer: str = field(
        default="auto",
        metadata={"help": "Captioning metrics tokenizer: auto (ptb with Java, else python)|ptb|python."},
    )


@dataclass
class DataArguments:
    """Where the fine-tuning data comes from."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "`synthetic`: the embedded synthetic benchmark (no download)."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Training annotations (.json / .jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation annotations (.json / .jsonl)."})
    test_file: str | None = field(default=None, metadata={"help": "Prediction annotations (.json / .jsonl)."})
    video_root: str | None = field(default=None, metadata={"help": "Folder that video paths / ids resolve against."})
    video_filename_template: str = field(
        default="{video_id}.mp4", metadata={"help": "File name of a record that only has a `video_id`."}
    )
    eval_split: str = field(
        default="validation",
        metadata={"help": f"Synthetic benchmark: evaluation split, one of {_EVAL_SPLITS}."},
    )
    answer_list: str | None = field(
        default=None, metadata={"help": "QA: answer vocabulary file (json list or one answer per line)."}
    )
    max_answers: int | None = field(default=None, metadata={"help": "QA: keep the N most frequent answers."})
    num_frames: int | None = field(default=None, metadata={"help": "Frames per video (default: the processor's)."})
    max_text_length: int = field(default=32, metadata={"help": "Maximum tokens of a caption / question."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set (videos)."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic benchmark."})
    synthetic_num_train: int = field(default=512, metadata={"help": "Synthetic training clips."})
    synthetic_num_eval: int = field(default=128, metadata={"help": "Synthetic clips per evaluation split."})
    compute_baselines: bool = field(
        default=False,
        metadata={"help": "Also report simple baselines (chance / majority answer / nearest-neighbour caption)."},
    )
    skip_bad_samples: bool = field(
        default=False,
        metadata={
            "help": "Training: replace an unreadable or over-sized video by another sample of the batch (warning naming "
            "the file) instead of stopping. Evaluation never skips: its metrics need every video."
        },
    )


def validate_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Raise a `ValueError` naming the first inconsistent argument."""
    if model_args.task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {model_args.task!r}.")
    if model_args.mask_strategy not in (None, "", "none", "cluster", "random", "tube"):
        raise ValueError(
            f"--mask_strategy must be cluster, random, tube or none while fine-tuning (attention-guided masking needs "
            f"a teacher), got {model_args.mask_strategy!r}."
        )
    if model_args.mask_ratio is not None and not 0.0 <= model_args.mask_ratio < 1.0:
        raise ValueError(f"--mask_ratio must be in [0, 1), got {model_args.mask_ratio}.")
    if (model_args.model_name_or_path is None) == (model_args.preset is None):
        raise ValueError("Pass exactly one of --model_name_or_path or --preset.")
    if data_args.dataset_name is not None and data_args.dataset_name != "synthetic":
        raise ValueError(
            f"--dataset_name must be 'synthetic' (got {data_args.dataset_name!r}); use --*_file for data."
        )
    if data_args.dataset_name is None:
        needed = {
            "--train_file": training_args.do_train and data_args.train_file is None,
            "--validation_file": training_args.do_eval and data_args.validation_file is None,
            "--test_file": training_args.do_predict and data_args.test_file is None,
        }
        missing = [name for name, is_missing in needed.items() if is_missing]
        if missing:
            raise ValueError(f"Without --dataset_name synthetic, {', '.join(missing)} is required.")
    if data_args.eval_split not in _EVAL_SPLITS:
        raise ValueError(f"--eval_split must be one of {_EVAL_SPLITS}, got {data_args.eval_split!r}.")
    if model_args.rerank_top_k < 0:
        raise ValueError(f"--rerank_top_k must be >= 0, got {model_args.rerank_top_k}.")
    from ..models.modeling_clusterstm import RERANK_FUSIONS

    if model_args.rerank_fusion not in RERANK_FUSIONS:
        raise ValueError(f"--rerank_fusion must be one of {RERANK_FUSIONS}, got {model_args.rerank_fusion!r}.")
    if model_args.num_beams < 1:
        raise ValueError(f"--num_beams must be >= 1, got {model_args.num_beams}.")
    if model_args.caption_tokenizer not in ("auto", "ptb", "python"):
        raise ValueError(f"--caption_tokenizer must be auto|ptb|python, got {model_args.caption_tokenizer!r}.")
    # Everything the config would only refuse at the first forward pass, refused before any loading or training.
    from ..models.masking_clusterstm import MASK_STRATEGIES

    if model_args.mask_strategy and model_args.mask_strategy not in MASK_STRATEGIES:
        raise ValueError(f"--mask_strategy must be one of {tuple(MASK_STRATEGIES)}, got {model_args.mask_strategy!r}.")
    if model_args.mask_ratio is not None and not 0.0 <= model_args.mask_ratio < 1.0:
        raise ValueError(
            f"--mask_ratio must be in [0, 1) (1.0 would drop every video token), got {model_args.mask_ratio}."
        )
    if model_args.matching_loss_weight is not None and model_args.matching_loss_weight < 0:
        raise ValueError(f"--matching_loss_weight must be >= 0, got {model_args.matching_loss_weight}.")
    if model_args.dual_softmax_temperature <= 0:
        raise ValueError(f"--dual_softmax_temperature must be > 0, got {model_args.dual_softmax_temperature}.")
    if model_args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {model_args.max_new_tokens}.")
    for flag, value in (
        ("--num_frames", data_args.num_frames),
        ("--max_text_length", data_args.max_text_length),
        ("--max_train_samples", data_args.max_train_samples),
        ("--max_eval_samples", data_args.max_eval_samples),
        ("--max_answers", data_args.max_answers),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}.")
    if data_args.dataset_name is None:
        for flag, path in (
            ("--train_file", data_args.train_file),
            ("--validation_file", data_args.validation_file),
            ("--test_file", data_args.test_file),
            ("--answer_list", data_args.answer_list),
        ):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{flag} {path!r} is not a file.")
        if data_args.video_root is not None and not os.path.isdir(data_args.video_root):
            raise ValueError(f"--video_root {data_args.video_root!r} is not a folder.")
    if training_args.push_to_hub:
        hub_id = training_args.hub_model_id
        if not hub_id or hub_id.count("/") != 1 or not all(hub_id.split("/")):
            raise ValueError(f"--push_to_hub needs --hub_model_id in the form 'namespace/name', got {hub_id!r}.")
    check = get_task(model_args.task).check_dependencies
    if check is not None and training_args.do_eval:
        check()


# ================================================================================================ annotations
@dataclass
class VideoCaptions:
    """Videos and their captions (retrieval and captioning). `videos[i]` is a path or a `(T, H, W, 3)` array."""

    videos: list[Any]
    video_ids: list[str]
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.videos)

    def texts(self) -> tuple[list[str], list[int]]:
        """All captions flattened, and the index of the video of each caption."""
        texts, text_to_video = [], []
        for video_index, captions in enumerate(self.captions):
            texts.extend(captions)
            text_to_video.extend([video_index] * len(captions))
        return texts, text_to_video

    def subset(self, n: int | None) -> VideoCaptions:
        if n is None:
            return self
        return VideoCaptions(self.videos[:n], self.video_ids[:n], self.captions[:n])


@dataclass
class VideoQuestions:
    """Question-answer records (QA). `videos[i]` is a path or a `(T, H, W, 3)` array."""

    videos: list[Any]
    questions: list[str]
    answers: list[str]
    question_types: list[str] | None = None

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, n: int | None) -> VideoQuestions:
        if n is None:
            return self
        types = self.question_types[:n] if self.question_types is not None else None
        return VideoQuestions(self.videos[:n], self.questions[:n], self.answers[:n], types)


def read_annotation_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a `.json` (list, or MSR-VTT `{"videos", "sentences"}` dict) or `.jsonl` annotation file."""
    from ..data.readers import read_jsonl_records

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Annotation file not found: {path!r}")
    if path.endswith(".jsonl"):
        records = read_jsonl_records(path)  # errors name the file and the line
    else:
        raw = Path(path).read_bytes()
        try:
            records = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            line = raw[: error.start].count(b"\n") + 1
            raise ValueError(
                f"{path}: line {line} is not valid UTF-8; annotation files must be UTF-8 encoded."
            ) from None
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
            ) from None
    if isinstance(records, dict):
        if "sentences" in records:  # the original MSR-VTT annotation layout
            records = [{"video_id": s["video_id"], "caption": s["caption"]} for s in records["sentences"]]
        elif "annotations" in records:
            records = records["annotations"]
        else:
            raise ValueError(f"{path!r}: a json dict must have a `sentences` or `annotations` list.")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path!r}: expected a list of json objects.")
    if not records:
        raise ValueError(f"{path!r} holds no records.")
    return records


def _resolve_video(
    record: dict[str, Any], video_root: str, template: str, where: str, source: str, index: int
) -> tuple[str, str]:
    """(video id, file path) of one record; the path must stay inside `video_root` (`resolve_video_path`)."""
    from ..data.readers import resolve_video_path

    for key in _PATH_KEYS:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            path = resolve_video_path(video_root, value, index, key, source)
            return str(record.get("video_id", Path(value).stem)), path
    if record.get("video_id") is not None:
        video_id = record["video_id"]
        path = resolve_video_path(video_root, template.format(video_id=video_id), index, "video_id", source)
        return str(video_id), path
    raise ValueError(f"{where}: the record has neither a video path ({'/'.join(_PATH_KEYS)}) nor a `video_id`.")


def _annotation_root(path: str | os.PathLike, video_root: str | None) -> str:
    # As for pretraining corpora: without --video_root, paths are relative to the annotation file's folder.
    return os.fspath(video_root) if video_root is not None else os.path.dirname(os.path.abspath(path))


def load_video_captions(
    path: str | os.PathLike, video_root: str | None = None, template: str = "{video_id}.mp4"
) -> VideoCaptions:
    """Read an MSR-VTT-style retrieval / caption annotation file; records of the same video are merged.

    Video paths resolve against `video_root` (default: the file's folder) and must stay inside it."""
    order: dict[str, int] = {}
    videos, ids, captions = [], [], []
    root = _annotation_root(path, video_root)
    for i, record in enumerate(read_annotation_file(path)):
        where = f"{os.fspath(path)} record {i}"
        video_id, video_path = _resolve_video(record, root, template, where, os.fspath(path), i)
        texts: list[str] = []
        for key in _CAPTION_KEYS:
            value = record.get(key)
            if value is None:
                continue
            texts.extend([value] if isinstance(value, str) else list(value))
        texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise ValueError(f"{where}: no caption (expected one of {'/'.join(_CAPTION_KEYS)}).")
        if video_path not in order:
            order[video_path] = len(videos)
            videos.append(video_path)
            ids.append(video_id)
            captions.append([])
        captions[order[video_path]].extend(texts)
    return VideoCaptions(videos, ids, captions)


def load_video_questions(
    path: str | os.PathLike, video_root: str | None = None, template: str = "{video_id}.mp4"
) -> VideoQuestions:
    """Read an MSRVTT-QA-style annotation file (`{video|video_id, question, answer[, question_type]}`).

    Video paths resolve against `video_root` (default: the file's folder) and must stay inside it."""
    videos, questions, answers, types = [], [], [], []
    root = _annotation_root(path, video_root)
    for i, record in enumerate(read_annotation_file(path)):
        where = f"{os.fspath(path)} record {i}"
        _, video_path = _resolve_video(record, root, template, where, os.fspath(path), i)
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: missing `question`.")
        if answer is None or not str(answer).strip():
            raise ValueError(f"{where}: missing `answer`.")
        videos.append(video_path)
        questions.append(question.strip())
        answers.append(str(answer).strip())
        types.append(str(record.get("question_type", record.get("type", ""))))
    return VideoQuestions(videos, questions, answers, types if any(types) else None)


def load_synthetic_split(
    task: str, split: str, num_clips: int, seed: int = 0, num_frames: int = 8, image_size: int = 64
):
    """One split of the synthetic benchmark as in-memory [`VideoCaptions`] (retrieval, captioning) or
    [`VideoQuestions`] (qa); videos are uint8 `(T, H, W, 3)` arrays."""
    from ..data.synthetic import SyntheticVideoTextConfig, generate_split_metadata, render_clips

    sizes = {"num_train": 0, "num_val": 0, "num_test": 0, "num_compositional": 0}
    size_key = {
        "train": "num_train",
        "validation": "num_val",
        "test": "num_test",
        "compositional": "num_compositional",
    }
    sizes[size_key[split]] = num_clips
    config = SyntheticVideoTextConfig(num_frames=num_frames, image_size=image_size, seed=seed, **sizes)
    rows = generate_split_metadata(config, split)
    clips = list(render_clips(rows, config)) if rows else []
    if get_task(task).records == "questions":
        videos, questions, answers, types = [], [], [], []
        for row, clip in zip(rows, clips):
            for question, answer, kind in zip(row["questions"], row["answers"], row["question_types"]):
                videos.append(clip)
                questions.append(question)
                answers.append(answer)
                types.append(kind)
        return VideoQuestions(videos, questions, answers, types)
    return VideoCaptions(clips, [row["video_id"] for row in rows], [[row["caption"]] for row in rows])


def build_answer_vocabulary(
    answers: Sequence[str], max_answers: int | None = None, answer_list: str | None = None
) -> list[str]:
    """Answer vocabulary: `answer_list` (json list or one answer per line) or the answers, most frequent first."""
    if answer_list is not None:
        text = Path(answer_list).read_text(encoding="utf-8")
        vocab = json.loads(text) if answer_list.endswith(".json") else [line.strip() for line in text.splitlines()]
        vocab = [str(a) for a in vocab if str(a).strip()]
    else:
        counts = Counter(answers)
        # Most frequent first; ties alphabetically so the vocabulary is deterministic.
        vocab = [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    if max_answers is not None:
        vocab = vocab[:max_answers]
    if not vocab:
        raise ValueError("The QA answer vocabulary is empty.")
    return vocab


# ================================================================================================ datasets
class CaptionedVideoDataset(Dataset):
    """Training items of retrieval / captioning: one item per video with one of its captions drawn at random.

    Drawing one caption per video keeps duplicate videos (false negatives of the contrastive loss) out of a batch.
    """

    def __init__(self, data: VideoCaptions) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        captions = self.data.captions[index]
        pick = int(torch.randint(len(captions), ())) if len(captions) > 1 else 0
        return {"video": self.data.videos[index], "text": captions[pick], "index": index}


class VideoOnlyDataset(Dataset):
    """Evaluation items that only carry a video (retrieval gallery, captioning)."""

    def __init__(self, videos: Sequence[Any]) -> None:
        self.videos = videos

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"video": self.videos[index], "index": index}


class TextOnlyDataset(Dataset):
    """Evaluation items that only carry a text (retrieval queries)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self.texts[index], "index": index}


class QuestionDataset(Dataset):
    """QA items: video, question and the answer's class id (-100 when the answer is outside the vocabulary)."""

    def __init__(self, data: VideoQuestions, label2id: dict[str, int]) -> None:
        self.data = data
        self.label2id = label2id

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = self.label2id.get(self.data.answers[index], -100)
        return {"video": self.data.videos[index], "text": self.data.questions[index], "labels": label, "index": index}


# ================================================================================================ collator
@dataclass
class ClusterSTMDataCollator:
    """Decode / preprocess videos and tokenise texts of a batch of raw items.

    Items may carry `video` (path or array), `text`, `labels`, `index`. The output holds only model inputs
    (`pixel_values`, `input_ids`, `attention_mask`, `labels`, `return_loss`), plus `index` when `keep_index`
    (used by the custom evaluation loops, never passed to `forward`).

    Args:
        processor: a [`ClusterSTMProcessor`] (video processor + tokenizer).
        task: `retrieval`, `qa` or `captioning`.
        training: random frame offsets (`True`) or uniform sampling (`False`).
        max_text_length: truncation length of texts.
        num_frames: frames per video (default: the processor's).
        keep_index: keep the items' `index` in the batch.
        skip_bad_samples: replace an item whose video raises [`VideoDecodingError`] (unreadable, or beyond the
            processor's size caps) by another good item of the batch, with a warning naming the file; `num_skipped`
            counts replacements in this process. A batch with no readable video still raises.
    """

    processor: Any
    task: str
    training: bool = True
    max_text_length: int = 32
    num_frames: int | None = None
    keep_index: bool = False
    skip_bad_samples: bool = False
    num_skipped: int = field(default=0, init=False)

    @property
    def targets(self) -> str:
        """What the task's head trains on (`clusterstm.tasks.base.TRAINING_TARGETS`)."""
        return get_task(self.task).training_targets

    def __post_init__(self) -> None:
        from ..data.readers import VideoTextCollator

        # The package's one video collator (built on the processor) decodes, samples and preprocesses the clips and
        # replaces unreadable ones; this class adds the task's texts and labels.
        self._videos = VideoTextCollator(
            self.processor,
            num_frames=self.num_frames,
            sampling="random" if self.training else "uniform",
            skip_bad_samples=self.skip_bad_samples,
            video_column="video",
        )

    def _pixel_values(self, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], torch.Tensor]:
        before = self._videos.num_skipped
        items, pixel_values = self._videos.videos(items)
        self.num_skipped += self._videos.num_skipped - before
        return items, pixel_values

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        if "video" in items[0]:
            # Replaced items keep video, text and label together.
            items, batch["pixel_values"] = self._pixel_values(items)
        if "text" in items[0]:
            encoding = self.processor.tokenizer(
                [item["text"] for item in items],
                padding=True,
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
                return_token_type_ids=False,
            )
            batch["input_ids"] = encoding["input_ids"]
            batch["attention_mask"] = encoding["attention_mask"]
        if "labels" in items[0]:
            batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.long)
        elif self.targets == "caption_tokens" and self.training and "input_ids" in batch:
            # Teacher forcing: predict every caption token; padding is ignored by the loss.
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
        if self.targets == "contrastive" and self.training:
            batch["return_loss"] = True
        if self.keep_index:
            batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        return batch


# ================================================================================================ baselines
def baseline_metrics(task: str, train_data: Any, eval_data: Any, caption_tokenizer: str = "auto") -> dict[str, Any]:
    """Reference numbers a model must beat, keys prefixed `baseline_` (each task's `baseline` in `clusterstm.tasks`).

    - retrieval: chance (R@K = K / num_videos, ranks (N + 1) / 2);
    - qa: always answering the most frequent training answer;
    - captioning: the caption of the nearest training video in colour-histogram space.
    """
    return get_task(task).baseline(train_data, eval_data, caption_tokenizer)


# ================================================================================================ trainer
class ClusterSTMTrainer(Trainer):
    """`Trainer` whose evaluation follows the protocols of the field.

    - retrieval: videos and texts are encoded in batches (sharded over processes; `gather_for_metrics` drops the
      padding duplicates of the last batch); ranks are computed chunk by chunk from the embeddings
      (`retrieval_metrics_from_embeddings`), never from a stored logits matrix; top-k re-ranking with the matching
      head is sharded over processes and merged through per-query indices.
    - captioning: captions are generated with `generate()` and gathered as strings (`use_gather_object`).
    - qa: the standard evaluation loop (logits reduced to argmax ids before gathering).

    Args (besides `Trainer`'s):
        task: `retrieval`, `qa` or `captioning`.
        eval_data / predict_data: the raw evaluation records ([`VideoCaptions`] / [`VideoQuestions`]).
        eval_collator: collator of the evaluation loops (uniform frame sampling, keeps indices).
        model_args: [`ModelArguments`] (re-ranking, dual-softmax, generation settings).
    """

    def __init__(self, *args, task: str, eval_collator=None, model_args: ModelArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.task = task
        self.eval_collator = eval_collator
        self.model_args = model_args or ModelArguments(task=task)

    def compute_loss(self, model, inputs, *args, **kwargs):
        # Training batches are masked through the one mask door (`build_mask`), once per step; eval is unmasked.
        strategy = self.model_args.mask_strategy or "none"
        if model.training and strategy != "none" and "bool_masked_pos" not in inputs:
            inputs = {**inputs, "bool_masked_pos": self._training_mask(model, inputs["pixel_values"], strategy)}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _training_mask(self, model, pixel_values: torch.Tensor, strategy: str) -> torch.Tensor:
        from ..models.masking_clusterstm import build_mask

        inner = self.accelerator.unwrap_model(model)
        tower = inner.clusterstm.vision_model
        vision = tower.config
        features = None
        if strategy == "cluster":
            with torch.no_grad():
                features = tower.embeddings(tower._check_pixel_values(pixel_values))[1].detach()
        num_frames = (pixel_values.shape[1] if pixel_values.ndim == 5 else 1) // vision.tubelet_size
        return build_mask(
            strategy,
            batch_size=pixel_values.shape[0],
            num_frames=num_frames,
            num_patches=(pixel_values.shape[-2] // vision.patch_size) * (pixel_values.shape[-1] // vision.patch_size),
            mask_ratio=0.8 if self.model_args.mask_ratio is None else self.model_args.mask_ratio,
            features=features,
            device=pixel_values.device,
        )

    # ------------------------------------------------------------------ helpers
    def _with_eval_collator(self, make_loader, dataset):
        # Evaluation batches use the deterministic collator (uniform frame sampling), training the random one.
        saved = self.data_collator
        self.data_collator = self.eval_collator or saved
        try:
            return make_loader(dataset)
        finally:
            self.data_collator = saved

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        return self._with_eval_collator(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        return self._with_eval_collator(super().get_test_dataloader, test_dataset)

    def _prepared_loader(self, dataset: Dataset) -> DataLoader:
        loader = DataLoader(
            dataset,
            batch_size=self.args.eval_batch_size,
            shuffle=False,
            collate_fn=self.eval_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def _gather_rows(self, loader: DataLoader, encode) -> tuple[dict[int, Any], int]:
        """Run `encode(batch)` -> tensor (or tuple of tensors) per batch; gather over processes, keyed by index."""
        rows: dict[int, Any] = {}
        num_batches = 0
        for batch in loader:
            index = batch.pop("index")
            with torch.no_grad():
                out = encode(batch)
            out = out if isinstance(out, tuple) else (out,)
            gathered = self.accelerator.gather_for_metrics((index, *out))
            for row, idx in enumerate(gathered[0].tolist()):
                rows[idx] = tuple(t[row].detach().float().cpu() for t in gathered[1:])
            num_batches += 1
        return rows, num_batches

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Task-specific evaluation; `eval_dataset` may be the raw records of a split (default: the eval split)."""
        evaluation = get_task(self.task).evaluation
        if evaluation == "trainer":
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not isinstance(data, VideoCaptions):
            raise ValueError(f"{self.task} evaluation expects `VideoCaptions` records, got {type(data).__name__}.")
        start = time.time()
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            if evaluation == "retrieval":
                metrics = self._evaluate_retrieval(model, data)
            else:
                metrics = self._evaluate_captioning(model, data, metric_key_prefix)
        finally:
            model.train(was_training)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        metrics.update(speed_metrics(metric_key_prefix, start, num_samples=len(data)))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ------------------------------------------------------------------ retrieval
    def _evaluate_retrieval(self, model, data: VideoCaptions) -> dict[str, Any]:
        from ..tasks.retrieval import retrieval_scores

        args = self.model_args
        texts, text_to_video = data.texts()
        top_k = args.rerank_top_k
        device = self.accelerator.device

        def encode_video(batch):
            pixel_values = batch["pixel_values"].to(device)
            if top_k:
                embeds, tokens = model.encode_videos(pixel_values, return_tokens=True)
                return embeds, tokens
            return model.encode_videos(pixel_values)

        def encode_text(batch):
            return model.encode_texts(batch["input_ids"].to(device), batch["attention_mask"].to(device))

        video_rows, _ = self._gather_rows(self._prepared_loader(VideoOnlyDataset(data.videos)), encode_video)
        text_rows, _ = self._gather_rows(self._prepared_loader(TextOnlyDataset(texts)), encode_text)
        if sorted(video_rows) != list(range(len(data))) or sorted(text_rows) != list(range(len(texts))):
            raise RuntimeError("Retrieval evaluation lost or duplicated samples while gathering.")
        video_embeds = torch.stack([video_rows[i][0] for i in range(len(data))])
        text_embeds = torch.stack([text_rows[i][0] for i in range(len(texts))])
        metrics = retrieval_scores(
            text_embeds,
            video_embeds,
            text_to_video,
            dual_softmax=args.dual_softmax,
            dual_softmax_temperature=args.dual_softmax_temperature,
        )
        metrics["num_captions_per_video"] = len(texts) / max(len(data), 1)
        if top_k:
            video_tokens = torch.stack([video_rows[i][1] for i in range(len(data))])
            metrics.update(
                self._rerank_retrieval(model, data, texts, text_to_video, video_embeds, text_embeds, video_tokens)
            )
        return metrics

    def _rerank_retrieval(self, model, data, texts, text_to_video, video_embeds, text_embeds, video_tokens):
        """UMT protocol: re-score the top-k candidates of every query with the matching head, sharded over ranks."""
        from accelerate.utils import gather_object

        from ..tasks.metrics import RetrievalRankAccumulator

        k = min(self.model_args.rerank_top_k, len(data), len(texts))
        device = self.accelerator.device
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        tokenizer = self.processing_class.tokenizer
        encoding = tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.eval_collator.max_text_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        video_to_texts: list[list[int]] = [[] for _ in range(len(data))]
        for t, v in enumerate(text_to_video):
            video_to_texts[v].append(t)
        acc = RetrievalRankAccumulator()
        chunk = max(1, self.args.eval_batch_size)
        my_texts = list(range(rank, len(texts), world))
        for start in range(0, len(my_texts), chunk):
            ids = my_texts[start : start + chunk]
            sim = text_embeds[ids] @ video_embeds.T
            with torch.no_grad():
                new = model.rerank(
                    sim.to(device),
                    video_tokens=video_tokens.to(device),
                    input_ids=encoding["input_ids"][ids].to(device),
                    attention_mask=encoding["attention_mask"][ids].to(device),
                    top_k=k,
                    direction="t2v",
                    fusion=self.model_args.rerank_fusion,
                )
            acc.add_batch(new.float().cpu(), [text_to_video[i] for i in ids], text_indices=ids)
        my_videos = list(range(rank, len(data), world))
        for start in range(0, len(my_videos), chunk):
            ids = my_videos[start : start + chunk]
            sim = video_embeds[ids] @ text_embeds.T
            with torch.no_grad():
                new = model.rerank(
                    sim.to(device),
                    video_tokens=video_tokens[ids].to(device),
                    input_ids=encoding["input_ids"].to(device),
                    attention_mask=encoding["attention_mask"].to(device),
                    top_k=k,
                    direction="v2t",
                    fusion=self.model_args.rerank_fusion,
                )
            acc.add_video_batch(new.float().cpu(), [video_to_texts[v] for v in ids], video_indices=ids)
        merged = RetrievalRankAccumulator()
        for part in gather_object([acc]) if world > 1 else [acc]:
            merged.merge(part)
        out = merged.compute("rerank_")
        out["rerank_top_k"] = k
        return out

    # ------------------------------------------------------------------ captioning
    def _evaluate_captioning(self, model, data: VideoCaptions, metric_key_prefix: str) -> dict[str, Any]:
        from ..tasks.metrics import caption_metrics

        args = self.model_args
        tokenizer = self.processing_class.tokenizer
        device = self.accelerator.device
        captions: dict[int, str] = {}
        for batch in self._prepared_loader(VideoOnlyDataset(data.videos)):
            with torch.no_grad():
                sequences = model.generate(
                    pixel_values=batch["pixel_values"].to(device),
                    num_beams=args.num_beams,
                    max_new_tokens=args.max_new_tokens,
                )
            decoded = tokenizer.batch_decode(sequences, skip_special_tokens=True)
            pairs = list(zip(batch["index"].tolist(), [d.strip() for d in decoded]))
            # Strings cannot be padded and concatenated: gather python objects, duplicates dropped by index.
            for idx, caption in self.accelerator.gather_for_metrics(pairs, use_gather_object=True):
                captions[int(idx)] = caption
        if sorted(captions) != list(range(len(data))):
            raise RuntimeError("Captioning evaluation lost or duplicated samples while gathering.")
        predictions = [captions[i] or "<empty>" for i in range(len(data))]
        # `python` tokenisation means "no Java": METEOR (a Java program) is skipped too.
        meteor = False if args.caption_tokenizer == "python" else "auto"
        metrics = caption_metrics(predictions, data.captions, tokenizer=args.caption_tokenizer, meteor=meteor)
        if self.args.should_save:
            path = Path(self.args.output_dir) / f"{metric_key_prefix}_captions.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            records = [
                {"video_id": vid, "prediction": pred, "references": refs}
                for vid, pred, refs in zip(data.video_ids, predictions, data.captions)
            ]
            path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
        return metrics


class QAComputeMetrics:
    """`compute_metrics` for QA: accuracy (percent) of the argmax answers, per question type when known.

    Labels of -100 (answers outside the vocabulary) count as wrong. Set `question_types` to the types of the
    dataset about to be evaluated (they are matched by position, the order of a sequential eval sampler).
    """

    def __init__(self, id2label: dict[int, str], question_types: Sequence[str] | None = None) -> None:
        self.id2label = {int(k): v for k, v in id2label.items()}
        self.question_types = question_types

    def __call__(self, eval_pred) -> dict[str, float]:
        from ..tasks.metrics import qa_accuracy

        predictions = np.asarray(eval_pred.predictions).reshape(-1)
        labels = np.asarray(eval_pred.label_ids).reshape(-1)
        pred_answers = [self.id2label[int(p)] for p in predictions]
        ref_answers = [self.id2label[int(y)] if y >= 0 else "<out-of-vocabulary>" for y in labels]
        types = None
        if self.question_types is not None and len(self.question_types) == len(labels):
            types = list(self.question_types)
        return qa_accuracy(pred_answers, ref_answers, question_types=types)


def argmax_logits(logits, labels):
    """`preprocess_logits_for_metrics`: keep one id per question instead of the full logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


# ================================================================================================ model loading
def _load_processor(path: str):
    from ..models.processing_clusterstm import ClusterSTMProcessor

    return ClusterSTMProcessor.from_pretrained(path)


def head_class(task: str):
    """The model class of a task (`retrieval`, `qa`, `captioning`; see `clusterstm.tasks.TASKS`)."""
    return get_task(task).head_class()


def resolve_checkpoint(model_args: ModelArguments, training_args: TrainingArguments) -> str:
    """`--model_name_or_path`, or a fresh `--preset` checkpoint written (once, by the main process) under the
    output directory."""
    path = model_args.model_name_or_path
    if path is None:
        path = os.path.join(training_args.output_dir, "init_checkpoint")
        with training_args.main_process_first(desc="initialising the checkpoint"):
            if not os.path.isfile(os.path.join(path, "config.json")):
                from ..hub.export import init_checkpoint

                init_checkpoint(model_args.preset, path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model_name_or_path must be a local checkpoint folder with a config.json, got {path!r}.")
    return path


def load_model_and_processor(
    model_args: ModelArguments,
    path: str,
    answer_vocabulary: list[str] | None = None,
) -> tuple[Any, Any]:
    """The task head on top of the checkpoint folder `path` (missing head weights initialised) and its processor."""
    from ..models.configuration_clusterstm import ClusterSTMConfig

    config = ClusterSTMConfig.from_pretrained(path)
    if model_args.matching_loss_weight is not None:
        config.matching_loss_weight = model_args.matching_loss_weight
    extra: dict[str, Any] = {}
    targets = get_task(model_args.task).training_targets
    if targets == "answer_classes":
        if answer_vocabulary is None:
            raise ValueError("QA needs an answer vocabulary.")
        config.id2label = dict(enumerate(answer_vocabulary))
        config.label2id = {a: i for i, a in enumerate(answer_vocabulary)}
        extra["ignore_mismatched_sizes"] = True
    processor = _load_processor(path)
    tokenizer = processor.tokenizer
    if targets == "caption_tokens":
        config.bos_token_id = tokenizer.cls_token_id
        config.eos_token_id = tokenizer.sep_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model = head_class(model_args.task).from_pretrained(path, config=config, use_safetensors=True, **extra)
    if targets == "caption_tokens":
        model.generation_config.bos_token_id = tokenizer.cls_token_id
        model.generation_config.eos_token_id = tokenizer.sep_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


# ================================================================================================ entry point
def _load_split(task: str, data_args: DataArguments, split: str, num_frames: int, image_size: int):
    """Records of `train` / `eval` / `predict`."""
    if data_args.dataset_name == "synthetic":
        synthetic_split = {"train": "train", "eval": data_args.eval_split, "predict": "test"}[split]
        num = data_args.synthetic_num_train if split == "train" else data_args.synthetic_num_eval
        return load_synthetic_split(task, synthetic_split, num, data_args.synthetic_seed, num_frames, image_size)
    path = {"train": data_args.train_file, "eval": data_args.validation_file, "predict": data_args.test_file}[split]
    if path is None:
        return None
    loader = load_video_questions if get_task(task).records == "questions" else load_video_captions
    return loader(path, data_args.video_root, data_args.video_filename_template)


def run_finetuning(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> dict[str, Any]:
    """Fine-tune and/or evaluate a ClusterSTM task head with `Trainer`; returns all metrics (train/eval/predict).

    Writes the model, processor, `train_results.json`, `eval_results.json`, `predict_results.json` and
    `all_results.json` into `training_args.output_dir` (as the transformers example scripts do).
    """
    validate_arguments(model_args, data_args, training_args)

    task = model_args.task
    spec = get_task(task)
    # An answer-classification head needs its answer vocabulary (from the training answers at the latest).
    classifies_answers = spec.training_targets == "answer_classes"
    # The collator needs the raw `video` / `text` columns: never let Trainer drop them (transformers#27535).
    if training_args.remove_unused_columns:
        logger.info("Setting remove_unused_columns=False: the collator decodes the raw `video`/`text` columns.")
        training_args.remove_unused_columns = False
    set_seed(training_args.seed)
    # Trainer checkpoints and the final save then carry `auto_map` and the remote-code files.
    from ..hub.export import register_auto_classes

    register_auto_classes()

    from ..models.configuration_clusterstm import ClusterSTMConfig

    checkpoint = resolve_checkpoint(model_args, training_args)
    # Synthetic clips are rendered at the model's resolution with the benchmark's 8 frames (the processor samples).
    image_size = ClusterSTMConfig.from_pretrained(checkpoint).vision_config.image_size
    synthetic_frames = 8
    train_data = eval_data = predict_data = None
    needs_train = (
        training_args.do_train or (data_args.compute_baselines and training_args.do_eval) or classifies_answers
    )
    if needs_train and (data_args.dataset_name == "synthetic" or data_args.train_file):
        train_data = _load_split(task, data_args, "train", synthetic_frames, image_size)
        train_data = train_data.subset(data_args.max_train_samples)
    if training_args.do_eval:
        eval_data = _load_split(task, data_args, "eval", synthetic_frames, image_size)
        eval_data = eval_data.subset(data_args.max_eval_samples)
    if training_args.do_predict:
        predict_data = _load_split(task, data_args, "predict", synthetic_frames, image_size)
        predict_data = predict_data.subset(data_args.max_eval_samples)

    answer_vocabulary = None
    if classifies_answers:
        # Priority: --answer_list, then the vocabulary a fine-tuned QA checkpoint carries (its classifier rows follow
        # it), then the training answers.
        if data_args.answer_list is not None:
            answer_vocabulary = build_answer_vocabulary([], data_args.max_answers, data_args.answer_list)
        else:
            answer_vocabulary = vocabulary_from_checkpoint(checkpoint)
        if answer_vocabulary is None:
            if train_data is None:
                raise ValueError("QA needs --answer_list, training data, or a checkpoint whose config has id2label.")
            answer_vocabulary = build_answer_vocabulary(train_data.answers, data_args.max_answers)
    model, processor = load_model_and_processor(model_args, checkpoint, answer_vocabulary)

    collator = ClusterSTMDataCollator(
        processor,
        task,
        training=True,
        max_text_length=data_args.max_text_length,
        num_frames=data_args.num_frames,
        skip_bad_samples=data_args.skip_bad_samples,
    )
    eval_collator = ClusterSTMDataCollator(
        processor,
        task,
        training=False,
        max_text_length=data_args.max_text_length,
        num_frames=data_args.num_frames,
        keep_index=spec.evaluation != "trainer",
    )

    def as_dataset(data, training: bool):
        if data is None:
            return None
        if spec.records == "questions":
            return QuestionDataset(data, model.config.label2id)
        return CaptionedVideoDataset(data) if training else data

    # Every upload goes through `push_checkpoint` (allow-list, no links out of the folder, a clean model card): the
    # Trainer's own pushes (`hub_strategy`) would upload the whole output folder.
    push_to_hub = training_args.push_to_hub
    training_args.push_to_hub = False
    output_dir = training_args.output_dir

    qa_metrics = None
    if spec.evaluation == "trainer":
        qa_metrics = QAComputeMetrics(model.config.id2label, eval_data.question_types if eval_data else None)
    trainer = ClusterSTMTrainer(
        model=model,
        args=training_args,
        train_dataset=as_dataset(train_data, True) if training_args.do_train else None,
        eval_dataset=as_dataset(eval_data, False),
        data_collator=collator,
        processing_class=processor,
        compute_metrics=qa_metrics,
        preprocess_logits_for_metrics=argmax_logits if spec.evaluation == "trainer" else None,
        task=task,
        eval_collator=eval_collator,
        model_args=model_args,
    )
    results: dict[str, Any] = {}
    if training_args.do_train:
        with explain_disk_full(output_dir, "training checkpoints"):
            train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        if collator.num_skipped:
            logger.warning("%d unreadable training videos were replaced by other samples.", collator.num_skipped)
        with explain_disk_full(output_dir, "the fine-tuned model"):
            trainer.save_model()
            if trainer.is_world_process_zero():
                _complete_remote_code(trainer, processor)
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(train_data)
        metrics["train_bad_samples_skipped"] = collator.num_skipped
        trainer.log_metrics("train", metrics)
        with explain_disk_full(output_dir, "train_results.json and the trainer state"):
            trainer.save_metrics("train", metrics)
            trainer.save_state()
        results.update(metrics)

    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        metrics["eval_samples"] = len(eval_data)
        if data_args.dataset_name == "synthetic":
            metrics["eval_split"] = data_args.eval_split
        if data_args.compute_baselines and train_data is not None:
            baselines = baseline_metrics(task, train_data, eval_data, model_args.caption_tokenizer)
            metrics.update({f"eval_{k}": v for k, v in baselines.items()})
        trainer.log_metrics("eval", metrics)
        with explain_disk_full(output_dir, "eval_results.json"):
            trainer.save_metrics("eval", metrics)
        results.update(metrics)

    if training_args.do_predict:
        if spec.evaluation == "trainer":
            qa_metrics.question_types = predict_data.question_types
            output = trainer.predict(QuestionDataset(predict_data, model.config.label2id), metric_key_prefix="predict")
            metrics = dict(output.metrics)
            if trainer.is_world_process_zero():
                answers = [model.config.id2label[int(p)] for p in np.asarray(output.predictions).reshape(-1)]
                records = [
                    {"question": q, "prediction": p, "answer": a}
                    for q, p, a in zip(predict_data.questions, answers, predict_data.answers)
                ]
                with explain_disk_full(output_dir, "predict_answers.json"):
                    Path(output_dir, "predict_answers.json").write_text(json.dumps(records, indent=2))
        else:
            metrics = trainer.evaluate(predict_data, metric_key_prefix="predict")
        metrics["predict_samples"] = len(predict_data)
        trainer.log_metrics("predict", metrics)
        with explain_disk_full(output_dir, "predict_results.json"):
            trainer.save_metrics("predict", metrics)
        results.update(metrics)

    training_args.push_to_hub = push_to_hub
    if push_to_hub and trainer.is_world_process_zero():
        push_finetuned_model(trainer, processor, model_args, data_args, training_args, results)
    return results


def push_finetuned_model(
    trainer: Trainer,
    processor: Any,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    results: dict[str, Any],
):
    """Write a model card and upload the fine-tuned model with [`push_checkpoint`] (allow-listed files only).

    The base model is named by its Hub id, or by its folder name when it is a local folder (never its path).
    """
    from ..hub.model_card import write_model_card
    from ..hub.publish import push_checkpoint

    output_dir = training_args.output_dir
    if not os.path.isfile(os.path.join(output_dir, "config.json")):  # evaluation-only runs: save what was evaluated
        with explain_disk_full(output_dir, "the model to push"):
            _complete_remote_code(trainer, processor)
    task = model_args.task
    spec = get_task(task)
    dataset = "ClusterSTM synthetic benchmark" if data_args.dataset_name == "synthetic" else None
    eval_results = []
    eval_metrics = {k: v for k, v in results.items() if k.startswith("eval_")}
    if eval_metrics and spec.card_entries(eval_metrics):
        name = dataset or Path(data_args.validation_file or "evaluation data").stem
        eval_results.append({"task": task, "dataset_name": name, "dataset_type": name, "metrics": eval_metrics})
    world = max(training_args.world_size, 1)
    run_info = {
        "repo_id": training_args.hub_model_id,
        "base_model": model_args.model_name_or_path or f"preset {model_args.preset} (random initialisation)",
        "summary": f"Fine-tuned for {task} with `scripts/finetune.py`.",
        "train_data": dataset or (Path(data_args.train_file).name if data_args.train_file else None),
        "batch_size": training_args.per_device_train_batch_size * world * training_args.gradient_accumulation_steps,
        "learning_rate": training_args.learning_rate,
    }
    with explain_disk_full(output_dir, "the model card"):
        write_model_card(
            output_dir, trainer.model.config, run_info, eval_results or None, pipeline_tag=spec.pipeline_tag
        )
    return push_checkpoint(
        output_dir,
        training_args.hub_model_id,
        private=bool(training_args.hub_private_repo),
        token=training_args.hub_token,
        revision=training_args.hub_revision,
        commit_message=f"ClusterSTM fine-tuned for {task}",
    )


def _complete_remote_code(trainer: Trainer, processor: Any) -> None:
    """Re-save the final model as a complete remote-code checkpoint (full `auto_map`, `*_clusterstm.py` files)."""
    from ..hub.export import save_checkpoint

    save_checkpoint(trainer.accelerator.unwrap_model(trainer.model), trainer.args.output_dir, processor)


def vocabulary_from_checkpoint(path: str) -> list[str] | None:
    """The answer vocabulary stored in a fine-tuned QA checkpoint's config (`id2label`), or `None`."""
    config = json.loads(Path(path, "config.json").read_text())
    if not any(name.endswith("QuestionAnswering") for name in config.get("architectures") or []):
        return None
    id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
    if not id2label or all(v.startswith("LABEL_") for v in id2label.values()):
        return None
    return [id2label[i] for i in range(len(id2label))]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (`scripts/finetune.py`)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if argv is None:
        import sys

        argv = sys.argv[1:]
    argv = list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    return run_finetuning(model_args, data_args, training_args)


__all__ = [
    "TASKS",
    "CaptionedVideoDataset",
    "ClusterSTMDataCollator",
    "ClusterSTMTrainer",
    "DataArguments",
    "ModelArguments",
    "VideoCaptions",
    "VideoQuestions",
    "baseline_metrics",
    "build_answer_vocabulary",
    "chance_retrieval_metrics",
    "load_synthetic_split",
    "load_video_captions",
    "load_video_questions",
    "check_captioning_dependencies",
    "main",
    "nearest_neighbour_captions",
    "push_finetuned_model",
    "QAComputeMetrics",
    "read_annotation_file",
    "run_finetuning",
    "validate_arguments",
    "vocabulary_from_checkpoint",
]
