"""One writer per embedded dataset folder, across processes (DDP ranks, parallel runs, test workers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def prepare_once(root: Path, last: Path, write: Callable[[], object]) -> None:
    """Run ``write`` to fill ``root`` unless ``last`` (the file it writes last) exists.

    An inter-process lock (``.<name>.lock`` beside ``root``) is held while writing, and ``last`` is
    checked again under it: a second process that wants the same dataset waits, then finds it
    complete, instead of reading (or writing) half-written files. A finished dataset costs no lock.
    """
    if last.is_file():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if not last.is_file():
            write()
