"""Atomic bundle publication, shared by the train task (writer) and the infer tasks (readers).

A bundle is a folder, and a folder cannot be replaced in one system call. Readers and the
publisher therefore take the same file lock (``.<name>.lock`` beside the bundle; the train task
runs in another process): the publisher moves the served bundle aside and the new one in while
holding it, and a reader loads only while holding it. No reader ever sees a half-published
bundle. A reader notices a new bundle by the identity of its ``models/model.pt`` (inode and
modification time), which every publication changes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from filelock import FileLock

T = TypeVar("T")
LOCK_TIMEOUT_S = 120.0


def bundle_lock(bundle: str | Path) -> FileLock:
    """The lock guarding ``bundle`` (a file beside it)."""
    bundle = Path(bundle)
    return FileLock(str(bundle.with_name(f".{bundle.name}.lock")), timeout=LOCK_TIMEOUT_S)


def bundle_version(bundle: str | Path) -> tuple[int, int] | None:
    """Identity of the served weights: ``(inode, mtime_ns)`` of ``models/model.pt`` (``None``: absent)."""
    try:
        st = (Path(bundle) / "models" / "model.pt").stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def load_locked(bundle: str | Path, load: Callable[[Path], T]) -> tuple[T, tuple[int, int] | None]:
    """``load(bundle)`` under the bundle's lock, with the version it loaded."""
    with bundle_lock(bundle):
        return load(Path(bundle)), bundle_version(bundle)


def publish_bundle(new_bundle: str | Path, served: str | Path, keep_previous: bool = True) -> Path:
    """Replace the served bundle with ``new_bundle`` atomically for readers.

    ``new_bundle`` is copied next to ``served`` first (same file system), then swapped in under
    the lock. The previous bundle is kept as ``<name>.previous-<timestamp>`` unless
    ``keep_previous`` is false.

    Returns:
        The served path.
    """
    served = Path(served)
    staging = served.with_name(f".{served.name}.incoming")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(new_bundle, staging)
    old = served.with_name(f".{served.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    with bundle_lock(served):
        if served.exists():
            served.rename(old)
        staging.rename(served)
        weights = served / "models" / "model.pt"
        weights.touch()  # the copy kept the run's mtime; a publication always moves it forward
    if not keep_previous:
        shutil.rmtree(old, ignore_errors=True)
    return served
