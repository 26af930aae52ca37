"""What the 2D and 3D promptable predictors share: prompts in, one label per object out.

Each box is an object (labels 1, 2, ... in order), then each lasso; the clicks (scribbles'
included), if any, form one more object.
Prompts mean what the prompts JSON means (:mod:`medimg.io.prompts`): voxel indices of the image as
stored, or RAS+ world mm. :func:`segment_file` is the prompts-file path used by ``medimg.infer``
and the bundles' ``inference.json``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medimg.errors import DataError
from medimg.io.drawn import Lasso
from medimg.io.image import Image, read_image, write_like
from medimg.io.memory import as_image
from medimg.io.prompts import Prompts, load_prompts, parse_prompts, prompts_document


def prompt_shape(array: np.ndarray) -> tuple[int, ...]:
    """The shape prompts refer to: a one-slice 3D file ``(X, Y, 1)`` is a 2D image."""
    return array.shape[:2] if array.ndim == 3 and array.shape[2] == 1 else array.shape


def slicer_shape(array: np.ndarray) -> tuple[int, ...]:
    """The 3D shape 3D Slicer's voxel indices refer to: every image is a volume there, a 2D one has one slice.

    Slicer's ``[i, j, k]`` clicks and ``[i0, i1, j0, j1, k0, k1]`` ROIs on a one-slice volume
    ``(X, Y, 1)`` or a 2D image ``(X, Y)`` carry a ``k`` that must be that one slice (0);
    :func:`prompt_shape` drops it.
    """
    return tuple(array.shape) if array.ndim == 3 else (*array.shape, 1)


def prompt_objects(prompts: Prompts) -> list[dict[str, Any]]:
    """The objects to segment: each box, each lasso, then all the clicks."""
    objects: list[dict[str, Any]] = [dict(box=b) for b in prompts.boxes]
    objects += [dict(lasso=lasso) for lasso in prompts.lassos]  # its box: lasso_box, by the predictor's kind
    if len(prompts.points):  # clicks alone are a session's clicks in the order made; a stroke has no order
        objects.append(dict(points=prompts.points, point_labels=prompts.point_labels, ordered=not prompts.scribbles))
    return objects


class PromptPredictorBase(ABC):
    """The prompt handling of a promptable predictor; subclasses set the image and segment one object.

    A lasso's box is flat along its slice's normal. A 2D slice model follows such a box through the
    volume (``flat_boxes = True``); a 3D model gets the box grown along the normal by half the
    contour's larger in-plane extent on each side (the object's depth is not drawn). Either way the
    mask on the lasso's slice is cut to the contour.
    """

    flat_boxes = True

    @abstractmethod
    def prepare(self, image: Image, intensity: str | None) -> None:
        """Set ``image`` (its stored voxels and affine) windowed by ``intensity`` (``None``: the bundle's)."""

    @abstractmethod
    def segment_object(self, image: Image, box: np.ndarray | None = None, points: np.ndarray | None = None,
                       point_labels: np.ndarray | None = None, propagate: bool = True,
                       ordered: bool = False) -> np.ndarray:
        """One object's mask over the prompt shape of ``image``, from voxel prompts.

        ``ordered``: the points are clicks in the order the user made them (a prompts file's
        ``points``); a model that refines its previous mask replays them one by one.
        """

    def segment_prompts(self, image: Image, prompts: Prompts, intensity: str | None = None,
                        source: str | Path = "prompts") -> np.ndarray:
        """The label map (``image.array``'s shape, uint8) of validated voxel prompts."""
        self.prepare(image, intensity or prompts.intensity)
        labels = np.zeros(prompt_shape(image.array), dtype=np.uint8)
        for value, obj in enumerate(prompt_objects(prompts), start=1):
            lasso = obj.pop("lasso", None)
            if lasso is not None:
                obj["box"] = lasso_box(lasso, labels.shape, self.flat_boxes)
            try:
                mask = self.segment_object(image, propagate=prompts.propagate, **obj)
            except ValueError as exc:
                raise DataError(source, str(exc)) from exc
            if lasso is not None:
                mask = lasso.cut(np.asarray(mask, dtype=bool).reshape(labels.shape))
            labels[mask & (labels == 0)] = value
        return labels.reshape(image.array.shape)

    def predict(self, image: Any, affine: np.ndarray | None = None, *, boxes: Sequence[Sequence[float]] = (),
                points: Sequence[Sequence[float]] = (), point_labels: Sequence[int] | None = None,
                space: str = "voxel", intensity: str | None = None, propagate: bool = True) -> Any:
        """Segment the prompted objects of one image.

        Args:
            image: a file path or DICOM folder, a nibabel or SimpleITK image, a ``MetaTensor``, or
                an array (with ``affine``; see :func:`medimg.io.memory.as_image`).
            affine: the RAS+ affine of an array input.
            boxes: boxes ``[i0, j0, (k0,) i1, j1, (k1)]``; each is one object (labels 1, 2, ...).
            points: clicks ``[i, j, (k)]``, together one more object.
            point_labels: 1 (positive) / 0 (negative) per click (default: all positive).
            space: ``voxel`` (indices of the image as stored) or ``world`` (RAS+ mm).
            intensity: an intensity preset for this image (a CT window such as ``ct_lung``, ``mr``).
            propagate: follow the object through the volume (``False``: only the prompted slices).

        Returns:
            The label map in the input's own type, shape and geometry.
        """
        inp = as_image(image, affine)
        doc = prompts_document(boxes, points, point_labels, space, intensity, propagate)
        prompts = parse_prompts(doc, prompt_shape(inp.image.array), inp.image.affine)
        return inp.restore(self.segment_prompts(inp.image, prompts))


def lasso_box(lasso: Lasso, shape: tuple[int, ...], flat: bool = True) -> np.ndarray:
    """A lasso's box prompt: flat on its slice, or grown along the slice's normal (``flat=False``).

    3D models get the box grown by half the contour's larger in-plane extent on each side.
    """
    box = lasso.box()
    if flat or lasso.axis is None:
        return box
    d, axis = len(shape), lasso.axis
    half = 0.5 * max(box[a + d] - box[a] for a in range(d) if a != axis)
    box[axis], box[axis + d] = max(box[axis] - half, 0.0), min(box[axis + d] + half, shape[axis] - 1.0)
    return box


def segment_file(predictor: PromptPredictorBase, input_path: str, prompts_path: str, output_path: str,
                 intensity: str | None = None, image: Image | None = None) -> str:
    """Segment one 2D image or 3D volume from a prompts file; write labels in the input's geometry.

    Each box becomes label 1, 2, ... in order; the points (if any) form one more object. The
    prompts file may set ``"intensity"`` (a CT window such as ``ct_lung``) and ``"propagate": false``.

    Args:
        predictor: the bundle's promptable predictor.
        input_path: image file or DICOM folder.
        prompts_path: prompts JSON.
        output_path: the NIfTI to write.
        intensity: intensity preset overriding the bundle's (and the prompts file's).
        image: the input already read by :func:`~medimg.io.image.read_image` (it is not read again).
    """
    image = image if image is not None else read_image(input_path, spatial_dims=None)
    prompts = load_prompts(prompts_path, prompt_shape(image.array), image.affine)
    write_like(predictor.segment_prompts(image, prompts, intensity, prompts_path), image, output_path)
    return output_path
