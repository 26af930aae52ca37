from __future__ import annotations

import ctypes
import json
import os
import platform
from collections.abc import Callable
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


# the longest test files start first: with two workers taking whole files (pytest-xdist, --dist
# loadfile), a long file picked up last would leave one worker running it alone at the end
SLOW_FIRST = ("tests/library/test_docs.py", "tests/cli/test_label_server.py", "tests/cli/test_resume_ddp_wheel.py",
              "tests/cli/test_label_pacs.py", "tests/cli/test_shipped_bundles.py", "tests/cli/test_medsam3d.py",
              "tests/cli/test_litemedsam.py", "tests/cli/test_library_api.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: file order kept otherwise
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def shared_root(tmp_path_factory) -> Path:
    """The folder every worker of this pytest run sees (pytest-xdist gives each worker its own basetemp)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_once(tmp_path_factory, name: str, build: Callable[[], Path]) -> Path:
    """Build a session resource (a trained run, a folder) once per pytest run, whichever worker asks first.

    The others wait on a file lock and get the same path. A build that fails records nothing, so
    the next worker that asks builds (and fails) again, with its own message.
    """
    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    record = root / f"{name}.path.json"
    with FileLock(str(root / f"{name}.lock")):
        if record.is_file():
            return Path(json.loads(record.read_text()))
        path = build()
        record.write_text(json.dumps(str(path)))
        return path


@pytest.fixture(scope="session", autouse=True)
def _data_root(tmp_path_factory):
    """Embedded datasets and the schema lookup never touch the user's home in tests (one folder per run)."""
    root = shared_root(tmp_path_factory) / "medimg_data"
    root.mkdir(exist_ok=True)
    os.environ["MEDIMG_DATA_DIR"] = str(root)
    if SCHEMA.is_file():
        os.environ["MEDIMG_MONAI_SCHEMA"] = str(SCHEMA)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, (os.cpu_count() or 2) // workers)  # the workers share the cores: no oversubscription
    torch.set_num_threads(threads)
    if workers > 1:  # the trainings and servers the tests start inherit it
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
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
    from tests.oracles import need_debian

    need_debian("mricron-data", "invesalius-examples")

    return prepare_structures(_data_root / "structures")


@pytest.fixture(scope="session")
def phantom_manifest(_data_root) -> Path:
    from medimg.data.embedded.phantom import prepare_phantom

    return prepare_phantom(_data_root / "phantom")


def pytest_runtest_logreport(report):
    """With ``MEDIMG_TEST_TIMELINE=FILE``, append each phase's worker, start and stop (for balancing the workers)."""
    path = os.environ.get("MEDIMG_TEST_TIMELINE")
    if getattr(report, "node", None) is not None:  # pytest-xdist's controller relays a worker's report: once only
        return
    if path and hasattr(report, "start"):
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(path, "a") as fh:
            fh.write(json.dumps({"worker": worker, "test": report.nodeid, "when": report.when,
                                 "start": report.start, "stop": report.stop}) + "\n")
