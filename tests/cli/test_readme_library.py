"""The library snippets of the README and the pipelines tutorial run as written, on real bundles and MNI152."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO

SNIPPET = re.compile(r"<!-- library: (\w+) -->\s*```python\n(.*?)```", re.S)


def snippets() -> dict[str, str]:
    found = dict(SNIPPET.findall((REPO / "docs" / "tutorials" / "pipelines.md").read_text()))
    readme = dict(SNIPPET.findall((REPO / "README.md").read_text()))
    assert readme and all(found.get(k) == v for k, v in readme.items())  # the README shows the tutorial's code
    assert set(found) == {"segmentation", "promptable2d", "promptable3d", "classification"}
    return found


def run_snippet(name: str, paths: dict[str, Path], cwd: Path, monkeypatch) -> dict:
    code = snippets()[name]
    assert len(code.strip().splitlines()) <= 12, f"the {name} snippet is longer than a short pipeline"
    for example_path, path in paths.items():
        assert f'"{example_path}"' in code, (name, example_path)
        code = code.replace(f'"{example_path}"', repr(str(path)))
    monkeypatch.chdir(cwd)
    namespace: dict = {}
    exec(compile(code, f"README:{name}", "exec"), namespace)  # noqa: S102 - the README's own code
    return namespace


def test_segmentation_snippet(mni_run, mni_dir, tmp_path, monkeypatch, capsys):
    ns = run_snippet("segmentation", {"runs/swin_unetr/<run>/bundle": mni_run / "bundle",
                                      "t1.nii.gz": mni_dir / "t1.nii.gz"}, tmp_path, monkeypatch)
    assert (tmp_path / "t1_seg.nii.gz").is_file()
    assert set(ns["labels"].get_fdata().ravel().astype(int).tolist()) <= {0, 1, 2}
    assert "'GM'" in capsys.readouterr().out


def test_promptable2d_snippet(lite_run, mni_dir, tmp_path, monkeypatch):
    ns = run_snippet("promptable2d", {"runs/litemedsam/<run>/bundle": lite_run / "bundle",
                                      "t1.nii.gz": mni_dir / "t1.nii.gz"}, tmp_path, monkeypatch)
    import SimpleITK as sitk

    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "wm_seg.nrrd")))
    assert mask.sum() > 50 and mask.sum() == sitk.GetArrayViewFromImage(ns["mask"]).sum()


def test_promptable3d_snippet(run3d, mni_dir, tmp_path, monkeypatch):
    ns = run_snippet("promptable3d", {"runs/medsam3d/<run>/bundle": run3d / "bundle",
                                      "t1.nii.gz": mni_dir / "t1.nii.gz"}, tmp_path, monkeypatch)
    assert int(ns["mask"][0, 72, 124, 98]) == 1  # the clicked voxel is in the object


def test_classification_snippet(cls_run, tmp_path, monkeypatch):
    import csv

    from medimg.data.embedded.mni_slices import embedded_csv

    table = embedded_csv("mni152_levels")
    with open(table) as f:
        image = table.parent / next(iter(csv.DictReader(f)))["image"]
    ns = run_snippet("classification", {"runs/vit_cls/<run>/bundle": cls_run / "bundle", "slice.nii.gz": image},
                     tmp_path, monkeypatch)
    assert set(ns["probs"]) == set(ns["classifier"].class_names)


@pytest.mark.parametrize("name", ["segmentation", "promptable2d", "promptable3d", "classification"])
def test_snippets_use_only_the_public_api(name):
    code = re.sub(r"#.*", "", snippets()[name])  # comments may name the Protocols
    assert "medimg." not in re.sub(r"medimg\.(load_bundle|read_image)", "", code)
