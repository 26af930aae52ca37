"""Exporter chatter muted around a conversion: shared by the OpenVINO conversions and the bundle's standard exports."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence

import torch


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence exporter chatter at its source: deprecation notices, tracer warnings, progress prints.

    Wraps only the export calls, so warnings from the user's own code elsewhere stay visible.
    """
    with warnings.catch_warnings():
        for pattern in (r"`torch\.jit\.", r"Converting a tensor to a Python", r"Iterating over a tensor",
                        r".*TracerWarning", r"torch\.tensor results are registered as constants",
                        r".*is deprecated.*torch\.export", r"Exporting a model", r"Using a non-full backward"):
            warnings.filterwarnings("ignore", message=pattern)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "onnx_ir")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)


SAMPLE_SEED = 0


def sample_input(shape: Sequence[int], seed: int = SAMPLE_SEED) -> torch.Tensor:
    """A check input: uniform noise from a fixed seed, so every batch item and channel differs.

    Conversions are compared with the eager network on it (the ONNX and ``torch.export`` files, the
    OpenVINO IR). A conversion that mixes batch items or channels, or that froze a data-dependent
    branch, shows on it; one repeated pattern would hide both.

    Args:
        shape: the network input shape, batch and channel first.
        seed: the generator's seed (reproducible by anyone checking a file).
    """
    return torch.rand(*[int(s) for s in shape], generator=torch.Generator().manual_seed(seed))


def one_line(exc: BaseException) -> str:
    """An exception as one short line (``Type: message``), for warnings that name why something was skipped."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
