"""Per-scan intensity refinement of a segmentation network's probabilities (Bayes' rule, fitted by EM).

A network trained on synthetic contrasts knows *where* tissue lies but draws the boundary between
two tissues of the scan in front of it less sharply than that scan's own intensities do: on a real
T1 a 3-class intensity clustering inside the true brain mask beats it at the grey/white border.
The classic answer (SPM's unified segmentation, FSL FAST, ANTs Atropos) combines a spatial prior
with an intensity model fitted to the scan itself. Here the network's softmax is the prior:

    posterior_k(x) ∝ prior_k(x)^beta · p(I(x) | k)

- every foreground class has one Gaussian intensity model, fitted by expectation-maximisation
  (tissues of one MR contrast are close to Gaussian after bias correction). Its weights are the
  posterior raised to a power (``fit_power``, 4): a voxel split between two classes (a partial-volume
  voxel at the grey matter's edge, half cortex and half CSF or dura) counts little, so each Gaussian
  describes its *pure* tissue (the idea behind FSL FAST's partial-volume model). With plain posterior
  weights (power 1) the network's confident grey-matter prior over that darker rim drags the
  grey-matter Gaussian down and widens it, and the widened Gaussian then keeps the rim grey;
- the background (air, scalp, bone, CSF, neck: anything) has no parametric form: its density is the
  histogram of the intensities weighted by the network's background probability, fixed;
- voxels the network calls background with probability ≥ ``certain`` keep their probabilities (and
  cost nothing).

It runs in the model's space, on the preprocessed image and the softmax, before ``Invertd`` maps
the probabilities back onto the input's grid, so the written geometry is untouched. Whether a
bundle applies it is decided on its validation data (``task.intensity_refinement: auto``), like the
main-component step (:mod:`medimg.data.postprocess`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy.ndimage import gaussian_filter1d

from medimg.data.postprocess import as_numpy, check_choice, choose_on_validation, like

FIT_VOXELS = 250_000  # EM fits its Gaussians on about this many voxels
FIT_POWER = 4.0  # chosen on the MNI152 template's held-out region, alone and inside a head (BENCHMARKS.md)


def refine_with_intensities(prob: np.ndarray, image: np.ndarray, beta: float = 1.0, iterations: int = 15,
                            bins: int = 64, certain: float = 0.999, fit_power: float = FIT_POWER) -> np.ndarray:
    """Posterior class probabilities from the network's (the prior) and the scan's own intensities.

    Args:
        prob: softmax probabilities ``(C, *spatial)``; channel 0 is the background.
        image: the intensities the network saw, ``(*spatial)`` on the same grid.
        beta: weight of the network's prior (1: Bayes' rule; smaller lets intensities decide more).
        iterations: at most this many EM rounds (it stops earlier once the means settle).
        bins: histogram bins of the background's intensity density.
        certain: voxels with background probability at least this are left as they are.
        fit_power: the Gaussians are fitted with the posterior to this power as weights (1: plain
            EM; larger: partial-volume voxels count less).

    Returns:
        Probabilities of the same shape, dtype float32, summing to 1 over channels.

    Raises:
        ValueError: shapes that do not match, fewer than 2 channels, or ``beta`` or ``fit_power`` not positive.
    """
    prob = np.asarray(prob, dtype=np.float32)
    image = np.asarray(image, dtype=np.float32)
    if prob.ndim < 2 or prob.shape[0] < 2 or prob.shape[1:] != image.shape:
        raise ValueError(f"probabilities {prob.shape} and image {image.shape} do not match (C, *spatial) / (*spatial)")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not fit_power > 0:
        raise ValueError(f"fit_power must be positive, got {fit_power}")
    out = prob.copy()
    roi = prob[0] < certain
    if roi.sum() < 2 * prob.shape[0]:
        return out
    x = image[roi]
    log_prior = beta * np.log(np.clip(prob[:, roi], 1e-6, 1.0))
    weights = np.exp(log_prior - log_prior.max(0))
    weights /= weights.sum(0)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return out
    idx = np.minimum(((x - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)
    hist = gaussian_filter1d(np.bincount(idx, weights=weights[0], minlength=bins) + 1e-3, 1.0)
    log_bg = np.log(hist / hist.sum() * bins / (hi - lo)).astype(np.float32)[idx]
    stride = max(1, x.size // FIT_VOXELS)  # the parameters from a regular subsample, the posterior everywhere
    xs, log_prior_s, log_bg_s = x[::stride], log_prior[:, ::stride], log_bg[::stride]
    post, stats, means = weights[:, ::stride], [], None
    for _ in range(iterations):
        stats = []
        for k in range(1, prob.shape[0]):
            w = post[k] ** fit_power
            total = float(w.sum()) + 1e-6
            mu = float((w * xs).sum()) / total
            sd = float(np.sqrt((w * (xs - mu) ** 2).sum() / total)) + 1e-3 * (hi - lo)
            stats.append((mu, sd))
        post = _posterior(xs, log_prior_s, log_bg_s, stats)
        new = np.array([s[0] for s in stats])
        if means is not None and np.abs(new - means).max() < 1e-4 * (hi - lo):
            break
        means = new
    post = _posterior(x, log_prior, log_bg, stats)
    out[:, roi] = post
    return out


def _posterior(x: np.ndarray, log_prior: np.ndarray, log_bg: np.ndarray,
               stats: list[tuple[float, float]]) -> np.ndarray:
    """Normalised ``prior · likelihood`` for intensities ``x``: background histogram, one Gaussian per class."""
    loglik = [log_bg] + [-0.5 * ((x - mu) / sd) ** 2 - np.float32(np.log(sd * np.sqrt(2 * np.pi)))
                         for mu, sd in stats]
    logpost = log_prior + np.stack(loglik)
    post = np.exp(logpost - logpost.max(0))
    return post / post.sum(0)


class IntensityRefined(MapTransform):
    """:func:`refine_with_intensities` for a bundle's ``postprocessing``, between softmax and ``Invertd``.

    Args:
        keys: the probability keys (``pred``), channel-first.
        image_key: the preprocessed image on the same grid (its first channel is used).
        enabled: apply it (``False``: identity; the bundle records the choice).
        beta: see :func:`refine_with_intensities`.
        fit_power: see :func:`refine_with_intensities`.
        allow_missing_keys: as in MONAI.
    """

    def __init__(self, keys: KeysCollection, image_key: str = "image", enabled: bool = True, beta: float = 1.0,
                 fit_power: float = FIT_POWER, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not (float(beta) > 0 and float(fit_power) > 0):
            raise ValueError(f"beta and fit_power must be positive, got {beta} and {fit_power}")
        self.image_key, self.enabled, self.beta = image_key, bool(enabled), float(beta)
        self.fit_power = float(fit_power)

    def __call__(self, data: dict) -> dict:
        """Refine each key with the image's intensities; the tensor keeps its type and metadata."""
        d = dict(data)
        if not self.enabled:
            return d
        image = as_numpy(d[self.image_key])[0]
        for key in self.key_iterator(d):
            d[key] = like(d[key], refine_with_intensities(as_numpy(d[key]), image, self.beta,
                                                                          fit_power=self.fit_power))
        return d


def check_refinement_mode(value: Any) -> Any:
    """``task.intensity_refinement`` checked: ``auto``, ``true`` or ``false``."""
    return check_choice(value, "task.intensity_refinement")


def choose_refinement(mode: Any, metrics: dict[str, Any]) -> bool:
    """Whether the bundle applies the intensity refinement.

    ``auto``: when the refined validation Dice (``val/dice_refined``) is at least the plain one
    (:func:`~medimg.data.postprocess.choose_on_validation` with no tolerance: the step changes
    every boundary, so it must not cost anything); ``False`` when nothing was measured.
    """
    return choose_on_validation(mode, metrics, "task.intensity_refinement", "val/dice_refined", 0.0)
