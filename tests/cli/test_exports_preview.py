"""A bundle's standard exported networks (ONNX, torch.export), a quiet export, and ``--preview`` pictures."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medimg.bundle.standard import export_sample
from medimg.io.preview import LEGEND_PX, PANEL_PX, label_colour, write_preview
from tests.helpers import flip_to_lps, run_module


def eager_network(bundle):
    from medimg.models import build_network

    spec = dict(json.loads((bundle / "configs" / "inference.json").read_text())["network_def"])
    spec.pop("_target_")
    net = build_network(**spec)
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    return net.eval()


def test_onnx_and_program_reproduce_the_network_on_the_export_sample(mni_run):
    import onnxruntime as ort

    bundle = mni_run / "bundle"
    exports = json.loads((bundle / "configs" / "metadata.json").read_text())["medimg_exports"]
    assert exports["ONNX"]["written"] and exports["torch.export"]["written"], exports
    shape = exports["ONNX"]["input_shape"]
    assert shape[0] == "batch" and shape[2:] == json.loads((bundle / "configs" / "inference.json").read_text())[
        "roi_size"]
    net = eager_network(bundle)
    session = ort.InferenceSession(str(bundle / "models" / "model.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(bundle / "models" / "model.pt2").module()
    for batch in (2, 3):  # the export sample, then a batch size the export never saw
        x = export_sample([batch, *shape[1:]])
        with torch.no_grad():
            ref = net(x).numpy()
            prog = program(x).numpy()
        onnx_out = session.run(None, {"image": x.numpy()})[0]
        assert onnx_out.shape == ref.shape
        assert np.abs(onnx_out - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max())
        np.testing.assert_allclose(prog, ref, atol=1e-4)


def test_training_and_export_are_quiet_and_say_what_they_wrote(mni_run):
    """The console of a whole run (train, validate, export, verify): no deprecation wall, one line per file."""
    text = (mni_run / "console.log").read_text()
    for chatter in ("deprecated", "TracerWarning", "Converting a tensor", "[torch.onnx]", "does not script",
                    "LeafSpec", "always_return_as_numpy", "Unable to load package"):
        assert chatter not in text, chatter
    for name in ("model.onnx", "model.pt2"):
        assert f"models/{name} written and checked against eager" in text
    assert (mni_run / "bundle" / "models" / "openvino").is_dir()


def cube_volume(lps: bool):
    """40^3 at 1 mm with a labelled cube at RAS indices x 5..14, y 20..29, z 10..19 (the patient's left)."""
    image = np.random.default_rng(0).random((40, 40, 40)).astype(np.float32)
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[5:15, 20:30, 10:20] = 1
    labels[7:9, 22:24, 14:16] = 2  # a second label inside, on the axial plane through the centre
    affine = np.eye(4)
    if lps:
        image, affine = flip_to_lps(image, affine)
        labels, _ = flip_to_lps(labels, np.eye(4))
    return image, labels, affine


def colour_pixels(png: np.ndarray, value: int) -> np.ndarray:
    """(row, column) of pixels drawn in label ``value``'s colour (its contour line)."""
    return np.argwhere((np.abs(png.astype(int) - np.asarray(label_colour(value))) < 40).all(axis=-1))


@pytest.mark.parametrize("lps", [False, True])
def test_preview_draws_each_label_in_its_colour_where_it_is(tmp_path, lps):
    from PIL import Image

    image, labels, affine = cube_volume(lps)
    out = write_preview(image, affine, labels, {1: "cube", 2: "core"}, tmp_path / "p.png")
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape == (PANEL_PX + LEGEND_PX, 3 * PANEL_PX, 3)
    px = 10  # 40 mm over a 400-pixel panel: 10 pixels per mm
    hits = colour_pixels(png[:PANEL_PX, 2 * PANEL_PX:], 1)  # the axial panel, radiological (x flipped)
    assert len(hits) > 200
    rows, cols = (400 - 30 * px - 3, 400 - 20 * px + 3), ((40 - 15) * px - 3, (40 - 5) * px + 3)
    inside = ((hits[:, 0] >= rows[0]) & (hits[:, 0] <= rows[1]) & (hits[:, 1] >= cols[0]) & (hits[:, 1] <= cols[1]))
    assert inside.mean() > 0.97, hits.mean(axis=0)
    assert len(colour_pixels(png[:PANEL_PX, 2 * PANEL_PX:], 2)) > 20  # the inner label, in its own colour
    assert len(colour_pixels(png[PANEL_PX:], 1)) > 50  # the legend's swatch
    empty = write_preview(image, affine, np.zeros_like(labels), {1: "cube"}, tmp_path / "e.png")
    assert len(colour_pixels(np.asarray(Image.open(empty).convert("RGB"))[:PANEL_PX], 1)) == 0


def test_infer_preview_of_a_real_prediction(mni_run, mni_dir, tmp_path):
    from PIL import Image

    out, preview = tmp_path / "seg.nii.gz", tmp_path / "seg.png"
    proc = run_module("medimg.infer", "--bundle", str(mni_run / "bundle"), "--input", str(mni_dir / "t1.nii.gz"),
                      "--output", str(out), "--preview", str(preview))
    assert proc.returncode == 0, proc.stderr[-2000:]
    png = np.asarray(Image.open(preview).convert("RGB"))
    assert png.shape == (PANEL_PX + LEGEND_PX, 3 * PANEL_PX, 3)
    pred = np.asarray(nib.load(out).dataobj)
    for value in (1, 2):  # grey and white matter both drawn, in their own colours
        assert (pred == value).any() and len(colour_pixels(png[:PANEL_PX], value)) > 100
    bad = run_module("medimg.infer", "--bundle", str(mni_run / "bundle"), "--input", str(mni_dir / "t1.nii.gz"),
                     "--output", str(tmp_path / "b.nii.gz"), "--preview", str(tmp_path / "b.jpg"))
    assert bad.returncode == 2 and bad.stderr.strip().startswith(f"error: {tmp_path / 'b.jpg'}")
    assert not (tmp_path / "b.nii.gz").exists()
