"""`clusterstm visualize` end to end on a tiny teacher, and the figure helpers on hand-made inputs."""

import numpy as np
import pytest
from pretrain_helpers import make_tiny_teacher

from clusterstm.visualize import plot_kept_tokens, plot_relevance_heatmaps, visualize_video


@pytest.fixture(scope="module")
def clip_and_teacher(tmp_path_factory):
    from clusterstm.data.synthetic import SyntheticVideoTextConfig, export_synthetic_benchmark, generate_split_metadata

    root = tmp_path_factory.mktemp("visualize")
    config = SyntheticVideoTextConfig(
        num_frames=4, image_size=32, num_train=1, num_val=1, num_test=1, num_compositional=1, seed=0
    )
    export_synthetic_benchmark(config, root / "clips", splits=["test"])
    video = next((root / "clips" / "test").glob("*.mp4"))
    caption = generate_split_metadata(config, "test")[0]["caption"]
    return video, caption, make_tiny_teacher(root / "teacher", image_size=32)


def test_visualize_video_writes_the_three_figures(clip_and_teacher, tmp_path):
    video, caption, teacher = clip_and_teacher
    paths = visualize_video(teacher, video, caption, output_dir=tmp_path, num_frames=4, mask_ratio=0.75)
    assert [p.name for p in paths] == ["relevance.png", "clusters.png", "kept_tokens.png"]
    for path in paths:
        assert path.stat().st_size > 1000, path


def test_visualize_checks_its_inputs_before_loading_the_teacher(clip_and_teacher, tmp_path, monkeypatch):
    import clusterstm.visualize as visualize

    video, caption, teacher = clip_and_teacher
    # Input errors must come before the (slow) teacher load: any load attempt fails this test.
    monkeypatch.setattr(visualize, "resolve_teacher_path", lambda *a: pytest.fail("teacher loaded before checks"))
    with pytest.raises(ValueError, match="caption is empty"):
        visualize_video(teacher, video, "  ", output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        visualize_video(teacher, tmp_path / "missing.mp4", caption, output_dir=tmp_path)


def test_relevance_figure_has_a_colour_bar_per_heatmap_row(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    frames = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    relevance = {1: np.linspace(-0.1, 0.2, 2 * 4 * 4).reshape(2, 4, 4), 3: np.zeros((2, 4, 4)) + 0.05}
    plot_relevance_heatmaps(frames, relevance, "a red square", tmp_path / "r.png")
    (fig,) = saved
    colour_bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colour_bars) == 2
    assert all("cosine" in ax.get_ylabel() for ax in colour_bars)
    row_labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel() and ax.get_label() != "<colorbar>"]
    assert row_labels == ["input", "relevance,\n1x1 window", "relevance,\n3x3 window"]


def test_kept_tokens_figure_marks_exactly_the_kept_tokens(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    frames = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    cluster = np.ones((2, 4, 4), dtype=bool)
    cluster[:, 0, 0] = cluster[:, 3, 3] = False  # 2 kept per frame
    random = np.ones((2, 4, 4), dtype=bool)
    random[:, 1, 2] = random[:, 2, 1] = False
    plot_kept_tokens(frames, {"cluster-wise": cluster, "random": random}, tmp_path / "k.png")
    (fig,) = saved
    marked = [len(collection.get_offsets()) for ax in fig.axes for collection in ax.collections]
    assert marked == [2, 2, 2, 2]
    assert "2 kept" in fig.axes[2].get_ylabel()  # first frame of the cluster-wise row
