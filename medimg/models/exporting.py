"""Exporter chatter muted around a conversion: shared by the OpenVINO conversions and the bundle's standard exports."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

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
