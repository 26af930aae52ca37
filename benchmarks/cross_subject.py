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
- wall time of the prediction.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medimg.bundle.loader import load_bundle  # noqa: E402

TEMPLATES = Path("/usr/share/mricron/templates")


def evaluate(bundle: Path, subject: Path, brain_mask: np.ndarray, aal: np.ndarray) -> dict[str, float]:
    """The metrics of one bundle on the subject."""
    predictor = load_bundle(bundle, device="cpu")
    start = time.perf_counter()
    labels = np.asarray(predictor.predict(str(subject)).array)
    seconds = time.perf_counter() - start
    names = {v: k for k, v in _labels(bundle).items()}
    tissue = labels > 0
    outside = float((tissue & ~brain_mask).sum() / max(tissue.sum(), 1))
    dice = float(2 * (tissue & brain_mask).sum() / max(tissue.sum() + brain_mask.sum(), 1))
    gm_value = next((v for v, n in names.items() if "grey" in n or "gray" in n), None)
    gm_in_aal = float((labels[aal > 0] == gm_value).mean()) if gm_value is not None else float("nan")
    return {"outside": outside, "brain_dice": dice, "gm_in_aal": gm_in_aal, "seconds": seconds}


def _labels(bundle: Path) -> dict[str, int]:
    import json

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    return {str(k): int(v) for k, v in meta.get("labels", {}).items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", action="append", required=True)
    parser.add_argument("--templates", default=str(TEMPLATES), help="folder with ch2.nii.gz, ch2bet.nii.gz, aal.nii.gz")
    args = parser.parse_args()
    folder = Path(args.templates)
    subject = folder / "ch2.nii.gz"
    if not subject.is_file():
        sys.exit(f"error: {subject}: missing; apt-get install mricron-data")
    brain = np.asarray(nib.load(folder / "ch2bet.nii.gz").dataobj) > 0
    aal = np.asarray(nib.load(folder / "aal.nii.gz").dataobj)
    print(f"machine: {platform.machine()} {platform.processor() or ''}; subject: Colin27 {nib.load(subject).shape}")
    print(f"{'bundle':60s} {'outside':>8s} {'brain Dice':>10s} {'GM in AAL':>9s} {'time s':>7s}")
    for b in args.bundle:
        m = evaluate(Path(b), subject, brain, aal)
        print(f"{b[-60:]:60s} {m['outside']:8.3f} {m['brain_dice']:10.3f} {m['gm_in_aal']:9.3f} {m['seconds']:7.1f}")


if __name__ == "__main__":
    main()
