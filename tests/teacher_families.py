"""Random-weight teachers of each supported family, saved as checkpoint folders with their real image processor and
a locally built tokenizer (no downloads). Small widths; the real transformers classes."""

from __future__ import annotations

import copy
import string
from pathlib import Path

import torch

WIDTH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# family -> (patch size, native size): the shapes of the released checkpoints they stand for
FAMILIES = {
    "clip_b16": (16, 224),  # CLIP ViT-B/16 at 224 px
    "clip_b32": (32, 224),  # CLIP ViT-B/32 at 224 px
    "siglip": (16, 224),  # SigLIP B/16-224
    "siglip2": (16, 224),  # SigLIP2 B/16 (NaFlex position grid 14x14)
    "xclip": (32, 224),  # X-CLIP B/32, 8 frames
}


def siglip2_tokenizer(max_length: int = 64):
    """A real `Siglip2Tokenizer` (Gemma-style BPE, left padding) with a character vocabulary, built locally."""
    from transformers import Siglip2Tokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5}
    for char in string.ascii_letters + string.digits + ".,?!'-":
        vocab[char] = len(vocab)
    return Siglip2Tokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def make_family_teacher(
    family: str,
    folder: str | Path,
    wordpiece,
    *,
    patch_size: int | None = None,
    image_size: int | None = None,
    hidden_size: int = 32,
    seed: int = 0,
) -> Path:
    """Saves a random-weight teacher of `family` (see `FAMILIES`) with its image processor and tokenizer."""
    import transformers as tf

    patch, size = FAMILIES[family]
    patch, size = patch_size or patch, image_size or size
    width = {**WIDTH, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size}
    tokenizer = copy.deepcopy(wordpiece)
    text = {
        **width,
        "vocab_size": len(wordpiece),
        "max_position_embeddings": 64,
        "pad_token_id": wordpiece.pad_token_id,
        "bos_token_id": wordpiece.cls_token_id,
        "eos_token_id": wordpiece.sep_token_id,
    }
    vision = {**width, "patch_size": patch, "image_size": size}
    torch.manual_seed(seed)
    if family.startswith("clip"):
        model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
        processor = tf.CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD
        )
        tokenizer.model_max_length = 77
    elif family == "siglip":
        model = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision))
        processor = tf.SiglipImageProcessor(size={"height": size, "width": size})
        tokenizer.model_max_length = 64  # SigLIP's trained text length
    elif family == "siglip2":
        tokenizer = siglip2_tokenizer()
        text = {**text, "vocab_size": len(tokenizer), "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}
        vision = {**width, "patch_size": patch, "num_patches": (size // patch) ** 2}
        model = tf.Siglip2Model(tf.Siglip2Config(text_config=text, vision_config=vision))
        processor = tf.Siglip2ImageProcessor(patch_size=patch, max_num_patches=(size // patch) ** 2)
    elif family == "xclip":
        vision = {**vision, "num_frames": 8, "mit_hidden_size": hidden_size, "mit_intermediate_size": 2 * hidden_size}
        config = tf.XCLIPConfig(
            text_config=text,
            vision_config=vision,
            projection_dim=24,
            prompt_layers=1,
            prompt_attention_heads=4,
            mit_hidden_size=hidden_size,
        )
        model = tf.XCLIPModel(config)
        processor = tf.VideoMAEImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD
        )
        tokenizer.model_max_length = 77
    else:
        raise ValueError(f"unknown family {family!r}")
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_open_clip_teacher(folder: str | Path, patch_size: int = 32, width: int = 32, seed: int = 0) -> Path:
    """A random-weight open_clip ViT (open_clip's own classes) saved as a local folder: `open_clip_config.json`
    (model and preprocess config) and `open_clip_model.safetensors`."""
    import json

    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": width, "head_width": 8, "patch_size": patch_size},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder
