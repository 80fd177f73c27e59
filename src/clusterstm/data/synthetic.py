"""The embedded synthetic video-text benchmark: small moving shapes on textured, drifting backgrounds.

Everything is generated from a seed, without downloads. Objects are small against a background that covers the whole
frame, so heavy random masking tends to miss them, and their motions (left/right/up/down/grow/shrink/still) can only
be told apart across frames. Each clip has a caption from several templates and QA pairs with a fixed answer
vocabulary ([`SYNTHETIC_ANSWERS`]). Splits: `train`, `validation`, `test` and `compositional` (attribute combinations
never seen in the other splits).

Memory: clips are rendered in chunks with numpy; the in-memory dataset holds `N*T*H*W*3` bytes (2000 clips of 8x64x64
are ~200 MB). For large sizes, use [`export_synthetic_benchmark`], which writes mp4 files chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 245),
    "yellow": (245, 230, 40),
    "purple": (165, 40, 210),
    "orange": (250, 140, 20),
    "cyan": (30, 225, 225),
    "white": (250, 250, 250),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: dict[str, float] = {"small": 0.075, "large": 0.13}  # radius as a fraction of the image size
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still", "grow", "shrink")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five")
SPLITS: tuple[str, ...] = ("train", "validation", "test", "compositional")

#: The fixed QA answer vocabulary (index = class id for classification heads).
SYNTHETIC_ANSWERS: list[str] = sorted(set(COLOURS) | set(SHAPES) | set(MOTIONS) | set(COUNT_WORDS[:3]) | {"yes", "no"})

DEFAULT_HELD_OUT_COLOUR_SHAPE: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "circle"),
    ("green", "square"),
    ("yellow", "cross"),
    ("purple", "diamond"),
)
DEFAULT_HELD_OUT_SHAPE_MOTION: tuple[tuple[str, str], ...] = (
    ("circle", "left"),
    ("square", "grow"),
    ("diamond", "up"),
)

_MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("moves left", "slides to the left", "travels leftward"),
    "right": ("moves right", "slides to the right", "travels rightward"),
    "up": ("moves up", "rises", "goes upward"),
    "down": ("moves down", "falls", "goes downward"),
    "still": ("stays still", "does not move", "remains in place"),
    "grow": ("grows", "is growing", "gets bigger"),
    "shrink": ("shrinks", "is shrinking", "gets smaller"),
}
_JOINERS: tuple[str, ...] = (" while ", " and ", ", ", " as ")


def get_synthetic_answers() -> list[str]:
    """The answer vocabulary of the synthetic QA pairs (a copy of [`SYNTHETIC_ANSWERS`])."""
    return list(SYNTHETIC_ANSWERS)


@dataclass
class SyntheticVideoTextConfig:
    """
    Settings of the synthetic video-text benchmark.

    Args:
        num_frames (`int`, defaults to 8): Frames per clip (>= 2: motion needs time).
        image_size (`int`, defaults to 64): Square frame size in pixels (even, so clips encode as yuv420p mp4).
        num_train, num_val, num_test, num_compositional (`int`): Clips per split.
        seed (`int`, defaults to 0): Everything is a function of the seed (each split has its own stream, so
            changing one split's size does not change the others).
        min_objects, max_objects (`int`, defaults to 1 and 3): Objects per clip.
        held_out_colour_shape, held_out_shape_motion: Attribute pairs that never occur in train/validation/test;
            every compositional clip has at least one object with a held-out pair.
        fps (`int`, defaults to 8): Frame rate of exported mp4 files.
        drift (`float`, defaults to 0.4): Maximum background drift in pixels per frame (at 64 px; scaled with size).
    """

    num_frames: int = 8
    image_size: int = 64
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 200
    num_compositional: int = 200
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 3
    held_out_colour_shape: tuple[tuple[str, str], ...] = field(default=DEFAULT_HELD_OUT_COLOUR_SHAPE)
    held_out_shape_motion: tuple[tuple[str, str], ...] = field(default=DEFAULT_HELD_OUT_SHAPE_MOTION)
    fps: int = 8
    drift: float = 0.4

    def __post_init__(self) -> None:
        if self.num_frames < 2:
            raise ValueError(f"`num_frames` must be >= 2 (motion needs time), got {self.num_frames}.")
        if self.image_size < 16 or self.image_size % 2:
            raise ValueError(f"`image_size` must be an even number >= 16, got {self.image_size}.")
        for name in ("num_train", "num_val", "num_test", "num_compositional"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise ValueError(f"Need 1 <= min_objects <= max_objects <= 3, got {self.min_objects}, {self.max_objects}.")
        self.held_out_colour_shape = tuple(tuple(p) for p in self.held_out_colour_shape)
        self.held_out_shape_motion = tuple(tuple(p) for p in self.held_out_shape_motion)
        for colour, shape in self.held_out_colour_shape:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"Unknown held-out colour/shape pair ({colour!r}, {shape!r}).")
        for shape, motion in self.held_out_shape_motion:
            if shape not in SHAPES or motion not in MOTIONS:
                raise ValueError(f"Unknown held-out shape/motion pair ({shape!r}, {motion!r}).")

    def split_sizes(self) -> dict[str, int]:
        return {
            "train": self.num_train,
            "validation": self.num_val,
            "test": self.num_test,
            "compositional": self.num_compositional,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- metadata sampling
def _is_held_out(obj: dict[str, Any], config: SyntheticVideoTextConfig) -> bool:
    return (obj["colour"], obj["shape"]) in config.held_out_colour_shape or (
        obj["shape"],
        obj["motion"],
    ) in config.held_out_shape_motion


def _trajectory_box(obj: dict[str, Any]) -> tuple[float, float, float, float]:
    r = max(obj["r0"], obj["r1"])
    xs, ys = (obj["x0"], obj["x1"]), (obj["y0"], obj["y1"])
    return min(xs) - r, min(ys) - r, max(xs) + r, max(ys) + r


def _boxes_overlap(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _sample_object(rng: np.random.Generator, config: SyntheticVideoTextConfig, force_held_out: bool) -> dict[str, Any]:
    size_px = config.image_size
    while True:
        if force_held_out:
            if rng.random() < 0.5 and config.held_out_colour_shape:
                colour, shape = config.held_out_colour_shape[rng.integers(len(config.held_out_colour_shape))]
                motion = MOTIONS[rng.integers(len(MOTIONS))]
            elif config.held_out_shape_motion:
                shape, motion = config.held_out_shape_motion[rng.integers(len(config.held_out_shape_motion))]
                colour = list(COLOURS)[rng.integers(len(COLOURS))]
            else:
                colour, shape = config.held_out_colour_shape[rng.integers(len(config.held_out_colour_shape))]
                motion = MOTIONS[rng.integers(len(MOTIONS))]
        else:
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            shape = SHAPES[rng.integers(len(SHAPES))]
            motion = MOTIONS[rng.integers(len(MOTIONS))]
        obj = {"colour": colour, "shape": shape, "motion": motion}
        if force_held_out or not _is_held_out(obj, config):
            break
    size = "small" if rng.random() < 0.5 else "large"
    base = SIZES[size] * size_px
    r0 = r1 = base
    if motion == "grow":
        r1 = base * 1.8
    elif motion == "shrink":
        r0 = base * 1.8
    travel = 0.32 * size_px
    dx, dy = {"left": (-travel, 0.0), "right": (travel, 0.0), "up": (0.0, -travel), "down": (0.0, travel)}.get(
        motion, (0.0, 0.0)
    )
    r = max(r0, r1) + 1.0
    # Start so that the whole trajectory stays inside the frame.
    x0 = rng.uniform(r - min(dx, 0.0), size_px - r - max(dx, 0.0))
    y0 = rng.uniform(r - min(dy, 0.0), size_px - r - max(dy, 0.0))
    obj.update(
        size=size,
        x0=float(x0),
        y0=float(y0),
        x1=float(x0 + dx),
        y1=float(y0 + dy),
        r0=float(r0),
        r1=float(r1),
    )
    return obj


def _sample_clip(rng: np.random.Generator, config: SyntheticVideoTextConfig, compositional: bool) -> dict[str, Any]:
    num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    objects: list[dict[str, Any]] = []
    boxes: list[tuple[float, ...]] = []
    for k in range(num_objects):
        # Trajectories of different objects do not overlap, so every object stays visible (count questions hold).
        for _ in range(60):
            obj = _sample_object(rng, config, force_held_out=compositional and k == 0)
            box = _trajectory_box(obj)
            if all(not _boxes_overlap(box, other, gap=1.0) for other in boxes):
                objects.append(obj)
                boxes.append(box)
                break
    # Object order in captions is shuffled relative to drawing order, so position in the text carries no cue.
    order = rng.permutation(len(objects))
    objects = [objects[i] for i in order]
    background = {
        "pattern": ["noise", "stripes", "checker"][int(rng.integers(3))],
        "seed": int(rng.integers(2**31 - 1)),
    }
    return {"objects": objects, "background": background, "text_seed": int(rng.integers(2**31 - 1))}


def _describe(obj: dict[str, Any], rng: np.random.Generator, with_size: bool) -> str:
    words = [obj["size"]] if with_size else []
    return " ".join(words + [obj["colour"], obj["shape"]])


def _article(word: str, definite: bool) -> str:
    if definite:
        return "the"
    return "an" if word[0] in "aeiou" else "a"


def _caption(objects: list[dict[str, Any]], rng: np.random.Generator) -> str:
    with_size = bool(rng.random() < 0.4)
    parts = []
    for i, obj in enumerate(objects):
        description = _describe(obj, rng, with_size)
        article = _article(description, definite=i == 0 and bool(rng.integers(2)))
        phrase = _MOTION_PHRASES[obj["motion"]][int(rng.integers(3))]
        parts.append(f"{article} {description} {phrase}")
    template = int(rng.integers(3))
    if len(parts) == 1:
        body = parts[0]
        return [body, f"{body} over a textured background", f"in this clip {body}"][template]
    joiner = _JOINERS[int(rng.integers(len(_JOINERS)))]
    body = ", ".join(parts[:-1]) + (" and " if joiner == ", " else joiner) + parts[-1]
    count = COUNT_WORDS[len(parts) - 1]
    return [body, f"{count} shapes: {body}", f"in this clip {body}"][template]


def _qa_pairs(objects: list[dict[str, Any]], rng: np.random.Generator) -> tuple[list[str], list[str], list[str]]:
    """Questions whose answer is unambiguous given the object metadata."""
    questions, answers, kinds = [], [], []

    def unique(key_fn, value) -> list[dict[str, Any]]:
        return [o for o in objects if key_fn(o) == value]

    for obj in objects:
        # colour: refer by shape + motion
        if len(unique(lambda o: (o["shape"], o["motion"]), (obj["shape"], obj["motion"]))) == 1:
            verb = _MOTION_PHRASES[obj["motion"]][0]
            # "moves left" -> "that moves left"
            questions.append(f"what colour is the {obj['shape']} that {verb}?")
            answers.append(obj["colour"])
            kinds.append("colour")
        # shape: refer by colour
        if len(unique(lambda o: o["colour"], obj["colour"])) == 1:
            questions.append(f"what shape is the {obj['colour']} object?")
            answers.append(obj["shape"])
            kinds.append("shape")
        # motion: refer by colour + shape
        if len(unique(lambda o: (o["colour"], o["shape"]), (obj["colour"], obj["shape"]))) == 1:
            questions.append(f"how does the {obj['colour']} {obj['shape']} move?")
            answers.append(obj["motion"])
            kinds.append("motion")
    questions.append(["how many objects are there?", "how many shapes are in the video?"][int(rng.integers(2))])
    answers.append(COUNT_WORDS[len(objects) - 1])
    kinds.append("count")
    # existence: half the time a present pair, otherwise an absent one
    present = {(o["colour"], o["shape"]) for o in objects}
    if rng.random() < 0.5:
        colour, shape = sorted(present)[int(rng.integers(len(present)))]
        answer = "yes"
    else:
        while True:
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            if (colour, shape) not in present:
                break
        answer = "no"
    questions.append(f"is there a {colour} {shape}?")
    answers.append(answer)
    kinds.append("exists")
    return questions, answers, kinds


def _split_rng(config: SyntheticVideoTextConfig, split: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([config.seed, SPLITS.index(split)]))


def generate_split_metadata(config: SyntheticVideoTextConfig, split: str) -> list[dict[str, Any]]:
    """
    Sample the metadata (objects, caption, QA) of every clip of one split, without rendering pixels (fast).

    Each row: `video_id`, `caption`, `questions`, `answers`, `question_types`, `objects` (list of dicts with
    `colour`, `shape`, `size`, `motion`, `x0`, `y0`, `x1`, `y1`, `r0`, `r1` in pixels), `background`,
    `num_objects`, `split`.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    rng = _split_rng(config, split)
    rows = []
    for i in range(config.split_sizes()[split]):
        clip = _sample_clip(rng, config, compositional=split == "compositional")
        text_rng = np.random.default_rng(clip.pop("text_seed"))
        questions, answers, kinds = _qa_pairs(clip["objects"], text_rng)
        rows.append(
            {
                # No split words in ids/file names (videofolder infers splits from them).
                "video_id": f"{split[:1]}{SPLITS.index(split)}-clip{i:06d}",
                "caption": _caption(clip["objects"], text_rng),
                "questions": questions,
                "answers": answers,
                "question_types": kinds,
                "objects": clip["objects"],
                "background": clip["background"],
                "num_objects": len(clip["objects"]),
                "split": split,
            }
        )
    return rows


def synthetic_text_corpus(config: SyntheticVideoTextConfig | None = None) -> list[str]:
    """All captions, questions and answers of the benchmark (for training the default tokenizer), plus every word."""
    config = config or SyntheticVideoTextConfig()
    texts: list[str] = []
    for split in SPLITS:
        for row in generate_split_metadata(config, split):
            texts.append(row["caption"])
            texts.extend(row["questions"])
    texts.append(" ".join(SYNTHETIC_ANSWERS))
    texts.extend(phrase for phrases in _MOTION_PHRASES.values() for phrase in phrases)
    return texts


# ---------------------------------------------------------------------------------------------- rendering
def _render_backgrounds(rows: list[dict[str, Any]], config: SyntheticVideoTextConfig) -> np.ndarray:
    """Textured, slowly drifting backgrounds: float32 (n, T, H, W, 3) in [0, 255]."""
    n, t_len, size = len(rows), config.num_frames, config.image_size
    params = []
    for row in rows:
        rng = np.random.default_rng(row["background"]["seed"])
        grey = rng.uniform(45, 125)
        c1 = np.clip(grey + rng.uniform(-25, 25, 3), 0, 255)
        c2 = np.clip(c1 + rng.choice([-1, 1]) * rng.uniform(25, 55) + rng.uniform(-12, 12, 3), 0, 255)
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(0, config.drift) * size / 64
        params.append((c1, c2, speed * np.cos(angle), speed * np.sin(angle), rng.uniform(0, 2 * np.pi, 3), rng))
    coords = np.arange(size, dtype=np.float32)
    frames = np.arange(t_len, dtype=np.float32)
    vx = np.array([p[2] for p in params], dtype=np.float32)
    vy = np.array([p[3] for p in params], dtype=np.float32)
    # u, v: (n, T, 1, W) and (n, T, H, 1) drifting coordinates.
    u = coords[None, None, None, :] - (vx[:, None] * frames[None, :])[:, :, None, None]
    v = coords[None, None, :, None] - (vy[:, None] * frames[None, :])[:, :, None, None]
    pattern = np.empty((n, t_len, size, size), dtype=np.float32)
    for kind in ("noise", "stripes", "checker"):
        idx = np.array([i for i, row in enumerate(rows) if row["background"]["pattern"] == kind], dtype=np.int64)
        if idx.size == 0:
            continue
        uu, vv = u[idx], v[idx]
        draws = np.stack([params[i][5].uniform(size=8) for i in idx]).astype(np.float32)  # (m, 8)
        phase = np.stack([params[i][4] for i in idx]).astype(np.float32)  # (m, 3)

        def col(j, lo, hi, draws=draws):
            return (lo + (hi - lo) * draws[:, j])[:, None, None, None]

        two_pi_over = np.float32(2 * np.pi / size)

        def ph(j, phase=phase):
            return phase[:, j][:, None, None, None]

        # sin(a + b) = sin(a)cos(b) + cos(a)sin(b) with a over (T, W) and b over (T, H): the (T, H, W) product is a
        # multiply-add, not a transcendental per pixel.
        if kind == "noise":
            acc = np.zeros((idx.size, t_len, size, size), dtype=np.float32)
            for j in range(3):
                a = col(2 * j, -3, 3) * two_pi_over * uu
                b = col(2 * j + 1, -3, 3) * two_pi_over * vv + ph(j)
                acc += np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b)
            pattern[idx] = 0.5 + acc / 6.0
        elif kind == "stripes":
            theta = col(0, 0, np.pi)
            freq = col(1, 3, 8) * two_pi_over
            a = freq * np.cos(theta) * uu
            b = freq * np.sin(theta) * vv + ph(0)
            pattern[idx] = 0.5 + 0.5 * (np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b))
        else:
            freq = col(0, 2, 5) * two_pi_over
            pattern[idx] = ((np.sin(freq * uu + ph(0)) * np.sin(freq * vv + ph(1))) > 0).astype(np.float32)
    c1 = np.stack([p[0] for p in params]).astype(np.float32)[:, None, None, None, :]
    c2 = np.stack([p[1] for p in params]).astype(np.float32)[:, None, None, None, :]
    return c1 + (c2 - c1) * pattern[..., None]


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= 0.6 * (dy + r))
    if shape == "cross":
        thin = 0.33 * r
        return ((np.abs(dx) <= thin) & (np.abs(dy) <= r)) | ((np.abs(dy) <= thin) & (np.abs(dx) <= r))
    raise ValueError(f"Unknown shape {shape!r}.")


def render_object_labels(
    rows: list[dict[str, Any]], config: SyntheticVideoTextConfig
) -> tuple[np.ndarray, np.ndarray]:
    """
    Where every object of every clip is drawn, pixel by pixel (the geometry [`render_clips`] paints).

    Returns:
        `labels`: `np.ndarray` int8 `(len(rows), num_frames, image_size, image_size)`, the index of the object (in
        `row["objects"]`, the caption's order) covering each pixel, `-1` for background; and `palette`: float32
        `(len(rows), max_objects + 1, 3)`, each object's RGB colour.
    """
    n, t_len, size = len(rows), config.num_frames, config.image_size
    alpha = np.linspace(0.0, 1.0, t_len, dtype=np.float32)[None, :, None, None]  # (1, T, 1, 1)
    grid = np.arange(size, dtype=np.float32) + 0.5
    max_objects = max((len(row["objects"]) for row in rows), default=0)
    # Paint object slot ids into a small int8 label map first (cheap), then composite colours once.
    labels = np.full((n, t_len, size, size), -1, dtype=np.int8)
    palette = np.zeros((n, max_objects + 1, 3), dtype=np.float32)
    for slot in range(max_objects):
        for shape in SHAPES:
            idx = [
                i
                for i, row in enumerate(rows)
                if len(row["objects"]) > slot and row["objects"][slot]["shape"] == shape
            ]
            if not idx:
                continue
            objs = [rows[i]["objects"][slot] for i in idx]

            def attr(name, objs=objs):
                return np.array([o[name] for o in objs], dtype=np.float32)[:, None, None, None]

            cx = attr("x0") + (attr("x1") - attr("x0")) * alpha  # (m, T, 1, 1)
            cy = attr("y0") + (attr("y1") - attr("y0")) * alpha
            r = attr("r0") + (attr("r1") - attr("r0")) * alpha
            mask = _shape_mask(shape, grid[None, None, None, :] - cx, grid[None, None, :, None] - cy, r)
            labels[idx] = np.where(mask, np.int8(slot), labels[idx])
            palette[idx, slot] = [COLOURS[o["colour"]] for o in objs]
    return labels, palette


def render_clips(rows: list[dict[str, Any]], config: SyntheticVideoTextConfig) -> np.ndarray:
    """
    Render clips from their metadata (as returned by [`generate_split_metadata`]).

    Returns:
        `np.ndarray` uint8 of shape `(len(rows), num_frames, image_size, image_size, 3)`.
    """
    background = _render_backgrounds(rows, config)
    n = len(rows)
    labels, palette = render_object_labels(rows, config)
    max_objects = palette.shape[1] - 1
    video = np.clip(np.rint(background), 0, 255).astype(np.uint8)
    if max_objects:
        drawn = labels >= 0
        clip_index = np.broadcast_to(np.arange(n)[:, None, None, None], labels.shape)
        video[drawn] = palette[clip_index[drawn], labels[drawn]].astype(np.uint8)
    return video


def _check_token_grid(
    config: SyntheticVideoTextConfig, patch_size: int, tubelet_size: int, min_coverage: float
) -> None:
    if patch_size < 1 or config.image_size % patch_size:
        raise ValueError(f"`patch_size` ({patch_size}) must divide the image size ({config.image_size}).")
    if tubelet_size < 1 or config.num_frames % tubelet_size:
        raise ValueError(f"`tubelet_size` ({tubelet_size}) must divide the number of frames ({config.num_frames}).")
    if not 0.0 < min_coverage <= 1.0:
        raise ValueError(f"`min_coverage` must be in (0, 1], got {min_coverage}.")


def object_token_masks(
    rows: list[dict[str, Any]],
    config: SyntheticVideoTextConfig,
    patch_size: int,
    tubelet_size: int = 1,
    min_coverage: float = 0.25,
) -> np.ndarray:
    """
    Which patch tokens of every frame show an object the caption names (every object of a synthetic clip is named).

    The token grid is the one a ViT with `patch_size` and `tubelet_size` lays on the clip: token `(t, i)` is the
    `patch_size x patch_size` patch `i` (row-major) of frame `t * tubelet_size` (the first frame of the tubelet, the
    frame the teacher sees). A token counts as on an object when at least `min_coverage` of its pixels are object
    pixels.

    Returns:
        `np.ndarray` bool of shape `(len(rows), num_frames // tubelet_size, (image_size // patch_size) ** 2)`.
    """
    _check_token_grid(config, patch_size, tubelet_size, min_coverage)
    labels, _ = render_object_labels(rows, config)
    covered = (labels[:, ::tubelet_size] >= 0).astype(np.float32)  # (B, T', H, W)
    b, t = covered.shape[:2]
    side = config.image_size // patch_size
    fraction = covered.reshape(b, t, side, patch_size, side, patch_size).mean(axis=(3, 5))
    return (fraction >= min_coverage).reshape(b, t, side * side)


def per_object_token_masks(
    rows: list[dict[str, Any]],
    config: SyntheticVideoTextConfig,
    patch_size: int,
    tubelet_size: int = 1,
    min_coverage: float = 0.25,
) -> np.ndarray:
    """
    [`object_token_masks`] object by object: which patch tokens of every frame show object `o` of a clip (`o` in the
    caption's order), a token counting when at least `min_coverage` of its pixels are that object's.

    Returns:
        `np.ndarray` bool of shape `(len(rows), num_frames // tubelet_size, max_objects, (image_size // patch_size) **
        2)`; the slots past a clip's last object are all `False`.
    """
    _check_token_grid(config, patch_size, tubelet_size, min_coverage)
    labels, palette = render_object_labels(rows, config)
    labels = labels[:, ::tubelet_size]  # (B, T', H, W)
    b, t = labels.shape[:2]
    side = config.image_size // patch_size
    slots = np.arange(palette.shape[1] - 1, dtype=np.int8)
    pixels = (labels[:, :, None] == slots[None, None, :, None, None]).astype(np.float32)  # (B, T', O, H, W)
    fraction = pixels.reshape(b, t, len(slots), side, patch_size, side, patch_size).mean(axis=(4, 6))
    return (fraction >= min_coverage).reshape(b, t, len(slots), side * side)


def kept_object_coverage(bool_masked_pos: np.ndarray, object_tokens: np.ndarray) -> dict[str, float]:
    """
    How well a mask keeps every object visible: the property cluster-wise masking is designed for.

    Args:
        bool_masked_pos: `(B, T, N)` bool, `True` = dropped (the model's convention).
        object_tokens: `(B, T, O, N)` bool from [`per_object_token_masks`].

    Returns:
        `object_frames_kept`: fraction of the (clip, frame, object) triples, among those where the object has at
        least one token, in which at least one of its tokens is kept; `clips_all_kept`: fraction of clips in which
        every object keeps a token in every frame; `object_tokens_kept`: fraction of object tokens kept (the mask's
        keep rate on objects; equal to `1 - mask_ratio` when masking ignores content); `num_object_frames`.
    """
    kept = ~np.asarray(bool_masked_pos, dtype=bool)
    objects = np.asarray(object_tokens, dtype=bool)
    if kept.shape != objects.shape[:2] + objects.shape[3:]:
        raise ValueError(
            f"bool_masked_pos {kept.shape} does not match object_tokens {objects.shape} (expected (B, T, O, N) for a "
            "(B, T, N) mask)."
        )
    present = objects.any(-1)  # (B, T, O)
    hit = (objects & kept[:, :, None, :]).any(-1)  # (B, T, O)
    clip_ok = (hit | ~present).all(axis=(1, 2))
    num = int(present.sum())
    return {
        "object_frames_kept": float(hit[present].mean()) if num else float("nan"),
        "clips_all_kept": float(clip_ok.mean()),
        "object_tokens_kept": float((objects & kept[:, :, None, :]).sum() / max(int(objects.sum()), 1)),
        "num_object_frames": num,
    }


def _iter_chunks(rows: list[dict[str, Any]], chunk_size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), chunk_size):
        yield rows[start : start + chunk_size]


# ---------------------------------------------------------------------------------------------- datasets
def _features(config: SyntheticVideoTextConfig, with_video: bool):
    from datasets import Array4D, Features, List, Value

    obj = {
        "colour": Value("string"),
        "shape": Value("string"),
        "motion": Value("string"),
        "size": Value("string"),
        "x0": Value("float32"),
        "y0": Value("float32"),
        "x1": Value("float32"),
        "y1": Value("float32"),
        "r0": Value("float32"),
        "r1": Value("float32"),
    }
    features = {
        "video_id": Value("string"),
        "caption": Value("string"),
        "questions": List(Value("string")),
        "answers": List(Value("string")),
        "question_types": List(Value("string")),
        "objects": List(obj),
        "background": {"pattern": Value("string"), "seed": Value("int64")},
        "num_objects": Value("int32"),
        "split": Value("string"),
    }
    if with_video:
        shape = (config.num_frames, config.image_size, config.image_size, 3)
        features = {"video": Array4D(shape=shape, dtype="uint8"), **features}
    return Features(features)


def generate_synthetic_benchmark(
    config: SyntheticVideoTextConfig | None = None,
    splits: tuple[str, ...] | list[str] | None = None,
    chunk_size: int = 256,
):
    """
    Generate the benchmark in memory as a `datasets.DatasetDict`.

    Columns: `video` (uint8 `(T, H, W, 3)`, formatted as numpy uint8), `video_id`, `caption`, `questions`, `answers`,
    `question_types`, `objects`, `background`, `num_objects`, `split`.

    Args:
        config ([`SyntheticVideoTextConfig`], *optional*): Settings (defaults: 8 frames of 64x64, 2000 train clips).
        splits (*optional*): Subset of `("train", "validation", "test", "compositional")`; default all.
        chunk_size (`int`, defaults to 256): Clips rendered per numpy batch (bounds temporary memory).
    """
    from datasets import Dataset, DatasetDict, concatenate_datasets

    config = config or SyntheticVideoTextConfig()
    splits = tuple(splits) if splits is not None else SPLITS
    features = _features(config, with_video=True)
    out = {}
    for split in splits:
        rows = generate_split_metadata(config, split)
        parts = []
        for chunk in _iter_chunks(rows, chunk_size):
            columns = {name: [row[name] for row in chunk] for name in features if name != "video"}
            columns["video"] = render_clips(chunk, config)
            parts.append(Dataset.from_dict(columns, features=features, split=split))
        dataset = (
            concatenate_datasets(parts)
            if parts
            else Dataset.from_dict({name: [] for name in features}, features=features, split=split)
        )
        dataset.set_format("numpy", columns=["video"], output_all_columns=True, dtype=np.uint8)
        out[split] = dataset
    return DatasetDict(out)


def write_video_pyav(
    path: str | os.PathLike, frames: np.ndarray, fps: int = 8, codec: str = "libx264", crf: int = 12
) -> None:
    """
    Encode `(T, H, W, 3)` uint8 frames into a video file with PyAV (yuv420p, so H and W must be even for h264).

    Args:
        path: Output file (the container follows the extension, e.g. `.mp4`).
        frames (`np.ndarray`): uint8 RGB frames.
        fps (`int`, defaults to 8): Frame rate.
        codec (`str`, defaults to `"libx264"`): Any encoder in the PyAV wheel (`libx264`, `mpeg4`, ...).
        crf (`int`, defaults to 12): Quality for x264 (lower is better; small clips need high quality so that
            small objects keep their colour).
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"`frames` must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}.")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"yuv420p encoding needs even frame sizes, got {frames.shape[1]}x{frames.shape[2]}.")
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec in ("libx264", "h264"):
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        else:
            stream.bit_rate = 4_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def export_synthetic_benchmark(
    config: SyntheticVideoTextConfig | None,
    output_dir: str | os.PathLike,
    splits: tuple[str, ...] | list[str] | None = None,
    codec: str = "libx264",
    chunk_size: int = 128,
) -> dict[str, str]:
    """
    Write the benchmark as real mp4 files plus one `metadata.jsonl` per split directory.

    Layout: `output_dir/{train,validation,test,compositional}/{video_id}.mp4` and `.../metadata.jsonl` with the
    videofolder column `file_name` (relative to the split directory), `caption`, `questions`, `answers`,
    `question_types`, `objects`, `num_objects`, `video_id`. File names contain no split words. A
    `benchmark_config.json` records the settings. Load with `load_dataset("json", data_files=.../metadata.jsonl)`,
    `load_dataset("videofolder", data_dir=output_dir)` (splits train/validation/test; the compositional split with
    `data_dir=output_dir/compositional`), or [`clusterstm.data.load_video_text_dataset`].

    Returns:
        `dict[str, str]`: split name -> path of its `metadata.jsonl`.
    """
    config = config or SyntheticVideoTextConfig()
    splits = tuple(splits) if splits is not None else SPLITS
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    written = {}
    for split in splits:
        split_dir = os.path.join(output_dir, split)
        os.makedirs(split_dir, exist_ok=True)
        rows = generate_split_metadata(config, split)
        metadata_path = os.path.join(split_dir, "metadata.jsonl")
        with open(metadata_path + ".tmp", "w", encoding="utf-8") as handle:
            for chunk in _iter_chunks(rows, chunk_size):
                videos = render_clips(chunk, config)
                for row, video in zip(chunk, videos):
                    file_name = f"{row['video_id']}.mp4"
                    write_video_pyav(os.path.join(split_dir, file_name), video, fps=config.fps, codec=codec)
                    record = {"file_name": file_name, **{k: v for k, v in row.items() if k != "background"}}
                    handle.write(json.dumps(record) + "\n")
        os.replace(metadata_path + ".tmp", metadata_path)
        written[split] = metadata_path
    with open(os.path.join(output_dir, "benchmark_config.json"), "w", encoding="utf-8") as handle:
        json.dump({**config.to_dict(), "answers": SYNTHETIC_ANSWERS}, handle, indent=2)
    return written


__all__ = [
    "COLOURS",
    "MOTIONS",
    "SHAPES",
    "SPLITS",
    "SYNTHETIC_ANSWERS",
    "SyntheticVideoTextConfig",
    "export_synthetic_benchmark",
    "generate_split_metadata",
    "generate_synthetic_benchmark",
    "get_synthetic_answers",
    "kept_object_coverage",
    "object_token_masks",
    "per_object_token_masks",
    "render_clips",
    "synthetic_text_corpus",
    "write_video_pyav",
]
