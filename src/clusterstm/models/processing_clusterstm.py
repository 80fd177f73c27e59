# Copyright 2026 The ClusterSTM developers.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Processor for ClusterSTM: a video processor and a tokenizer behind one call."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import auto_docstring

from .video_processing_clusterstm import ClusterSTMVideoProcessor

# Keyword arguments routed to the video processor; everything else goes to the tokenizer.
_VIDEO_KWARGS = frozenset(ClusterSTMVideoProcessor.valid_kwargs.__annotations__) | {"generator"}


@auto_docstring(
    custom_intro="""
    Wraps a [`ClusterSTMVideoProcessor`] and a BERT-style tokenizer into a single processor:
    `processor(videos=..., text=..., return_tensors="pt")` returns exactly the inputs the ClusterSTM models take,
    `pixel_values` `(B, T, 3, H, W)`, `input_ids` and `attention_mask` `(B, L)`. Video keyword arguments
    (`num_frames`, `sampling`, `generator`, `size`, ...) go to the video processor, the rest (`padding`,
    `truncation`, `max_length`, ...) to the tokenizer.
    """
)
class ClusterSTMProcessor(ProcessorMixin):
    def __init__(self, video_processor: ClusterSTMVideoProcessor | None = None, tokenizer: Any = None, **kwargs):
        if video_processor is None:
            raise ValueError("ClusterSTMProcessor needs a `video_processor`.")
        if tokenizer is None:
            raise ValueError("ClusterSTMProcessor needs a `tokenizer`.")
        super().__init__(video_processor, tokenizer, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # Load the sibling video processor class directly: this works in-package and as Hub remote code, with or
        # without an `AutoVideoProcessor` registration.
        subfolder = kwargs.pop("subfolder", "")
        video_processor = ClusterSTMVideoProcessor.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return [video_processor, tokenizer]

    @auto_docstring
    def __call__(self, videos: Any = None, text: str | list[str] | None = None, **kwargs) -> BatchFeature:
        r"""
        Returns:
            [`BatchFeature`] with `pixel_values` (when `videos` is given: one video or a batch of paths, arrays,
            tensors or lists of PIL frames, see [`ClusterSTMVideoProcessor`]) and `input_ids`, `attention_mask` (when
            `text` is given: one caption/question or a batch). Keyword arguments: `return_tensors`; video kwargs
            (`num_frames`, `sampling`, `generator`, ...); tokenizer kwargs (`padding`, `truncation`, `max_length`).
        """
        if videos is None and text is None:
            raise ValueError("ClusterSTMProcessor needs `videos`, `text`, or both.")
        return_tensors = kwargs.pop("return_tensors", None)
        video_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _VIDEO_KWARGS}
        data: dict[str, Any] = {}
        if text is not None:
            if isinstance(text, str):
                text = [text]
            if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
                raise ValueError("`text` must be a string or a list of strings.")
            empty = [i for i, t in enumerate(text) if not t.strip()]
            if empty:
                raise ValueError(f"Empty text at batch position(s) {empty}.")
            kwargs.setdefault("padding", True)
            kwargs.setdefault("truncation", True)
            kwargs.setdefault("return_token_type_ids", False)
            encoding = self.tokenizer(list(text), return_tensors=return_tensors, **kwargs)
            data["input_ids"] = encoding["input_ids"]
            data["attention_mask"] = encoding["attention_mask"]
        if videos is not None:
            pixel_values = self.video_processor(videos, return_tensors=return_tensors, **video_kwargs)["pixel_values"]
            if text is not None and len(pixel_values) != len(data["input_ids"]):
                raise ValueError(
                    f"Got {len(pixel_values)} videos but {len(data['input_ids'])} texts; pass one text per video."
                )
            data["pixel_values"] = pixel_values
        return BatchFeature(data=data)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]


__all__ = ["ClusterSTMProcessor"]
