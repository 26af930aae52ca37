"""Measure a trained 3D promptable bundle (``medsam3d``) and, with ``--name``, ship it in ``medimg/zoo``.

    apt-get install mricron-data invesalius-examples
    python benchmarks/ship_promptable3d.py --bundle runs/medsam3d_structures/<run>/bundle [--json out.json]
    python benchmarks/ship_promptable3d.py --bundle ... --name medsam3d \\
        --command "python -m medimg.train bundle=medsam3d_structures" --wall "1 h 5 min"

Every figure goes through ``medimg.load_bundle`` and the prompts-JSON path ``medimg.infer`` runs
(:mod:`medimg.predictors.evaluation3d`: whole volumes, windows growing with the object):

1. **held-out structures** of the ``structures`` dataset's MNI152 atlas (every fourth Harvard-Oxford
   region, five JHU tracts on both sides; never trained on): box, 1 click, 3 clicks;
2. **a held-out head**, Colin27 (Debian ``mricron-data``; a real single-subject T1 with skull and
   scalp) with the AAL deep grey structures (thalamus, caudate, putamen, pallidum, hippocampus,
   amygdala, each side): the same prompts, and each mask's share outside the expert brain mask;
3. **white-matter clicks on Colin27** (``benchmarks/cross_subject_prompts.py``: 12 seeded clicks on
   sure white matter): the share of each mask outside the brain, and whether it holds the click.

With ``--name`` the bundle is copied into the zoo with its card (``docs/README.md``), headline and
``medimg_card_check`` (box and one-click Dice on two held-out structures, which the suite repeats).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cross_subject_prompts import evaluate as wm_evaluate  # noqa: E402
from cross_subject_prompts import wm_clicks  # noqa: E402
from interactive import DEEP_GREY, TEMPLATES  # noqa: E402
from timing import machine  # noqa: E402

from medimg.bundle.loader import load_bundle  # noqa: E402
from medimg.bundles import ZOO, install_staged  # noqa: E402
from medimg.data.embedded.structures import prepare_structures  # noqa: E402
from medimg.io.image import read_image  # noqa: E402
from medimg.predictors.evaluation import validation_case  # noqa: E402
from medimg.predictors.evaluation3d import PROMPTS_3D, card_check3d, score_volume  # noqa: E402

CARD_TOLERANCE = 0.02
CHECK = {"case": "mni152_atlas", "structures": [20, 145], "min_voxels": 200, "prompts": ["box", "click1"]}
SIDES = {f"{side} {name}": (v,) for name, pair in DEEP_GREY.items() for side, v in zip(("left", "right"), pair)}


def choose_threshold(bundle: str, manifest: Path, thresholds: list[float], min_voxels: int) -> tuple[float, dict]:
    """The mask threshold with the best mean of box and one-click Dice on the held-out structures.

    Chosen on the validation structures only (the run's own validation set), never on Colin27.
    """
    predictor = load_bundle(bundle, device="cpu")
    image, label, intensity, values = validation_case(manifest, "mni152_atlas")
    sweep = {}
    for t in thresholds:
        predictor.threshold = t
        res = score_volume(predictor, image, label, intensity, values, min_voxels, ("box", "click1"))["mean"]
        sweep[str(t)] = {k: round(v, 4) for k, v in res.items()}
        print(f"threshold {t}: box {res['box']:.3f}, 1 click {res['click1']:.3f}", flush=True)
    best = max(thresholds, key=lambda t: sweep[str(t)]["box"] + sweep[str(t)]["click1"])
    return best, sweep


def measure(bundle: str, manifest: Path, clicks: int, min_voxels: int) -> dict:
    """The three held-out sets' figures (module docstring) for one bundle."""
    predictor = load_bundle(bundle, device="cpu")
    out: dict = {}
    start = time.perf_counter()
    image, label, intensity, values = validation_case(manifest, "mni152_atlas")
    out["held-out structures: MNI152 atlas"] = score_volume(predictor, image, label, intensity, values, min_voxels)
    subject = TEMPLATES / "ch2.nii.gz"
    if not subject.is_file():
        sys.exit(f"error: {subject}: missing; apt-get install mricron-data")
    brain = np.asarray(nib.load(TEMPLATES / "ch2bet.nii.gz").dataobj) > 0
    aal = np.asarray(nib.load(TEMPLATES / "aal.nii.gz").dataobj)
    out["held-out head: Colin27 AAL deep grey"] = score_volume(predictor, read_image(subject), aal.astype(np.int64),
                                                               "mr", SIDES, min_voxels, brain=brain)
    img = nib.load(str(subject))
    points = wm_clicks(np.asarray(img.dataobj, dtype=np.float32), brain, aal, img.affine, clicks)
    out["Colin27 white-matter clicks"] = wm_evaluate(Path(bundle), subject, points, brain, aal, img.affine)
    out["seconds"] = time.perf_counter() - start
    return out


def table(m: dict) -> str:
    """The card's and README's held-out table."""
    rows = ["| held-out set | targets | box | 1 click | 3 clicks | mask outside the brain (1 click) |",
            "|---|---|---|---|---|---|"]
    for case in ("held-out structures: MNI152 atlas", "held-out head: Colin27 AAL deep grey"):
        r = m[case]
        outside = f"{r['mean']['outside_click1']:.1%}" if "outside_click1" in r["mean"] else "n/a (template)"
        rows.append(f"| {case} | {r['targets']} | " + " | ".join(f"{r['mean'][p]:.3f}" for p in PROMPTS_3D)
                    + f" | {outside} |")
    thal = [m["held-out head: Colin27 AAL deep grey"]["structures"].get(f"{s} thalamus") for s in ("left", "right")]
    if all(thal):
        rows.append("| Colin27 thalamus (left / right) | 2 | " + " | ".join(
            " / ".join(f"{t[p]:.3f}" for t in thal) for p in PROMPTS_3D) + " | "
            + " / ".join(f"{t['outside_click1']:.1%}" for t in thal) + " |")
    wm = m["Colin27 white-matter clicks"]
    rows.append(f"| Colin27 white-matter clicks | {wm['clicks']} | | | | {wm['outside']:.1%} "
                f"(click in its mask: {wm['in_mask']:.0%}; median {wm['voxels']:.0f} voxels) |")
    return "\n".join(rows)


def threshold_text(meta: dict) -> str:
    """The card's sentence on the mask threshold and the sweep that chose it (empty without a sweep)."""
    sweep = meta.get("medimg_threshold_sweep")
    if not sweep:
        return ""
    rows = "; ".join(f"{t}: box {v['box']:.3f}, 1 click {v['click1']:.3f}" for t, v in sweep.items())
    return (f"\nMask threshold {meta['medimg_threshold']} (`threshold` of the predictor in `inference.json`), "
            f"chosen on the held-out validation structures by box + 1-click Dice, never on Colin27: {rows}.\n")


def card(name: str, args: argparse.Namespace, meta: dict, m: dict, size_mb: float) -> str:
    """The model card of the shipped 3D bundle."""
    commands = "\n".join(args.command)
    return f"""# {name}: 3D clicks and boxes on many structures (3DSAM-adapter-style)

A volumetric promptable model (medimg's 3DSAM-adapter design: a 2D SAM-style ViT lifted to 3D
with depth-wise adapters, a 3D prompt encoder and mask decoder) trained on the `structures`
dataset's MNI152 atlas volume: FSL's MNI152 NLin6 head (a real head with scalp and skull) with the
Harvard-Oxford cortical regions, the JHU white-matter tracts and AICHA's deep grey nuclei. One click
means "this structure": the target is the part of the clicked label connected to the click.
Input: a 3D MR volume, any orientation; output: one mask per object in the input's exact geometry.

## Use

```bash
python -m medimg.infer --bundle {name} --input scan.nii.gz --prompts prompts.json --output mask.nii.gz
python -m medimg.label serve --studies studies/          # served by default with the other shipped bundles
```

Prompts: 3D boxes, clicks (`points` / `point_labels`), scribbles and lassos (a lasso's box grows
along its normal). The windows grow with the object until its mask stops at their faces.

## Recipe

```bash
{commands}
```

Wall time {args.wall} on {args.machine}. {meta.get('medimg_trainable', '')}

## Held-out results

Nothing here was trained on. Measured through `medimg.load_bundle` and the prompts-JSON path
(`benchmarks/ship_promptable3d.py`, `medimg.predictors.evaluation3d`), whole volumes, Dice on the
target's largest connected piece, structures weighted equally:

{table(m)}
{threshold_text(meta)}
## Limitations

- A tiny ViT encoder (depth 2, width 64) trained from scratch on a CPU: no SAM / MedSAM image
  encoder weights (none offline in the 3D layout); few training steps (see the recipe).
- MR T1 only (one intensity window); the CT volumes of `structures` were not used.
- Atlas structures on one template; real pathology (tumours, lesions) was not in training.
- Thin, branching structures (cortical gyri, tracts) are ambiguous from one click: add clicks or a box.
{args.notes_text}

## Licences

- Weights: Apache-2.0 (medimg), derived from FSL-licensed atlases (Harvard-Oxford, JHU, MNI152
  NLin6; non-commercial use) and AICHA (Debian `mricron-data`): treat them as for non-commercial use.
- Colin27 and AAL (evaluation only, Debian `mricron-data`): not redistributed here.
"""


def main() -> None:
    """Measure; with ``--name`` also write the card and copy the bundle into the zoo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument("--command", action="append", default=[])
    parser.add_argument("--wall", default="")
    parser.add_argument("--machine", default=f"{platform.machine()} CPU, 2 cores, no GPU")
    parser.add_argument("--clicks", type=int, default=12, help="white-matter clicks on Colin27")
    parser.add_argument("--min-voxels", type=int, default=200)
    parser.add_argument("--notes", default=None)
    parser.add_argument("--schema", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--thresholds", default=None,
                        help="comma-separated mask thresholds to choose from on the validation structures")
    args = parser.parse_args()
    args.notes_text = Path(args.notes).read_text() if args.notes else ""
    manifest = prepare_structures()
    print(f"machine: {machine()}")
    sweep, best = None, None
    if args.thresholds:  # choose the mask threshold on the validation structures, then measure a copy with it
        best, sweep = choose_threshold(args.bundle, manifest, [float(t) for t in args.thresholds.split(",")],
                                       args.min_voxels)
        staged = Path(tempfile.mkdtemp()) / "bundle"
        shutil.copytree(args.bundle, staged)
        inference = json.loads((staged / "configs" / "inference.json").read_text())
        inference["predictor"]["threshold"] = best
        (staged / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
        args.bundle = str(staged)
        print(f"threshold {best} chosen on the held-out validation structures")
    m = measure(args.bundle, manifest, args.clicks, args.min_voxels)
    print(table(m))
    print(f"{m['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(m, indent=1))
    if not args.name:
        return
    if not args.command or not args.wall:
        sys.exit("error: --name needs --command and --wall (the card's recipe)")
    tmp = ZOO / f".{args.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(args.bundle, tmp, ignore=shutil.ignore_patterns("sample", "eval"))
    meta = json.loads((tmp / "configs" / "metadata.json").read_text())
    structures, colin = m["held-out structures: MNI152 atlas"], m["held-out head: Colin27 AAL deep grey"]
    meta["medimg_headline"] = {
        "held-out structures (MNI152 atlas) box / 1 / 3 clicks Dice": " / ".join(
            f"{structures['mean'][p]:.3f}" for p in PROMPTS_3D),
        "held-out head (Colin27 deep grey) box / 1 / 3 clicks Dice": " / ".join(
            f"{colin['mean'][p]:.3f}" for p in PROMPTS_3D),
        "Colin27 white-matter click: mask outside the brain": f"{m['Colin27 white-matter clicks']['outside']:.1%}",
    }
    dice = card_check3d(load_bundle(tmp, device="cpu"), manifest, CHECK)
    meta["medimg_card_check"] = {**CHECK, "dice": dice, "tolerance": CARD_TOLERANCE}
    meta["medimg_storage"] = {"weights": "fp32"}
    if sweep is not None:
        meta["medimg_threshold_sweep"] = sweep
        meta["medimg_threshold"] = best
    meta["eval_metrics"] = {**meta.get("eval_metrics", {}), "interactive3d": m}
    install_staged(tmp, args.name, meta, lambda size: card(args.name, args, meta, m, size), args.schema)


if __name__ == "__main__":
    main()
