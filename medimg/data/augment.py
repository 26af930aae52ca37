"""Named augmentation presets for segmentation training: ``none``, ``light``, ``strong``, ``synth``.

- ``light``: small intensity scale and shift (medimg's original behaviour).
- ``strong``: affine and elastic deformation (image and labels together), bias field, gamma,
  histogram shift, Gaussian noise, Gibbs ringing and simulated low resolution: all MONAI transforms.
- ``synth``: SynthSeg-style (Billot et al.): the image is *replaced* by one generated from a label
  map with random per-label intensities, then the ``strong`` corruptions. The generation label
  map is the training labels plus generation-only labels (:class:`SynthLabelsd`): CSF (dark
  unlabelled voxels inside the labelled structures' hull) and the rest of the head split by
  intensity, so synthetic images carry a head around the labelled anatomy and the network learns
  to call all of it background. Half the synthetic samples keep the anatomy's real intensities and
  randomise only its surroundings (air, CSF, head). The training labels themselves are unchanged.

MONAI has no label-to-image generator; :class:`SynthLabelsd` and :class:`RandLabelSynthd` are the
only hand-written parts.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Rand3DElasticd, RandomizableTransform
from scipy import ndimage

from medimg.errors import ConfigError

PRESETS = ("none", "light", "strong", "synth")
GEN_KEY = "gen_label"
KEEP = 255  # generation label: keep the real image here (the label value a region split ignores)
Spec = list[dict[str, Any]]


def check_preset(preset: str | bool) -> str:
    """A preset name (``True``/``False``, the old boolean, mean ``light``/``none``)."""
    if isinstance(preset, bool):
        return "light" if preset else "none"
    if preset not in PRESETS:
        raise ConfigError("data.augment", f"unknown augmentation {preset!r}; choose from {', '.join(PRESETS)}")
    return preset


def deformation_spec(keys: Sequence[str], label_keys: Sequence[str], spatial_dims: int) -> Spec:
    """Affine + elastic deformation of images (bilinear) and label maps (nearest) together."""
    modes = ["nearest" if k in label_keys else "bilinear" for k in keys]
    rotate = [0.26] * (3 if spatial_dims == 3 else 1)  # 15 degrees
    spec: Spec = [{"_target_": "RandAffined", "keys": list(keys), "mode": modes, "prob": 0.5, "rotate_range": rotate,
                   "scale_range": [0.15] * spatial_dims, "shear_range": [0.05] * (6 if spatial_dims == 3 else 2),
                   "padding_mode": "zeros"}]
    if spatial_dims == 3:
        spec.append({"_target_": "medimg.data.augment.GatedRand3DElasticd", "keys": list(keys), "mode": modes,
                     "prob": 0.2,
                     "sigma_range": [6.0, 8.0], "magnitude_range": [40.0, 120.0], "padding_mode": "zeros"})
    else:
        spec.append({"_target_": "Rand2DElasticd", "keys": list(keys), "mode": modes, "prob": 0.2,
                     "spacing": [12, 12], "magnitude_range": [0.5, 2.0], "padding_mode": "zeros"})
    return spec


class GatedRand3DElasticd(Rand3DElasticd):
    """MONAI's ``Rand3DElasticd`` that does no work on the draws it leaves unchanged.

    MONAI's version draws a full random offset field and resamples every key through an identity
    grid even when its probability says "no deformation"; at ``prob=0.2`` that was 80% of its cost
    for nothing (and the largest single cost of a cached ``swin_unetr`` epoch). Here the gate is
    drawn first and the deformation runs only when it passes.
    """

    def __init__(self, keys: Sequence[str], prob: float = 0.1, **kwargs: Any) -> None:
        super().__init__(keys, prob=1.0, **kwargs)
        self.gate = float(prob)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:  # noqa: D102
        if self.R.rand() >= self.gate:
            return dict(data)
        return super().__call__(data)


def corruption_spec(key: str = "image", spatial_dims: int = 3) -> Spec:
    """Scanner-like intensity corruptions of an image in roughly [0, 1] (2D or 3D)."""
    return [
        {"_target_": "RandScaleIntensityd", "keys": key, "factors": 0.4, "prob": 0.8},  # global gain: +-40%
        {"_target_": "RandShiftIntensityd", "keys": key, "offsets": 0.1, "prob": 0.5},
        {"_target_": "RandBiasFieldd", "keys": key, "prob": 0.5, "coeff_range": [0.0, 0.1]},
        {"_target_": "RandAdjustContrastd", "keys": key, "prob": 0.5, "gamma": [0.6, 1.6]},
        {"_target_": "RandHistogramShiftd", "keys": key, "prob": 0.3, "num_control_points": [5, 10]},
        {"_target_": "RandSimulateLowResolutiond", "keys": key, "prob": 0.25, "zoom_range": [0.4, 0.9],
         "upsample_mode": "trilinear" if spatial_dims == 3 else "bilinear"},
        {"_target_": "RandGibbsNoised", "keys": key, "prob": 0.2, "alpha": [0.0, 0.5]},
        {"_target_": "RandGaussianNoised", "keys": key, "prob": 0.3, "std": 0.05},
    ]


def augmentation_spec(preset: str | bool, keys: Sequence[str] = ("image", "label"), spatial_dims: int = 3,
                      num_labels: int = 3, synth: Mapping[str, Any] | None = None) -> Spec:
    """The random transforms of ``preset``, applied after cropping (image key first, label maps after).

    ``synth`` expects :data:`GEN_KEY` (from :func:`synth_labels_spec`) among ``keys`` and removes it;
    the ``synth`` mapping (``data.synth``) overrides :class:`RandLabelSynthd`'s arguments, e.g.
    ``{"prob": 0.6, "clutter_prob": 0.8}``.
    """
    preset = check_preset(preset)
    light = [{"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": 0.5},
             {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": 0.5}]
    if preset == "none":
        return []
    if preset == "light":
        return light
    labels = [k for k in keys if k != "image"]
    spec = deformation_spec(keys, labels, spatial_dims)
    if preset == "synth":
        spec += [{"_target_": "medimg.data.augment.RandLabelSynthd", "keys": "image", "gen_key": GEN_KEY,
                  "num_labels": int(num_labels), **synth_options(synth)},
                 {"_target_": "DeleteItemsd", "keys": GEN_KEY}]
    return spec + corruption_spec(spatial_dims=spatial_dims)


def synth_options(synth: Mapping[str, Any] | None) -> dict[str, float]:
    """:class:`RandLabelSynthd`'s arguments: the defaults, overridden by ``data.synth`` (checked)."""
    options = {"prob": 0.8, "head_only_prob": 0.5, "clutter_prob": 0.5, "stripped_prob": 0.0, **dict(synth or {})}
    unknown = set(options) - {"prob", "head_only_prob", "clutter_prob", "stripped_prob", "max_std", "max_blur"}
    if unknown:
        raise ConfigError("data.synth", f"unknown option(s) {', '.join(sorted(unknown))}")
    return {k: float(v) for k, v in options.items()}


def synth_labels_spec(preset: str | bool, num_labels: int) -> Spec:
    """The deterministic generation-label step ``synth`` needs before cropping (empty for other presets)."""
    if check_preset(preset) != "synth":
        return []
    return [{"_target_": "medimg.data.augment.SynthLabelsd", "keys": "label", "image_key": "image",
             "gen_key": GEN_KEY, "num_labels": int(num_labels)}]


class SynthLabelsd(MapTransform):
    """Add the generation label map: training labels, plus CSF and intensity classes of the rest of the head.

    Values: ``0`` air (outside the head), ``1..num_labels-1`` the training labels, ``num_labels``
    CSF (unlabelled voxels inside the labelled structures' filled hull that are darker than the
    labelled tissue), then ``head_classes`` classes of the remaining head voxels by intensity, then
    ``shells`` bands of ``shell_width`` voxels around everything so far. The bands give a
    skull-stripped image (such as the MNI152 template) a head to synthesise: each band gets its own
    random intensity, so synthetic skull, scalp and fat layers of any thickness and contrast appear.

    Args:
        keys: the label key.
        image_key: the (normalised) image.
        gen_key: where to put the generation labels.
        num_labels: training classes including background.
        head_classes: intensity classes of the non-labelled head.
        head_threshold: share of the image's 99th percentile above which a voxel is head, not air.
        shells: bands of synthetic head.
        shell_width: width of each band (voxels).
    """

    def __init__(self, keys: str, image_key: str = "image", gen_key: str = GEN_KEY, num_labels: int = 3,
                 head_classes: int = 3, head_threshold: float = 0.1, shells: int = 8,
                 shell_width: float = 2.0) -> None:
        super().__init__(keys)
        self.image_key, self.gen_key = image_key, gen_key
        self.num_labels, self.head_classes, self.head_threshold = int(num_labels), int(head_classes), head_threshold
        self.shells, self.shell_width = int(shells), float(shell_width)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add ``gen_key`` (same shape and meta as the label)."""
        d = dict(data)
        label = d[self.keys[0]]
        lab = _channel0(label).astype(np.int32)
        img = _channel0(d[self.image_key]).astype(np.float32)
        keep = lab == KEEP  # another region's labels (region split): never used, real image kept there
        lab[keep] = 0
        gen = lab.copy()
        tissue = lab > 0
        unlabelled = ~tissue & ~keep
        if tissue.any():
            hull = ndimage.binary_fill_holes(ndimage.binary_closing(tissue, iterations=3))
            dark = img < np.percentile(img[tissue], 5)
            gen[hull & unlabelled & dark] = self.num_labels  # CSF
        scale = float(np.percentile(img, 99)) or 1.0
        head = unlabelled & (gen == 0) & (img > self.head_threshold * scale)
        head = ndimage.binary_closing(head, iterations=2) & unlabelled & (gen == 0)
        if head.any():
            edges = np.quantile(img[head], np.linspace(0, 1, self.head_classes + 1)[1:-1])
            gen[head] = self.num_labels + 1 + np.searchsorted(edges, img[head])
        if self.shells and tissue.any():  # a head the image lacks (skull-stripped): bands around what is there
            inside = (gen > 0) | hull
            dist = ndimage.distance_transform_edt(~inside)
            band = np.ceil(dist / self.shell_width).astype(np.int32)
            ring = (~inside) & (band <= self.shells)
            gen[ring] = self.num_labels + 1 + self.head_classes + band[ring] - 1
        gen[keep] = KEEP
        d[self.gen_key] = _like(label, gen.astype(np.int16))
        return d


class RandLabelSynthd(RandomizableTransform, MapTransform):
    """Replace the image by one synthesised from the generation labels (random mean and spread per label).

    Air gets a dark mean; every other label a mean anywhere in [0, 1], a within-label standard
    deviation up to ``max_std`` and a light blur (partial-volume look).

    Args:
        keys: the image key.
        gen_key: the generation labels (:class:`SynthLabelsd`).
        prob: chance of synthesising (else the real image is kept, so real contrast is still seen).
        head_only_prob: of the synthesised samples, the share where only the generation-only
            labels (air, CSF, head) get new intensities and the labelled anatomy keeps its real
            ones: whatever surrounds the anatomy, it stays background.
        num_labels: training classes including background (generation labels at or above it are
            generation-only).
        max_std: largest within-label standard deviation.
        max_blur: largest Gaussian blur sigma (voxels).
        clutter_prob: chance of filling the air beyond the head with random blobs (see ``_clutter``).
        stripped_prob: chance of a skull-stripped look: every head label gets the air's intensity.
    """

    def __init__(self, keys: str, gen_key: str = GEN_KEY, prob: float = 0.8, max_std: float = 0.08,
                 max_blur: float = 1.0, head_only_prob: float = 0.0, num_labels: int = 3,
                 clutter_prob: float = 0.0, stripped_prob: float = 0.0) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.gen_key, self.max_std, self.max_blur = gen_key, max_std, max_blur
        self.head_only_prob, self.num_labels = float(head_only_prob), int(num_labels)
        self.clutter_prob, self.stripped_prob = float(clutter_prob), float(stripped_prob)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace the image with probability ``prob``."""
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        gen = _channel0(d[self.gen_key]).astype(np.int64)
        n = int(gen.max()) + 1
        means = self.R.uniform(0.0, 1.0, n)
        means[0] = self.R.uniform(0.0, 0.1)
        stds = self.R.uniform(0.0, self.max_std, n)
        stripped = self.R.uniform() < self.stripped_prob
        if stripped:  # a skull-stripped scan: the head (not the CSF) is air
            means[self.num_labels + 1:], stds[self.num_labels + 1:] = means[0], stds[0]
        synth = means[gen] + stds[gen] * self.R.standard_normal(gen.shape)
        if self.R.uniform() < self.clutter_prob and not stripped:
            synth = self._clutter(synth, gen == 0)
        sigma = self.R.uniform(0.0, self.max_blur)
        if sigma > 0.1:
            synth = ndimage.gaussian_filter(synth, sigma)
        image = d[self.keys[0]]
        real = _channel0(image).astype(np.float64)
        if self.R.uniform() < self.head_only_prob:  # real anatomy, synthetic surroundings
            anatomy = (gen > 0) & (gen < self.num_labels)
            synth = np.where(anatomy, real, synth)
        synth = np.where(gen == KEEP, real, synth)  # another region's voxels stay as scanned
        d[self.keys[0]] = _like(image, synth.astype(np.float32))
        return d


    def _clutter(self, synth: np.ndarray, air: np.ndarray) -> np.ndarray:
        """Random blobs of random intensity in the air: the face, neck and shoulders a real scan holds.

        A smooth random field (Gaussian noise on a grid of 3-10 voxel cells, linearly upsampled) is
        cut at random quantiles into 2-5 classes; class 0 stays air, the others get their own mean
        and spread, so structures of any brightness and shape lie beyond the head bands.
        """
        if not air.any():
            return synth
        classes = int(self.R.randint(2, 6))
        cell = self.R.uniform(3.0, 10.0)
        low = self.R.standard_normal(tuple(max(2, int(np.ceil(n / cell))) for n in air.shape))
        field = ndimage.zoom(low, [n / m for n, m in zip(air.shape, low.shape)], order=1)
        field = np.pad(field, [(0, max(0, n - f)) for n, f in zip(air.shape, field.shape)], mode="edge")
        field = field[tuple(slice(0, n) for n in air.shape)]
        cuts = np.quantile(field, np.sort(self.R.uniform(0.2, 1.0, classes - 1)))
        blob = np.searchsorted(cuts, field)
        means = self.R.uniform(0.0, 1.0, classes)
        stds = self.R.uniform(0.0, self.max_std, classes)
        filled = means[blob] + stds[blob] * self.R.standard_normal(air.shape)
        return np.where(air & (blob > 0), filled, synth)


def _channel0(x: Any) -> np.ndarray:
    """Channel 0 of a channel-first tensor or array, as numpy."""
    return np.asarray(torch.as_tensor(x)[0].detach().cpu())


def _like(reference: Any, array: np.ndarray) -> Any:
    """``array`` with a channel axis, as a tensor carrying ``reference``'s meta when it has one."""
    out = torch.as_tensor(array[None])
    return type(reference)(out, meta=dict(reference.meta)) if hasattr(reference, "meta") else out
