"""Start-up check that a teacher can train a student: patch grids, frames and the alignment width.

Run it once before training (the pretraining run and the target-cache writer do): it fails at start-up, naming both
sides, instead of mid-run, and it matches the teacher to the student so that `compute_teacher_targets` makes the
teacher's frames from the student's.
"""

from __future__ import annotations

from typing import Any

from .preprocessing import ImageNormalization, StudentFrames
from .teacher import ClusterSTMTeacher


def check_teacher_compatibility(
    teacher: ClusterSTMTeacher, student_config: Any, student_processor: Any = None
) -> dict[str, Any]:
    """
    Checks that `teacher` can produce targets for a student and matches it to that student.

    * Grid: the teacher is fed frames at the resolution that gives its patch grid the student's (`grid *
      teacher_patch_size` per side, position embeddings interpolated); a grid that would need frames over 4x the
      teacher's native size raises, naming both grids and patch sizes.
    * Time: the teacher sees the first frame of every student tubelet (`num_frames // tubelet_size` frames).
    * Width: unmasked-token alignment (`alignment_loss_weight > 0`) regresses the teacher's patch tokens through the
      student's `alignment_head`, whose output width is `teacher_hidden_size`; a teacher of another width raises,
      naming both widths (relevance and masking work with any teacher width).
    * Frames: the student's normalisation (from `student_processor`, else the ClusterSTM video processor's
      defaults) is recorded on the teacher so `compute_teacher_targets` turns the student's `pixel_values` into the
      teacher's own (see [`ClusterSTMTeacher.frames_from_student`]).

    Args:
        teacher ([`ClusterSTMTeacher`]): the loaded teacher.
        student_config ([`ClusterSTMConfig`]): the student's config.
        student_processor (*optional*): the student's [`ClusterSTMProcessor`] or video processor.

    Returns:
        `dict` describing the match (`family`, `input_size`, `student_grid`, `teacher_native_grid`, `num_frames`,
        `frame_selection`), for the run's log.
    """
    vision = student_config.vision_config
    patch = int(vision.patch_size)
    grid = (int(vision.image_size) // patch, int(vision.image_size) // patch)
    input_size = teacher.input_size_for_grid(grid, patch)

    if getattr(student_config, "alignment_loss_weight", 0) > 0 and teacher.hidden_size != student_config.teacher_hidden_size:
        raise ValueError(
            f"Unmasked-token alignment needs the teacher's patch-token width: the teacher "
            f"({teacher.adapter.describe()}) has width {teacher.hidden_size} but the student's alignment head outputs "
            f"teacher_hidden_size={student_config.teacher_hidden_size}. Build the student with "
            f"teacher_hidden_size={teacher.hidden_size}, or set alignment_loss_weight=0."
        )

    if student_processor is None:
        from ..models.video_processing_clusterstm import ClusterSTMVideoProcessor

        student_processor = ClusterSTMVideoProcessor
    teacher.match_student(
        StudentFrames(
            normalization=ImageNormalization.from_processor(student_processor),
            patch_size=patch,
            tubelet_size=int(getattr(vision, "tubelet_size", 1)),
        )
    )
    native = teacher.image_size // teacher.patch_size
    return {
        "family": teacher.family,
        "input_size": input_size,
        "student_grid": grid,
        "teacher_native_grid": (native, native),
        "num_frames": int(vision.num_frames) // int(getattr(vision, "tubelet_size", 1)),
        "frame_selection": "first frame of every tubelet",
    }


__all__ = ["check_teacher_compatibility"]
