"""PNG overlays of image, label and prediction for one slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_overlay(image: np.ndarray, label: np.ndarray, pred: np.ndarray, path: str | Path,
                 title: str = "") -> Path:
    """Save a three-panel PNG (image | label | prediction) of the slice with most foreground.

    Args:
        image: 3D (or 2D) image array.
        label: label array, same shape.
        pred: prediction array, same shape.
        path: output PNG path.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if image.ndim == 3:
        k = int(np.argmax((label > 0).sum(axis=(0, 1)))) if label.any() else image.shape[2] // 2
        image, label, pred = image[..., k], label[..., k], pred[..., k]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    vmax = max(int(label.max()), int(pred.max()), 1)
    for ax, overlay, name in zip(axes, (None, label, pred), ("image", "label", "prediction")):
        ax.imshow(image.T, cmap="gray", origin="lower")
        if overlay is not None:
            ax.imshow(np.ma.masked_equal(overlay.T, 0), cmap="jet", alpha=0.45, vmin=0, vmax=vmax,
                      origin="lower", interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
