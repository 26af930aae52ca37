from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import PHANTOM, TINY, shared_once
from tests.helpers import run_module

NO_STD = "export.standard=false"  # the checked ONNX / torch.export files are tested on mni_run's bundle only


def train(tmp: Path, *overrides: str, env: dict | None = None, check: bool = True):
    proc = run_module("medimg.train", "bundle=swin_unetr", "trainer=debug", f"runs_dir={tmp}", *TINY, *overrides,
                      env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_dir_of(proc) -> Path:
    """The run folder a training printed; its console output is kept there as ``console.log``."""
    match = re.search(r"bundle written and verified: (\S+)", proc.stdout)
    assert match, proc.stdout[-2000:]
    run_dir = Path(match.group(1)).parent
    (run_dir / "console.log").write_text(proc.stdout + proc.stderr)
    return run_dir


@pytest.fixture(scope="session")
def phantom_run(tmp_path_factory, schema, phantom_manifest) -> Path:
    def build() -> Path:
        proc = train(tmp_path_factory.mktemp("runs"), *PHANTOM, f"data.dataset_dir={phantom_manifest.parent}", NO_STD,
                     "task.intensity_refinement=auto")
        return run_dir_of(proc)

    return shared_once(tmp_path_factory, "phantom_run", build)


@pytest.fixture(scope="session")
def mni_run(tmp_path_factory, schema, mni_dir) -> Path:
    """A tiny Swin-UNETR trained briefly on the real MNI152 data at 4 mm (geometry tests need a real bundle).

    ``light`` augmentation: two debug epochs of ``synth`` images leave too weak a model for the
    geometry tests' agreement thresholds (they test geometry, not augmentation).
    """

    def build() -> Path:
        proc = train(tmp_path_factory.mktemp("runs"), "data.pixdim=[4.0,4.0,4.0]", "data.augment=light",
                     f"data.dataset_dir={mni_dir}")
        return run_dir_of(proc)

    return shared_once(tmp_path_factory, "mni_run", build)


TINY_LITE = ["bundle=litemedsam", "trainer=debug", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
             "trainer.max_epochs=1", "data.train_slices=3", "data.val_slices=3", "data.batch_size=2",
             "data.target_mode=label", NO_STD]


def train_on_mni(tmp_path_factory, mni_dir: Path, overrides: list[str], expect: str) -> Path:
    """Train a bundle on the MNI152 data in a fresh runs folder; the log must show ``expect``."""
    proc = run_module("medimg.train", *overrides, f"runs_dir={tmp_path_factory.mktemp('runs')}",
                      f"data.dataset_dir={mni_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert expect in proc.stdout and "trainable" in proc.stdout + proc.stderr
    return run_dir_of(proc)


@pytest.fixture(scope="session")
def lite_run(tmp_path_factory, schema, mni_dir):
    def build() -> Path:
        return train_on_mni(tmp_path_factory, mni_dir, TINY_LITE, "zero-shot Dice")

    return shared_once(tmp_path_factory, "lite_run", build)


# tiny ViT, 4 mm voxels, 32^3 patches: about a minute of CPU training
TINY_3D = ["bundle=medsam3d", "trainer=debug", "trainer.limit_train_batches=null", "trainer.max_epochs=5",
           "trainer.check_val_every_n_epoch=5", "data.pixdim=[4.0,4.0,4.0]", "data.roi_size=[32,32,32]",
           "data.train_samples=40", "data.val_clicks=2", "data.batch_size=4", "checkpoint.every_n_train_steps=5",
           NO_STD]
WM_CLICK_RAS = [-26.0, -10.0, 26.0]  # deep white matter (left corona radiata), in RAS mm


@pytest.fixture(scope="session")
def run3d(tmp_path_factory, schema, mni_dir):
    def build() -> Path:
        return train_on_mni(tmp_path_factory, mni_dir, TINY_3D, "point3")

    return shared_once(tmp_path_factory, "run3d", build)


QUICK = ["trainer=debug", "trainer.enable_progress_bar=false", "model.img_size=32", "data.batch_size=8", NO_STD]


def train_vit(runs: Path, *args: str):
    proc = run_module("medimg.train", *QUICK, f"runs_dir={runs}", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def mae_run(tmp_path_factory) -> Path:
    def build() -> Path:
        proc = train_vit(tmp_path_factory.mktemp("runs"), "bundle=mae_pretrain")
        match = re.search(r"MAE encoder written .*: (\S+encoder\.pt)", proc.stdout)
        assert match, proc.stdout[-2000:]
        assert "masked-patch MSE" in proc.stdout
        return Path(match.group(1))

    return shared_once(tmp_path_factory, "mae_run", build)


@pytest.fixture(scope="session")
def cls_run(tmp_path_factory, schema, mae_run) -> Path:
    def build() -> Path:
        proc = train_vit(tmp_path_factory.mktemp("runs"), "bundle=vit_cls", f"model.backbone_checkpoint={mae_run}",
                          "model.peft=dvpt")
        assert "RANDOMLY INITIALISED" not in proc.stdout + proc.stderr
        assert "validation (best checkpoint): auroc" in proc.stdout
        return run_dir_of(proc)

    return shared_once(tmp_path_factory, "cls_run", build)



@pytest.fixture(scope="session")
def medsam2d_run(tmp_path_factory, schema, mni_dir) -> Path:
    """medsam2d with a tiny ViT and MedSAM-format weights from a file (random values, official layout)."""

    def build() -> Path:
        import torch

        from medimg.models import build_network

        tmp = tmp_path_factory.mktemp("medsam2d")
        src = build_network("medsam", size="tiny", img_size=256)
        torch.save({k: v.clone() for k, v in src.state_dict().items()}, tmp / "medsam_tiny.pth")
        tiny = [a.replace("bundle=litemedsam", "bundle=medsam2d") for a in TINY_LITE]
        proc = run_module("medimg.train", *tiny, f"runs_dir={tmp / 'runs'}", f"data.dataset_dir={mni_dir}",
                          "model.size=tiny", "model.img_size=256", f"model.checkpoint={tmp / 'medsam_tiny.pth'}",
                          "model.adapters=true", "task.freeze=adapters_only", "task.zero_shot_eval=false")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "loaded" in proc.stdout + proc.stderr and "RANDOM INITIALISATION" not in proc.stdout + proc.stderr
        return run_dir_of(proc)

    return shared_once(tmp_path_factory, "medsam2d_run", build)


@pytest.fixture(scope="session")
def vit_seg_run(tmp_path_factory, schema, mni_dir) -> Path:
    """A tiny DVPT ViT segmenter on 4 mm MNI152 (coronal slices)."""

    def build() -> Path:
        proc = run_module("medimg.train", "bundle=vit_seg", "trainer=debug", "trainer.enable_progress_bar=false",
                          f"runs_dir={tmp_path_factory.mktemp('runs')}", f"data.dataset_dir={mni_dir}",
                          "data.pixdim=[4.0,4.0,4.0]", "model.img_size=32", "data.roi_size=[32,32]",
                          "data.num_samples=4", "model.peft=dvpt", NO_STD)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return run_dir_of(proc)


    return shared_once(tmp_path_factory, "vit_seg_run", build)
