"""medimg bundles as MONAI Label infer tasks.

Each task implements ``InferTask.__call__`` itself (as MONAI Label's SAM2 task does) and runs the
bundle's own predictor (:func:`medimg.load_bundle`), so the server returns exactly what the bundle
validated. ``request["image"]`` is a local file or a DICOM series folder; the returned label has
that image's exact shape and geometry (:mod:`medimg.label.results`).

Prompts follow 3D Slicer's MONAI Label client (:mod:`medimg.label.prompts`). ``"propagate":
false`` keeps the answer on the slice the user is on (``slice``, else the first foreground
click's, else the ROI's middle ``k``). A 2D model's clicks are segmented on the one slice they lie
on, whichever of the file's axes it crosses.

Models load on the first request, not at app start (MONAI Label re-creates the app in every train
subprocess), and reload when the bundle's weights change (:mod:`medimg.label.publish`). One lock
per task serialises its requests; other models and other endpoints are not blocked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from medimg.bundle.loader import bundle_task, load_bundle, segment_names
from medimg.bundles import held_out_3d
from medimg.data.slicing import axis_plane
from medimg.errors import MedimgError
from medimg.io.image import Image, read_image
from medimg.io.jsonfile import loads_finite
from medimg.label.prompts import clicks_plane, request_prompts, request_propagate, viewed_plane, viewed_slice
from medimg.label.publish import bundle_version, load_locked
from medimg.label.results import write_result
from medimg.predictors.embedding_cache import DEFAULT_CACHE_MB, EmbeddingCache
from medimg.predictors.prompting import prompt_shape

log = logging.getLogger(__name__)


def bundle_meta(bundle: Path) -> dict[str, Any]:
    """A bundle's ``configs/metadata.json`` (an older writer's ``NaN`` metric read as ``None``)."""
    return loads_finite((Path(bundle) / "configs" / "metadata.json").read_text())


def bundle_labels(meta: dict[str, Any], background: bool = False) -> dict[str, int]:
    """``{name: value}`` of a bundle's labels (its metadata's ``labels``), by value, background optional."""
    labels = sorted(((str(k), int(v)) for k, v in meta.get("labels", {}).items()), key=lambda kv: kv[1])
    return {k: v for k, v in labels if background or v > 0}


def described(bundle: Path, kind: str, prompts: str) -> str:
    """An interactive model's description for the clients, with its card's held-out 3D figures when it has them."""
    figures = held_out_3d(bundle)
    return f"{kind} ({bundle.name}): {prompts}" + (f"; {figures['summary']}" if figures and figures.get("summary")
                                                    else "")


class BundleInfer(InferTask):
    """What every medimg infer task shares: lazy loading, reloading, errors and result files.

    Args:
        bundle: the bundle folder.
        type: MONAI Label's infer type.
        dimension: 2 or 3 (3D Slicer sends ``slice`` to 2D models).
        description: shown by the clients.
        device: torch device for the predictor (``None``: CUDA when available).
        cache_mb: the bound of an interactive model's embedding cache, over all images (MiB).
    """

    def __init__(self, bundle: Path, type: InferType, dimension: int, description: str,
                 device: str | None = None, cache_mb: float = DEFAULT_CACHE_MB) -> None:
        self.bundle = Path(bundle)
        self.meta, self.meta_version = bundle_meta(self.bundle), bundle_version(self.bundle)
        super().__init__(type=type, labels=self.task_labels(self.meta), dimension=dimension, description=description,
                         config={"bundle": str(self.bundle), "bundle_version": str(self.meta.get("version", ""))})
        self.device, self.cache_mb = device, float(cache_mb)
        self.predictor: Any = None
        self.loaded_version: tuple[int, int] | None = None
        self.loads = 0
        self._lock = threading.Lock()

    def is_valid(self) -> bool:
        """The bundle has weights."""
        return bundle_version(self.bundle) is not None

    def task_labels(self, meta: dict[str, Any]) -> Any:
        """The labels MONAI Label shows for a bundle's metadata (its foreground labels)."""
        return bundle_labels(meta)

    def _read_meta(self) -> None:
        """Labels, version and metrics from the served bundle's card (after a publication too)."""
        self.meta, self.meta_version = bundle_meta(self.bundle), bundle_version(self.bundle)
        self.labels = self.task_labels(self.meta)
        self._config["bundle_version"] = str(self.meta.get("version", ""))

    def info(self) -> dict[str, Any]:
        """MONAI Label's model info plus the bundle's name and validated metrics, of the bundle served now."""
        if bundle_version(self.bundle) != self.meta_version:
            with contextlib.suppress(OSError, ValueError):  # mid-swap: the next call reads it
                self._read_meta()
        return {**super().info(), "bundle": self.meta.get("name"), "eval_metrics": self.meta.get("eval_metrics", {})}

    def _ensure_loaded(self) -> None:
        if self.predictor is not None and bundle_version(self.bundle) == self.loaded_version:
            return
        self.predictor, self.loaded_version = load_locked(self.bundle, lambda b: load_bundle(b, self.device))
        self._read_meta()
        self.loads += 1
        log.info("loaded %s (weights version %s)", self.bundle, self.loaded_version)
        if isinstance(getattr(self.predictor, "cache", None), EmbeddingCache):
            self.predictor.cache = EmbeddingCache(self.cache_mb)  # the server's bound, across images
        self.on_load()

    def on_load(self) -> None:
        """Called after every (re)load of the predictor."""

    @abstractmethod
    def run(self, image: Image, request: dict[str, Any]) -> tuple[np.ndarray | None, dict[str, Any]]:
        """The label map (``image.array``'s shape; ``None`` for no label file) and result fields."""

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """Run one request: ``(label file or None, result JSON)``; bad input answers HTTP 400."""
        start = time.perf_counter()
        with self._lock:
            try:
                self._ensure_loaded()
                loaded = time.perf_counter()
                image = read_image(request["image"], spatial_dims=None)
                labels, fields = self.run(image, request)
                path = None
                if labels is not None:
                    names, algorithm, version = segment_names(self.bundle, self.type == InferType.DEEPGROW)
                    path = write_result(labels, image, request.get("result_extension"), request.get("result_dtype"),
                                        names, algorithm, version)
            except (MedimgError, ValueError) as exc:
                raise HTTPException(status_code=400, detail=str(exc)) from exc
        done = time.perf_counter()
        fields.update({"label_names": self.labels, "weights_version": list(self.loaded_version or ()),
                       "latencies": {"load": round(loaded - start, 4), "infer": round(done - loaded, 4),
                                     "total": round(done - start, 4)}})
        return path, fields


class SegmentationInfer(BundleInfer):
    """An automatic segmentation bundle (``swin_unetr``, ``vit_seg``)."""

    def __init__(self, bundle: Path, device: str | None = None) -> None:
        super().__init__(bundle, InferType.SEGMENTATION, 3, f"medimg automatic segmentation ({bundle.name})", device)

    def run(self, image: Image, request: dict[str, Any]) -> tuple[np.ndarray | None, dict[str, Any]]:
        """The bundle's label map."""
        return np.asarray(self.predictor.predict(image).array), {}


class ClassificationInfer(BundleInfer):
    """A classification bundle: class probabilities in the result JSON, no label file."""

    def __init__(self, bundle: Path, device: str | None = None) -> None:
        super().__init__(bundle, InferType.CLASSIFICATION, 3, f"medimg classification ({bundle.name})", device)

    def task_labels(self, meta: dict[str, Any]) -> Any:
        """Every class, in output order."""
        return list(bundle_labels(meta, background=True))

    def run(self, image: Image, request: dict[str, Any]) -> tuple[np.ndarray | None, dict[str, Any]]:
        """Class probabilities and the most probable class."""
        probs = self.predictor.predict(image)
        return None, {"probabilities": probs, "prediction": max(probs, key=probs.get)}


class PromptInfer2D(BundleInfer):
    """An interactive 2D bundle (``litemedsam``, ``medsam2d``): clicks on a slice, or an ROI through the volume.

    Clicks are segmented on the slice the user clicked (``slice``, a ``k`` of the file), whatever
    plane the bundle was trained on. An ``roi`` (with any clicks inside it) is followed through the
    volume along the bundle's own slicing plane, or, with ``propagate`` false, segmented on the
    viewed slice only (its in-plane extent as the box). One predictor per plane keeps its slice
    embeddings across requests, so a new click on the same image runs no image encoder.
    """

    def __init__(self, bundle: Path, device: str | None = None, cache_mb: float = DEFAULT_CACHE_MB) -> None:
        super().__init__(bundle, InferType.DEEPGROW, 2, described(bundle, "medimg interactive 2D", "clicks or ROI"),
                         device, cache_mb)

    @property
    def encoder_calls(self) -> int:
        """Image-encoder runs since the bundle was (re)loaded, over all planes."""
        return sum(p.encoder_calls for p in self.predictor.family())

    def run(self, image: Image, request: dict[str, Any]) -> tuple[np.ndarray | None, dict[str, Any]]:
        """The mask of clicks on a slice, or of an ROI (plus clicks) followed through the volume."""
        before = self.encoder_calls
        pts, labels, box, lasso = request_prompts(request, image, flat_boxes=True)
        volume = len(prompt_shape(image.array)) == 3
        propagate = request_propagate(request)
        if not volume or (box is not None and (propagate or lasso is not None)):
            # a 2D image is one slice; an ROI propagates in the bundle's plane; a lasso's box is on its own slice
            predictor = self.predictor
        elif box is None:  # clicks: the one slice they lie on, in the plane the user views
            if not (labels == 1).any():
                raise ValueError(f"{image.path}: give foreground clicks or an roi")
            axis, _ = clicks_plane(request, image, pts, labels)
            predictor, propagate = self.predictor.for_plane(axis_plane(image.affine, axis)), False
        else:  # an ROI with propagate false: the slice the user is on
            k = viewed_slice(request, image, pts, labels, box)
            on_slice = np.round(pts[:, 2]) == k
            pts, labels = pts[on_slice], labels[on_slice]
            box = np.concatenate([box[:2], [k], box[3:5], [k]])
            predictor, propagate = self.predictor.for_plane(viewed_plane(image.affine)), False
        predictor.prepare(image, None)
        mask = predictor.segment_object(image, box=box, points=pts if len(pts) else None,
                                        point_labels=labels if len(pts) else None, propagate=propagate)
        if lasso is not None:
            mask = lasso.cut(np.asarray(mask, dtype=bool))
        return mask.astype(np.uint8).reshape(image.array.shape), {
            "encoder_calls": self.encoder_calls - before, "encoder_calls_total": self.encoder_calls,
            "plane": predictor.plane if volume else None,
            "embedding_cache": {"bytes": predictor.cache.nbytes, "bound": predictor.cache.max_bytes,
                                "images": len(predictor.cache.images()), "evictions": predictor.cache.evictions}}


class PromptInfer3D(BundleInfer):
    """An interactive 3D bundle (``medsam3d``): 3D clicks and/or the ROI box on the whole volume.

    With ``propagate`` false the answer is kept on the slice the user is on (zero elsewhere).
    """

    def __init__(self, bundle: Path, device: str | None = None) -> None:
        super().__init__(bundle, InferType.DEEPGROW, 3, described(bundle, "medimg interactive 3D", "clicks or ROI"),
                         device)

    def run(self, image: Image, request: dict[str, Any]) -> tuple[np.ndarray | None, dict[str, Any]]:
        """The 3D mask of the clicks or the ROI box."""
        pts, labels, box, lasso = request_prompts(request, image, flat_boxes=False)
        if box is None and not (labels == 1).any():
            raise ValueError(f"{image.path}: give at least one foreground click, a scribble, a lasso or an roi")
        viewed = None  # (axis, index) of the one slice kept with propagate false
        if not request_propagate(request):
            viewed = (lasso.axis, lasso.index) if lasso is not None else (
                2, viewed_slice(request, image, pts, labels, box))
        self.predictor.prepare(image, None)
        mask = self.predictor.segment_object(image, box=box, points=pts if len(pts) else None,
                                             point_labels=labels if len(pts) else None)
        if lasso is not None:
            mask = lasso.cut(np.asarray(mask, dtype=bool))
        if viewed is not None:
            axis, index = viewed
            kept = np.zeros_like(mask, dtype=bool)
            np.moveaxis(kept, axis, 0)[index] = True
            mask = np.asarray(mask, dtype=bool) & kept
        return mask.astype(np.uint8), {}


def infer_task(bundle: Path, device: str | None = None, cache_mb: float = DEFAULT_CACHE_MB) -> BundleInfer:
    """The infer task for a bundle folder, by its ``medimg_task`` and template (``cache_mb``: 2D interactive)."""
    kind = bundle_task(bundle)
    if kind == "classification":
        return ClassificationInfer(bundle, device)
    if kind == "promptable":
        spec = json.loads((bundle / "configs" / "inference.json").read_text()).get("predictor", {})
        if str(spec.get("_target_", "")).endswith("VolumePromptPredictor"):
            return PromptInfer3D(bundle, device)
        return PromptInfer2D(bundle, device, cache_mb)
    return SegmentationInfer(bundle, device)
