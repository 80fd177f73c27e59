"""Corpus readers, path resolution, the synthetic benchmark and the collator."""

from .readers import VideoTextCollator, load_video_text_dataset, resolve_video_path

__all__ = ["VideoTextCollator", "load_video_text_dataset", "resolve_video_path"]
