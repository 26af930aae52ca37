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
(``outside_<prompt>``): what a click on a real head leaks into scalp, skull and neck. Each request's
wall time and the documents sent are kept as well, so two predictors scored on the same targets
can be shown to have had the same box and first click (``benchmarks/propagation_vs_3d.py``).
``benchmarks/ship_promptable3d.py`` reports these figures for the shipped 3D bundle.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medimg.data.promptable.simulation import largest_component
from medimg.io.image import Image
from medimg.io.prompts import parse_prompts
from medimg.predictors.evaluation import correction, dice, interior, validation_case

PROMPTS_3D = ("box", "click1", "click3")
SHARED_PROMPTS = ("box", "click1")  # the kinds whose documents do not depend on a model's earlier answers


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

    Attributes:
        sent: the prompts documents of the last :meth:`score`, in order, each with its ``prompt`` kind.
        seconds: wall seconds of every request so far, by prompt kind (``click3``: the request
            carrying the third click).
    """

    def __init__(self, predictor: Any, image: Image, intensity: str, prompts: Sequence[str] = PROMPTS_3D,
                 brain: np.ndarray | None = None) -> None:
        self.predictor, self.image, self.intensity, self.prompts = predictor, image, intensity, tuple(prompts)
        self.brain = brain
        self.spacing = np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)
        self.sent: list[dict[str, Any]] = []
        self.seconds: dict[str, list[float]] = {}

    def _ask(self, kind: str, doc: dict) -> np.ndarray:
        """One timed request, remembered in :attr:`sent` and :attr:`seconds`."""
        self.sent.append({"prompt": kind, **doc})
        start = time.perf_counter()
        pred = self.run(doc)
        self.seconds.setdefault(kind, []).append(time.perf_counter() - start)
        return pred

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
        self.sent = []
        if "box" in self.prompts:
            idx = np.argwhere(truth)
            self._record(out, "box", self._ask("box", {"boxes": [[*idx.min(0).tolist(), *idx.max(0).tolist()]]}),
                         truth)
        wanted = max((int(p[5:]) for p in self.prompts if p.startswith("click")), default=0)
        clicks, labels = [interior(truth, self.spacing)], [1]
        for n in range(1, wanted + 1):
            doc = {"points": np.asarray(clicks).tolist(), "point_labels": [int(v) for v in labels]}
            pred = self._ask(f"click{n}", doc)
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
        ``{"mean": {key: value}, "structures": {name: {key: value}}, "targets": n, "seconds": {kind: s},
        "prompts": {name: [document, ...]}}``; keys are the prompt kinds (Dice) and, with ``brain``,
        ``outside_<prompt>``; ``seconds`` is the mean wall time of a request of each kind, ``prompts``
        the documents each target was sent (:attr:`VolumeScorer.sent`).
    """
    scorer = VolumeScorer(predictor, image, intensity, prompts, brain)
    rows, sent = {}, {}
    for name, piece in volume_targets(label, values, min_voxels):
        rows[name] = scorer.score(piece)
        sent[name] = scorer.sent
    keys = list(next(iter(rows.values()))) if rows else []
    return {"mean": {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}, "structures": rows,
            "targets": len(rows), "seconds": {k: float(np.mean(v)) for k, v in scorer.seconds.items()},
            "prompts": sent}


def encoder_calls(predictor: Any) -> int:
    """Image-encoder runs of a 2D slice predictor (and its siblings on other planes); 0 for a 3D one."""
    return sum(p.encoder_calls for p in predictor.family()) if hasattr(predictor, "family") else 0


def score_models(predictors: Mapping[str, Any], image: Image, label: np.ndarray, intensity: str,
                 values: Mapping[str, Sequence[int]], min_voxels: int, prompts: Sequence[str] = PROMPTS_3D,
                 brain: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """:func:`score_volume` for several predictors on the same targets, each first timed on a cold click.

    Before its scoring, each predictor gets one click (``click1``) on the first target, on a volume it
    has not prepared yet: ``cold_click_s`` is that request's wall time (a 2D slice model encodes every
    slice it visits). The results are checked by :func:`same_prompts` before they are returned.

    Returns:
        ``{model: score_volume result + cold_click_s, encoder_calls, seconds_total}``.
    """
    out = {}
    first = next(volume_targets(label, values, min_voxels), None)
    for model, predictor in predictors.items():
        start, calls = time.perf_counter(), encoder_calls(predictor)
        cold = None
        if first is not None and "click1" in prompts:
            VolumeScorer(predictor, image, intensity, ("click1",)).score(first[1])
            cold = time.perf_counter() - start
        res = score_volume(predictor, image, label, intensity, values, min_voxels, prompts, brain)
        res.update(cold_click_s=cold, encoder_calls=encoder_calls(predictor) - calls,
                   seconds_total=time.perf_counter() - start)
        out[model] = res
    same_prompts(out)
    return out


def same_prompts(results: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise unless every model was scored on the same targets and sent the same box and first click.

    Raises:
        AssertionError: naming the target and what differs.
    """
    models = list(results)
    ref = results[models[0]]
    for model in models[1:]:
        res = results[model]
        if list(res["structures"]) != list(ref["structures"]):
            raise AssertionError(f"{model} was scored on other targets than {models[0]}")
        for name, docs in res["prompts"].items():
            mine = [d for d in docs if d["prompt"] in SHARED_PROMPTS]
            theirs = [d for d in ref["prompts"][name] if d["prompt"] in SHARED_PROMPTS]
            if mine != theirs:
                raise AssertionError(f"{name}: {model} was sent {mine}, {models[0]} {theirs}")


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
