from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # before torch loads: see medimg/cpu.py (suite on a busy machine)
# glibc keeps freed blocks below 1 GiB for reuse instead of unmapping them: every large tensor otherwise
# costs fresh page faults. A tiny training's system time drops from 11 s to 2.4 s, wall time by ~12%, for
# ~40% more peak memory (BENCHMARKS.md, "Test suite"). Subprocesses read the variables at start; this
# process sets the same with mallopt.
MALLOC_BYTES = 1 << 30
for _name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
    os.environ.setdefault(_name, str(MALLOC_BYTES))
if platform.libc_ver()[0] == "glibc":
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallopt(-3, ctypes.c_int(MALLOC_BYTES))  # M_MMAP_THRESHOLD
    _libc.mallopt(-1, ctypes.c_int(MALLOC_BYTES))  # M_TRIM_THRESHOLD

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import REPO  # noqa: E402

SCHEMA = Path(os.environ.get("MEDIMG_MONAI_SCHEMA") or REPO.parent / "shared" / "monai" / "meta_schema_20240725.json")

# tiny, CPU-friendly Swin-UNETR (SwinUNETR needs >= 64^3 patches to train: its bottleneck is 1/32)
TINY = ["model.feature_size=12", "model.depths=[1,1,1,1]", "data.roi_size=[64,64,64]", "data.num_samples=1",
        "data.repeats=1", "task.sw_batch_size=1", "checkpoint.every_n_train_steps=1"]
PHANTOM = ["data.dataset=phantom", "data.pixdim=null", "data.intensity=none"]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _data_root(tmp_path_factory):
    """Embedded datasets and the schema lookup never touch the user's home in tests."""
    root = tmp_path_factory.mktemp("medimg_data")
    os.environ["MEDIMG_DATA_DIR"] = str(root)
    if SCHEMA.is_file():
        os.environ["MEDIMG_MONAI_SCHEMA"] = str(SCHEMA)
    torch.set_num_threads(2)
    return root


@pytest.fixture(scope="session")
def schema() -> Path:
    if not SCHEMA.is_file():  # bundle verification is part of the contract: a missing schema fails
        pytest.fail(f"MONAI metadata schema not found at {SCHEMA}; set MEDIMG_MONAI_SCHEMA to a local copy")
    return SCHEMA


@pytest.fixture(scope="session")
def mni_dir(_data_root) -> Path:
    from medimg.data.embedded.mni152 import prepare_mni152

    return prepare_mni152(_data_root / "mni152")


@pytest.fixture(scope="session")
def structures_manifest(_data_root) -> Path:
    from medimg.data.embedded.structures import prepare_structures

    return prepare_structures(_data_root / "structures")


@pytest.fixture(scope="session")
def phantom_manifest(_data_root) -> Path:
    from medimg.data.embedded.phantom import prepare_phantom

    return prepare_phantom(_data_root / "phantom")
