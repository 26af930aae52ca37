from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import PHANTOM, TINY
from tests.helpers import run_module


def train(tmp: Path, *overrides: str, env: dict | None = None, check: bool = True):
    proc = run_module("medimg.train", "bundle=swin_unetr", "trainer=debug", f"runs_dir={tmp}", *TINY, *overrides,
                      env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_dir_of(proc) -> Path:
    match = re.search(r"bundle written and verified: (\S+)", proc.stdout)
    assert match, proc.stdout[-2000:]
    return Path(match.group(1)).parent


@pytest.fixture(scope="session")
def phantom_run(tmp_path_factory, schema, phantom_manifest) -> Path:
    proc = train(tmp_path_factory.mktemp("runs"), *PHANTOM, f"data.dataset_dir={phantom_manifest.parent}")
    return run_dir_of(proc)


@pytest.fixture(scope="session")
def mni_run(tmp_path_factory, schema, mni_dir) -> Path:
    """A tiny Swin-UNETR trained briefly on the real MNI152 data at 4 mm (geometry tests need a real bundle)."""
    proc = train(tmp_path_factory.mktemp("runs"), "data.pixdim=[4.0,4.0,4.0]", f"data.dataset_dir={mni_dir}")
    return run_dir_of(proc)
