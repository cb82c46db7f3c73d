import numpy as np
import pytest
import torch
from PIL import Image

from imm.evaluation.figures import (
    image_grid,
    save_png,
    scatter,
    step_comparison_images,
    step_comparison_points,
)


def _ring(n=500, seed=0, radius=2.0):
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, n)
    return np.stack([np.cos(angle), np.sin(angle)], axis=1) * radius


def _read_png(path):
    with Image.open(path) as img:
        img.load()
        return img.format, img.size


def test_image_grid_shape_dtype_and_layout():
    images = torch.zeros(5, 3, 4, 6)
    grid = image_grid(images, nrow=3, padding=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)
    # Image 4 (0-based) sits in row 1, column 1; zero maps to mid-grey 128.
    top, left = 2 + 1 * 6, 2 + 1 * 8
    assert (grid[top : top + 4, left : left + 6] == 128).all()
    # The empty last cell and the padding stay black.
    assert (grid[top : top + 4, 2 + 2 * 8 : 2 + 2 * 8 + 6] == 0).all()
    assert (grid[:2] == 0).all()


def test_image_grid_value_mapping_and_grayscale():
    images = torch.full((2, 1, 3, 3), -1.0)
    images[1] = 1.0
    grid = image_grid(images, nrow=2, padding=0)
    assert grid.shape == (3, 6, 3)
    assert (grid[:, :3] == 0).all() and (grid[:, 3:] == 255).all()
    # Out-of-range values are clipped rather than wrapped around.
    assert image_grid(torch.full((1, 3, 2, 2), 5.0), nrow=1, padding=0).min() == 255
    with pytest.raises(ValueError, match="1 or 3"):
        image_grid(torch.zeros(2, 2, 4, 4))


def test_image_grid_accepts_numpy_and_single_row():
    grid = image_grid(np.zeros((3, 3, 8, 8), dtype=np.float32), nrow=10, padding=1)
    assert grid.shape == (8 + 2, 3 * 9 + 1, 3)


def test_scatter_saves_png(tmp_path):
    fig = scatter(_ring(seed=1, radius=1.0), data=_ring(), title="samples")
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_title() == "samples"
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x1 - x0 == pytest.approx(y1 - y0)  # square
    assert x0 < -2 and x1 > 2  # covers the data, not just the smaller samples
    path = tmp_path / "sub" / "scatter.png"
    save_png(fig, path)
    assert _read_png(path)[0] == "PNG"


def test_the_held_out_points_stay_visible_under_many_samples(tmp_path):
    """samples.png of 5000 samples over 1000 held-out points from the same ring: the held-out points show (their
    colour covers at least half the pixels it covers alone), as they did not when drawn beneath the samples."""
    from matplotlib.colors import to_rgb

    from imm.evaluation import figures

    data, samples = (
        _ring(n=1000, seed=0),
        _ring(n=5000, seed=1) * np.random.default_rng(2).uniform(0.97, 1.03, (5000, 1)),
    )
    colour = np.array(to_rgb(figures._DATA_STYLE["c"])) * 255

    def data_pixels(fig, name):
        save_png(fig, tmp_path / name)
        rgb = np.asarray(Image.open(tmp_path / name).convert("RGB"), dtype=float)
        return int((np.abs(rgb - colour).max(axis=2) < 40).sum())

    alone = data_pixels(scatter(samples[:0], data=data), "alone.png")
    assert alone > 500
    shown = data_pixels(scatter(samples, data=data), "over.png")
    assert shown >= alone / 2, (shown, alone)
    legend = [t.get_text() for t in scatter(samples, data=data).axes[0].get_legend().get_texts()]
    assert legend == ["samples (5000)", "held-out (1000)"]


def test_step_comparison_points_panels_titles_and_metrics(tmp_path):
    samples = {4: _ring(seed=4), 1: _ring(seed=1) * 0.5, 2: torch.tensor(_ring(seed=2))}
    metrics = {1: {"recall": 0.71, "energy": 0.0123}, 4: "ok"}
    fig = step_comparison_points(samples, _ring(), metrics_by_steps=metrics)
    assert [ax.get_title() for ax in fig.axes] == ["1 step", "2 steps", "4 steps"]
    assert len({ax.get_xlim() for ax in fig.axes}) == 1  # shared, fixed limits
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("recall 0.71" in t for t in texts)
    assert len(fig.axes[1].texts) == 0
    save_png(fig, tmp_path / "steps.png")
    assert _read_png(tmp_path / "steps.png")[0] == "PNG"


def test_far_outliers_do_not_flatten_the_plot():
    samples = np.concatenate([_ring(seed=3), [[1e4, 1e4], [np.nan, 0.0]]])
    fig = scatter(samples, data=_ring())
    ax = fig.axes[0]
    assert ax.get_xlim()[1] < 10
    assert any("2 outside" in t.get_text() for t in ax.texts)


def test_step_comparison_images_rows_and_labels(tmp_path):
    noise = torch.rand(6, 3, 8, 8) * 2 - 1
    images = {s: (noise / s).clamp(-1, 1) for s in (8, 1, 2, 4)}
    fig = step_comparison_images(images, max_images=4)
    assert len(fig.axes) == 4
    assert [ax.get_ylabel() for ax in fig.axes] == ["1 step", "2 steps", "4 steps", "8 steps"]
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (8 + 4, 4 * (8 + 2) + 2, 3)
    path = tmp_path / "images.png"
    save_png(fig, path)
    fmt, (width, height) = _read_png(path)
    assert fmt == "PNG" and min(width, height) > 100
