"""The CPU fast path of segmentation bundles (OpenVINO, the default) against the eager network."""

from __future__ import annotations

import logging
import shutil

import torch

from medimg.bundle.loader import load_bundle
from medimg.models.openvino_ir import OpenVINONetwork
from medimg.predictors.segmentation import SegmentationPredictor


def test_segmentation_bundle_runs_openvino_on_cpu_with_the_eager_labels(mni_run, mni_dir):
    """The default predictor on a CPU runs the bundle's IR; logits and labels match eager PyTorch's."""
    fast = load_bundle(mni_run / "bundle", "cpu")
    assert isinstance(fast.runner, OpenVINONetwork)
    eager = SegmentationPredictor(fast.network, fast.preprocessing, fast.inferer, fast.postprocessing, "cpu")
    assert eager.runner is eager.network
    x = fast.preprocessing({"image": str(mni_dir / "t1.nii.gz")})["image"][None]
    a, b = fast.logits(x).as_tensor(), eager.logits(x).as_tensor()
    assert float((a - b).abs().max()) <= 1e-2 * float(b.abs().max())
    agree = float((a.argmax(1) == b.argmax(1)).float().mean())
    assert agree >= 0.999, agree
    labels_fast, _ = fast.labels(str(mni_dir / "t1.nii.gz"))
    labels_eager, _ = eager.labels(str(mni_dir / "t1.nii.gz"))
    assert labels_fast.shape == labels_eager.shape
    assert float((labels_fast == labels_eager).mean()) >= 0.999


def test_a_bundle_with_a_swapped_ir_runs_a_checked_conversion_with_one_warning(mni_run, tmp_path, monkeypatch,
                                                                                  caplog):
    """Retrained weights next to the old IR: the stale IR is never served; one warning, the eager logits."""
    monkeypatch.setenv("MEDIMG_IR_CACHE", str(tmp_path / "cache"))
    bundle = tmp_path / "bundle"
    shutil.copytree(mni_run / "bundle", bundle)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 0.01  # retrained weights next to the old IR
    torch.save(state, bundle / "models" / "model.pt")
    fast = load_bundle(bundle, "cpu")
    roi = [int(r) for r in fast.inferer.roi_size]
    x = torch.rand(2, 1, *roi, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING):
        got = fast.runner(x)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "network.xml: was not made from models/model.pt" in warnings[0], warnings
    with torch.inference_mode():
        want = fast.network(x)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_a_bundle_shipped_without_its_ir_derives_it_once_into_the_cache(mni_run, tmp_path, monkeypatch):
    """No ``models/openvino`` (the zoo saves the space): the first batch converts the weights, checked against
    eager, into ``$MEDIMG_IR_CACHE`` under their digest; the next load reads it; its logits are the stored IR's."""
    from medimg.models.openvino_ir import NETWORK_IR

    cache = tmp_path / "ir"
    monkeypatch.setenv("MEDIMG_IR_CACHE", str(cache))
    bundle = tmp_path / "bundle"
    shutil.copytree(mni_run / "bundle", bundle)
    shutil.rmtree(bundle / "models" / "openvino")
    stored = load_bundle(mni_run / "bundle", "cpu")
    derived = load_bundle(bundle, "cpu")
    assert isinstance(derived.runner, OpenVINONetwork) and not cache.exists()  # nothing converted before use
    roi = [int(r) for r in derived.inferer.roi_size]
    x = torch.rand(2, 1, *roi, generator=torch.Generator().manual_seed(0))
    want, got = stored.runner(x), derived.runner(x)
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert (folder / f"{NETWORK_IR}.xml").is_file() and (folder / f"{NETWORK_IR}.bin").is_file()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not list(cache.glob(".*.partial"))  # no partial folder left behind
    stamp = (folder / f"{NETWORK_IR}.bin").stat().st_mtime_ns
    torch.testing.assert_close(load_bundle(bundle, "cpu").runner(x), got)  # read from the cache, not converted
    assert (folder / f"{NETWORK_IR}.bin").stat().st_mtime_ns == stamp
    monkeypatch.setenv("MEDIMG_IR_CACHE", str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a folder")  # an unwritable cache: converted in memory, same logits
    torch.testing.assert_close(load_bundle(bundle, "cpu").runner(x), got, atol=1e-5, rtol=1e-5)
