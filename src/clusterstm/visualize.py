"""Figures in the style of the paper: relevance heatmaps (supplementary Figure I), cluster maps and kept
tokens (Figure II), cluster-wise vs random kept tokens, and training curves.

``clusterstm visualize CHECKPOINT_OR_TEACHER VIDEO "caption"`` calls :func:`visualize_video`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .models.masking_clusterstm import cluster_wise_mask, dpc_knn, num_visible_tokens, random_mask  # noqa: E402
from .models.video_processing_clusterstm import read_video_pyav  # noqa: E402
from .teacher.targets import compute_teacher_targets  # noqa: E402
from .teacher.teacher import ClusterSTMTeacher  # noqa: E402

# Perceptually uniform, and drawn half-transparent with contour lines, so the objects stay visible underneath
# (jet at full strength hid red objects behind red "hot" patches).
RELEVANCE_CMAP = "viridis"
RELEVANCE_ALPHA = 0.5


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of an (L, L) token grid to the frame size, for overlays."""
    rows = np.minimum((np.arange(height) * grid.shape[0]) // height, grid.shape[0] - 1)
    cols = np.minimum((np.arange(width) * grid.shape[1]) // width, grid.shape[1] - 1)
    return grid[rows][:, cols]


def _clean_axes(axes: np.ndarray) -> None:
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])


def _row_label(ax: Any, text: str) -> None:
    ax.set_ylabel(text, fontsize=8, rotation=0, ha="right", va="center", labelpad=6)


def plot_relevance_heatmaps(
    frames: np.ndarray, relevance_by_window: dict[int, np.ndarray], caption: str, path: str | Path
) -> Path:
    """Frames on top, then one row of relevance heatmaps per window size (Figure I of the supplementary).

    Each heatmap row has its own colour bar in the relevance's units (cosine similarity between pooled patch
    features and the caption); the same scale holds for every frame of a row, so frames are comparable.

    Args:
        frames: uint8 array (T, H, W, 3).
        relevance_by_window: window size -> relevance (T, L, L), cosine similarities.
        caption: the text the relevance refers to (figure title).
        path: output PNG.
    """
    num_frames, height, width = frames.shape[:3]
    rows = 1 + len(relevance_by_window)
    fig, axes = plt.subplots(
        rows, num_frames, figsize=(1.5 * num_frames + 2.6, 1.6 * rows + 0.6), squeeze=False, layout="constrained"
    )
    for t in range(num_frames):
        axes[0, t].imshow(frames[t])
        axes[0, t].set_title(f"frame {t}", fontsize=7)
    _row_label(axes[0, 0], "input")
    for row, (window, relevance) in enumerate(sorted(relevance_by_window.items()), start=1):
        low, high = float(relevance.min()), float(relevance.max())
        image = None
        for t in range(num_frames):
            heat = _upsample(relevance[t], height, width)
            axes[row, t].imshow(frames[t])
            image = axes[row, t].imshow(heat, cmap=RELEVANCE_CMAP, alpha=RELEVANCE_ALPHA, vmin=low, vmax=high)
            if high > low:
                axes[row, t].contour(heat, levels=np.linspace(low, high, 5)[1:-1], colors="white", linewidths=0.5)
        _row_label(axes[row, 0], f"relevance,\n{window}x{window} window")
        bar = fig.colorbar(image, ax=axes[row, :].tolist(), shrink=0.9, pad=0.01)
        bar.set_label("cosine sim.", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    _clean_axes(axes)
    fig.suptitle(
        f'teacher relevance of each patch to: "{caption}"\n(bright = more relevant; white lines: quartiles of the row)',
        fontsize=9,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _draw_kept(ax: Any, frame: np.ndarray, mask: np.ndarray) -> None:
    """The frame darkened where tokens are masked, with a yellow "+" on every kept token."""
    height, width = frame.shape[:2]
    grid = mask.shape[-1]
    shaded = frame.astype(np.float32) * np.where(_upsample(mask, height, width), 0.3, 1.0)[..., None]
    ax.imshow(shaded.astype(np.uint8))
    ys, xs = np.nonzero(~mask)
    scale_y, scale_x = height / grid, width / grid
    ax.scatter((xs + 0.5) * scale_x - 0.5, (ys + 0.5) * scale_y - 0.5, marker="+", c="yellow", s=30, linewidths=1)


def plot_cluster_masks(
    frames: np.ndarray, labels: np.ndarray, masks: np.ndarray, path: str | Path, title: str = ""
) -> Path:
    """Input frames, the per-frame cluster map, and the kept tokens marked with "+" (Figure II).

    Args:
        frames: uint8 array (T, H, W, 3).
        labels: cluster id per token (T, L, L).
        masks: True = masked (T, L, L).
        path: output PNG.
    """
    num_frames, height, width = frames.shape[:3]
    fig, axes = plt.subplots(3, num_frames, figsize=(1.5 * num_frames + 1.6, 5.4), squeeze=False, layout="constrained")
    for t in range(num_frames):
        axes[0, t].imshow(frames[t])
        axes[0, t].set_title(f"frame {t}", fontsize=7)
        axes[1, t].imshow(_upsample(labels[t], height, width), cmap="tab20", interpolation="nearest")
        _draw_kept(axes[2, t], frames[t], masks[t])
    kept = int((~masks[0]).sum())
    for row, name in enumerate(
        ["input", "DPC-KNN clusters\n(one colour each)", f"kept tokens (+)\n{kept} per frame,\nmasked darkened"]
    ):
        _row_label(axes[row, 0], name)
    _clean_axes(axes)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_kept_tokens(
    frames: np.ndarray, masks_by_strategy: dict[str, np.ndarray], path: str | Path, title: str = ""
) -> Path:
    """What each masking strategy keeps of the same clip: one row per strategy, kept tokens marked with "+".

    Args:
        frames: uint8 array (T, H, W, 3).
        masks_by_strategy: strategy name -> mask (T, L, L), True = masked; same ratio for a fair comparison.
        path: output PNG.
    """
    num_frames = frames.shape[0]
    rows = 1 + len(masks_by_strategy)
    fig, axes = plt.subplots(
        rows, num_frames, figsize=(1.5 * num_frames + 1.6, 1.7 * rows + 0.5), squeeze=False, layout="constrained"
    )
    for t in range(num_frames):
        axes[0, t].imshow(frames[t])
        axes[0, t].set_title(f"frame {t}", fontsize=7)
    _row_label(axes[0, 0], "input")
    for row, (name, masks) in enumerate(masks_by_strategy.items(), start=1):
        for t in range(num_frames):
            _draw_kept(axes[row, t], frames[t], masks[t])
        _row_label(axes[row, 0], f"{name}:\n{int((~masks[0]).sum())} kept\nper frame")
    _clean_axes(axes)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_training_curves(log_history: Sequence[dict], path: str | Path, keys: Sequence[str] | None = None) -> Path:
    """Loss curves from a list of log records (``{"step": ..., "loss": ..., ...}``), one line per loss key."""
    if not log_history:
        raise ValueError("plot_training_curves: the log history is empty.")
    if keys is None:
        keys = sorted({k for record in log_history for k in record if k.endswith("loss")})
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in log_history if key in r and r[key] is not None]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token or pair)")
    ax.set_title("pretraining losses (a flat line: that objective is not learning)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def resolve_teacher_path(checkpoint_or_teacher: str | Path) -> tuple[Path, dict]:
    """Finds the teacher for a path: a CLIP/SigLIP folder itself, or the teacher a ClusterSTM checkpoint names (the
    `teacher_config.json` a pretraining run writes into its output folder, or `teacher_name_or_path` in the config,
    or a `teacher/` sub-folder).

    Returns the teacher folder and the ClusterSTM config dict ({} for a bare teacher), updated with the run's
    recorded teacher settings (relevance window, mask settings).
    """
    folder = Path(checkpoint_or_teacher)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a checkpoint folder.")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "clusterstm":
        return folder, {}
    record_path = folder / "teacher_config.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        config = {**config, **{k: v for k, v in record.items() if v is not None}}
    for candidate in (config.get("teacher_name_or_path"), folder / "teacher"):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate), config
        if candidate and (folder / str(candidate) / "config.json").is_file():
            return folder / str(candidate), config
    raise ValueError(
        f"{folder} is a ClusterSTM checkpoint without a reachable teacher: set `teacher_name_or_path` in its config "
        "or put the teacher in a `teacher/` sub-folder, or pass the teacher folder itself."
    )


@torch.no_grad()
def visualize_video(
    checkpoint_or_teacher: str | Path,
    video: str | Path,
    caption: str,
    output_dir: str | Path = ".",
    num_frames: int = 8,
    mask_ratio: float | None = None,
    window_sizes: Sequence[int] = (1, 3),
) -> list[Path]:
    """Writes ``relevance.png`` (Figure I), ``clusters.png`` (Figure II) and ``kept_tokens.png`` (cluster-wise vs
    random masking at the same ratio, random drawn with a fixed seed) for one video and caption."""
    # Cheap input checks first: loading the teacher takes seconds.
    if not str(caption).strip():
        raise ValueError("visualize: the caption is empty; give the text whose relevance to show.")
    if not Path(video).is_file():
        raise FileNotFoundError(f"visualize: video file not found: {video}")
    teacher_path, config = resolve_teacher_path(checkpoint_or_teacher)
    teacher = ClusterSTMTeacher.from_pretrained(teacher_path)
    if teacher.tokenizer is None:
        raise ValueError(f"The teacher at {teacher_path} has no tokenizer files; cannot encode the caption.")
    mask_ratio = config.get("mask_ratio", 0.8) if mask_ratio is None else mask_ratio
    dc_ratio, dpc_k = config.get("dc_ratio", 0.02), config.get("dpc_k", 5)

    size = teacher.image_size
    raw = read_video_pyav(str(video), num_frames=num_frames, sampling="uniform")
    # the teacher's own preprocessing (its image statistics, its native size) from the decoded uint8 frames
    pixel_values = teacher.prepare_frames(np.asarray(raw)[None], size=size)
    frames = _display_frames(raw, size)

    tokens = teacher.prepare_text([caption])
    relevance, patch_tokens = {}, None
    for w in window_sizes:
        targets = compute_teacher_targets(
            teacher,
            pixel_values,
            tokens["input_ids"],
            tokens.get("attention_mask"),
            window_size=w,
            relevance_method=config.get("relevance_method", "window"),
            need_patch_tokens=patch_tokens is None,
        )
        patch_tokens = targets.patch_tokens if patch_tokens is None else patch_tokens
        relevance[w] = targets.relevance[0].cpu()
    grid = math.isqrt(patch_tokens.shape[2])
    relevance = {w: value.reshape(-1, grid, grid).numpy() for w, value in relevance.items()}
    labels, _ = dpc_knn(patch_tokens[0], num_visible_tokens(grid * grid, mask_ratio), k=dpc_k)
    masks = cluster_wise_mask(patch_tokens, mask_ratio, dc_ratio=dc_ratio, k=dpc_k)[0]
    num_frames_seen = masks.shape[0]
    random_masks = random_mask(
        1, num_frames_seen, grid * grid, mask_ratio, generator=torch.Generator().manual_seed(0)
    )[0]

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_relevance_heatmaps(frames, relevance, caption, output_dir / "relevance.png"),
        plot_cluster_masks(
            frames,
            labels.reshape(-1, grid, grid).numpy(),
            masks.reshape(-1, grid, grid).numpy(),
            output_dir / "clusters.png",
            title=f"cluster-wise masking at ratio {mask_ratio}: one token kept per cluster",
        ),
        plot_kept_tokens(
            frames,
            {
                "cluster-wise": masks.reshape(-1, grid, grid).numpy(),
                "random": random_masks.reshape(-1, grid, grid).numpy(),
            },
            output_dir / "kept_tokens.png",
            title=f"what is kept at mask ratio {mask_ratio}: cluster-wise vs random on the same clip",
        ),
    ]


def _display_frames(raw: np.ndarray, size: int) -> np.ndarray:
    """The frames as the teacher sees them (resize shortest edge + centre crop), uint8, for plotting."""
    video = torch.from_numpy(np.ascontiguousarray(raw)).permute(0, 3, 1, 2).float()
    if video.shape[1] == 1:
        video = video.expand(-1, 3, -1, -1)
    height, width = video.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    video = torch.nn.functional.interpolate(video, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    video = video[:, :, top : top + size, left : left + size]
    return video.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
