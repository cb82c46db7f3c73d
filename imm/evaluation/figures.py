"""Figures for 2-D point clouds and image samples, as matplotlib Figures.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot: nothing is
registered with a GUI backend or kept alive globally (no leaks in long training runs), and
saving to PNG always renders with Agg, whatever backend the process has selected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
from matplotlib.figure import Figure

from imm.diskspace import replacing
from imm.evaluation.fid import to_uint8

# The held-out points are drawn over the samples, smaller and in a contrasting colour: under thousands of
# samples a grey layer beneath them vanished exactly where the samples cover the data.
_DATA_STYLE = {"s": 0.6, "c": "tab:orange", "linewidths": 0, "rasterized": True, "zorder": 2}
_SAMPLE_STYLE = {"s": 1.5, "c": "tab:blue", "alpha": 0.5, "linewidths": 0, "rasterized": True, "zorder": 1}
# Sample outliers (e.g. from a diverging sampler) may not stretch the axes beyond this many
# data half-widths around the data centre; they are counted in the panel instead.
_MAX_ZOOM_OUT = 2.0


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Writes ``fig`` as PNG, creating the parent directory; a full disk leaves any earlier file at ``path``
    (DiskFullError)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")


def _points(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"expected 2-D points of shape [N, 2], got {x.shape}")
    return x


def _square_limits(data: np.ndarray | None, samples: list[np.ndarray]) -> tuple[float, float, float]:
    """Square box (cx, cy, half-width) covering data and samples, with a small margin."""
    clouds = [c for c in [data, *samples] if c is not None and len(c)]
    finite = np.concatenate([c[np.isfinite(c).all(axis=1)] for c in clouds])
    if len(finite) == 0:
        return 0.0, 0.0, 1.0
    lo, hi = finite.min(axis=0), finite.max(axis=0)
    center = (lo + hi) / 2
    half = max((hi - lo).max() / 2, 1e-6)
    if data is not None and len(data):
        d_lo, d_hi = data.min(axis=0), data.max(axis=0)
        d_half = max((d_hi - d_lo).max() / 2, 1e-6)
        if half > _MAX_ZOOM_OUT * d_half:
            center, half = (d_lo + d_hi) / 2, _MAX_ZOOM_OUT * d_half
    return float(center[0]), float(center[1]), 1.05 * half


def _draw_points(ax, samples: np.ndarray, data: np.ndarray | None, limits) -> None:
    cx, cy, half = limits
    ax.scatter(samples[:, 0], samples[:, 1], label=f"samples ({len(samples)})", **_SAMPLE_STYLE)
    if data is not None:
        ax.scatter(data[:, 0], data[:, 1], label=f"held-out ({len(data)})", **_DATA_STYLE)
    ax.set_xlim(cx - half, cx + half)
    ax.set_ylim(cy - half, cy + half)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    outside = ~((np.abs(samples[:, 0] - cx) <= half) & (np.abs(samples[:, 1] - cy) <= half))
    if outside.any():
        ax.text(
            0.98,
            0.02,
            f"{int(outside.sum())} outside",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="tab:red",
        )


def scatter(samples, data=None, title: str | None = None, size: float = 4.0) -> Figure:
    """2-D samples (blue) with the data drawn over them (small orange dots), on fixed square axes covering both."""
    samples = _points(samples)
    data = _points(data) if data is not None else None
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    _draw_points(ax, samples, data, _square_limits(data, [samples]))
    if data is not None:
        ax.legend(loc="upper right", fontsize=7, markerscale=6, framealpha=0.8)
    if title:
        ax.set_title(title)
    return fig


def _steps_label(steps: int) -> str:
    return f"{steps} step" if steps == 1 else f"{steps} steps"


def _format_metrics(metrics) -> str:
    if isinstance(metrics, str):
        return metrics
    return "\n".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def step_comparison_points(
    samples_by_steps: Mapping[int, object],
    data,
    metrics_by_steps: Mapping[int, Mapping[str, float] | str] | None = None,
    panel_size: float = 3.0,
) -> Figure:
    """One panel per step count (ascending) with the data underneath, all on the same axes.

    ``metrics_by_steps`` optionally adds text per panel, e.g. {1: {"recall": 0.71}}.
    """
    if not samples_by_steps:
        raise ValueError("samples_by_steps is empty")
    steps = sorted(samples_by_steps)
    clouds = {s: _points(samples_by_steps[s]) for s in steps}
    data = _points(data)
    limits = _square_limits(data, list(clouds.values()))
    fig = Figure(figsize=(panel_size * len(steps), panel_size + 0.4))
    axes = fig.subplots(1, len(steps), squeeze=False)[0]
    for ax, s in zip(axes, steps):
        _draw_points(ax, clouds[s], data, limits)
        ax.set_title(_steps_label(s))
        if metrics_by_steps and s in metrics_by_steps:
            ax.text(
                0.02,
                0.98,
                _format_metrics(metrics_by_steps[s]),
                transform=ax.transAxes,
                ha="left",
                va="top",
                fontsize=7,
                family="monospace",
            )
    fig.tight_layout()
    return fig


def image_grid(images, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tiles images [N, C, H, W] in [-1, 1] (C = 1 or 3) into a uint8 array [H', W', 3].

    ``nrow`` images per row (as in torchvision's make_grid); gaps and unused cells are black.
    """
    images = torch.as_tensor(images).detach().cpu()
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
    images = to_uint8(images)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    cols = max(1, min(nrow, n))
    rows = -(-n // cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), dtype=np.uint8)
    hwc = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[top : top + h, left : left + w] = hwc[i]
    return grid


def step_comparison_images(
    images_by_steps: Mapping[int, object],
    max_images: int = 8,
    cell_inches: float = 1.0,
) -> Figure:
    """One row per step count (ascending), labelled "1 step", "2 steps", ...

    Pass samples decoded from the same noise so columns are comparable across rows.
    """
    if not images_by_steps:
        raise ValueError("images_by_steps is empty")
    steps = sorted(images_by_steps)
    rows = [image_grid(torch.as_tensor(images_by_steps[s])[:max_images], nrow=max_images) for s in steps]
    height, width = rows[0].shape[:2]
    aspect = width / height
    fig = Figure(figsize=(cell_inches * aspect * 1.0 + 0.8, cell_inches * len(steps)))
    axes = fig.subplots(len(steps), 1, squeeze=False)[:, 0]
    for ax, s, row in zip(axes, steps, rows):
        ax.imshow(row, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(_steps_label(s), rotation=0, ha="right", va="center")
    fig.subplots_adjust(left=0.8 / fig.get_figwidth(), right=1, top=1, bottom=0, hspace=0.05)
    return fig
