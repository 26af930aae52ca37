"""A picture of a prediction: three orthogonal planes through the structure, labels as coloured contours.

``python -m medimg.infer ... --preview seg.png`` writes it (TotalSegmentator users know this as
``--preview``). The planes are drawn in the patient frame whatever the file's voxel order:
sagittal, coronal and axial, in radiological convention (the patient's right on the picture's
left, marked R / L), each with its physical aspect ratio, through the centre of the predicted
structure. Each label is a filled contour in its own colour (:data:`PALETTE`), named in a legend
from the bundle's label names. Prompts (boxes and clicks, in the file's voxel indices) are drawn
projected onto each plane.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medimg.errors import atomic_output

# label value n is drawn in PALETTE[(n - 1) % len(PALETTE)] (RGB, 0-255): saturated, far from grey
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128))
PANEL_PX = 400      # each plane's square panel, pixels
LEGEND_PX = 60      # the legend strip below the panels
DPI = 100


def label_colour(value: int) -> tuple[int, int, int]:
    """The RGB colour label ``value`` (>= 1) is drawn in."""
    return PALETTE[(int(value) - 1) % len(PALETTE)]


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``array`` in RAS voxel order, its voxel sizes, and the map of stored indices to RAS indices.

    Returns:
        ``(array, zooms, ornt)`` with ``ornt`` nibabel's orientation transform (axis, flip) rows.
    """
    import nibabel as nib

    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt("RAS"))
    out = nib.orientations.apply_orientation(array, ornt)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return np.ascontiguousarray(out), zooms[np.argsort(ornt[:, 0])], ornt


def _to_canonical(points: np.ndarray, shape: tuple[int, ...], ornt: np.ndarray) -> np.ndarray:
    """Voxel indices of the stored file -> indices of the RAS-ordered array."""
    out = np.zeros_like(points, dtype=np.float64)
    for axis, (new_axis, flip) in enumerate(ornt):
        coord = points[:, axis].astype(np.float64)
        out[:, int(new_axis)] = (shape[axis] - 1 - coord) if flip < 0 else coord
    return out


def _window(array: np.ndarray) -> tuple[float, float]:
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


# (name, the RAS axis held fixed, horizontal axis, vertical axis, reverse the horizontal for radiological view)
PLANES = (("sagittal", 0, 1, 2, False), ("coronal", 1, 0, 2, True), ("axial", 2, 0, 1, True))


def _draw_plane(ax: Any, image: np.ndarray, labels: np.ndarray, zooms: np.ndarray, plane: tuple, centre: np.ndarray,
                values: list[int], window: tuple[float, float], prompts: dict[str, np.ndarray] | None) -> None:
    name, fixed, h, v, flip_h = plane
    k = int(np.clip(round(centre[fixed]), 0, image.shape[fixed] - 1))
    img2d = np.take(image, k, axis=fixed)
    lab2d = np.take(labels, k, axis=fixed)
    img2d, lab2d = img2d.T, lab2d.T  # np.take keeps (h, v) in order (h < v): rows become the vertical axis
    width, height = image.shape[h] * zooms[h], image.shape[v] * zooms[v]
    extent = (0.0, width, 0.0, height)
    ax.imshow(img2d, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", extent=extent,
              interpolation="bilinear")
    xs = (np.arange(image.shape[h]) + 0.5) * zooms[h]
    ys = (np.arange(image.shape[v]) + 0.5) * zooms[v]
    for value in values:
        mask = (lab2d == value).astype(np.float32)
        if not mask.any():
            continue
        colour = np.asarray(label_colour(value)) / 255.0
        ax.contourf(xs, ys, mask, levels=[0.5, 1.5], colors=[(*colour, 0.45)], antialiased=False)
        ax.contour(xs, ys, mask, levels=[0.5], colors=[colour], linewidths=1.2)
    if prompts is not None:
        for box in prompts["boxes"]:
            lo, hi = box[: len(box) // 2], box[len(box) // 2:]
            x0, x1 = lo[h] * zooms[h], (hi[h] + 1) * zooms[h]
            y0, y1 = lo[v] * zooms[v], (hi[v] + 1) * zooms[v]
            ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color="#00ff00", linewidth=1.5)
        for point, positive in zip(prompts["points"], prompts["point_labels"]):
            ax.plot((point[h] + 0.5) * zooms[h], (point[v] + 0.5) * zooms[v], marker="*" if positive else "X",
                    markersize=12, color="#00ff00" if positive else "#ff00ff", markeredgecolor="black")
    ax.set_xlim((width, 0.0) if flip_h else (0.0, width))  # radiological: the patient's right (high x) on the left
    ax.set_ylim(0.0, height)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("black")
    ax.text(0.5, 0.98, f"{name} {k}", transform=ax.transAxes, color="white", fontsize=10, ha="center", va="top")
    if flip_h:
        ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="yellow", fontsize=11, va="center")
        ax.text(0.95, 0.5, "L", transform=ax.transAxes, color="yellow", fontsize=11, va="center")


def write_preview(image: np.ndarray, affine: np.ndarray, labels: np.ndarray, names: Mapping[int, str],
                  out: str | Path, prompts: Any = None) -> Path:
    """Write the preview PNG of a prediction.

    Args:
        image: the input's voxels, in the file's own index order (2D or 3D).
        affine: its voxel-to-RAS+ matrix (4x4; a 2D image uses the top-left block).
        labels: the prediction, same shape as ``image``; 0 is background.
        names: label value -> name for the legend (values missing here are named ``label N``).
        out: the PNG to write (atomically).
        prompts: :class:`medimg.io.prompts.Prompts` in the file's voxel indices, drawn if given.

    Returns:
        ``out``. The picture is ``3 * PANEL_PX`` wide (one panel for 2D images) and
        ``PANEL_PX + LEGEND_PX`` high.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    image = np.asarray(image, dtype=np.float32)
    labels = np.asarray(labels)
    if image.ndim == 3 and image.shape[2] == 1:  # a one-slice file is a 2D picture
        image, labels = image[..., 0], labels[..., 0]
    two_d = image.ndim == 2
    if two_d:
        aff = np.eye(4)
        aff[:2, :2], aff[:2, 3] = np.asarray(affine)[:2, :2], np.asarray(affine)[:2, 3]
        image, labels = image[..., None], labels[..., None]
    else:
        aff = np.asarray(affine)
    can_image, zooms, ornt = _canonical(image, aff)
    can_labels, _, _ = _canonical(labels, aff)
    values = sorted(int(v) for v in np.unique(can_labels) if v > 0)
    drawn = None
    if prompts is not None:
        nd = image.ndim if not two_d else 2
        pts = np.asarray(prompts.points, dtype=np.float64).reshape(-1, nd)
        boxes = np.asarray(prompts.boxes, dtype=np.float64).reshape(-1, 2 * nd)
        if two_d:
            pts = np.c_[pts, np.zeros(len(pts))]
            boxes = np.c_[boxes[:, :2], np.zeros(len(boxes)), boxes[:, 2:], np.zeros(len(boxes))]
        lo = _to_canonical(boxes[:, :3], image.shape, ornt)
        hi = _to_canonical(boxes[:, 3:], image.shape, ornt)
        drawn = {"points": _to_canonical(pts, image.shape, ornt),
                 "point_labels": np.asarray(prompts.point_labels).reshape(-1),
                 "boxes": np.c_[np.minimum(lo, hi), np.maximum(lo, hi)]}
    fg = np.argwhere(can_labels > 0)
    if len(fg):
        centre = fg.mean(axis=0)
    elif drawn is not None and len(drawn["points"]):
        centre = drawn["points"].mean(axis=0)
    else:
        centre = (np.asarray(can_image.shape) - 1) / 2.0
    planes = [PLANES[2]] if two_d else list(PLANES)
    width_px = PANEL_PX * len(planes)
    fig = plt.figure(figsize=(width_px / DPI, (PANEL_PX + LEGEND_PX) / DPI), dpi=DPI, facecolor="black")
    frac = LEGEND_PX / (PANEL_PX + LEGEND_PX)
    window = _window(can_image)
    for i, plane in enumerate(planes):
        ax = fig.add_axes((i / len(planes), frac, 1.0 / len(planes), 1.0 - frac))
        _draw_plane(ax, can_image, can_labels, zooms, plane, centre, values, window, drawn)
    handles = [Patch(facecolor=np.asarray(label_colour(v)) / 255.0, label=str(names.get(v, f"label {v}")))
               for v in values] or [Patch(facecolor="black", edgecolor="white", label="nothing predicted")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False, fontsize=10,
               labelcolor="white", bbox_to_anchor=(0.5, 0.0))
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=DPI, facecolor="black", format="png")
    plt.close(fig)
    return Path(out)
