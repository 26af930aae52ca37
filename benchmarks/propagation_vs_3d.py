"""3D work: the 2D model with slice propagation against the 3D model, same run, same targets, same prompts.

    apt-get install mricron-data
    python benchmarks/propagation_vs_3d.py [--json propagation_vs_3d.json] [--models litemedsam,medsam3d]

Both shipped bundles are loaded by name through ``medimg.load_bundle`` and sent the very same 3D
prompts-JSON documents through ``segment_prompts`` (the path ``medimg.infer`` runs), scored by
:mod:`medimg.predictors.evaluation3d` on whole volumes (Dice on each target's largest connected
piece, structures weighted equally):

1. the held-out structures of the ``structures`` dataset's MNI152 atlas (never trained on by either);
2. Colin27 (Debian ``mricron-data``, a held-out real head with skull and scalp) with the AAL deep
   grey structures, and each mask's share outside the ``ch2bet`` brain mask;
3. a control for "does it look at the image": the same white-matter clicks on Colin27 and on
   Gaussian noise of the same shape and affine; the masks' sizes, and the Dice between the mask on
   the head and the mask on noise (near 1: the answer hardly depends on the image).

``--models`` may also name ``no-image``, a reference that never reads the voxels (:class:`NoImage`:
the ellipsoid inscribed in the box; a ball of 10 mm around each positive click less one around each
negative click, the radius fixed beforehand, not fitted). ``--merge OLD.json`` adds the models of an
earlier run of this script to the tables, after checking that they were sent the same prompts.
``--cards`` writes the figures into the shipped cards: the section between the ``propagation_vs_3d``
markers of each bundle's ``docs/README.md``, its ``medimg_held_out_3d`` (which orders the models
``python -m medimg.label serve`` offers, :func:`medimg.bundles.serving_order`) and
``eval_metrics.interactive3d_compared``.

How each model takes a 3D prompt (the fairness rule; the documents are identical, each predictor
reads them as its bundle defines):

- ``box`` (the target's tight 3D box): the 3D model runs its windows inside the box. The 2D model
  (``litemedsam``, slicing axially as shipped) segments the box's middle slice with the box's
  in-plane extent as its 2D box, then propagates slice by slice in both directions, each slice's
  box the previous mask's bounding box, kept inside the 3D box and its slice range.
- ``click1`` (one positive click at the target's most interior voxel): the 2D model segments the
  click's own slice from the click, then propagates both ways until the mask vanishes, its
  predicted IoU drops below 0.5 or its mean intensity departs from the first slice's.
- ``click3``: then two correction clicks at the most interior voxel of the model's own largest
  error (positive in a miss, negative in a false positive), every request carrying all clicks so
  far. The 2D model starts a propagation from every slice holding a positive click and honours each
  click on the slice it lies on; the 3D model takes them together. The corrections depend on each
  model's previous answer, so only ``box`` and ``click1`` are the same documents; the rule is the same.

Every request's wall time is recorded. The 2D model's slice embeddings are kept for the run (an
embedding cache large enough for the volumes, as the server keeps them), so its first requests on
a volume pay the image encoder for each slice they visit and later ones mostly do not; the first
click on a fresh volume is timed separately (``cold click``: that request plus the simulated user's
own distance transform for the click, which is all the ``no-image`` row's cold click is).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cross_subject_prompts import wm_clicks  # noqa: E402
from interactive import TEMPLATES  # noqa: E402
from ship_promptable3d import SIDES  # noqa: E402
from timing import machine  # noqa: E402

from medimg.bundle.loader import load_bundle  # noqa: E402
from medimg.io.image import Image, read_image  # noqa: E402
from medimg.predictors.evaluation import dice, validation_case  # noqa: E402
from medimg.predictors.evaluation3d import PROMPTS_3D, VolumeScorer, same_prompts, score_models  # noqa: E402

ATLAS, COLIN = "held-out structures: MNI152 atlas", "held-out head: Colin27 AAL deep grey"
MODELS = ("litemedsam", "medsam3d")
MODES = {"litemedsam": "2D, axial slices, slice propagation", "medsam3d": "3D, whole volume",
         "no-image": "reference: never reads the image"}
CASE_SHORT = {ATLAS: "MNI152 held-out", COLIN: "Colin27 deep grey"}
BEGIN = "<!-- propagation_vs_3d: written by python benchmarks/propagation_vs_3d.py --cards -->"
END = "<!-- /propagation_vs_3d -->"
NO_IMAGE = "no-image"
BALL_MM = 10.0


class NoImage:
    """The reference that never reads the voxels: what the prompts alone give (see the module docstring)."""

    def segment_prompts(self, image: Image, prompts: Any, intensity: str | None = None) -> np.ndarray:
        grid = np.ogrid[tuple(slice(0, n) for n in image.array.shape)]
        if len(prompts.boxes):
            lo, hi = np.asarray(prompts.boxes[0][:3], float), np.asarray(prompts.boxes[0][3:], float)
            centre, semi = (lo + hi) / 2, (hi - lo) / 2 + 0.5
            return (sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, semi)) <= 1).astype(np.uint8)
        spacing = np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)
        mask = np.zeros(image.array.shape, bool)
        for point, positive in zip(prompts.points, prompts.point_labels):
            ball = sum(((g - c) * d) ** 2 for g, c, d in zip(grid, point, spacing)) <= BALL_MM ** 2
            mask = mask | ball if positive else mask & ~ball
        return mask.astype(np.uint8)


def load(name: str, cache_mb: float) -> Any:
    """A shipped bundle's predictor on the CPU; a 2D one with an embedding cache of ``cache_mb``."""
    from medimg.predictors.embedding_cache import EmbeddingCache

    if name == NO_IMAGE:
        return NoImage()
    predictor = load_bundle(name, device="cpu")
    if hasattr(predictor, "cache"):
        predictor.cache = EmbeddingCache(cache_mb)
    return predictor


def compare(predictors: Mapping[str, Any], image: Image, label: np.ndarray, intensity: str,
            values: Mapping[str, Any], min_voxels: int, brain: np.ndarray | None = None) -> dict[str, dict]:
    """:func:`~medimg.predictors.evaluation3d.score_models` on one volume, with a line per model."""
    out = score_models(predictors, image, label, intensity, values, min_voxels, PROMPTS_3D, brain)
    for model, res in out.items():
        print(f"  {model}: {res['targets']} targets, " + ", ".join(
            f"{p} {res['mean'][p]:.3f}" for p in PROMPTS_3D) + f" ({res['seconds_total']:.0f} s)", flush=True)
    return out


def noise_control(predictors: Mapping[str, Any], subject: Image, brain: np.ndarray, aal: np.ndarray,
                  clicks: int) -> dict[str, dict]:
    """The same white-matter clicks on Colin27 and on Gaussian noise of its shape and affine."""
    rng = np.random.default_rng(0)
    t1 = subject.array.astype(np.float32)
    noise = Image(rng.normal(float(t1[brain].mean()), float(t1[brain].std()), t1.shape).astype(np.float32),
                  subject.affine, Path("noise.nii.gz"), "nifti")
    world = wm_clicks(t1, brain, aal, subject.affine, clicks)
    voxels = np.round(np.linalg.solve(subject.affine, np.c_[world, np.ones(len(world))].T).T[:, :3]).astype(int)
    out = {}
    for model, predictor in predictors.items():
        rows = []
        for v in voxels:
            doc = {"points": [v.tolist()], "point_labels": [1]}
            head = VolumeScorer(predictor, subject, "mr").run(doc)
            rand = VolumeScorer(predictor, noise, "mr").run(doc)
            rows.append((head.sum(), rand.sum(), dice(head, rand), (head & ~brain).sum() / max(head.sum(), 1)))
        r = np.asarray(rows, dtype=np.float64)
        out[model] = {"clicks": len(r), "voxels_head": float(np.median(r[:, 0])),
                      "voxels_noise": float(np.median(r[:, 1])), "dice_head_vs_noise": float(r[:, 2].mean()),
                      "outside_head": float(r[:, 3].mean()), "points": voxels.tolist()}
        print(f"  {model}: median {out[model]['voxels_head']:.0f} voxels on the head, "
              f"{out[model]['voxels_noise']:.0f} on noise, Dice head vs noise {out[model]['dice_head_vs_noise']:.3f}",
              flush=True)
    return out


def table(results: Mapping[str, Any], models: tuple[str, ...]) -> str:
    """Per structure and mean, the models side by side; wall time per request; the noise control."""
    label = {"box": "box", "click1": "1 click", "click3": "3 clicks"}
    lines = []
    for case in (ATLAS, COLIN):
        if case not in results:
            continue
        per = results[case]
        colin = "outside_click1" in per[models[0]]["mean"]
        head = [f"{label[p]}: {m}" for p in PROMPTS_3D for m in models]
        head += [f"outside (1 click): {m}" for m in models] if colin else []
        lines += [f"\n{case} ({per[models[0]]['targets']} targets)\n", "| structure | " + " | ".join(head) + " |",
                  "|---|" + "---|" * len(head)]

        def row(name: str, get: Any, colin: bool = colin) -> str:
            cells = [f"{get(m)[p]:.3f}" for p in PROMPTS_3D for m in models]
            cells += [f"{get(m)['outside_click1']:.1%}" for m in models] if colin else []
            return f"| {name} | " + " | ".join(cells) + " |"

        for name in per[models[0]]["structures"]:
            lines.append(row(name, lambda m, n=name, per=per: per[m]["structures"][n]))
        lines.append(row("**mean**", lambda m, per=per: per[m]["mean"]))
        seconds = [f"{per[m]['seconds'][p]:.2f}" for p in PROMPTS_3D for m in models]
        lines.append("| s / request | " + " | ".join(seconds + [""] * (len(models) * colin)) + " |")
        lines.append("\n" + "; ".join(f"{m}: cold click {per[m]['cold_click_s']:.1f} s, "
                                      f"{per[m]['encoder_calls']} slice encodings, {per[m]['seconds_total']:.0f} s"
                                      for m in models))
    if "noise control" in results:
        lines += ["\nSame white-matter click on Colin27 and on Gaussian noise\n",
                  "| model | clicks | median voxels, head | median voxels, noise | Dice head vs noise | "
                  "outside the brain (head) |", "|---|---|---|---|---|---|"]
        for m in models:
            r = results["noise control"][m]
            lines.append(f"| {m} | {r['clicks']} | {r['voxels_head']:.0f} | {r['voxels_noise']:.0f} | "
                         f"{r['dice_head_vs_noise']:.3f} | {r['outside_head']:.1%} |")
    return "\n".join(lines)


DICE_HEAD = ("| model | MNI152 held-out ({a}): box | 1 click | 3 clicks | Colin27 deep grey ({c}): box | 1 click | "
             "3 clicks |\n|---|---|---|---|---|---|---|")
SPEED_HEAD = ("| model | s / request (MNI152: box / 1 click) | first click on a new volume | mask outside the brain "
              "(Colin27, 1 click) | white-matter click on Colin27 / the same click on Gaussian noise |\n"
              "|---|---|---|---|---|")


def _dice(res: Mapping[str, Any]) -> str:
    return " | ".join(f"{res['mean'][p]:.3f}" for p in PROMPTS_3D)


def card_section(results: Mapping[str, Any]) -> str:
    """The cards' section: both models and the no-image reference, same run, same prompts."""
    models = results["models"]
    date = results["machine"][:10]
    rows = [f"| {m} ({MODES.get(m, '')}) | " + " | ".join(_dice(results[c][m]) for c in (ATLAS, COLIN)) + " |"
            for m in models]
    speed = []
    for m in models:
        a, c, n = results[ATLAS][m], results[COLIN][m], results.get("noise control", {}).get(m)
        noise = (f"{n['voxels_head']:.0f} / {n['voxels_noise']:.0f} voxels, Dice {n['dice_head_vs_noise']:.3f}"
                 if n else "")
        speed.append(f"| {m} | {a['seconds']['box']:.1f} / {a['seconds']['click1']:.1f} s | "
                     f"{a['cold_click_s']:.1f} s | {c['mean']['outside_click1']:.1%} | {noise} |")
    targets = {c: results[c][models[0]]["targets"] for c in (ATLAS, COLIN)}
    return f"""{BEGIN}
## 3D work: slice propagation against the 3D model (same run, same prompts)

Measured {date} in one run of `python benchmarks/propagation_vs_3d.py` on a 2-core CPU shared with
other jobs (BENCHMARKS.md has the machine, the versions and every structure). The shipped
`litemedsam` and `medsam3d`, loaded by name through `medimg.load_bundle`, were sent the very same
3D prompts-JSON documents on the same held-out targets, beside a reference that never reads the
image (`no-image`: the ellipsoid inscribed in the box; a 10 mm ball around each positive click,
less one around each negative click). Whole volumes, Dice on each target's largest connected piece,
structures weighted equally; box = the target's tight 3D box, 1 click = its most interior voxel,
3 clicks = then two corrections at the model's own largest error.

{DICE_HEAD.format(a=targets[ATLAS], c=targets[COLIN])}
{chr(10).join(rows)}

{SPEED_HEAD}
{chr(10).join(speed)}

How the 2D model takes a 3D prompt (the predictor's own rule, no change for the benchmark): a box
becomes its middle axial slice with the box's in-plane extent, then each next slice's box is the
previous mask's bounding box, inside the 3D box and its slice range; a click is segmented on its
own axial slice, then followed both ways until the mask vanishes, its predicted IoU drops below
0.5 or its mean intensity departs from the first slice's; a positive correction starts another
propagation from its slice, a negative one acts on its own slice. The first click on a new volume
pays the image encoder for every slice it visits (embeddings are then cached); its time includes
the simulated user's distance transform (the no-image row's figure is that alone).
{END}"""


def write_cards(results: Mapping[str, Any]) -> None:
    """The figures into each shipped card measured here (see the module docstring)."""
    from medimg.bundles import HELD_OUT_3D, ZOO
    from medimg.io.jsonfile import dumps_strict

    section = card_section(results)
    compared = {"benchmark": "benchmarks/propagation_vs_3d.py", "measured": results["machine"][:10],
                "machine": results["machine"], "models": {
                    m: {**{c: {k: results[c][m][k] for k in ("targets", "mean", "seconds", "cold_click_s",
                                                                "encoder_calls")} for c in (ATLAS, COLIN)},
                        "noise control": {k: v for k, v in results.get("noise control", {}).get(m, {}).items()
                                          if k != "points"}, "mode": MODES.get(m, "")}
                    for m in results["models"]}}
    for model in results["models"]:
        folder = ZOO / model
        if not folder.is_dir():
            continue
        means = {c: {p: round(results[c][model]["mean"][p], 4) for p in PROMPTS_3D} for c in (ATLAS, COLIN)}
        dice_all = float(np.mean([v for m in means.values() for v in m.values()]))
        summary = "held-out 3D Dice, box / 1 / 3 clicks: " + "; ".join(
            f"{CASE_SHORT[c]} " + " / ".join(f"{results[c][model]['mean'][p]:.3f}" for p in PROMPTS_3D)
            for c in (ATLAS, COLIN)
        ) + f" ({MODES[model]})"
        meta_path = folder / "configs" / "metadata.json"
        meta = json.loads(meta_path.read_text())
        meta[HELD_OUT_3D] = {"dice": round(dice_all, 4), **means, "mode": MODES[model],
                             "measured": compared["measured"], "benchmark": compared["benchmark"], "summary": summary}
        meta.setdefault("eval_metrics", {})["interactive3d_compared"] = compared
        meta_path.write_text(dumps_strict(meta, indent=2))
        card_path = folder / "docs" / "README.md"
        card = card_path.read_text()
        if BEGIN in card:
            card = card[:card.index(BEGIN)] + section + card[card.index(END) + len(END):]
        else:
            card = card.replace("## Limitations", section + "\n\n## Limitations", 1)
        card_path.write_text(card)
        print(f"card: {card_path}")


def main() -> None:
    """Measure both models in one run, print the tables, write the JSON."""
    from medimg.data.embedded.structures import prepare_structures

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--min-voxels", type=int, default=200)
    parser.add_argument("--cache-mb", type=float, default=4096.0, help="the 2D model's embedding cache")
    parser.add_argument("--noise-clicks", type=int, default=4, help="white-matter clicks of the noise control")
    parser.add_argument("--json", default=None)
    parser.add_argument("--merge", default=None, help="an earlier run's JSON whose models join the tables")
    parser.add_argument("--cards", action="store_true", help="write the figures into the shipped cards")
    parser.add_argument("--from-json", default=None, help="print (and with --cards write) an earlier run's figures")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        print(table(results, tuple(results["models"])))
        if args.cards:
            write_cards(results)
        return
    models = tuple(args.models.split(","))
    subject = TEMPLATES / "ch2.nii.gz"
    if not subject.is_file():
        sys.exit(f"error: {subject}: missing; apt-get install mricron-data")
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "models": list(models), "cache_mb": args.cache_mb}
    print(f"machine: {results['machine']}", flush=True)

    def save() -> None:  # after each stage, so a long run that fails late keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=lambda o: o.item()))

    predictors = {m: load(m, args.cache_mb) for m in models}
    image, label, intensity, values = validation_case(prepare_structures(), "mni152_atlas")
    print(ATLAS, flush=True)
    results[ATLAS] = compare(predictors, image, label, intensity, values, args.min_voxels)
    save()
    colin = read_image(subject)
    brain = np.asarray(nib.load(TEMPLATES / "ch2bet.nii.gz").dataobj) > 0
    aal = np.asarray(nib.load(TEMPLATES / "aal.nii.gz").dataobj).astype(np.int64)
    print(COLIN, flush=True)
    results[COLIN] = compare(predictors, colin, aal, "mr", SIDES, args.min_voxels, brain)
    save()
    if args.noise_clicks:
        print("noise control", flush=True)
        results["noise control"] = noise_control(predictors, colin, brain, aal, args.noise_clicks)
    results["seconds"] = time.perf_counter() - start
    if args.merge:  # an earlier run's models first, checked for the same targets and prompts
        old = json.loads(Path(args.merge).read_text())
        models = (*old["models"], *models)
        results.update(models=list(models), merged={"from": args.merge, "machine": old["machine"],
                                                    "seconds": old["seconds"]})
        for case in (ATLAS, COLIN, "noise control"):
            if case in old and case in results:
                results[case] = {**old[case], **results[case]}
                if case != "noise control":
                    same_prompts(results[case])
    print(table(results, models))
    print(f"\n{results['seconds']:.0f} s in all")
    save()
    if args.cards:
        write_cards(results)


if __name__ == "__main__":
    main()
