"""One exception hierarchy for user mistakes, and the CLI wrapper that turns them into one line.

Every error a user can cause (a bad file, a bad config, a weight file that does not fit) is a
:class:`MedimgError` that names the offending path and the problem. The CLIs catch them and print
``error: <path>: <problem>`` on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

EXIT_USER_ERROR = 2


class MedimgError(Exception):
    """Base class of every error caused by user input.

    Args:
        path: the file, folder or config key at fault (``None`` when there is none).
        problem: what is wrong with it, as one short sentence.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class DataError(MedimgError):
    """An image, label, DICOM series or manifest cannot be used."""


class ConfigError(MedimgError):
    """A configuration value or command-line option is wrong."""


class WeightsError(MedimgError):
    """A checkpoint or weight file cannot be read or does not fit the network."""


class BundleError(MedimgError):
    """A MONAI bundle is malformed or fails verification."""


def find_medimg_error(exc: BaseException | None) -> MedimgError | None:
    """Return the :class:`MedimgError` that ``exc`` wraps, following explicit ``raise ... from`` causes only.

    MONAI wraps exceptions raised inside transforms (``raise RuntimeError("applying transform ...")
    from e``); the user's mistake is the MedimgError at the end of that chain. An exception merely
    raised *while handling* a MedimgError (``__context__``) is a genuine bug, never a user error:
    it keeps its traceback.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MedimgError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def run_cli(main: Callable[[], int | None]) -> int:
    """Run a CLI body; a user mistake becomes one ``error:`` line and exit code 2.

    Args:
        main: the body; returns an exit code or ``None`` for success.

    Returns:
        The exit code to pass to :func:`sys.exit`.
    """
    try:
        return int(main() or 0)
    except Exception as exc:  # noqa: BLE001 - only MedimgErrors are turned into one line
        err = find_medimg_error(exc)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


def console_main(main: Callable[[list[str] | None], int]) -> int:
    """Start a command line: the SIGTERM handler (:func:`exit_on_sigterm`), then ``main`` on ``sys.argv``.

    The one path of every medimg program: ``python -m medimg.infer`` and the ``medimg-infer``
    console script (pyproject's ``[project.scripts]``) both call it, so neither skips the handler.

    Args:
        main: the CLI's ``main(argv)``; ``None`` reads ``sys.argv``.

    Returns:
        The exit code for :func:`sys.exit`.
    """
    exit_on_sigterm()
    return main(None)


def exit_on_sigterm() -> None:
    """Make SIGTERM end a CLI through its clean-ups, with status ``128 + 15``, instead of on the spot.

    ``kill``, ``docker stop``, systemd and batch schedulers (SLURM preemption) send SIGTERM; with
    Python's default handler the process ends before any ``finally`` or ``except BaseException``
    block runs, so a half-written output or a temporary folder would be left behind. Installed
    by the command-line entry points only (never on import), on the main thread, and only over
    the default handler.
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_for_signal)


def _exit_for_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def check_output_location(path: str | os.PathLike, folder: bool = False) -> Path:
    """Refuse an output that cannot be written, before any work is done; nothing is created.

    The nearest existing folder above ``path`` must be a folder (not a file) in which a file can
    be created: a temporary file is made there and removed at once (this catches read-only mounts,
    permissions and pseudo file systems such as ``/proc`` alike).

    Args:
        path: the output file, or with ``folder`` the output folder (which may exist).
        folder: ``path`` is a folder to write into.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: naming ``path`` and why it cannot be written.
    """
    import tempfile

    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(path, "is a file; the output here is a folder (one file per input)")
    here = path if folder else path.parent
    here = here if str(here) else Path(".")
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise ConfigError(path, f"cannot be written: {here} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=here):
            pass
    except OSError as exc:
        raise ConfigError(path, f"cannot be written: {here}: {exc.strerror or exc}") from exc
    return path


# errors of writing itself (write(), close(), flush() give no file name): a full disk, a quota, a failing device
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS})


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    Nothing half-written is ever left at ``path``: on any error the temporary file is removed. A
    failure to write there is a :class:`ConfigError` naming ``path``: an error on the output's own
    file or folder (no such folder, a file in the way, permissions), and one of
    :data:`WRITE_ERRNOS` (a full disk, a quota, an I/O error), which ``write()`` and ``close()``
    raise without a file name.

    Args:
        path: the final output file.
    """
    final = Path(path)
    # keep the full suffix (.nii.gz) so writers that dispatch on it behave
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}{''.join(final.suffixes)}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        own = exc.filename is not None and Path(exc.filename) in (tmp, final, *final.parents)
        if not own and not (exc.filename is None and exc.errno in WRITE_ERRNOS):
            raise  # not the output's own file or folder: some other failure inside the block
        check_output_location(final)  # a file in the way, a read-only place: says which
        raise ConfigError(final, f"cannot be written: {exc.strerror or exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
