"""Cross-subject check of a tissue-segmentation bundle on a real single-subject T1 (Colin27), through the bundle path.

    apt-get install mricron-data      # Debian: Colin Holmes' T1 (ch2.nii.gz, with skull and scalp),
                                      # its brain extraction (ch2bet.nii.gz) and the AAL atlas on it
    python benchmarks/cross_subject.py --bundle runs/swin_unetr/<run>/bundle [--bundle ...]

Colin27 is one person's brain (27 averaged scans from another scanner), not a population template
like MNI152: the head around the brain is real. For each bundle it reports, from
``medimg.load_bundle(bundle).predict(ch2.nii.gz)``:

- ``outside``: predicted tissue outside the brain mask, as a share of all predicted tissue;
- ``brain Dice``: predicted tissue (any label) against the brain mask;
- ``GM in AAL``: share of AAL's grey-matter parcels predicted as grey matter;
- wall time of the prediction;
- ``template``: mean Dice on the MNI152 template's held-out region (posterior of y = -28 mm), the
  whole template given to the predictor, as a user would.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medimg.bundle.loader import load_bundle  # noqa: E402

TEMPLATES = Path("/usr/share/mricron/templates")


def template_heldout(predictor, names: dict[int, str], surfaces: bool = False,
                     dataset: str = "mni152") -> dict[str, float]:
    """Dice per class on the MNI152 template's held-out region (the manifest's region split), whole volume in.

    With ``surfaces``, also HD95 and surface Dice (1 mm tolerance) per class, on the template's own 1 mm grid.
    ``dataset``: ``mni152`` (the skull-stripped template) or ``mni152_head`` (its brain inside a real head).
    """
    from medimg.data.embedded import embedded_manifest
    from medimg.data.manifest import load_manifest
    from medimg.data.transforms import world_range_region

    manifest = load_manifest(*embedded_manifest(dataset, None))
    rs = manifest.meta["region_split"]
    item = manifest.splits[rs["split"]][0]
    image, truth = nib.load(item["image"]), np.asarray(nib.load(item["label"]).dataobj)
    labels = np.asarray(predictor.predict(str(item["image"])).array)
    region = world_range_region(truth.shape, image.affine, rs["axis"], *rs["val"])
    spacing = [float(s) for s in image.header.get_zooms()[:3]]
    out = {}
    for value, name in names.items():
        if value == 0:
            continue
        p, t = (labels == value) & region, (truth == value) & region
        out[f"template_{name}"] = float(2 * (p & t).sum() / max(p.sum() + t.sum(), 1))
        if surfaces:
            out[f"hd95_{name}"], out[f"nsd_{name}"] = surface_metrics(p, t, spacing)
    out["template_mean"] = float(np.mean([v for k, v in out.items() if k.startswith("template_")]))
    return out


def surface_metrics(pred: np.ndarray, truth: np.ndarray, spacing: list[float],
                    tolerance_mm: float = 1.0) -> tuple[float, float]:
    """HD95 (mm) and surface Dice at ``tolerance_mm`` of two binary masks (MONAI's metrics)."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    def onehot(mask: np.ndarray) -> torch.Tensor:
        m = torch.from_numpy(mask)[None]
        return torch.stack([~m, m], dim=1).float()

    p, t = onehot(pred), onehot(truth)
    hd = compute_hausdorff_distance(p, t, percentile=95, spacing=spacing)
    nsd = compute_surface_dice(p, t, class_thresholds=[tolerance_mm], spacing=spacing)
    return float(hd.flatten()[0]), float(nsd.flatten()[0])


def evaluate(bundle: Path, subject: Path, brain_mask: np.ndarray, aal: np.ndarray,
             device: str = "cpu") -> dict[str, float]:
    """The metrics of one bundle on the subject, and on the template's held-out region."""
    predictor = load_bundle(bundle, device=device)
    start = time.perf_counter()
    labels = np.asarray(predictor.predict(str(subject)).array)
    seconds = time.perf_counter() - start
    names = {v: k for k, v in _labels(bundle).items()}
    tissue = labels > 0
    outside = float((tissue & ~brain_mask).sum() / max(tissue.sum(), 1))
    dice = float(2 * (tissue & brain_mask).sum() / max(tissue.sum() + brain_mask.sum(), 1))
    gm_value = next((v for v, n in names.items() if "grey" in n or "gray" in n), None)
    gm_in_aal = float((labels[aal > 0] == gm_value).mean()) if gm_value is not None else float("nan")
    return {"outside": outside, "brain_dice": dice, "gm_in_aal": gm_in_aal, "seconds": seconds,
            **template_heldout(predictor, names)}


def _labels(bundle: Path) -> dict[str, int]:
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    return {str(k): int(v) for k, v in meta.get("labels", {}).items()}


def colin_arguments(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, Path, np.ndarray, np.ndarray]:
    """Parse the shared options; ``(args, ch2 path, brain mask, AAL atlas)``, exiting when mricron-data is missing."""
    parser.add_argument("--bundle", action="append", required=True)
    parser.add_argument("--templates", default=str(TEMPLATES), help="folder with ch2.nii.gz, ch2bet.nii.gz, aal.nii.gz")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    folder = Path(args.templates)
    subject = folder / "ch2.nii.gz"
    if not subject.is_file():
        sys.exit(f"error: {subject}: missing; apt-get install mricron-data")
    brain = np.asarray(nib.load(folder / "ch2bet.nii.gz").dataobj) > 0
    aal = np.asarray(nib.load(folder / "aal.nii.gz").dataobj)
    if aal.shape != brain.shape or brain.shape != nib.load(subject).shape:
        sys.exit(f"error: {folder}: ch2, ch2bet and aal must share one grid")
    return args, subject, brain, aal


def main() -> None:
    args, subject, brain, aal = colin_arguments(argparse.ArgumentParser())
    print(f"machine: {platform.machine()} {platform.processor() or ''}; subject: Colin27 {nib.load(subject).shape}")
    columns = [("template_mean", "template", 9, ".3f"), ("outside", "outside", 9, ".3f"),
               ("brain_dice", "brain Dice", 11, ".3f"), ("gm_in_aal", "GM in AAL", 10, ".3f"),
               ("seconds", "time s", 8, ".1f")]
    table(args, lambda b: evaluate(b, subject, brain, aal, args.device), columns)


def table(args: argparse.Namespace, measure, columns: list[tuple[str, str, int, str]]) -> dict[str, dict]:
    """Measure each ``--bundle``, print a row per bundle (``columns``: key, header, width, format), write ``--json``."""
    print(f"{'bundle':<60}" + "".join(f"{head:>{width}}" for _, head, width, _ in columns))
    results = {}
    for b in args.bundle:
        r = results[b] = measure(Path(b))
        print(f"{b[-60:]:<60}" + "".join(f"{r[key]:>{width}{fmt}}" for key, _, width, fmt in columns), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
