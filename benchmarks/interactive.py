"""Held-out interactive quality of promptable 2D bundles, through the prompts JSON path ``medimg.infer`` runs.

    apt-get install mricron-data invesalius-examples   # Colin27 + AAL (held-out volume); the structures data
    python benchmarks/interactive.py --bundle ZERO_SHOT --bundle TUNED [--per-structure 3] [--json out.json]

Two held-out sets, neither ever trained on:

- **held-out structures** of the ``structures`` dataset (``medimg.data.embedded.structures``: every
  fourth Harvard-Oxford region, five JHU tracts, the thoracic vertebral column), on the slices of
  each volume's own planes;
- **a held-out volume**: Colin27 (a real single-subject T1 with skull and scalp) and the AAL deep
  grey-matter structures of ``benchmarks/forgetting.py`` (caudate ... amygdala, left and right).

On ``--per-structure`` slices of each structure and plane (evenly spaced, area >= ``--min-area``),
the largest connected piece is the target, prompted as a user would (box, 1 / 3 / 5 clicks,
scribble, lasso: :mod:`medimg.predictors.evaluation`), each prompt a prompts-JSON document run
through ``predictor.segment_prompts`` (what ``medimg.infer --prompts`` runs). Each set is also
reported over its compact targets alone (solidity >= 0.9: a disc or an ellipse, not a bending
gyrus), each target weighted equally.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import machine  # noqa: E402

from medimg.bundle.loader import load_bundle  # noqa: E402
from medimg.io.image import read_image  # noqa: E402
from medimg.predictors.evaluation import PROMPTS, named_structures, score_case  # noqa: E402

TEMPLATES = Path("/usr/share/mricron/templates")
DEEP_GREY = {"caudate": (71, 72), "putamen": (73, 74), "pallidum": (75, 76), "thalamus": (77, 78),
             "hippocampus": (37, 38), "amygdala": (41, 42)}


def evaluate(bundle: str, cases: list[tuple], per: int, min_area: int,
             masks: list[np.ndarray] | None = None) -> dict[str, dict]:
    """Mean Dice per prompt kind over each case (set of structures), and per structure.

    ``masks``: if given, every predicted slice mask is appended, in order.
    """
    base = load_bundle(bundle, device="cpu")
    results = {}
    for case, image_path, label_path, intensity, planes, values, names in cases:
        image, label = read_image(image_path), read_image(label_path).array.astype(np.int64)
        start = time.perf_counter()
        res = score_case(base, image, label, intensity, planes, values or named_structures(label, names),
                         per, min_area, masks=masks)
        results[case] = {**res, "seconds": time.perf_counter() - start}
        compact = res["compact"]
        print(f"{bundle} | {case} | " + " ".join(f"{p} {res['mean'][p]:.3f}" for p in PROMPTS)
              + f" | {res['targets']} targets, {results[case]['seconds']:.0f} s | compact ({compact['targets']} "
              + "targets): " + " ".join(f"{p} {compact[p]:.3f}" for p in PROMPTS if p in compact), flush=True)
    return results


def cases(structures_manifest: Path, templates: Path) -> list[tuple]:
    """``(name, image, label, intensity, planes, structures, names)`` of each held-out set.

    The held-out structures of each ``structures`` volume (``structures`` ``None``: every value of its
    held-out label map, named from ``names``), then Colin27's deep grey matter.
    """
    doc = json.loads(structures_manifest.read_text())
    root = structures_manifest.parent
    out = [(f"held-out structures: {e['subject']}", root / e["image"], root / e["label"], e["intensity"],
            e["planes"], None, doc["labels"]) for e in doc["validation"]]
    if not (templates / "ch2.nii.gz").is_file():
        sys.exit(f"error: {templates / 'ch2.nii.gz'}: missing; apt-get install mricron-data")
    out.append(("held-out volume: Colin27 AAL deep grey", templates / "ch2.nii.gz", templates / "aal.nii.gz", "mr",
                ["axial", "coronal", "sagittal"], DEEP_GREY, {}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", action="append", required=True, help="bundle folder or shipped name")
    parser.add_argument("--structures", default=None, help="the structures manifest (default: materialise it)")
    parser.add_argument("--templates", default=str(TEMPLATES), help="folder with ch2.nii.gz and aal.nii.gz")
    parser.add_argument("--per-structure", type=int, default=3, help="slices per structure and plane")
    parser.add_argument("--min-area", type=int, default=40)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from medimg.data.embedded.structures import prepare_structures

    manifest = Path(args.structures) if args.structures else prepare_structures()
    print(f"machine: {machine()}")
    all_cases = cases(manifest, Path(args.templates))
    results = {b: evaluate(b, all_cases, args.per_structure, args.min_area) for b in args.bundle}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
