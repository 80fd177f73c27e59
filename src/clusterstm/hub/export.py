"""Creating, saving and registering ClusterSTM checkpoints.

A ClusterSTM checkpoint is an ordinary transformers folder (``config.json``, ``model.safetensors``,
processor and tokenizer files) that also carries the flat ``*_clusterstm.py`` remote-code files and an
``auto_map``, so that it loads with ``trust_remote_code=True`` where this package is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoProcessor,
    AutoVideoProcessor,
    GenerationConfig,
)
from transformers.pipelines import PIPELINE_REGISTRY

from ..models.configuration_clusterstm import ClusterSTMConfig
from ..models.modeling_clusterstm import ClusterSTMForPreTraining, ClusterSTMModel
from ..models.pipelines_clusterstm import (
    CUSTOM_PIPELINES,
    TEXT_TO_VIDEO_RETRIEVAL,
    ZERO_SHOT_VIDEO_CLASSIFICATION,
    ClusterSTMTextToVideoRetrievalPipeline,
    ClusterSTMZeroShotVideoClassificationPipeline,
)
from ..models.processing_clusterstm import ClusterSTMProcessor
from ..models.video_processing_clusterstm import ClusterSTMVideoProcessor
from ..tasks import TASKS

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

# Auto class -> "module.Class" for everything a checkpoint can be loaded as.
MODEL_AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_clusterstm.ClusterSTMConfig",
    "AutoModel": "modeling_clusterstm.ClusterSTMModel",
    "AutoModelForPreTraining": "modeling_clusterstm.ClusterSTMForPreTraining",
    # every task head that has a transformers Auto class (`clusterstm.tasks.TASKS`)
    **{task.auto_class: f"modeling_clusterstm.{task.head_class_name}" for task in TASKS.values() if task.auto_class},
}

_MODEL_AUTO_CLASSES = {
    "AutoModel": (AutoModel, ClusterSTMModel),
    "AutoModelForPreTraining": (AutoModelForPreTraining, ClusterSTMForPreTraining),
    **{
        task.auto_class: (getattr(transformers, task.auto_class), task.head_class())
        for task in TASKS.values()
        if task.auto_class
    },
}
# Task heads without a transformers Auto class (retrieval) save their remote code under AutoModel.
_AUTO_MODEL_HEADS = tuple(task.head_class() for task in TASKS.values() if not task.auto_class)


def remote_code_files() -> list[Path]:
    """The flat files that travel with a checkpoint as Hub remote code."""
    return sorted(MODELS_DIR.glob("*_clusterstm.py"))


def register_auto_classes() -> None:
    """Registers ClusterSTM with the transformers Auto classes, in this process and for remote code.

    After this, ``AutoModel.from_pretrained(folder)`` works without ``trust_remote_code`` while the package is
    imported, and every ``save_pretrained`` (Trainer checkpoints included) copies the remote-code files.
    """
    AutoConfig.register(ClusterSTMConfig.model_type, ClusterSTMConfig, exist_ok=True)
    ClusterSTMConfig.register_for_auto_class("AutoConfig")
    for auto_name, (auto_class, model_class) in _MODEL_AUTO_CLASSES.items():
        auto_class.register(ClusterSTMConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_name)
    # Retrieval has no transformers Auto class; it saves its remote code under AutoModel.
    for head in _AUTO_MODEL_HEADS:
        head.register_for_auto_class("AutoModel")
    AutoVideoProcessor.register(ClusterSTMConfig, ClusterSTMVideoProcessor, exist_ok=True)
    AutoProcessor.register(ClusterSTMConfig, ClusterSTMProcessor, exist_ok=True)
    ClusterSTMVideoProcessor.register_for_auto_class("AutoVideoProcessor")
    ClusterSTMProcessor.register_for_auto_class("AutoProcessor")
    # The checkpoint's custom pipelines, for `pipeline(task, model=..., pipeline_class=...)` in this process; a
    # folder's config.json names them in `custom_pipelines` for `pipeline(task, model=folder, trust_remote_code=True)`.
    for task, pipeline_class in (
        (ZERO_SHOT_VIDEO_CLASSIFICATION, ClusterSTMZeroShotVideoClassificationPipeline),
        (TEXT_TO_VIDEO_RETRIEVAL, ClusterSTMTextToVideoRetrievalPipeline),
    ):
        PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=AutoModel, type="multimodal")


def _complete_auto_map(output_dir: Path, model_class_name: str) -> None:
    """Writes the full ``auto_map`` and the custom pipelines into ``config.json`` so one folder loads through every
    Auto class and ``transformers.pipeline`` task."""
    config_path = output_dir / "config.json"
    config = json.loads(config_path.read_text())
    auto_map = dict(MODEL_AUTO_MAP)
    if model_class_name in {head.__name__ for head in _AUTO_MODEL_HEADS}:
        auto_map["AutoModel"] = f"modeling_clusterstm.{model_class_name}"
    config["auto_map"] = auto_map
    config["custom_pipelines"] = CUSTOM_PIPELINES
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def generation_config_for(model: Any, processor: Any | None = None) -> GenerationConfig | None:
    """The captioning decoder's generation config: bos = [CLS], eos = [SEP], pad = [PAD].

    Taken from ``model.generation_config`` when the model generates and has its tokens set, else from the
    processor's tokenizer; ``None`` when neither knows them.
    """
    own = getattr(model, "generation_config", None)
    if own is not None and model.can_generate() and own.bos_token_id is not None:
        return own
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        return None
    return GenerationConfig(
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_checkpoint(model: Any, output_dir: str | Path, processor: Any | None = None) -> Path:
    """Saves ``model`` (and ``processor``) as a complete, Hub-ready checkpoint folder.

    The folder gets safetensors weights, the config with a complete ``auto_map`` and ``custom_pipelines``, the
    remote-code files, ``generation_config.json`` (bos/eos/pad of the tokenizer, so that the captioning head
    generates from any checkpoint) and, when given, the processor (video processor + tokenizer). The frozen teacher
    is never saved.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    register_auto_classes()
    model.save_pretrained(output_dir)
    _complete_auto_map(output_dir, type(model).__name__)
    for source in remote_code_files():
        shutil.copyfile(source, output_dir / source.name)
    if processor is not None:
        processor.save_pretrained(output_dir)
    generation_config = generation_config_for(model, processor)
    if generation_config is not None:
        generation_config.save_pretrained(output_dir)
    return output_dir


def default_tokenizer(vocab_size: int = 1000) -> Any:
    """The offline default tokenizer: WordPiece trained on the embedded benchmark's captions and questions."""
    from ..data.synthetic import synthetic_text_corpus
    from ..data.tokenization import train_wordpiece_tokenizer

    return train_wordpiece_tokenizer(synthetic_text_corpus(), vocab_size=vocab_size)


def init_checkpoint(
    preset: str,
    output_dir: str | Path,
    tokenizer_name_or_path: str | Path | None = None,
    seed: int = 0,
) -> Path:
    """Writes a complete, Hub-ready ClusterSTM folder with random weights (``clusterstm init``).

    The folder holds the config of ``preset``, ``model.safetensors`` of a :class:`ClusterSTMForPreTraining`
    (which every head and ``AutoModel`` load from), the processor (video processor + tokenizer), the remote-code
    files and a model card.

    Args:
        preset: ``"tiny"`` (CPU tests and the demo) or ``"base"`` (ViT-B/16 + BERT-base, UMT-B shapes).
        output_dir: where to write the folder.
        tokenizer_name_or_path: a local BERT-style tokenizer folder; by default a WordPiece tokenizer is trained on
            the synthetic benchmark's text (no downloads).
        seed: seed of the random initialisation.
    """
    import torch

    from ..data.tokenization import load_local_tokenizer
    from .model_card import write_model_card

    config = ClusterSTMConfig.from_preset(preset)
    if tokenizer_name_or_path is None:
        tokenizer = default_tokenizer()
    else:
        tokenizer = load_local_tokenizer(tokenizer_name_or_path)
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.mask_token_id = tokenizer.mask_token_id

    torch.manual_seed(seed)
    model = ClusterSTMForPreTraining(config)
    vision = config.vision_config
    video_processor = ClusterSTMVideoProcessor(
        num_frames=vision.num_frames,
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
    )
    processor = ClusterSTMProcessor(video_processor=video_processor, tokenizer=tokenizer)
    output_dir = save_checkpoint(model, output_dir, processor)
    write_model_card(
        output_dir,
        config,
        run_info={"preset": preset, "stage": "random initialisation (not trained)", "seed": seed},
    )
    return output_dir
