"""Simulated users for interactive evaluation, through the prompts-JSON path ``medimg.infer`` runs.

For a target (one connected piece of a structure on one slice, in a predictor's working frame) a
user's prompts are simulated deterministically:

- ``box``: its tight box; ``click1``: one click at its most interior pixel; ``click3`` /
  ``click5``: then correction clicks, each at the most interior pixel of the largest error region
  (positive in a miss, negative in a false positive), every request carrying all clicks so far
  in the order made (the 2D predictor replays them, each with the previous mask fed back, as a
  live session does);
- ``scribble``: one positive stroke along the target's main axis through its most interior pixel;
- ``lasso``: its convex hull, one pixel out, as a closed contour.

Each prompt becomes a prompts-JSON document in the volume's stored voxel indices, run through
``predictor.segment_prompts`` on one slice without propagation; Dice is taken on that slice.
``benchmarks/interactive.py`` reports these figures and the suite checks the shipped cards with them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from medimg.data.promptable.simulation import largest_component
from medimg.io.image import Image, read_image
from medimg.io.prompts import parse_prompts

PROMPTS = ("box", "click1", "click3", "click5", "scribble", "lasso")
COMPACT_SOLIDITY = 0.9  # a compact target fills at least this share of its convex hull


def solidity(mask: np.ndarray) -> float:
    """A 2D mask's area over its convex hull's: about 1 for a disc or an ellipse, less for a C, a ring or a bend."""
    from skimage.morphology import convex_hull_image

    return float(mask.sum() / max(int(convex_hull_image(mask).sum()), 1))


def interior(mask: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """The most interior pixel (voxel) of a 2D or 3D mask: largest distance (in ``spacing``) to its edge."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[tuple(slice(1, -1) for _ in mask.shape)]
    return np.asarray(np.unravel_index(np.argmax(dist), mask.shape), dtype=np.float64)


def correction(truth: np.ndarray, pred: np.ndarray,
               spacing: Sequence[float] | None = None) -> tuple[np.ndarray, int] | None:
    """The next correction click: the most interior point of the largest error region, and its label.

    A miss (truth not predicted) gets a positive click, a false positive a negative one, whichever
    error is larger; ``None`` when there is no error.
    """
    miss, extra = truth & ~pred, pred & ~truth
    err, lab = (miss, 1) if miss.sum() >= extra.sum() else (extra, 0)
    if not err.any():
        return None
    return interior(largest_component(err), spacing), lab


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (0 when both are empty)."""
    return float(2 * (pred & truth).sum() / max(int(pred.sum() + truth.sum()), 1))


def stroke(mask: np.ndarray) -> np.ndarray:
    """A scribble: along the mask's main axis through its most interior pixel, kept inside, 80% of the run."""
    c = interior(mask)
    coords = np.argwhere(mask).astype(np.float64)
    direction = np.linalg.svd(coords - coords.mean(0), full_matrices=False)[2][0]
    ends = []
    for sign in (1.0, -1.0):
        t = 0.0
        while True:
            p = np.round(c + sign * (t + 1) * direction).astype(int)
            if (p < 0).any() or (p >= mask.shape).any() or not mask[tuple(p)]:
                break
            t += 1
        ends.append(c + sign * 0.8 * t * direction)
    return np.array([ends[0], c, ends[1]])


def hull(mask: np.ndarray) -> np.ndarray:
    """A lasso: the convex hull of the mask grown by one pixel, as ordered vertices."""
    pts = np.argwhere(ndimage.binary_dilation(mask)).astype(np.float64)
    try:
        return pts[ConvexHull(pts).vertices]
    except Exception:  # noqa: BLE001 - a flat piece: its bounding rectangle
        lo, hi = pts.min(0), pts.max(0)
        return np.array([lo, [lo[0], hi[1]], hi, [hi[0], lo[1]]])


def targets(label: np.ndarray, values: dict[str, tuple[int, ...]], per: int,
            min_area: int) -> Iterator[tuple[str, int, np.ndarray]]:
    """``(name, k, mask)``: the largest piece on ``per`` evenly spaced slices of each structure (working frame)."""
    for name, vals in values.items():
        structure = np.isin(label, vals)
        area = structure.sum(axis=(0, 1))
        ks = np.nonzero(area >= min_area)[0]
        for k in ks[np.linspace(0, len(ks) - 1, per).round().astype(int)] if len(ks) else []:
            piece = largest_component(structure[:, :, k])
            if piece.any() and piece.sum() >= min_area:
                yield name, int(k), piece


class Scorer:
    """Runs prompts-JSON documents on one slice of a volume through a predictor and scores them."""

    def __init__(self, predictor: object, image: Image, intensity: str, prompts: tuple[str, ...] = PROMPTS) -> None:
        self.predictor, self.image, self.intensity, self.prompts = predictor, image, intensity, prompts
        self.masks: list[np.ndarray] = []  # every predicted slice mask, in order (to compare two predictors)
        predictor.prepare(image, intensity)
        self.frame = predictor.frame

    def stored(self, pts2d: np.ndarray, k: int) -> list[list[float]]:
        """Working-frame ``(i, j)`` points on slice ``k`` -> stored voxel indices."""
        work = np.column_stack([pts2d, np.full(len(pts2d), k)])
        return self.frame.points_from_working(work).tolist()

    def run(self, doc: dict, k: int) -> np.ndarray:
        """One prompts document on slice ``k``: the predicted slice mask (working frame)."""
        doc = {"space": "voxel", "propagate": False, **doc}
        prompts = parse_prompts(doc, self.image.array.shape, self.image.affine)
        labels = self.predictor.segment_prompts(self.image, prompts, self.intensity)
        self.masks.append(self.frame.to_working(labels == 1)[:, :, k])
        return self.masks[-1]

    def score(self, truth: np.ndarray, k: int) -> dict[str, float]:
        """Dice of each simulated prompt kind (``self.prompts``) for the target ``truth`` on slice ``k``."""
        out: dict[str, float] = {}
        if "box" in self.prompts:
            corners = np.array([np.argwhere(truth).min(0), np.argwhere(truth).max(0)], dtype=np.float64)
            box = np.asarray(self.stored(corners, k))
            out["box"] = dice(self.run({"boxes": [[*box.min(0), *box.max(0)]]}, k), truth)
        clicks_wanted = max((int(p[5:]) for p in self.prompts if p.startswith("click")), default=0)
        clicks, labels = [interior(truth)], [1]
        for n in range(1, clicks_wanted + 1):
            pred = self.run({"points": self.stored(np.array(clicks), k), "point_labels": labels}, k)
            if f"click{n}" in self.prompts:
                out[f"click{n}"] = dice(pred, truth)
            if n == clicks_wanted:
                break
            nxt = correction(truth, pred)
            if nxt is None:
                for rest in range(n + 1, clicks_wanted + 1):
                    if f"click{rest}" in self.prompts:
                        out[f"click{rest}"] = dice(pred, truth)
                break
            clicks.append(nxt[0])
            labels.append(nxt[1])
        if "scribble" in self.prompts:
            doc = {"scribbles": [{"points": self.stored(stroke(truth), k), "label": 1}]}
            out["scribble"] = dice(self.run(doc, k), truth)
        if "lasso" in self.prompts:
            out["lasso"] = dice(self.run({"lassos": [self.stored(hull(truth), k)]}, k), truth)
        return out


def named_structures(label: np.ndarray, names: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """Every non-zero value of a label map as one structure, named from a manifest's ``labels``."""
    return {names.get(str(int(v)), f"label {int(v)}"): (int(v),) for v in np.unique(label) if v}


def score_case(predictor: Any, image: Image, label: np.ndarray, intensity: str, planes: Sequence[str],
               values: Mapping[str, tuple[int, ...]], per: int, min_area: int, prompts: tuple[str, ...] = PROMPTS,
               masks: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Mean Dice per prompt kind over one volume's structures (each weighted equally), in each plane.

    Args:
        predictor: a 2D promptable predictor (``for_plane`` gives its sibling on each plane).
        image: the volume as read.
        label: its label map (stored order).
        intensity: the volume's window.
        planes: the planes to slice it in.
        values: structure name -> its label values.
        per: slices per structure and plane.
        min_area: the smallest target (pixels).
        prompts: the prompt kinds to score.
        masks: if given, every predicted slice mask is appended (to compare two predictors).

    Returns:
        ``{"mean": {prompt: Dice}, "structures": {name: {prompt: Dice}}, "targets": n, "compact":
        {"targets": m, prompt: Dice}}``; ``compact`` is the mean over the targets whose
        :func:`solidity` reaches :data:`COMPACT_SOLIDITY`, each target weighted equally. With no
        compact target it holds ``targets: 0`` and a ``note`` instead of Dice values (a mean of
        nothing is not a number, and a card must stay strict JSON).
    """
    rows: dict[str, list[dict[str, float]]] = {}
    compact: list[dict[str, float]] = []
    for plane in planes:
        scorer = Scorer(predictor.for_plane(plane), image, intensity, prompts)
        for name, k, truth in targets(scorer.frame.to_working(label), values, per, min_area):
            rows.setdefault(name, []).append(scorer.score(truth, k))
            if solidity(truth) >= COMPACT_SOLIDITY:
                compact.append(rows[name][-1])
        if masks is not None:
            masks += scorer.masks
    per_structure = {n: {p: float(np.mean([r[p] for r in v])) for p in prompts} for n, v in rows.items()}
    return {"mean": {p: float(np.mean([s[p] for s in per_structure.values()])) for p in prompts},
            "structures": per_structure, "targets": sum(len(v) for v in rows.values()),
            "compact": {"targets": len(compact),
                        **({p: float(np.mean([r[p] for r in compact])) for p in prompts} if compact else
                           {"note": f"no target with solidity >= {COMPACT_SOLIDITY} in this case"})}}


def validation_case(manifest: str | Path, case: str) -> tuple[Image, np.ndarray, str, dict[str, tuple[int, ...]]]:
    """``(image, held-out label map, intensity, structures)`` of one validation entry of the ``structures`` manifest.

    ``case`` is the entry's ``subject``; the structures are every value of its label map, named from
    the manifest's ``labels``.
    """
    manifest = Path(manifest)
    doc = json.loads(manifest.read_text())
    entry = next(e for e in doc["validation"] if e["subject"] == case)
    label = read_image(manifest.parent / entry["label"]).array.astype(np.int64)
    return read_image(manifest.parent / entry["image"]), label, entry["intensity"], named_structures(label,
                                                                                                    doc["labels"])


def card_check(predictor: Any, manifest: str | Path, check: Mapping[str, Any]) -> dict[str, float]:
    """The fast figure a shipped interactive card records and the suite recomputes.

    ``check``: ``case`` (a validation entry's ``subject`` of the ``structures`` manifest), ``plane``,
    ``per_structure``, ``min_area`` and ``prompts``.
    """
    image, label, intensity, values = validation_case(manifest, check["case"])
    res = score_case(predictor, image, label, intensity, [check["plane"]], values, int(check["per_structure"]),
                     int(check["min_area"]), tuple(check["prompts"]))
    return {p: round(res["mean"][p], 4) for p in check["prompts"]}
