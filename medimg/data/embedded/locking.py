"""One writer per embedded dataset folder, across processes (DDP ranks, parallel runs, test workers)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


@contextmanager
def preparing(root: Path) -> Iterator[None]:
    """Hold an inter-process lock (``.<name>.lock`` beside ``root``) while ``root`` is written.

    A second process that wants the same dataset waits, then finds it complete, instead of reading
    (or writing) half-written files. Callers check for their dataset's last file again inside.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        yield
