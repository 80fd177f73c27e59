"""SigLIP 2 teachers (`Siglip2Model`, NaFlex): patchified pixels with `spatial_shapes` and `pixel_attention_mask`."""

from __future__ import annotations

import math

import torch

from .siglip import SiglipAdapter


class Siglip2Adapter(SiglipAdapter):
    """
    As [`SiglipAdapter`] (patch tokens after `post_layernorm`, pooling head, max-length text without mask), with the
    NaFlex vision input: frames are cut into `patch_size x patch_size` patches in the layout of `Siglip2ImageProcessor`
    (row-major patches, each `(p, p, C)` flattened) and passed with their `spatial_shapes` (the grid) and an all-ones
    `pixel_attention_mask`; the model resizes its position embeddings to any grid natively. Its native size is the
    position-embedding grid (`sqrt(num_patches)`) times the patch size.
    """

    family = "SigLIP2"
    model_types = ("siglip2",)
    hf_classes = ("Siglip2Model",)

    @property
    def native_size(self) -> int:
        return math.isqrt(int(self.vision_config.num_patches)) * self.patch_size

    def _tower(self, frames: torch.Tensor) -> torch.Tensor:
        m, c, height, width = frames.shape
        p = self.patch_size
        grid_h, grid_w = height // p, width // p
        patches = frames[:, :, : grid_h * p, : grid_w * p].reshape(m, c, grid_h, p, grid_w, p)
        patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(m, grid_h * grid_w, p * p * c)
        spatial_shapes = torch.tensor([[grid_h, grid_w]], device=frames.device).expand(m, 2)
        mask = torch.ones(m, grid_h * grid_w, dtype=torch.long, device=frames.device)
        output = self.model.vision_model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=spatial_shapes)
        return output.last_hidden_state
