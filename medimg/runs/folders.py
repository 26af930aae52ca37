"""Run folders: every run, and every folder prepared for one, is created exclusively.

A folder is claimed by creating it (``mkdir`` fails when it exists), never by finding it there:
two runs started in the same second (two processes, the jobs of one Hydra multirun, a MONAI Label
fine-tune beside a CLI run) resolve the same name, and the later one takes ``<name>-2``, then
``-3``, ... A folder somebody prepared for a run (MONAI Label's train task) is handed to that run
by an explicit instruction (``run_dir_claimed=true``), never taken because it looks unused.
"""

from __future__ import annotations

from pathlib import Path

from medimg.errors import ConfigError


def new_folder(wanted: str | Path, limit: int = 10_000) -> Path:
    """Create ``wanted``, or the first of ``wanted-2``, ``wanted-3``, ... that does not exist yet.

    Args:
        wanted: the folder asked for (its parents are created).
        limit: how many names to try.

    Returns:
        The folder created, absolute.

    Raises:
        ConfigError: every name is taken.
    """
    wanted = Path(wanted).resolve()
    wanted.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, limit):
        folder = wanted if n == 1 else wanted.with_name(f"{wanted.name}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise ConfigError("run_dir", f"no free run folder next to {wanted}")
