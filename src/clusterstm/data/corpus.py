"""The pretraining corpus builder, shared by pretraining and the teacher-target cache writer.

It takes plain parameters (no argument dataclass), so `teacher/` (the cache writer) and `training/` (the loop) both
call it without importing each other. `corpus_parameters` reads those parameters off either one's arguments.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .sources import Corpus, load_training_corpus

# The fields of an arguments object (`PretrainingArguments`, `PrecomputeTargetsArguments`) the builder reads; missing
# ones take the builder's defaults.
_CORPUS_FIELDS = (
    "dataset_name",
    "train_file",
    "video_root",
    "video_column",
    "caption_column",
    "video_path_template",
    "dataset_config_name",
    "train_split_name",
    "streaming",
    "skip_bad_samples",
    "num_train_clips",
    "synthetic_seed",
    "max_train_samples",
)


def derive_seed(*values: int | str) -> int:
    """A 63-bit seed that is a pure function of `values` (stable across processes, runs and Python versions)."""
    digest = hashlib.blake2b(repr(tuple(values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def corpus_parameters(args: Any) -> dict[str, Any]:
    """The keyword arguments of [`build_train_corpus`] that `args` (any arguments object) sets."""
    return {name: getattr(args, name) for name in _CORPUS_FIELDS if hasattr(args, name)}


def build_train_corpus(
    *,
    num_frames: int,
    image_size: int,
    dataset_name: str | None = None,
    train_file: str | None = None,
    video_root: str | None = None,
    video_column: str = "file_name",
    caption_column: str = "caption",
    video_path_template: str | None = None,
    dataset_config_name: str | None = None,
    train_split_name: str = "train",
    streaming: bool = False,
    skip_bad_samples: bool = False,
    num_train_clips: int | None = None,
    synthetic_seed: int = 0,
    max_train_samples: int | None = None,
) -> Corpus:
    """
    The training corpus (a `datasets` object and the resolver its rows need): the synthetic benchmark in memory
    (`dataset_name="synthetic"`, `num_train_clips` clips of `num_frames` frames at `image_size`), or any format of
    docs/DATA_FORMATS.md (optionally streamed), truncated to `max_train_samples` rows.
    """
    if dataset_name == "synthetic":
        from .readers import load_video_text_dataset
        from .synthetic import SyntheticVideoTextConfig

        sizes = {"num_val": 0, "num_test": 0, "num_compositional": 0}
        if num_train_clips is not None:
            sizes["num_train"] = num_train_clips
        config = SyntheticVideoTextConfig(
            num_frames=max(num_frames, 2), image_size=image_size, seed=synthetic_seed, **sizes
        )
        corpus = Corpus(load_video_text_dataset("synthetic", split="train", synthetic_config=config), None)
    else:
        corpus = load_training_corpus(
            dataset_name=dataset_name,
            train_file=train_file,
            video_root=video_root,
            video_column=video_column,
            caption_column=caption_column,
            video_path_template=video_path_template,
            dataset_config_name=dataset_config_name,
            split=train_split_name,
            streaming=streaming,
            skip_bad_shards=skip_bad_samples,
        )
    if max_train_samples is not None:
        dataset = corpus.dataset
        corpus.dataset = (
            dataset.take(max_train_samples)
            if streaming
            else dataset.select(range(min(len(dataset), max_train_samples)))
        )
    return corpus


def build_train_dataset(**parameters: Any) -> Any:
    """The training split's `datasets` object (see [`build_train_corpus`], which also returns its row resolver)."""
    return build_train_corpus(**parameters).dataset
