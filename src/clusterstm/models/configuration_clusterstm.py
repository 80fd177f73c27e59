# Copyright 2026 The ClusterSTM developers. All rights reserved.
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
"""ClusterSTM model configuration"""

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.utils import auto_docstring, logging

logger = logging.get_logger(__name__)

RELEVANCE_LOSSES = ("mse", "zscore_mse", "kl")
RELEVANCE_TOKENS = ("all", "masked", "visible")
MATCHING_NEGATIVES = ("hard", "uniform", "mixed")
MATCHING_POOLINGS = ("mean", "softmin")
# Masking settings that configurations written before masking moved to the pretraining arguments may still carry in
# their config.json. They are accepted (and ignored) so those checkpoints load; nothing reads them.
LEGACY_MASKING_KEYS = ("mask_strategy", "mask_ratio", "dc_ratio", "dpc_k", "mask_features", "mask_at_eval")


def _drop_legacy_masking_keys(kwargs: dict) -> None:
    for key in LEGACY_MASKING_KEYS:
        kwargs.pop(key, None)


@auto_docstring(checkpoint="clusterstm-base")
@strict
class ClusterSTMVisionConfig(PreTrainedConfig):
    r"""
    num_frames (`int`, *optional*, defaults to 4):
        Number of frames the temporal position embeddings are trained for. Other frame counts are interpolated.
    tubelet_size (`int`, *optional*, defaults to 1):
        Number of frames that one patch (tubelet) spans. With 1, every frame keeps its own tokens, which is what
        frame-wise (cluster-wise) masking needs.
    drop_path_rate (`float`, *optional*, defaults to 0.0):
        Stochastic depth rate, linearly increasing over the layers.

    Example:

    ```python
    >>> from clusterstm import ClusterSTMVisionConfig, ClusterSTMVisionModel

    >>> configuration = ClusterSTMVisionConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
    >>> model = ClusterSTMVisionModel(configuration)
    ```"""

    model_type = "clusterstm_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    num_frames: int = 4
    tubelet_size: int = 1
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    hidden_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    drop_path_rate: float = 0.0

    def __post_init__(self, **kwargs):
        # Masking is chosen per training step by the caller (`bool_masked_pos`), never by the tower's config.
        _drop_legacy_masking_keys(kwargs)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict`-powered validation. Validates the architecture of the config."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"The hidden size ({self.hidden_size}) is not a multiple of the number of attention "
                f"heads ({self.num_attention_heads})."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size}).")
        if self.num_frames % self.tubelet_size != 0:
            raise ValueError(
                f"num_frames ({self.num_frames}) must be divisible by tubelet_size ({self.tubelet_size})."
            )


@auto_docstring(checkpoint="clusterstm-base")
@strict
class ClusterSTMTextConfig(PreTrainedConfig):
    r"""
    num_fusion_layers (`int`, *optional*, defaults to 3):
        Number of the top text layers that cross-attend to the video tokens (video-text matching, masked language
        modelling, question answering, captioning). The bottom `num_hidden_layers - num_fusion_layers` layers are the
        text-only encoder used for contrastive text features.
    encoder_width (`int`, *optional*, defaults to 768):
        Width of the video tokens the fusion layers cross-attend to (the vision tower's hidden size).

    Example:

    ```python
    >>> from clusterstm import ClusterSTMTextConfig, ClusterSTMTextModel

    >>> configuration = ClusterSTMTextConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4,
    ...                                      num_attention_heads=4, intermediate_size=256, num_fusion_layers=2,
    ...                                      encoder_width=128)
    >>> model = ClusterSTMTextModel(configuration)
    ```"""

    model_type = "clusterstm_text_model"
    base_config_key = "text_config"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int | None = 0
    num_fusion_layers: int = 3
    encoder_width: int = 768
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02

    def validate_architecture(self):
        """Part of `@strict`-powered validation. Validates the architecture of the config."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"The hidden size ({self.hidden_size}) is not a multiple of the number of attention "
                f"heads ({self.num_attention_heads})."
            )
        if not 0 <= self.num_fusion_layers <= self.num_hidden_layers:
            raise ValueError(
                f"num_fusion_layers ({self.num_fusion_layers}) must be between 0 and num_hidden_layers "
                f"({self.num_hidden_layers})."
            )


@auto_docstring(checkpoint="clusterstm-base")
@strict
class ClusterSTMConfig(PreTrainedConfig):
    r"""
    text_config (`dict` or `ClusterSTMTextConfig`, *optional*):
        Configuration of the BERT-style text tower.
    vision_config (`dict` or `ClusterSTMVisionConfig`, *optional*):
        Configuration of the video tower.
    projection_dim (`int`, *optional*, defaults to 256):
        Dimension of the joint video-text embedding space.
    logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
        Initial value of the learnable log inverse temperature (CLIP's value, i.e. temperature 0.07).
    relevance_window_size (`int`, *optional*, defaults to 3):
        Odd window size of the teacher's window-pooled relevance targets.
    relevance_loss (`str`, *optional*, defaults to `"zscore_mse"`):
        Form of the relevance reconstruction loss: `"mse"`, `"zscore_mse"` (per-video z-scored) or `"kl"` (softmax
        over the tokens of a video). The z-scored form is the default because it does not depend on the scale of the
        teacher's cosines (plain MSE at weight 1 is ~100x smaller than the contrastive loss and taught the student
        nothing measurable; docs/RESULTS.md section 3).
    relevance_tokens (`str`, *optional*, defaults to `"all"`):
        On which tokens the relevance loss is computed: `"all"`, `"masked"` or `"visible"`.
    decoder_hidden_size (`int`, *optional*, defaults to 384):
        Width of the light relevance decoder used during pretraining.
    decoder_num_layers (`int`, *optional*, defaults to 2):
        Number of blocks of the relevance decoder.
    decoder_num_attention_heads (`int`, *optional*, defaults to 6):
        Number of attention heads of the relevance decoder.
    teacher_hidden_size (`int`, *optional*, defaults to 768):
        Width of the teacher's patch tokens (target of the unmasked-token alignment).
    decoder_intermediate_size (`int`, *optional*, defaults to 1536):
        Width of the MLP of the relevance decoder blocks.
    relevance_temperature (`float`, *optional*, defaults to 0.1):
        Temperature of the softmax over a video's tokens for the `"kl"` relevance loss.
    teacher_projection_dim (`int`, *optional*, defaults to 512):
        Dimension of the teacher's joint space (its text embeddings).
    contrastive_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight of the video-text contrastive loss; 0 skips it.
    relevance_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight of the relevance reconstruction loss; 0 skips it (and the decoder).
    matching_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight of the video-text matching loss; 0 skips it.
    matching_negatives (`str`, *optional*, defaults to `"mixed"`):
        How the matching loss draws its negative pairs: `"hard"` (in proportion to the contrastive similarity, the
        ALBEF/BLIP/UMT rule), `"uniform"` (any other pair of the batch) or `"mixed"` (hard or uniform with
        probability 1/2 per query). `"mixed"` is the default because a matching head trained from scratch on hard
        negatives alone stayed at its 1:2 prior in every measured run (docs/RESULTS.md section 4).
    matching_pooling (`str`, *optional*, defaults to `"softmin"`):
        How the matching head reads the fused caption tokens: `"mean"` scores their mean; `"softmin"` scores every
        caption token and takes a soft minimum of the per-token match log-odds, so that one phrase the video
        contradicts (a wrong motion, a wrong shape) vetoes the pair. `"softmin"` is the default because it learned
        more and re-ranked better in the measured runs (docs/RESULTS.md section 4). A config.json written before
        this setting existed loads as `"mean"`, the head it was trained with.
    mlm_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight of the masked language modelling loss; 0 skips it.
    alignment_loss_weight (`float`, *optional*, defaults to 0.0):
        Weight of the unmasked-token alignment with the teacher (the UMT objective); 0 skips it.
    mlm_probability (`float`, *optional*, defaults to 0.15):
        Fraction of the text tokens masked for masked language modelling.
    mask_token_id (`int`, *optional*, defaults to 103):
        Id of the `[MASK]` token of the tokenizer (BERT's id by default).
    tie_word_embeddings (`bool`, *optional*, defaults to `True`):
        Whether the masked language modelling head shares its weights with the text word embeddings.

    Example:

    ```python
    >>> from clusterstm import ClusterSTMConfig, ClusterSTMModel

    >>> configuration = ClusterSTMConfig.from_preset("tiny")
    >>> model = ClusterSTMModel(configuration)
    ```"""

    model_type = "clusterstm"
    sub_configs_defaults = {
        "vision_config": ClusterSTMVisionConfig,
        "text_config": ClusterSTMTextConfig,
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 256
    logit_scale_init_value: float = 2.6592
    relevance_window_size: int = 3
    relevance_loss: str = "zscore_mse"
    relevance_tokens: str = "all"
    decoder_hidden_size: int = 384
    decoder_num_layers: int = 2
    decoder_num_attention_heads: int = 6
    decoder_intermediate_size: int = 1536
    relevance_temperature: float = 0.1
    teacher_hidden_size: int = 768
    teacher_projection_dim: int = 512
    contrastive_loss_weight: float = 1.0
    relevance_loss_weight: float = 1.0
    matching_loss_weight: float = 1.0
    matching_negatives: str = "mixed"
    matching_pooling: str = "softmin"
    mlm_loss_weight: float = 1.0
    alignment_loss_weight: float = 0.0
    mlm_probability: float = 0.15
    mask_token_id: int = 103
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # Checked here as well as in `validate_architecture` so that a bad setting raises a plain `ValueError` at
        # construction time (the strict validators wrap it in their own exception type).
        self._validate_settings()
        # Masking settings belong to the pretraining arguments (`PretrainingArguments`); old config.json files that
        # still carry them load, and the keys are dropped.
        _drop_legacy_masking_keys(kwargs)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict`-powered validation. Validates the relevance and loss settings."""
        super().validate_architecture()
        self._validate_settings()

    def _validate_settings(self):
        if self.relevance_window_size < 1 or self.relevance_window_size % 2 == 0:
            raise ValueError(f"relevance_window_size must be an odd integer >= 1, got {self.relevance_window_size}.")
        if self.relevance_loss not in RELEVANCE_LOSSES:
            raise ValueError(f"relevance_loss must be one of {RELEVANCE_LOSSES}, got {self.relevance_loss!r}.")
        if self.relevance_tokens not in RELEVANCE_TOKENS:
            raise ValueError(f"relevance_tokens must be one of {RELEVANCE_TOKENS}, got {self.relevance_tokens!r}.")
        if self.matching_negatives not in MATCHING_NEGATIVES:
            raise ValueError(
                f"matching_negatives must be one of {MATCHING_NEGATIVES}, got {self.matching_negatives!r}."
            )
        if self.matching_pooling not in MATCHING_POOLINGS:
            raise ValueError(f"matching_pooling must be one of {MATCHING_POOLINGS}, got {self.matching_pooling!r}.")
        if not 0.0 <= self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1), got {self.mlm_probability}.")
        if self.relevance_temperature <= 0:
            raise ValueError(f"relevance_temperature must be > 0, got {self.relevance_temperature}.")
        if self.decoder_hidden_size % self.decoder_num_attention_heads != 0:
            raise ValueError(
                f"decoder_hidden_size ({self.decoder_hidden_size}) is not a multiple of decoder_num_attention_heads "
                f"({self.decoder_num_attention_heads})."
            )
        for name in (
            "contrastive_loss_weight",
            "relevance_loss_weight",
            "matching_loss_weight",
            "mlm_loss_weight",
            "alignment_loss_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "ClusterSTMConfig":
        """As [`PreTrainedConfig.from_dict`]; a saved configuration without `matching_pooling` predates the setting
        and its matching head was trained on the caption-token mean, so it keeps reading that."""
        if "matching_pooling" not in config_dict and "matching_pooling" not in kwargs:
            config_dict = {**config_dict, "matching_pooling": "mean"}
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> "ClusterSTMConfig":
        """
        Build a configuration from a named preset (see `PRESETS`): `"tiny"` (CPU tests and the demo) or `"base"`
        (ViT-B/16 at 224 px with 4 frames + BERT-base whose top 3 layers cross-attend to video, the UMT-B shapes).
        A preset is only a configuration; keyword arguments override its top-level fields, and `vision_config` /
        `text_config` dicts update the preset's sub-configurations.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available presets: {sorted(PRESETS)}.")
        preset = {key: (dict(value) if isinstance(value, dict) else value) for key, value in PRESETS[name].items()}
        for key in ("vision_config", "text_config"):
            override = kwargs.pop(key, None)
            if isinstance(override, PreTrainedConfig):
                override = override.to_dict()
            if override:
                preset[key] = {**preset[key], **override}
        preset.update(kwargs)
        return cls(**preset)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision_config": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "num_frames": 8,
            "tubelet_size": 1,
        },
        "text_config": {
            "vocab_size": 1000,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_fusion_layers": 2,
            "max_position_embeddings": 64,
            "encoder_width": 128,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        "projection_dim": 64,
        "decoder_hidden_size": 64,
        "decoder_num_layers": 1,
        "decoder_num_attention_heads": 4,
        "decoder_intermediate_size": 128,
        "teacher_hidden_size": 64,
        "teacher_projection_dim": 64,
        "mask_token_id": 4,
    },
    "base": {
        "vision_config": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 16,
            "num_frames": 4,
            "tubelet_size": 1,
        },
        "text_config": {
            "vocab_size": 30522,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "num_fusion_layers": 3,
            "max_position_embeddings": 512,
            "encoder_width": 768,
        },
        "projection_dim": 512,
        "decoder_hidden_size": 384,
        "decoder_num_layers": 2,
        "decoder_num_attention_heads": 6,
        "decoder_intermediate_size": 1536,
        "teacher_hidden_size": 768,
        "teacher_projection_dim": 512,
        "mask_token_id": 103,
    },
}


__all__ = ["ClusterSTMConfig", "ClusterSTMTextConfig", "ClusterSTMVisionConfig", "PRESETS"]
