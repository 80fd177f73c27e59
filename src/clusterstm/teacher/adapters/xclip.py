"""X-CLIP video teachers (`XCLIPModel`): a CLIP vision tower whose layers exchange one message token per frame."""

from __future__ import annotations

import contextlib

import torch

from .clip import CLIPAdapter


class XCLIPAdapter(CLIPAdapter):
    """
    As [`CLIPAdapter`] per frame (patch tokens before `post_layernorm`; window pooling by mean, `post_layernorm` and
    `visual_projection`, the path X-CLIP gives every frame's CLS before its multi-frame integration transformer; text
    by `get_text_features`, without X-CLIP's video-conditioned prompt, which would make the text depend on the clip).

    Frame count: X-CLIP's cross-frame message attention has no temporal position embedding, so the tower runs on the
    student's frame count (its layers' `num_frames`, a reshape size, is set to it for the call). The CLS attention is
    the softmax over CLS, patches and the frame's message token, restricted to the patches.
    """

    family = "X-CLIP"
    model_types = ("xclip",)
    hf_classes = ("XCLIPModel",)

    @contextlib.contextmanager
    def _frame_count(self, num_frames: int):
        layers = list(self.model.vision_model.encoder.layers)
        saved = [layer.num_frames for layer in layers]
        for layer in layers:
            layer.num_frames = num_frames
        try:
            yield
        finally:
            for layer, value in zip(layers, saved):
                layer.num_frames = value

    def _run_tower(self, frames: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._frame_count(num_frames):
            return super()._run_tower(frames, num_frames)
