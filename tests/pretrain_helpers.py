"""Small checkpoints shared by the pretraining, teacher and distributed tests (tiny shapes, random weights)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_tokenizer():
    from clusterstm.data.synthetic import SyntheticVideoTextConfig, synthetic_text_corpus
    from clusterstm.data.tokenization import train_wordpiece_tokenizer

    corpus = synthetic_text_corpus(
        SyntheticVideoTextConfig(
            num_frames=4, image_size=32, num_train=200, num_val=0, num_test=0, num_compositional=0
        )
    )
    return train_wordpiece_tokenizer(corpus, vocab_size=400)


def make_tiny_student(output_dir: str | Path, seed: int = 0, tokenizer=None, **overrides) -> Path:
    """A ClusterSTM pretraining checkpoint folder: the tiny preset shrunk to 4 frames of 32x32 (16 tokens per frame)."""
    from clusterstm.models.configuration_clusterstm import ClusterSTMConfig
    from clusterstm.models.modeling_clusterstm import ClusterSTMForPreTraining
    from clusterstm.models.processing_clusterstm import ClusterSTMProcessor
    from clusterstm.models.video_processing_clusterstm import ClusterSTMVideoProcessor

    tokenizer = tokenizer or tiny_tokenizer()
    vision = {"num_frames": 4, "image_size": 32, "num_hidden_layers": 2, **overrides.pop("vision_config", {})}
    text = {"vocab_size": len(tokenizer), "num_hidden_layers": 2, "num_fusion_layers": 1, "pad_token_id": 0}
    config = ClusterSTMConfig.from_preset(
        "tiny", vision_config=vision, text_config=text, mask_token_id=tokenizer.mask_token_id, **overrides
    )
    torch.manual_seed(seed)
    model = ClusterSTMForPreTraining(config)
    video_processor = ClusterSTMVideoProcessor(
        num_frames=vision["num_frames"],
        size={"shortest_edge": vision["image_size"]},
        crop_size={"height": vision["image_size"], "width": vision["image_size"]},
    )
    processor = ClusterSTMProcessor(video_processor=video_processor, tokenizer=tokenizer)
    from clusterstm.training.pretraining import save_final_model

    return save_final_model(model, processor, output_dir)


def make_tiny_teacher(output_dir: str | Path, seed: int = 0, image_size: int = 32, tokenizer=None) -> Path:
    """An untrained CLIP teacher folder (model + CLIPImageProcessor + tokenizer) matching `make_tiny_student`."""
    from transformers import CLIPModel

    from clusterstm.training.teacher_training import (
        TeacherTrainingArguments,
        build_image_processor,
        build_teacher_config,
    )

    tokenizer = tokenizer or tiny_tokenizer()
    args = TeacherTrainingArguments(output_dir=str(output_dir), image_size=image_size, num_hidden_layers=2)
    torch.manual_seed(seed)
    model = CLIPModel(build_teacher_config(args, tokenizer))
    model.save_pretrained(output_dir)
    build_image_processor(image_size).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return Path(output_dir)
