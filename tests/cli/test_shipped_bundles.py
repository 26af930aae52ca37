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

SHIPPED = sorted(shipped_bundles())
BUDGET_MB = 150


def test_tissue_t1_ships_and_the_zoo_fits_the_budget():
    assert "tissue_t1" in SHIPPED
    total = sum(f.stat().st_size for f in ZOO.rglob("*") if f.is_file()) / 1e6
    assert total <= BUDGET_MB


@pytest.mark.parametrize("name", SHIPPED)
def test_each_bundle_is_complete_and_carded(name, schema):
    from medimg.bundle.verify import verify_bundle

    folder = shipped_bundles()[name]
    verify_bundle(folder, schema)
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    card = (folder / "docs" / "README.md").read_text()
    assert meta["medimg_headline"] and meta["medimg_card_check"]["tolerance"] <= 0.02
    for needed in ("## Recipe", "python -m medimg.train", "Wall time", "Colin27", "## Limitations", "## Licences"):
        assert needed in card, needed
    assert f"{meta['eval_metrics']['template_mean']:.3f}" in card


@pytest.mark.parametrize("name", SHIPPED)
def test_card_figure_holds_through_load_bundle(name, mni_dir):
    """The card's fast check, recomputed: mean Dice on the held-out slab, within the card's tolerance."""
    import medimg

    folder = shipped_bundles()[name]
    check = json.loads((folder / "configs" / "metadata.json").read_text())["medimg_card_check"]
    labels = np.asarray(medimg.load_bundle(name, "cpu").predict(str(mni_dir / Path(check["input"]).name)).array)
    truth = np.asarray(nib.load(mni_dir / Path(check["truth"]).name).dataobj)
    dice = [2 * ((labels == v) & (truth == v)).sum() / ((labels == v).sum() + (truth == v).sum()) for v in (1, 2)]
    assert abs(float(np.mean(dice)) - check["mean_dice"]) <= check["tolerance"], (dice, check)


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
    assert sorted(p.name for p in served.iterdir()) == SHIPPED
    assert (served / "tissue_t1" / "models" / "model.pt").read_bytes() == (folder / "models" / "model.pt").read_bytes()
    shutil.rmtree(served)
