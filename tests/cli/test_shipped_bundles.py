"""The bundles shipped inside medimg: complete, loadable by short name everywhere, and as good as their cards say."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medimg.bundles import ZOO, resolve_bundle, shipped_bundles
from medimg.errors import BundleError
from tests.helpers import run_module
from tests.oracles import COLIN, need_debian

SHIPPED = sorted(shipped_bundles())
BUDGET_MB = 150
CASES_3D = ("held-out structures: MNI152 atlas", "held-out head: Colin27 AAL deep grey")
PROMPTS_3D = ("box", "click1", "click3")


def _meta(name: str) -> dict:
    return json.loads((shipped_bundles()[name] / "configs" / "metadata.json").read_text())


def _is_3d(name: str) -> bool:
    return "interactive3d" in _meta(name).get("eval_metrics", {})


def test_tissue_and_interactive_bundles_ship_and_the_zoo_fits_the_budget():
    assert {"tissue_t1", "litemedsam", "medsam3d"} <= set(SHIPPED)
    total = sum(f.stat().st_size for f in ZOO.rglob("*") if f.is_file()) / 1e6
    assert total <= BUDGET_MB


def _refuse(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_card_is_strict_json(name):
    """JavaScript's JSON.parse (OHIF) and Starlette's responses (MONAI Label's /info/) refuse NaN and Infinity."""
    for doc in (shipped_bundles()[name] / "configs").glob("*.json"):
        json.loads(doc.read_text(), parse_constant=_refuse)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_bundle_is_complete_and_carded(name, schema):
    from medimg.bundle.verify import verify_bundle

    folder = shipped_bundles()[name]
    verify_bundle(folder, schema)
    meta = _meta(name)
    card = (folder / "docs" / "README.md").read_text()
    assert meta["medimg_headline"] and meta["medimg_card_check"]["tolerance"] <= 0.02
    for needed in ("## Recipe", "python -m medimg.train", "Wall time", "Colin27", "## Limitations", "## Licences"):
        assert needed in card, needed
    if _is_3d(name):  # the 3D held-out table
        figures = meta["eval_metrics"]["interactive3d"]
        for case in ("held-out structures: MNI152 atlas", "held-out head: Colin27 AAL deep grey"):
            assert all(f"{figures[case]['mean'][p]:.3f}" in card for p in ("box", "click1", "click3"))
        assert f"{figures['Colin27 white-matter clicks']['outside']:.1%}" in card
    elif meta.get("medimg_task") == "promptable":  # the held-out table, fp32 as measured
        after = meta["eval_metrics"]["interactive"]
        assert all(f"{res['mean']['click5']:.3f}" in card for res in after.values())
        assert meta["medimg_storage"]["weights"] == "fp32" or (
            meta["medimg_storage"]["identical"] == meta["medimg_storage"]["masks"])
    else:
        assert f"{meta['eval_metrics']['template_mean']:.3f}" in card
    if "interactive3d_compared" in meta.get("eval_metrics", {}):  # the same-run 3D table, every model's row
        compared = meta["eval_metrics"]["interactive3d_compared"]
        for model, figures in compared["models"].items():
            row = next(line for line in card.splitlines() if line.startswith(f"| {model} ("))
            assert all(f"{figures[case]['mean'][p]:.3f}" in row for case in CASES_3D for p in PROMPTS_3D)


@pytest.mark.parametrize("name", SHIPPED)
def test_card_figure_holds_through_load_bundle(name, mni_dir, request):
    """The card's fast check, recomputed through ``load_bundle``, within the card's tolerance.

    Tissue: mean Dice on the MNI152 held-out slab. Interactive: box and one-click Dice on the held-out
    structures of the MNI152 atlas (axial, one slice each), prompts through the prompts-JSON path.
    """
    import medimg

    check = _meta(name)["medimg_card_check"]
    promptable = _meta(name).get("medimg_task") == "promptable"
    structures_manifest = request.getfixturevalue("structures_manifest") if promptable else None  # Debian atlases
    if _is_3d(name):  # box and one click on two held-out structures, whole volume
        from medimg.predictors.evaluation3d import card_check3d

        dice = card_check3d(medimg.load_bundle(name, "cpu"), structures_manifest, check)
        for prompt, expected in check["dice"].items():
            assert abs(dice[prompt] - expected) <= check["tolerance"], (prompt, dice)
        return
    if promptable:
        from medimg.predictors.evaluation import card_check

        dice = card_check(medimg.load_bundle(name, "cpu"), structures_manifest, check)
        for prompt, expected in check["dice"].items():
            assert abs(dice[prompt] - expected) <= check["tolerance"], (prompt, dice)
        return
    labels = np.asarray(medimg.load_bundle(name, "cpu").predict(str(mni_dir / Path(check["input"]).name)).array)
    truth = np.asarray(nib.load(mni_dir / Path(check["truth"]).name).dataobj)
    dice = [2 * ((labels == v) & (truth == v)).sum() / ((labels == v).sum() + (truth == v).sum()) for v in (1, 2)]
    assert abs(float(np.mean(dice)) - check["mean_dice"]) <= check["tolerance"], (dice, check)


def test_slicer_click_on_a_real_head_returns_a_mask_holding_the_click(tmp_path):
    """The served interactive bundle, as 3D Slicer asks it: one foreground click on Colin27's thalamus."""
    from medimg.io.image import read_image
    from medimg.label.infer import PromptInfer2D
    from medimg.label.serve import copy_shipped

    need_debian("mricron-data")
    image = read_image(COLIN)
    aal = read_image(COLIN.parent / "aal.nii.gz").array
    thalamus = aal == 77
    k = int(np.argmax(thalamus.sum(axis=(0, 1))))
    i, j = np.argwhere(thalamus[:, :, k]).mean(0).round().astype(int)
    task = PromptInfer2D(copy_shipped(tmp_path / "models") / "litemedsam", device="cpu")  # as serve does
    path, result = task({"image": str(image.path), "foreground": [[int(i), int(j), k]], "slice": k})
    out = nib.load(path)
    mask = np.asarray(out.dataobj)
    Path(path).unlink()  # MONAI Label deletes a result once sent
    assert mask.shape == image.array.shape and np.allclose(out.affine, image.affine) and mask[i, j, k] == 1
    here = mask[:, :, k] > 0
    assert here.sum() >= 30 and (here & thalamus[:, :, k]).sum() >= 0.9 * here.sum()  # it stays inside
    assert not mask[:, :, k + 5].any()  # a click answers on its own slice


def test_slicer_3d_click_on_a_real_head_stays_in_the_brain(tmp_path):
    """The served 3D bundle, as 3D Slicer asks it: one foreground click on Colin27's left thalamus (a held-out
    head) gives a 3D mask that holds the click, is the thalamus (not the hemisphere) and keeps out of scalp
    and skull."""
    from medimg.io.image import read_image
    from medimg.label.infer import infer_task
    from medimg.label.serve import copy_shipped
    from medimg.predictors.evaluation import interior

    need_debian("mricron-data")
    image = read_image(COLIN)
    aal = read_image(COLIN.parent / "aal.nii.gz").array
    brain = read_image(COLIN.parent / "ch2bet.nii.gz").array > 0
    thalamus = aal == 77
    i, j, k = interior(thalamus).astype(int)
    task = infer_task(copy_shipped(tmp_path / "models") / "medsam3d", device="cpu")  # as serve does
    path, _ = task({"image": str(image.path), "foreground": [[int(i), int(j), int(k)]]})
    out = nib.load(path)
    mask = np.asarray(out.dataobj) > 0
    Path(path).unlink()
    assert mask.shape == image.array.shape and np.allclose(out.affine, image.affine) and mask[i, j, k]
    assert len(np.unique(np.nonzero(mask)[2])) > 5  # a 3D answer, not one slice
    inside, covered = (mask & thalamus).sum() / mask.sum(), (mask & thalamus).sum() / thalamus.sum()
    print(f"thalamus click: {inside:.3f} of the mask inside, {covered:.3f} of the thalamus covered")
    assert inside >= 0.7 and covered >= 0.5  # that structure, not the hemisphere (card: 1-click Dice 0.765)
    assert (mask & ~brain).sum() <= 0.1 * mask.sum()


def test_the_server_offers_first_the_model_measured_better_for_3d_work(tmp_path):
    """Both models that take 3D prompts carry held-out 3D Dice from one run (benchmarks/propagation_vs_3d.py);
    the served models are ordered by it (``/info/`` lists them so, 3D Slicer selects the first), then by name."""
    from medimg.bundles import HELD_OUT_3D, held_out_3d, serving_order
    from medimg.label.compat import install

    install()
    from medimg.label.infer import infer_task
    from medimg.label.main import find_bundles

    figures = {name: held_out_3d(folder) for name, folder in shipped_bundles().items()}
    measured = {name: f for name, f in figures.items() if f}
    assert set(measured) == {"litemedsam", "medsam3d"} and len({f["measured"] for f in measured.values()}) == 1
    for name, f in measured.items():  # the ranking figure is the mean of the card's own held-out Dice
        meta = _meta(name)
        mine = meta["eval_metrics"]["interactive3d_compared"]["models"][name]
        assert all(f[c][p] == round(mine[c]["mean"][p], 4) for c in CASES_3D for p in PROMPTS_3D)
        assert f["dice"] == pytest.approx(np.mean([f[c][p] for c in CASES_3D for p in PROMPTS_3D]), abs=1e-4)
    best = max(measured, key=lambda n: measured[n]["dice"])
    served = [p.name for p in find_bundles(ZOO)]
    assert served[0] == best and served[-1] == "tissue_t1" and sorted(served) == SHIPPED
    assert measured[best]["summary"] in infer_task(ZOO / best).description
    made = []  # the order follows the cards' figures, not the names; no figure: after them, by name
    for name, dice in (("a_plain", None), ("b_worse", 0.2), ("c_better", 0.6), ("d_plain", None)):
        (tmp_path / name / "configs").mkdir(parents=True)
        meta = {HELD_OUT_3D: {"dice": dice}} if dice is not None else {}
        (tmp_path / name / "configs" / "metadata.json").write_text(json.dumps(meta))
        made.append(tmp_path / name)
    assert [p.name for p in serving_order(made)] == ["c_better", "b_worse", "a_plain", "d_plain"]


def test_short_name_on_the_command_line_keeps_the_input_geometry(tmp_path, mni_dir):
    src = nib.load(mni_dir / "t1_posterior.nii.gz")
    lps = src.as_reoriented(np.array([[0, -1], [1, -1], [2, 1]]))
    nib.save(lps, tmp_path / "lps.nii.gz")
    proc = run_module("medimg.infer", "--bundle", "tissue_t1", "--input", str(tmp_path / "lps.nii.gz"),
                      "--output", str(tmp_path / "seg.nii.gz"), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = nib.load(tmp_path / "seg.nii.gz")
    assert out.shape == lps.shape and np.allclose(out.affine, lps.affine, atol=1e-5)
    assert set(np.unique(np.asarray(out.dataobj))) == {0, 1, 2}


def test_listing_and_unknown_names(tmp_path):
    proc = run_module("medimg.bundles")
    assert proc.returncode == 0 and "tissue_t1" in proc.stdout and "grey_matter" in proc.stdout
    assert "template held-out mean Dice" in proc.stdout and "MB" in proc.stdout
    bad = run_module("medimg.infer", "--bundle", "no_such_model", "--input", "x.nii.gz", "--output",
                     str(tmp_path / "o.nii.gz"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "not a shipped bundle name" in bad.stderr and "tissue_t1" in bad.stderr


def test_a_real_folder_wins_over_a_shipped_name(tmp_path, monkeypatch):
    mine = tmp_path / "tissue_t1"
    mine.mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_bundle("tissue_t1") == Path("tissue_t1")
    assert resolve_bundle(str(mine)) == mine
    with pytest.raises(BundleError):
        resolve_bundle(tmp_path / "nothing")


def test_init_weights_and_label_serve_take_the_short_name(tmp_path):
    from medimg.label.serve import copy_shipped
    from medimg.models import build_network
    from medimg.runs.run import load_init_weights

    folder = shipped_bundles()["tissue_t1"]
    spec = json.loads((folder / "configs" / "inference.json").read_text())["network_def"]
    net = build_network(**{k: v for k, v in spec.items() if k != "_target_"})
    load_init_weights(net, "tissue_t1")
    shipped = torch.load(folder / "models" / "model.pt", weights_only=True)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, shipped[key].to(value.dtype))
    served = copy_shipped(tmp_path / "models")  # serve without --models: copies, the package stays read-only
    # hidden ``.<bundle>.lock`` files beside the bundles are the publication locks
    assert sorted(p.name for p in served.iterdir() if not p.name.startswith(".")) == SHIPPED
    assert (served / "tissue_t1" / "models" / "model.pt").read_bytes() == (folder / "models" / "model.pt").read_bytes()
    shutil.rmtree(served)
