"""Atomic bundle publication, shared by the train task (writer) and the infer tasks (readers).

A bundle is a folder, and a folder cannot be replaced in one system call. Readers and the
publisher therefore take the same file lock (``.<name>.lock`` beside the bundle; the train task
runs in another process): the publisher moves the served bundle aside and the new one in while
holding it, and a reader loads only while holding it. No reader ever sees a half-published
bundle. A reader notices a new bundle by the identity of its ``models/model.pt`` (inode and
modification time), which every publication changes.

A publisher killed at any point (``kill -9``) leaves either the old or the new bundle served,
never a mix and never none: the new bundle is copied to ``.<name>.incoming.partial`` and renamed
``.<name>.incoming`` only when complete, and the swap is two renames under the lock. The only
state between them (the served folder moved aside, the complete incoming one not yet in) is
finished by :func:`recover`, which every reader and the next publisher run under the lock first:
it rolls the complete incoming bundle forward, or, with none, the bundle the swap moved aside
back. Each publisher copies into its own ``.<name>.incoming-<pid>.partial``, removed by
:func:`recover` only once that process is gone (a reader never deletes a live publisher's copy).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from filelock import FileLock

T = TypeVar("T")
LOCK_TIMEOUT_S = 120.0
KEEP_PREVIOUS = 2  # replaced bundles kept beside a served one, newest first


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


def _owner_alive(partial: Path) -> bool:
    """Whether the publisher that is copying into ``partial`` (``…incoming-<pid>.partial``) still runs."""
    try:
        pid = int(partial.name.rsplit("-", 1)[1].split(".")[0])
        os.kill(pid, 0)
    except (IndexError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def recover(served: str | Path) -> str | None:
    """Finish or undo a publication a killed publisher left half done; call it holding the lock.

    A partial copy is removed only when its publisher is gone: a reader must never delete the copy
    a live publisher is still making. The newest previous bundle is moved back only when a swap
    was under way (``.<name>.swap`` names it), never because a user deleted the served folder.

    Returns:
        ``"forward"`` (the complete incoming bundle was moved in), ``"back"`` (the bundle the
        interrupted swap had moved aside was moved back), or ``None`` (nothing to do).
    """
    served = Path(served)
    incoming = served.with_name(f".{served.name}.incoming")
    swap = served.with_name(f".{served.name}.swap")
    for partial in served.parent.glob(f".{served.name}.incoming*.partial"):
        if not _owner_alive(partial):
            shutil.rmtree(partial, ignore_errors=True)
    moved_aside = served.with_name(swap.read_text().strip()) if swap.is_file() else None
    swap.unlink(missing_ok=True)
    if served.exists():
        shutil.rmtree(incoming, ignore_errors=True)  # a complete copy never swapped in: the swap is redone
        return None
    if incoming.is_dir():
        incoming.rename(served)
        return "forward"
    if moved_aside is not None and moved_aside.is_dir():
        moved_aside.rename(served)
        return "back"
    return None


def load_locked(bundle: str | Path, load: Callable[[Path], T]) -> tuple[T, tuple[int, int] | None]:
    """``load(bundle)`` under the bundle's lock (after :func:`recover`), with the version it loaded."""
    with bundle_lock(bundle):
        recover(bundle)
        return load(Path(bundle)), bundle_version(bundle)


def publish_bundle(new_bundle: str | Path, served: str | Path, keep_previous: bool = True) -> Path:
    """Replace the served bundle with ``new_bundle`` atomically for readers.

    ``new_bundle`` is copied next to ``served`` first (same file system), then swapped in under
    the lock. The first bundle ever replaced (the shipped or exported one) is kept for good as
    ``.<name>.original`` (:func:`original_copy`); later ones as ``.<name>.previous-<timestamp>``
    unless ``keep_previous`` is false, and only the newest :data:`KEEP_PREVIOUS` of those stay.

    Returns:
        The served path.
    """
    served = Path(served)
    staging = served.with_name(f".{served.name}.incoming")
    partial = served.with_name(f".{served.name}.incoming-{os.getpid()}.partial")  # this publisher's own
    with bundle_lock(served):  # a publication a killed publisher left half done is finished first
        recover(served)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(new_bundle, partial)
    original = original_copy(served)
    seconds, fraction = divmod(time.time_ns(), 10**9)  # one instant: names sort in publication order
    old = original if not original.exists() else served.with_name(
        f".{served.name}.previous-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(seconds))}-{fraction:09d}")
    swap = served.with_name(f".{served.name}.swap")
    with bundle_lock(served):
        shutil.rmtree(staging, ignore_errors=True)
        partial.rename(staging)  # complete: from here a killed publication rolls forward
        if served.exists():
            swap.write_text(old.name)  # what recover moves back should the complete copy be lost
            served.rename(old)
        staging.rename(served)
        swap.unlink(missing_ok=True)
        weights = served / "models" / "model.pt"
        weights.touch()  # the copy kept the run's mtime; a publication always moves it forward
    if not keep_previous and old != original:
        shutil.rmtree(old, ignore_errors=True)
    prune_previous(served, KEEP_PREVIOUS if keep_previous else 0)
    return served


def original_copy(served: str | Path) -> Path:
    """Where the first bundle a publication replaced is kept for good: ``.<name>.original`` beside it.

    Fine-tunes stack; without it the bundle a department started from would be pruned after
    :data:`KEEP_PREVIOUS` + 1 publications, and a bad run of fine-tunes could not be undone.
    """
    served = Path(served)
    return served.with_name(f".{served.name}.original")


def prune_previous(served: str | Path, keep: int = 2) -> list[Path]:
    """Delete all but the newest ``keep`` ``.<name>.previous-*`` copies of a served bundle.

    Every publication keeps the bundle it replaced, for a roll-back; without a bound a server that
    fine-tunes daily would fill its disk with them.

    Returns:
        The copies deleted.
    """
    served = Path(served)
    with bundle_lock(served):
        previous = sorted(served.parent.glob(f".{served.name}.previous-*"))
        gone = previous[:max(len(previous) - keep, 0)]
        for old in gone:
            shutil.rmtree(old, ignore_errors=True)
    return gone
