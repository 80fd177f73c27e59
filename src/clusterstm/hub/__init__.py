"""Checkpoint export, Hub publishing and model cards."""

from .publish import check_checkpoint_folder, find_missing_checkpoint_files, push_checkpoint, select_upload_files

__all__ = ["check_checkpoint_folder", "find_missing_checkpoint_files", "push_checkpoint", "select_upload_files"]
