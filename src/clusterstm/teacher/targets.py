"""The one function that turns a frozen teacher and a batch into ClusterSTM's training targets.

Every caller goes through `compute_teacher_targets`: the online pretraining step, the target-cache writer
(`clusterstm precompute-targets`), the benchmarks, the demo and `clusterstm visualize`. The student model never holds
or calls a teacher; it receives these targets as inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dense import check_relevance_method
from .teacher import ClusterSTMTeacher


@dataclass
class TeacherTargets:
    """
    A batch's teacher targets.

    Args:
        relevance (`torch.Tensor` of shape `(batch_size, num_frames, num_patches)`, float32, *optional*):
            window-pooled video-text relevance of every token (the relevance reconstruction target).
        patch_tokens (`torch.Tensor` of shape `(batch_size, num_frames, num_patches, hidden_size)`, *optional*):
            the teacher's patch tokens (UMT alignment targets; features of cluster-wise masking on the teacher).
        cls_attention (`torch.Tensor` of shape `(batch_size, num_frames, num_patches)`, float32, *optional*):
            the teacher's CLS attention (attention-guided masking).
    """

    relevance: torch.Tensor | None = None
    patch_tokens: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None


@torch.no_grad()
def compute_teacher_targets(
    teacher: ClusterSTMTeacher,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    window_size: int,
    need_relevance: bool = True,
    need_patch_tokens: bool = False,
    need_cls_attention: bool = False,
    teacher_pixel_values: torch.Tensor | None = None,
    teacher_input_ids: torch.Tensor | None = None,
    teacher_attention_mask: torch.Tensor | None = None,
    relevance_method: str = "window",
) -> TeacherTargets:
    """
    Runs the frozen `teacher` (eval mode, no gradient) once over a batch and returns the requested targets.

    Args:
        teacher ([`ClusterSTMTeacher`]): the frozen teacher.
        pixel_values (`torch.Tensor` of shape `(batch_size, num_frames, 3, height, width)`): the student's frames.
            Unless `teacher_pixel_values` (frames prepared for the teacher) is given, a teacher matched to the student
            by `check_teacher_compatibility` makes its own frames from them (`teacher.frames_from_student`: first
            frame of each tubelet, re-normalised with the teacher's statistics, resized to the grid-matching size);
            an unmatched teacher takes them as they are.
        input_ids, attention_mask (*optional*): the captions, tokenised for the teacher unless `teacher_input_ids` /
            `teacher_attention_mask` (the teacher tokenizer's ids) are given. Needed for the relevance.
        window_size (`int`): odd window of the relevance pooling (`config.relevance_window_size`).
        relevance_method (`str`, *optional*, defaults to `"window"`): which tokens the window pooler reads:
            `"window"` the tower's last hidden states (Algorithm III), `"maskclip"` the value path of the last
            attention layer (Zhou et al., ECCV 2022), `"clearclip"` the last attention without residual and
            feed-forward (Lan et al., ECCV 2024); see `clusterstm.teacher.dense`. Only CLIP-like teachers support
            the last two (a `ValueError` otherwise). They cost one more tower pass.
        need_relevance / need_patch_tokens / need_cls_attention (`bool`): which targets to return; the others are
            `None` (patch tokens are large: ~`T * N * C * 4` bytes per clip).

    Returns:
        [`TeacherTargets`] on the teacher's device; relevance and CLS attention in float32.
    """
    if not (need_relevance or need_patch_tokens or need_cls_attention):
        return TeacherTargets()
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be an odd integer >= 1, got {window_size}.")
    check_relevance_method(relevance_method)
    teacher.eval()
    if teacher_pixel_values is not None:
        frames = teacher_pixel_values
    elif getattr(teacher, "student_frames", None) is not None:
        frames = teacher.frames_from_student(pixel_values)
    else:
        frames = pixel_values
    video = teacher.encode_video(frames)
    relevance = None
    if need_relevance:
        ids = teacher_input_ids if teacher_input_ids is not None else input_ids
        mask = teacher_attention_mask if teacher_input_ids is not None else attention_mask
        if ids is None:
            raise ValueError("compute_teacher_targets: the relevance needs the captions (input_ids or teacher_input_ids).")
        if ids.shape[0] != frames.shape[0]:
            raise ValueError(
                f"compute_teacher_targets: {ids.shape[0]} captions for {frames.shape[0]} videos; one caption per video."
            )
        text_embeds = teacher.encode_text(ids, mask)
        tokens = video.patch_tokens
        # CODEPATH: relevance_method ("window" default = Algorithm III; "maskclip" / "clearclip" dense readings).
        if relevance_method != "window":
            tokens = teacher.encode_dense(frames, relevance_method)
        relevance = teacher.relevance(tokens, text_embeds, window_size).float()
    return TeacherTargets(
        relevance=relevance,
        patch_tokens=video.patch_tokens if need_patch_tokens else None,
        cls_attention=video.cls_attention.float() if need_cls_attention else None,
    )


__all__ = ["TeacherTargets", "compute_teacher_targets"]
