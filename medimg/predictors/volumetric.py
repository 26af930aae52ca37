"""Full-volume inference for 3D promptable networks: windows that grow from the prompts.

The network sees ``roi_size`` windows of the volume in its own frame (RAS, ``pixdim``, intensity
preset: the bundle's training pipeline). Inference starts with a window centred on the first
positive click (or the box centre). Whenever the mask reaches a face of the current window, the
neighbouring window on that side (stride ``roi_size / 2``) is queued; a window with no click of
the user's inside gets a positive click at the most interior voxel of the mask found so far
there, so the structure is followed across the volume. With a box, windows stay inside the box
(each also gets the clicks that fall in it) and the mask is kept within the box plus a 10% margin.
Window probabilities are blended with MONAI's Gaussian importance map. The result is resampled
back to the input grid (``SpatialResample`` to the input's affine and shape) and thresholded, so
the output has the input's exact geometry whatever its orientation.

Why not MONAI's ``monai.apps.vista3d.inferer.point_based_window_inferer``: it runs one window
centred on each click (VISTA3D's model signature) and stitches those. It neither follows a
structure beyond the clicked windows, nor takes a box prompt that bounds the object; both are what
this predictor adds. MONAI's Gaussian importance map (``compute_importance_map``) is shared.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch
from monai.data.utils import compute_importance_map
from scipy import ndimage

from medimg.errors import ConfigError, DataError
from medimg.io.image import Image
from medimg.io.memory import memory_key
from medimg.predictors.embedding_cache import content_key
from medimg.predictors.prompting import PromptPredictorBase
from medimg.predictors.protocols import PromptableNetwork3D

log = logging.getLogger(__name__)
BOX_MARGIN = 0.1  # share of the box size a mask may extend beyond a box prompt


class VolumePromptPredictor(PromptPredictorBase):
    """Segment 3D structures from 3D clicks and boxes on whole volumes.

    :meth:`predict` takes any input type and prompts in voxel or world coordinates of the input
    (see :class:`~medimg.predictors.prompting.PromptPredictorBase`); the label map comes back on
    the input's own grid. :meth:`set_volume` + :meth:`predict_probability` work in the model frame.

    Args:
        network: a 3D promptable network (:class:`~medimg.predictors.protocols.PromptableNetwork3D`).
        device: torch device.
        roi_size: window size (the training patch size).
        pixdim: the model's voxel size in mm (``None``: native spacing).
        intensity: the bundle's intensity preset.
        max_windows: upper bound on windows per object.
        amp: bf16 autocast on CUDA.
        threshold: foreground probability that makes a voxel part of the mask (and lets the windows
            grow); a bundle records the value chosen on its validation structures.
    """

    flat_boxes = False  # a lasso on a 3D model: its box grows along the normal (PromptPredictorBase)

    def __init__(self, network: PromptableNetwork3D, device: str | torch.device = "cpu",
                 roi_size: Sequence[int] = (64, 64, 64), pixdim: Sequence[float] | None = (2.0, 2.0, 2.0),
                 intensity: str = "mr", max_windows: int = 64, amp: bool = True,
                 threshold: float = 0.5) -> None:
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.roi = np.asarray([int(r) for r in roi_size])
        network.check_size(tuple(self.roi))
        self.pixdim, self.intensity = pixdim, intensity
        self.max_windows = int(max_windows)
        if not 0.0 < float(threshold) < 1.0:
            raise ConfigError("threshold", f"must lie strictly between 0 and 1, got {threshold}")
        self.threshold = float(threshold)
        self.amp = amp and self.device.type == "cuda"
        self.importance = compute_importance_map(tuple(self.roi), mode="gaussian", sigma_scale=0.125,
                                                 device="cpu").numpy()
        self.volume = None
        self._prepared: str | None = None  # content_key of what prepare() brought into the model frame

    # ------------------------------------------------------------------ volume
    def set_volume(self, path: str, intensity: str | None = None) -> None:
        """Load ``path`` into the model frame through the bundle's geometry and intensity pipeline.

        ``path`` is a file or a :func:`~medimg.io.memory.memory_key`; ``intensity`` replaces the
        bundle's preset.
        """
        from medimg.data.transforms import build_pipeline, geometry_spec, intensity_spec

        pipeline = build_pipeline(geometry_spec(["image"], self.pixdim, label_key=None)
                                  + intensity_spec(intensity or self.intensity))
        image = pipeline({"image": str(path)})["image"]
        self.volume = np.asarray(image[0], dtype=np.float32)
        self.model_affine = np.asarray(image.affine, dtype=np.float64)
        self._prepared = None

    def to_model(self, coords: np.ndarray, src_affine: np.ndarray) -> np.ndarray:
        """Voxel coordinates of the source image -> voxel coordinates of the model frame."""
        m = np.linalg.inv(self.model_affine) @ src_affine
        return np.asarray(coords, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]

    # ------------------------------------------------------------------ windows
    def _window_origin(self, centre: np.ndarray) -> np.ndarray:
        shape = np.asarray(self.volume.shape)
        origin = np.round(centre).astype(np.int64) - self.roi // 2
        return np.clip(origin, np.minimum(0, shape - self.roi), np.maximum(0, shape - self.roi))

    def _crop(self, array: np.ndarray, origin: np.ndarray) -> np.ndarray:
        out = np.zeros(tuple(self.roi), dtype=array.dtype)
        src = tuple(slice(max(o, 0), min(o + r, n)) for o, r, n in zip(origin, self.roi, array.shape))
        out[tuple(slice(s.start - o, s.stop - o) for s, o in zip(src, origin))] = array[src]
        return out

    def _run(self, window: np.ndarray, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None) -> np.ndarray:
        x = torch.from_numpy(window)[None, None].to(self.device)
        pts = None
        if len(points):
            pts = (torch.as_tensor(points, dtype=torch.float32, device=self.device)[None],
                   torch.as_tensor(labels, dtype=torch.int64, device=self.device)[None])
        box_t = None if box is None else torch.as_tensor(box, dtype=torch.float32, device=self.device)[None]
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits, _ = self.network.decode(self.network.encode(x), points=pts, boxes=box_t)
        return torch.sigmoid(logits.float())[0, 0].cpu().numpy()

    def prepare(self, image: Image, intensity: str | None) -> None:
        """Bring a 3D volume as read into the model frame (once for several prompts on the same image).

        The model-frame volume is kept while the voxels, the affine and ``intensity`` stay the same
        (:func:`~medimg.predictors.embedding_cache.content_key`), whatever array object holds them.
        """
        if image.array.ndim != 3 or 1 in image.array.shape:
            raise DataError(image.path, f"a 3D promptable model needs a 3D volume, got shape {image.array.shape}")
        key = content_key(image.array, image.affine, str(intensity))
        if key == self._prepared:
            return
        with memory_key(image) as name:
            self.set_volume(name, intensity)
        self._prepared = key

    def segment_object(self, image: Image, box: np.ndarray | None = None, points: np.ndarray | None = None,
                       point_labels: np.ndarray | None = None, propagate: bool = True,
                       ordered: bool = False) -> np.ndarray:
        """One object's mask on the input grid (voxel prompts of the input; windows always grow).

        A box and clicks go to the network together (Slicer's ROI with clicks inside it). The 3D
        network takes all clicks at once and has no mask input: ``ordered`` changes nothing.
        """
        from monai.data import MetaTensor
        from monai.transforms import SpatialResample

        prompts: dict[str, np.ndarray | None] = {}
        if points is not None and len(points):
            prompts["points"] = self.to_model(np.asarray(points, dtype=np.float64).reshape(-1, 3), image.affine)
            prompts["point_labels"] = None if point_labels is None else np.asarray(point_labels)
        if box is not None:  # all 8 corners into the model frame: an oblique input gives a rotated box
            corners = np.array(np.meshgrid(*[[box[a], box[a + 3]] for a in range(3)], indexing="ij")).reshape(3, -1).T
            c = self.to_model(corners, image.affine)
            prompts["box"] = np.concatenate([c.min(0), c.max(0)])
        prob = self.predict_probability(**prompts)
        back = SpatialResample(mode="bilinear", padding_mode="zeros")(
            MetaTensor(torch.from_numpy(prob)[None], affine=torch.as_tensor(self.model_affine)),
            dst_affine=torch.as_tensor(image.affine), spatial_size=image.array.shape)
        return np.asarray(back[0]) > self.threshold

    def predict_probability(self, points: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                            box: np.ndarray | None = None) -> np.ndarray:
        """Foreground probability over the model-frame volume for one object.

        Args:
            points: ``(N, 3)`` model-frame voxel clicks.
            point_labels: 1 positive / 0 negative per click.
            box: ``[i0, j0, k0, i1, j1, k1]`` in model-frame voxels.
        """
        if self.volume is None:
            raise RuntimeError("call set_volume first")
        pts = np.zeros((0, 3)) if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 3)
        labels = np.ones(len(pts), dtype=np.int64) if point_labels is None else np.asarray(point_labels)
        box = None if box is None else np.asarray(box, dtype=np.float64)
        if box is not None:
            start = (box[:3] + box[3:]) / 2
        elif (labels == 1).any():
            start = pts[labels == 1][0]
        else:
            raise ValueError("give a box or at least one positive point")
        shape = np.asarray(self.volume.shape)
        stride = np.maximum(self.roi // 2, 1)
        acc, weight = np.zeros(self.volume.shape, np.float32), np.zeros(self.volume.shape, np.float32)
        queue, seen = deque([self._window_origin(start)]), set()
        while queue and len(seen) < self.max_windows:
            origin = queue.popleft()
            if tuple(origin) in seen:
                continue
            seen.add(tuple(origin))
            local_pts = pts - origin
            inside = ((local_pts >= 0) & (local_pts < self.roi)).all(axis=1)
            w_pts, w_labels = local_pts[inside], labels[inside]
            if box is None and not (w_labels == 1).any():  # grown into: seed from the mask so far
                seed = self._interior_seed(acc, weight, origin)
                if seed is None:
                    continue
                w_pts, w_labels = np.vstack([w_pts, seed[None]]), np.append(w_labels, 1)
            prob = self._run(self._crop(self.volume, origin), w_pts, w_labels,
                             None if box is None else np.concatenate([box[:3] - origin, box[3:] - origin]))
            self._accumulate(acc, weight, prob, origin)
            for axis in range(3):
                for side, sl in ((-1, slice(0, 2)), (1, slice(-2, None))):
                    face = np.take(prob > self.threshold, np.arange(self.roi[axis])[sl], axis=axis)
                    nxt = origin.copy()
                    nxt[axis] += side * stride[axis]
                    nxt = np.clip(nxt, np.minimum(0, shape - self.roi), np.maximum(0, shape - self.roi))
                    if not face.any() or tuple(nxt) in seen or (nxt == origin).all():
                        continue
                    if box is not None and not _overlaps(nxt, self.roi, box):
                        continue
                    queue.append(nxt)
        if queue:
            log.warning("stopped after %d windows (max_windows); the object may continue", self.max_windows)
        prob = np.where(weight > 0, acc / np.maximum(weight, 1e-8), 0.0).astype(np.float32)
        if box is not None:  # a box bounds its object: keep the box plus a margin for loose boxes
            margin = np.maximum(BOX_MARGIN * (box[3:] - box[:3]), 2.0)
            lo = np.clip(np.floor(box[:3] - margin), 0, shape).astype(int)
            hi = np.clip(np.ceil(box[3:] + margin) + 1, 0, shape).astype(int)
            bounded = np.zeros_like(prob)
            inner = tuple(slice(a, b) for a, b in zip(lo, hi))
            bounded[inner] = prob[inner]
            prob = bounded
        return prob

    def _accumulate(self, acc: np.ndarray, weight: np.ndarray, prob: np.ndarray, origin: np.ndarray) -> None:
        src = tuple(slice(max(o, 0), min(o + r, n)) for o, r, n in zip(origin, self.roi, acc.shape))
        win = tuple(slice(s.start - o, s.stop - o) for s, o in zip(src, origin))
        acc[src] += prob[win] * self.importance[win]
        weight[src] += self.importance[win]

    def _interior_seed(self, acc: np.ndarray, weight: np.ndarray, origin: np.ndarray) -> np.ndarray | None:
        known = self._crop(np.where(weight > 0, acc / np.maximum(weight, 1e-8), 0.0), origin) > self.threshold
        if not known.any():
            return None
        dist = ndimage.distance_transform_edt(known)
        return np.asarray(np.unravel_index(np.argmax(dist), dist.shape), dtype=np.float64)


def _overlaps(origin: np.ndarray, roi: np.ndarray, box: np.ndarray) -> bool:
    return bool(((origin <= box[3:]) & (origin + roi - 1 >= box[:3])).all())
