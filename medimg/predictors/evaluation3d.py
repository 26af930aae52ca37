"""Simulated users for 3D promptable models, through the prompts-JSON path ``medimg.infer`` runs.

A target is one structure's largest connected piece on the volume's stored grid. Its prompts, all
in stored voxel indices and each a prompts-JSON document run through ``predictor.segment_prompts``
(the whole volume, windows growing with the object):

- ``box``: the piece's tight 3D box;
- ``click1``: one click at its most interior voxel (largest distance to the edge, in mm);
- ``click3`` / ``click5``: then correction clicks at the most interior voxel of the largest error
  region (positive in a miss, negative in a false positive), every request carrying all clicks so
  far (the 3D network takes them together: it has no mask input).

Dice is taken on the whole volume. With a brain mask, each mask's share outside it is recorded too
(``outside_<prompt>``): what a click on a real head leaks into scalp, skull and neck.
``benchmarks/ship_promptable3d.py`` reports these figures for the shipped 3D bundle.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medimg.data.promptable.simulation import largest_component
from medimg.io.image import Image
from medimg.io.prompts import parse_prompts
from medimg.predictors.evaluation import correction, dice, interior, validation_case

PROMPTS_3D = ("box", "click1", "click3")


def volume_targets(label: np.ndarray, values: Mapping[str, Sequence[int]],
                   min_voxels: int) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, piece)``: the largest connected piece of each structure, if it has ``min_voxels``."""
    for name, vals in values.items():
        piece = largest_component(np.isin(label, list(vals)))
        if piece.any() and piece.sum() >= min_voxels:
            yield name, piece


class VolumeScorer:
    """Runs 3D prompts-JSON documents on one volume through a predictor and scores them.

    Args:
        predictor: a 3D promptable predictor (``segment_prompts``).
        image: the volume as read.
        intensity: its window.
        prompts: the prompt kinds to score (:data:`PROMPTS_3D`, or ``click5``).
        brain: optional brain mask on the stored grid (records ``outside_<prompt>``).
    """

    def __init__(self, predictor: Any, image: Image, intensity: str, prompts: Sequence[str] = PROMPTS_3D,
                 brain: np.ndarray | None = None) -> None:
        self.predictor, self.image, self.intensity, self.prompts = predictor, image, intensity, tuple(prompts)
        self.brain = brain
        self.spacing = np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)

    def run(self, doc: dict) -> np.ndarray:
        """One prompts document: the predicted mask on the stored grid."""
        prompts = parse_prompts({"space": "voxel", **doc}, self.image.array.shape, self.image.affine)
        return self.predictor.segment_prompts(self.image, prompts, self.intensity) == 1

    def _record(self, out: dict[str, float], name: str, pred: np.ndarray, truth: np.ndarray) -> None:
        out[name] = dice(pred, truth)
        if self.brain is not None:
            out[f"outside_{name}"] = float((pred & ~self.brain).sum() / max(int(pred.sum()), 1))

    def score(self, truth: np.ndarray) -> dict[str, float]:
        """Dice (and outside share) of each prompt kind for the target ``truth``."""
        out: dict[str, float] = {}
        if "box" in self.prompts:
            idx = np.argwhere(truth)
            self._record(out, "box", self.run({"boxes": [[*idx.min(0).tolist(), *idx.max(0).tolist()]]}), truth)
        wanted = max((int(p[5:]) for p in self.prompts if p.startswith("click")), default=0)
        clicks, labels = [interior(truth, self.spacing)], [1]
        for n in range(1, wanted + 1):
            pred = self.run({"points": np.asarray(clicks).tolist(), "point_labels": labels})
            nxt = correction(truth, pred, self.spacing) if n < wanted else None
            for rest in range(n, wanted + 1 if nxt is None else n + 1):
                if f"click{rest}" in self.prompts:
                    self._record(out, f"click{rest}", pred, truth)
            if nxt is None:
                break
            clicks.append(nxt[0])
            labels.append(nxt[1])
        return out


def score_volume(predictor: Any, image: Image, label: np.ndarray, intensity: str,
                 values: Mapping[str, Sequence[int]], min_voxels: int, prompts: Sequence[str] = PROMPTS_3D,
                 brain: np.ndarray | None = None) -> dict[str, Any]:
    """Mean figures per prompt kind over one volume's structures (each weighted equally).

    Returns:
        ``{"mean": {key: value}, "structures": {name: {key: value}}, "targets": n}``; keys are the
        prompt kinds (Dice) and, with ``brain``, ``outside_<prompt>``.
    """
    scorer = VolumeScorer(predictor, image, intensity, prompts, brain)
    rows = {name: scorer.score(piece) for name, piece in volume_targets(label, values, min_voxels)}
    keys = list(next(iter(rows.values()))) if rows else []
    return {"mean": {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}, "structures": rows,
            "targets": len(rows)}


def card_check3d(predictor: Any, manifest: str | Path, check: Mapping[str, Any]) -> dict[str, float]:
    """The fast figure a shipped 3D interactive card records and the suite recomputes.

    ``check``: ``case`` (a validation entry's ``subject`` of the ``structures`` manifest),
    ``structures`` (label values of its held-out map), ``min_voxels`` and ``prompts``.
    """
    image, label, intensity, names = validation_case(manifest, check["case"])
    wanted = {int(v) for v in check["structures"]}
    values = {name: vals for name, vals in names.items() if wanted & set(vals)}
    res = score_volume(predictor, image, label, intensity, values, int(check["min_voxels"]), tuple(check["prompts"]))
    return {p: round(res["mean"][p], 4) for p in check["prompts"]}
