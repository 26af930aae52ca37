"""Interactive promptable segmentation with a 2D SAM-family network, for 2D images and 3D volumes.

Set an image or volume once; image embeddings are computed per slice on first use and kept in a
cache bounded in bytes across images (:class:`~medimg.predictors.embedding_cache.EmbeddingCache`,
least recently used first), so each new prompt runs only the prompt encoder and mask decoder, and
coming back to an image seen before runs no encoder while its slices are still cached.

A volume is prepared exactly as training prepared it (:func:`medimg.data.slicing.prepare_volume`:
the bundle's anatomical ``plane`` resolved through the affine, its ``intensity`` window). Prompts
are array indices of the file as stored (the prompts-JSON contract); they are mapped into the
working frame, where a slice ``working[:, :, k]`` is shown to the network transposed (rows = J,
columns = I), and masks are mapped back. 3D prompts are segmented slice by slice: the box for slice k+1
is the bounding box of the mask on slice k. Given a box, SAM outputs *something* even on a slice
the object has left, so propagation stops where the mask vanishes, where the decoder's predicted
IoU drops below ``min_iou``, or where the mean (windowed) intensity inside the mask departs from
the starting slice's by more than ``intensity_tolerance`` of the intensity range.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medimg.data.slicing import SliceFrame, axis_plane, check_intensity, check_plane, prepare_volume, window_to_uint8
from medimg.io.image import Image
from medimg.models.sam.network import decode_best
from medimg.models.sam.runtime import make_runtime
from medimg.predictors.embedding_cache import DEFAULT_CACHE_MB, EmbeddingCache, content_key
from medimg.predictors.prompting import PromptPredictorBase
from medimg.predictors.protocols import PromptableNetwork2D


class PromptablePredictor(PromptPredictorBase):
    """Prompt a 2D promptable network (SAM, MedSAM, LiteMedSAM) on an image or a volume.

    :meth:`predict` takes any input type and prompts in voxel or world coordinates (see
    :class:`~medimg.predictors.prompting.PromptPredictorBase`); :meth:`set_volume`,
    :meth:`predict_slice` and :meth:`predict_volume` are the interactive, step-by-step interface.

    Args:
        network: the promptable network (:class:`~medimg.predictors.protocols.PromptableNetwork2D`).
        device: ``cpu``/``cuda`` (default: CUDA when available).
        plane: the anatomical slicing plane training used (``sagittal``, ``coronal``, ``axial``).
        intensity: the intensity preset training used (a CT window, ``mr`` or ``none``).
        cache_mb: the bound of the embedding cache (MiB), over all images (ignored with ``cache``).
        cache: an :class:`EmbeddingCache` to share (e.g. between the planes of one server model).
        min_area: a propagated slice mask smaller than this (pixels) ends propagation.
        box_margin: pixels added around a mask's bounding box when it becomes the next slice's box.
        min_iou: propagation stops below this predicted IoU.
        intensity_tolerance: propagation stops when the mean intensity inside the mask moves by more
            than this fraction of the windowed range from the starting slice's.
        backend: what runs the encoder and decoder (:func:`medimg.models.sam.runtime.make_runtime`):
            ``torch`` (eager), ``openvino`` (CPU) or ``auto`` (OpenVINO on the CPU, eager on a GPU).
            Exported bundles ask for ``auto``.
        runtime_dir: the bundle's stored OpenVINO IR (``None``: convert the network in memory).
        precision: OpenVINO inference precision: ``f32`` (default; masks equal eager), or ``auto``
            (OpenVINO picks: bf16 on AMX CPUs, 2.4x faster; masks differ, Dice down to 0.90).
        negative_clicks_remove: a negative click decoded with the previous answer fed back (a
            correction) only removes from that answer: the new logits are capped by the previous
            ones, so no pixel the user had not got before turns foreground. SAM-family decoders
            otherwise often grow the mask elsewhere after a negative click (see BENCHMARKS.md).
    """

    def __init__(self, network: PromptableNetwork2D, device: str | None = None, plane: str = "axial",
                 intensity: str = "mr", cache_mb: float = DEFAULT_CACHE_MB, min_area: int = 10,
                 box_margin: int = 2, min_iou: float = 0.5, intensity_tolerance: float = 0.25,
                 backend: str = "torch", runtime_dir: str | None = None, precision: str = "f32",
                 cache: EmbeddingCache | None = None, negative_clicks_remove: bool = True) -> None:
        self.plane = check_plane(plane)
        self.intensity = check_intensity(intensity)
        self.frame: SliceFrame | None = None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.network = network.to(self.device).eval()
        self.backend, self.runtime_dir, self.precision = backend, runtime_dir, precision
        self.runtime = make_runtime(self.network, backend, runtime_dir, precision, self.device)
        self.cache = cache if cache is not None else EmbeddingCache(cache_mb)
        self.min_area = int(min_area)
        self.box_margin = int(box_margin)
        self.min_iou = float(min_iou)
        self.intensity_tolerance = float(intensity_tolerance)
        self.negative_clicks_remove = bool(negative_clicks_remove)
        self.last_iou = float("nan")
        self._volume: np.ndarray | None = None
        self._key: str | None = None
        self._intensity_used = self.intensity
        self._root = self  # the predictor whose plane registry this one shares (for_plane)
        self._planes: dict[str, PromptablePredictor] = {}  # the root's siblings on other planes
        self.encoder_calls = 0

    # -------------------------------------------------------------- prompts API
    def prepare(self, image: Image, intensity: str | None) -> None:
        """Set a 2D image or a 3D volume as read (a one-slice file is a 2D image)."""
        array = image.array
        if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
            self.set_image(array.reshape(array.shape[:2]), intensity=intensity)
        else:
            self.set_volume(array, image.affine, intensity=intensity)

    def segment_object(self, image: Image, box: np.ndarray | None = None, points: np.ndarray | None = None,
                       point_labels: np.ndarray | None = None, propagate: bool = True,
                       ordered: bool = False) -> np.ndarray:
        """One object's mask: the slice itself for a 2D image, slice propagation on a volume.

        ``ordered``: the clicks are replayed in order on each slice, as a live session makes them
        (:meth:`predict_slice`).
        """
        pts = None if points is None else np.asarray(points).tolist()
        lab = None if point_labels is None else np.asarray(point_labels).tolist()
        if self.frame is None:
            return self.predict_slice(0, box=box, points=pts, point_labels=lab, ordered=ordered)[0]
        plane = _flat_box_plane(box, image.affine)
        if plane is not None and plane != self.plane:  # a box drawn on another view (a lasso): slice along it
            other = self.for_plane(plane)
            other.set_volume(image.array, image.affine, self._intensity_used)
            return other.predict_volume(box=box, points=pts, point_labels=lab, propagate=propagate, ordered=ordered)
        return self.predict_volume(box=box, points=pts, point_labels=lab, propagate=propagate, ordered=ordered)

    # -------------------------------------------------------------- setting data
    def set_image(self, image: np.ndarray, intensity: str | None = None) -> None:
        """Set a 2D image (array index order ``(i, j)``), windowed by ``intensity`` (default: the bundle's)."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 2:
            raise ValueError(f"set_image expects a 2D array, got shape {image.shape}")
        key = content_key(image, None, intensity or self.intensity, self.plane)
        if key == self._key:  # the same image again: keep its embeddings
            return
        self.frame = None
        self._volume = window_to_uint8(image, check_intensity(intensity or self.intensity))[..., None]
        self._key = key

    def set_volume(self, volume: np.ndarray, affine: np.ndarray | None = None, intensity: str | None = None) -> None:
        """Set a 3D volume as stored on disk, with its RAS+ ``affine`` (identity: already RAS).

        The volume is reoriented to the bundle's slicing plane and windowed by ``intensity``
        (default: the bundle's) with the very function training used. Setting the same voxels,
        affine and intensity again keeps the cached slice embeddings, so a new prompt on an image
        already seen runs no encoder.
        """
        volume = np.asarray(volume, dtype=np.float32)
        if volume.ndim != 3:
            raise ValueError(f"set_volume expects a 3D array, got shape {volume.shape}")
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        key = content_key(volume, affine, intensity or self.intensity, self.plane)
        if key == self._key:  # the same volume again (a new click on it): keep its slice embeddings
            return
        self._volume, self.frame = prepare_volume(volume, affine, self.plane,
                                                  check_intensity(intensity or self.intensity))
        self._key = key
        self._intensity_used = intensity or self.intensity

    def with_plane(self, plane: str) -> PromptablePredictor:
        """A predictor sharing this one's network, settings and embedding cache that slices along another ``plane``."""
        other = PromptablePredictor(self.network, str(self.device), plane, self.intensity, min_area=self.min_area,
                                    box_margin=self.box_margin, min_iou=self.min_iou,
                                    intensity_tolerance=self.intensity_tolerance, cache=self.cache,
                                    negative_clicks_remove=self.negative_clicks_remove)
        other.backend, other.runtime_dir, other.precision, other.runtime = (
            self.backend, self.runtime_dir, self.precision, self.runtime)
        other._root = self._root
        return other

    def for_plane(self, plane: str) -> PromptablePredictor:
        """The family member slicing along ``plane``: the root predictor, or a sibling made once and kept.

        Every member shares the network, the runtime and the embedding cache; a server model asks
        it for the plane a user views, a lasso for the plane it was drawn on.
        """
        root = self._root
        if plane == root.plane:
            return root
        if plane not in root._planes:
            root._planes[plane] = root.with_plane(check_plane(plane))
        return root._planes[plane]

    def family(self) -> list[PromptablePredictor]:
        """The root predictor and its siblings on other planes (to count their encoder runs)."""
        return [self._root, *self._root._planes.values()]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the current volume in the working frame (slices along the last axis)."""
        if self._volume is None:
            raise RuntimeError("call set_image or set_volume first")
        return self._volume.shape

    # -------------------------------------------------------------- embeddings
    @torch.no_grad()
    def embedding(self, k: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image embedding of slice ``k`` (cached) and its resized size."""
        cached = self.cache.get(self._key, k)
        if cached is not None:
            return cached
        x, resized = self.network.preprocess(self._volume[:, :, k].T)
        emb = self.runtime.encode(x.to(self.device))
        self.encoder_calls += 1
        self.cache.put(self._key, k, (emb, resized))
        return emb, resized

    # -------------------------------------------------------------- 2D prompts
    @torch.no_grad()
    def predict_slice(self, k: int = 0, box: Sequence[float] | None = None,
                      points: Sequence[Sequence[float]] | None = None, point_labels: Sequence[int] | None = None,
                      mask_input: torch.Tensor | None = None, ordered: bool = False) -> tuple[np.ndarray, torch.Tensor]:
        """Segment working slice ``k`` from a box ``[i0, j0, i1, j1]`` and/or points ``[[i, j], ...]``.

        Coordinates are those of the working frame (for a 2D image: its own array indices).

        Args:
            k: the working slice.
            box: the box, if any.
            points: the clicks, if any.
            point_labels: 1 positive / 0 negative per click (default: all positive).
            mask_input: the low-resolution logits of the previous answer (a live session). When the
                last click is negative, the answer stays inside it (``negative_clicks_remove``).
            ordered: the points are clicks in the order made: with no ``mask_input``, the session
                is replayed (the first click, then each next one with the previous mask fed back),
                which is how the model is trained to take corrections. Otherwise all points are
                decoded together.

        Returns:
            ``(mask (I, J) bool, low_res_logits (1, 1, 256, 256))``; pass the logits back as
            ``mask_input`` to refine with more clicks.
        """
        clicks, click_labels = _clicks(points, point_labels)
        if box is None and clicks is None:
            raise ValueError("give a box or at least one point")
        if ordered and clicks is not None and len(clicks) > 1 and mask_input is None:
            for n in range(1, len(clicks)):
                _, mask_input = self.predict_slice(k, box=box, points=clicks[:n], point_labels=click_labels[:n],
                                                   mask_input=mask_input)
        emb, resized = self.embedding(k)
        size = self._volume.shape[1], self._volume.shape[0]  # (rows, cols) of the transposed slice
        boxes = pts = None
        negative_last = False  # the newest click is a negative one
        if box is not None:
            b = torch.as_tensor(np.asarray(box, dtype=np.float32), device=self.device).view(2, 2)
            boxes = self.network.scale_coords(b, size).view(1, 4)
        if clicks is not None:
            p = torch.as_tensor(clicks, device=self.device)
            labels = torch.as_tensor(click_labels, device=self.device)
            pts = (self.network.scale_coords(p, size)[None], labels[None].int())
            negative_last = int(labels[-1]) == 0
        low, iou = decode_best(self.runtime.decode, emb, points=pts, boxes=boxes, masks=mask_input)
        if self.negative_clicks_remove and negative_last and mask_input is not None:
            low = torch.minimum(low, mask_input.to(low.dtype))  # a negative correction only removes
        self.last_iou = float(iou[0, 0])
        full = self.network.postprocess(low, resized, size)
        return (full[0, 0] > 0).cpu().numpy().T, low

    # -------------------------------------------------------------- 3D prompts
    def _box_of(self, mask: np.ndarray, bound: np.ndarray | None = None) -> np.ndarray | None:
        """The next slice's box: the mask's bounding box plus a margin (kept inside ``bound``, the user's box)."""
        if mask.sum() < self.min_area:
            return None
        idx = np.argwhere(mask)
        lo = np.maximum(idx.min(0) - self.box_margin, 0)
        hi = np.minimum(idx.max(0) + self.box_margin, np.asarray(mask.shape) - 1)
        if bound is not None:
            lo, hi = np.maximum(lo, bound[:2]), np.minimum(hi, bound[2:])
            if (hi < lo).any():
                return None
        return np.concatenate([lo, hi]).astype(np.float32)

    def _propagate(self, out: np.ndarray, start: int, mask: np.ndarray, stop: int, step: int,
                   clicks: dict[int, tuple[list, list]], bound: np.ndarray | None = None,
                   ordered: bool = False) -> None:
        box = self._box_of(mask, bound)
        seed_mean = float(self._volume[:, :, start][mask].mean()) if mask.any() else 0.0
        k = start + step
        while box is not None and (k <= stop if step > 0 else k >= stop):
            pts, labels = clicks.get(k, (None, None))
            mask, _ = self.predict_slice(k, box=box, points=pts, point_labels=labels, ordered=ordered)
            if mask.sum() < self.min_area or self.last_iou < self.min_iou:
                break
            if abs(float(self._volume[:, :, k][mask].mean()) - seed_mean) > self.intensity_tolerance * 255.0:
                break
            out[:, :, k] |= mask
            box = self._box_of(mask, bound)
            k += step

    def predict_volume(self, box: Sequence[float] | None = None, points: Sequence[Sequence[float]] | None = None,
                       point_labels: Sequence[int] | None = None, propagate: bool = True,
                       ordered: bool = False) -> np.ndarray:
        """Segment a 3D structure by slice propagation along the bundle's plane.

        Args:
            box: a 3D box ``[i0, j0, k0, i1, j1, k1]`` in stored voxel indices. It bounds its
                object: propagation stays inside its extent along the slicing plane's normal, the
                propagated in-plane boxes stay inside it, and the mask is kept within it. A box that
                is flat along the normal (one slice) propagates until the structure ends.
            points: 3D points ``[[i, j, k], ...]`` in stored voxel indices. Every slice holding a
                positive click starts a propagation, which honours the clicks of each slice it
                reaches; the results are merged.
            point_labels: 1 positive, 0 negative per point.
            propagate: ``False`` segments only the prompted slices.
            ordered: the points are clicks in the order made; each slice replays its own in that
                order (:meth:`predict_slice`).

        Returns:
            The mask in the volume's stored index order and shape.
        """
        if self.frame is None:
            raise RuntimeError("call set_volume first")
        ni, nj, nk = self.shape
        out = np.zeros((ni, nj, nk), dtype=bool)
        pts = np.asarray(points if points is not None and len(points) else np.zeros((0, 3)), dtype=np.float64)
        labels = np.asarray(point_labels if point_labels is not None else [1] * len(pts), dtype=np.int64)
        if len(pts) and pts.shape[1] != 3:
            raise ValueError("points on a volume are [i, j, k]")
        pts = self.frame.points_to_working(pts) if len(pts) else pts
        ks = np.clip(np.round(pts[:, 2]), 0, nk - 1).astype(int) if len(pts) else np.zeros(0, dtype=int)
        clicks = {int(k): (pts[ks == k, :2].tolist(), labels[ks == k].tolist()) for k in np.unique(ks)}
        if box is not None:
            box = np.asarray(box, dtype=np.float64)
            if box.size != 6:
                raise ValueError(f"a box on a volume has 6 numbers [i0, j0, k0, i1, j1, k1], got {box.size}")
            wbox = self.frame.boxes_to_working(box)[0]
            k_lo, k_hi = int(round(wbox[2])), int(round(wbox[5]))
            starts = [(k_lo + k_hi) // 2]
            box2d = wbox[[0, 1, 3, 4]]
            if k_lo == k_hi:  # a box on one slice: follow the structure wherever it goes
                k_lo, k_hi, bound = 0, nk - 1, None
            else:  # a 3D box bounds its object on every side
                bound = box2d
        elif len(pts):
            if not (labels == 1).any():
                raise ValueError("give at least one positive point")
            starts = sorted({int(k) for k in ks[labels == 1]})
            k_lo, k_hi, box2d, bound = 0, nk - 1, None, None
        else:
            raise ValueError("give a box or points")
        for start in starts:
            here_pts, here_labels = clicks.get(start, (None, None))
            mask, _ = self.predict_slice(start, box=box2d, points=here_pts, point_labels=here_labels, ordered=ordered)
            out[:, :, start] |= mask
            if propagate:
                self._propagate(out, start, mask, k_hi, +1, clicks, bound, ordered)
                self._propagate(out, start, mask, k_lo, -1, clicks, bound, ordered)
        if bound is not None:  # nothing outside the user's 3D box
            lo = np.floor(bound[:2]).astype(int)
            hi = np.ceil(bound[2:]).astype(int) + 1
            inside = np.zeros_like(out)
            inside[lo[0]:hi[0], lo[1]:hi[1], k_lo:k_hi + 1] = True
            out &= inside
        return self.frame.from_working(out)


def _clicks(points: Sequence[Sequence[float]] | np.ndarray | None,
            point_labels: Sequence[int] | np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Clicks (lists or arrays) as ``(N, 2)`` float32 ``(i, j)`` and ``(N,)`` int64 labels; ``(None, None)`` for none.

    Raises:
        ValueError: the labels are not one per click.
    """
    if points is None or len(points) == 0:
        return None, None
    clicks = np.asarray(points, dtype=np.float32).reshape(len(points), -1)[:, :2]
    labels = np.ones(len(clicks), np.int64) if point_labels is None else np.asarray(point_labels, np.int64).reshape(-1)
    if len(labels) != len(clicks):
        raise ValueError(f"{len(labels)} point labels for {len(clicks)} points")
    return clicks, labels


def _flat_box_plane(box: Sequence[float] | None, affine: np.ndarray) -> str | None:
    """The plane of a 3D box that is flat along exactly one stored axis (a box drawn on one slice), else ``None``."""
    if box is None or len(box) != 6:
        return None
    b = np.asarray(box, dtype=np.float64)
    flat = [a for a in range(3) if b[a + 3] - b[a] < 0.5]
    return axis_plane(affine, flat[0]) if len(flat) == 1 else None
