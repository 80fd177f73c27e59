"""ClusterSTM: cluster-wise spatio-temporal masking for efficient video-language pretraining.

Importing the package registers ClusterSTM with the transformers Auto classes (so ``AutoModel`` and
``AutoProcessor`` load ClusterSTM folders without ``trust_remote_code``); public names are resolved lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY_IMPORTS: dict[str, str] = {
    # algorithms
    "dpc_knn": "masking_clusterstm",
    "temporal_density": "masking_clusterstm",
    "cluster_wise_mask": "masking_clusterstm",
    "random_mask": "masking_clusterstm",
    "tube_mask": "masking_clusterstm",
    "attention_guided_mask": "masking_clusterstm",
    "num_visible_tokens": "masking_clusterstm",
    "generate_relevance": "relevance_clusterstm",
    "CLIPWindowPooler": "relevance_clusterstm",
    "SiglipWindowPooler": "relevance_clusterstm",
    "build_window_pooler": "relevance_clusterstm",
    # configuration and models
    "ClusterSTMConfig": "configuration_clusterstm",
    "ClusterSTMVisionConfig": "configuration_clusterstm",
    "ClusterSTMTextConfig": "configuration_clusterstm",
    "ClusterSTMPreTrainedModel": "modeling_clusterstm",
    "ClusterSTMVisionModel": "modeling_clusterstm",
    "ClusterSTMTextModel": "modeling_clusterstm",
    "ClusterSTMModel": "modeling_clusterstm",
    "ClusterSTMForPreTraining": "modeling_clusterstm",
    "ClusterSTMForVideoTextRetrieval": "modeling_clusterstm",
    "ClusterSTMForVideoQuestionAnswering": "modeling_clusterstm",
    "ClusterSTMForVideoCaptioning": "modeling_clusterstm",
    # processing
    "ClusterSTMVideoProcessor": "video_processing_clusterstm",
    "ClusterSTMProcessor": "processing_clusterstm",
    # teacher hook
    "ClusterSTMTeacher": "teacher_clusterstm",
}

__all__ = sorted(_LAZY_IMPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_IMPORTS:
        module = importlib.import_module(f".{_LAZY_IMPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


def _register() -> None:
    from .checkpoint import register_auto_classes

    register_auto_classes()


_register()
