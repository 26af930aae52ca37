"""Run ``python -m MODULE args`` in a child forked from a warm process: the CLI's code, without its imports.

Every ``python -m medimg.train`` / ``medimg.infer`` the suite starts spends 10 to 25 s of CPU importing
torch, MONAI, Lightning, timm and torchvision before it reads an argument (BENCHMARKS.md, "Test
suite"). Here the standard library's fork server (:mod:`multiprocessing`, ``forkserver``) imports
them once per pytest worker, and each command is a fresh child forked from it: its own process id,
working folder, environment, argv and standard streams, running the module as ``__main__`` exactly as
``python -m`` does (:func:`runpy.run_module`), then the interpreter's exit handlers, then its exit
code. The fork server never runs a tensor operation, so no thread pool is copied into a child.

What it does not cover, tested with real interpreters elsewhere: the imports themselves (the lean
MONAI import, the console scripts, a missing input reported before torch loads) and signals sent
to a CLI process.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# imported once in the fork server; every child starts with them loaded (medimg itself is not: the
# child imports the working tree's medimg, as python -m would)
PRELOAD = ["tests.warm_preload"]
_context = None


def _fork_context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(module: str, args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """The child's whole life: ``python -m module args`` in ``cwd`` with ``env``, streams to two files."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path.insert(0, cwd)  # python -m puts the working folder first
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    if env.get("OMP_NUM_THREADS", "").isdigit():  # torch read it when the fork server imported it
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception ends python -m with its traceback and 1
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what interpreter shutdown runs (multiprocessing's children skip it)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_module_warm(module: str, *args: str, cwd: Path, env: dict[str, str],
                    timeout: float) -> subprocess.CompletedProcess:
    """``python -m module args`` in a child of the warm fork server; output captured as text.

    Raises:
        subprocess.TimeoutExpired: it ran past ``timeout`` (the child is killed first).
    """
    with tempfile.TemporaryDirectory(prefix="medimg-warm-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _fork_context().Process(target=_child, args=(module, list(args), str(cwd), dict(env), out, err))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([sys.executable, "-m", module, *args], timeout)
        with open(out, encoding="utf-8", errors="replace") as fh_out, open(err, encoding="utf-8",
                                                                           errors="replace") as fh_err:
            stdout, stderr = fh_out.read(), fh_err.read()
    # a child ended by a signal reports -N, as subprocess does
    return subprocess.CompletedProcess([sys.executable, "-m", module, *args], proc.exitcode, stdout, stderr)
