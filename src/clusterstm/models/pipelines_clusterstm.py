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
"""`transformers.pipeline` tasks of ClusterSTM checkpoints, shipped as Hub remote code: zero-shot video
classification and text-to-video retrieval. Both run the dual encoder (`ClusterSTMModel`, or the `clusterstm` dual
encoder inside a head) with the checkpoint's `ClusterSTMProcessor`."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Pipeline

ZERO_SHOT_VIDEO_CLASSIFICATION = "zero-shot-video-classification"
TEXT_TO_VIDEO_RETRIEVAL = "text-to-video-retrieval"

# The `custom_pipelines` entry of a checkpoint's config.json (the format `Pipeline.save_pretrained` writes for a
# pipeline registered with `PIPELINE_REGISTRY.register_pipeline`).
CUSTOM_PIPELINES: dict[str, dict[str, Any]] = {
    ZERO_SHOT_VIDEO_CLASSIFICATION: {
        "impl": "pipelines_clusterstm.ClusterSTMZeroShotVideoClassificationPipeline",
        "pt": ["AutoModel"],
        "tf": [],
        "type": "multimodal",
    },
    TEXT_TO_VIDEO_RETRIEVAL: {
        "impl": "pipelines_clusterstm.ClusterSTMTextToVideoRetrievalPipeline",
        "pt": ["AutoModel"],
        "tf": [],
        "type": "multimodal",
    },
}


def _dual_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The `ClusterSTMModel` of `model` (itself, or the `clusterstm` dual encoder of a head)."""
    return getattr(model, "clusterstm", model)


def _embed_videos(pipeline: Pipeline, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised video embeddings `(num_videos, projection_dim)`."""
    features = _dual_encoder(pipeline.model).get_video_features(pixel_values_videos=pixel_values).pooler_output
    return torch.nn.functional.normalize(features, dim=-1)


def _embed_texts(pipeline: Pipeline, text_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2-normalised text embeddings `(num_texts, projection_dim)`."""
    features = (
        _dual_encoder(pipeline.model)
        .get_text_features(input_ids=text_inputs["input_ids"], attention_mask=text_inputs["attention_mask"])
        .pooler_output
    )
    return torch.nn.functional.normalize(features, dim=-1)


class ClusterSTMZeroShotVideoClassificationPipeline(Pipeline):
    """
    Zero-shot video classification: scores one video against free-text `candidate_labels` with the video-text
    similarity of the dual encoder (softmax over the labels, at the model's learned temperature).

    ```python
    >>> from transformers import pipeline
    >>> classifier = pipeline("zero-shot-video-classification", model="path/to/clusterstm", trust_remote_code=True)
    >>> classifier("clip.mp4", candidate_labels=["cooking", "dancing"])
    [{'score': 0.9, 'label': 'cooking'}, {'score': 0.1, 'label': 'dancing'}]
    ```

    A video is a path, or frames as an array/tensor `(num_frames, height, width, 3)`; a list of them is a batch of
    videos (one result list each). `hypothesis_template` (default `"a video of {}."`) turns a label into a caption.
    Video keyword arguments (`num_frames`, `sampling`) go to the video processor.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    def __call__(self, videos: Any, **kwargs: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Classify `videos` (one video or a list) into `candidate_labels`; returns labels sorted by score."""
        return super().__call__(videos, **kwargs)

    def _sanitize_parameters(
        self,
        candidate_labels: list[str] | str | None = None,
        hypothesis_template: str | None = None,
        num_frames: int | None = None,
        sampling: str | None = None,
        **kwargs: Any,
    ):
        preprocess_params: dict[str, Any] = {}
        if candidate_labels is not None:
            preprocess_params["candidate_labels"] = candidate_labels
        if hypothesis_template is not None:
            preprocess_params["hypothesis_template"] = hypothesis_template
        video_kwargs = {k: v for k, v in (("num_frames", num_frames), ("sampling", sampling)) if v is not None}
        preprocess_params["video_kwargs"] = video_kwargs
        return preprocess_params, {}, {}

    def preprocess(
        self,
        video: Any,
        candidate_labels: list[str] | str | None = None,
        hypothesis_template: str = "a video of {}.",
        video_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if candidate_labels is None:
            raise ValueError("zero-shot-video-classification needs `candidate_labels` (a list of label strings).")
        if isinstance(candidate_labels, str):
            candidate_labels = [label.strip() for label in candidate_labels.split(",")]
        candidate_labels = list(candidate_labels)
        if not candidate_labels or not all(isinstance(label, str) and label.strip() for label in candidate_labels):
            raise ValueError(f"`candidate_labels` must be non-empty strings, got {candidate_labels!r}.")
        if "{}" not in hypothesis_template:
            raise ValueError(f"hypothesis_template must contain '{{}}' for the label, got {hypothesis_template!r}.")
        pixel_values = self.processor(videos=[video], return_tensors="pt", **(video_kwargs or {}))["pixel_values"]
        text_inputs = self.processor(
            text=[hypothesis_template.format(label) for label in candidate_labels], return_tensors="pt"
        )
        return {
            "pixel_values": pixel_values.to(self.dtype) if self.dtype is not None else pixel_values,
            "input_ids": text_inputs["input_ids"],
            "attention_mask": text_inputs["attention_mask"],
            "candidate_labels": candidate_labels,
        }

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        video_embeds = _embed_videos(self, model_inputs["pixel_values"])
        text_embeds = _embed_texts(self, model_inputs)
        scale = _dual_encoder(self.model).scaled_logit_scale()
        logits = scale * video_embeds @ text_embeds.t()  # (1, num_labels)
        return {"logits": logits[0], "candidate_labels": model_inputs["candidate_labels"]}

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        scores = model_outputs["logits"].float().softmax(dim=-1).tolist()
        ranked = sorted(zip(scores, model_outputs["candidate_labels"]), key=lambda pair: -pair[0])
        return [{"score": score, "label": label} for score, label in ranked]


class ClusterSTMTextToVideoRetrievalPipeline(Pipeline):
    """
    Text-to-video retrieval: ranks a list of `videos` for each query text by the dual encoder's cosine similarity.
    The videos are encoded once per call, whatever the number of queries.

    ```python
    >>> from transformers import pipeline
    >>> retriever = pipeline("text-to-video-retrieval", model="path/to/clusterstm", trust_remote_code=True)
    >>> retriever("a person is cooking", videos=["a.mp4", "b.mp4"], top_k=1)
    [{'score': 0.42, 'index': 1, 'video': 'b.mp4'}]
    ```

    Each result holds the cosine `score`, the `index` of the video in `videos` and, for videos given as paths, the
    `video` itself. A list of queries gives one ranked list per query. Video keyword arguments (`num_frames`,
    `sampling`) go to the video processor; `video_batch_size` (default 8) videos are encoded at once.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    def __call__(self, text: str | list[str], **kwargs: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Rank `videos` (keyword argument) for `text` (one query or a list)."""
        # The video embeddings of this call, computed by the first query's forward and reused by the others.
        self._video_embeds = None
        try:
            return super().__call__(text, **kwargs)
        finally:
            self._video_embeds = None

    def _sanitize_parameters(
        self,
        videos: list[Any] | None = None,
        top_k: int | None = None,
        num_frames: int | None = None,
        sampling: str | None = None,
        video_batch_size: int | None = None,
        **kwargs: Any,
    ):
        forward_params: dict[str, Any] = {}
        postprocess_params: dict[str, Any] = {}
        if videos is not None:
            if not isinstance(videos, (list, tuple)) or len(videos) == 0:
                raise ValueError("`videos` must be a non-empty list of videos (paths or frame arrays).")
            forward_params["videos"] = list(videos)
            postprocess_params["videos"] = list(videos)
        forward_params["video_kwargs"] = {
            k: v for k, v in (("num_frames", num_frames), ("sampling", sampling)) if v is not None
        }
        if video_batch_size is not None:
            if video_batch_size < 1:
                raise ValueError(f"video_batch_size must be >= 1, got {video_batch_size}.")
            forward_params["video_batch_size"] = video_batch_size
        if top_k is not None:
            if top_k < 1:
                raise ValueError(f"top_k must be >= 1, got {top_k}.")
            postprocess_params["top_k"] = top_k
        return {}, forward_params, postprocess_params

    def preprocess(self, text: str) -> dict[str, torch.Tensor]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"A query must be a non-empty string, got {text!r}.")
        text_inputs = self.processor(text=[text], return_tensors="pt")
        return {"input_ids": text_inputs["input_ids"], "attention_mask": text_inputs["attention_mask"]}

    def _encode_videos(self, videos: list[Any], video_kwargs: dict[str, Any], batch_size: int) -> torch.Tensor:
        embeds = []
        for start in range(0, len(videos), batch_size):
            chunk = videos[start : start + batch_size]
            pixel_values = self.processor(videos=chunk, return_tensors="pt", **video_kwargs)["pixel_values"]
            pixel_values = pixel_values.to(device=self.device, dtype=self.dtype or pixel_values.dtype)
            embeds.append(_embed_videos(self, pixel_values))
        return torch.cat(embeds)

    def _forward(
        self,
        model_inputs: dict[str, torch.Tensor],
        videos: list[Any] | None = None,
        video_kwargs: dict[str, Any] | None = None,
        video_batch_size: int = 8,
    ) -> dict[str, torch.Tensor]:
        if videos is None:
            raise ValueError("text-to-video-retrieval needs `videos=[...]` (the videos to rank).")
        if getattr(self, "_video_embeds", None) is None:
            self._video_embeds = self._encode_videos(videos, video_kwargs or {}, video_batch_size)
        text_embeds = _embed_texts(self, model_inputs)
        return {"scores": (text_embeds @ self._video_embeds.t())[0]}

    def postprocess(
        self, model_outputs: dict[str, torch.Tensor], videos: list[Any] | None = None, top_k: int | None = None
    ) -> list[dict[str, Any]]:
        scores = model_outputs["scores"].float()
        top_k = min(top_k or scores.numel(), scores.numel())
        values, indices = scores.topk(top_k)
        results = []
        for score, index in zip(values.tolist(), indices.tolist()):
            result: dict[str, Any] = {"score": score, "index": index}
            if videos is not None and isinstance(videos[index], str):
                result["video"] = videos[index]
            results.append(result)
        return results


__all__ = [
    "CUSTOM_PIPELINES",
    "ClusterSTMTextToVideoRetrievalPipeline",
    "ClusterSTMZeroShotVideoClassificationPipeline",
]
