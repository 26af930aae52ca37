"""Standard exported networks for GPU servers: ONNX and ``torch.export``, each checked before it is written.

A bundle's ``models/model.pt`` needs medimg to rebuild the network. Serving stacks (Triton,
TorchServe, MONAI Deploy) want a self-contained graph instead, so every bundle also carries:

- ``models/model.onnx``: exported by PyTorch's ``torch.export``-based ONNX exporter, then run by
  onnxruntime on the export sample and compared with the eager network;
- ``models/model.pt2``: a ``torch.export`` program (``torch.export.load(path).module()``), reloaded
  from disk and compared the same way.

A format whose export or check fails is not written; :func:`export_standard` reports it as one
line naming the format and the reason. The batch dimension is dynamic where the network allows
(``Dim.AUTO``); the shapes each file accepts are recorded in the bundle's metadata.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medimg.models.exporting import SAMPLE_SEED, one_line, quiet_export, sample_input

log = logging.getLogger(__name__)
ONNX_FILE = "model.onnx"
PROGRAM_FILE = "model.pt2"
TOLERANCE = 1e-3


def export_sample(shape: Sequence[int]) -> torch.Tensor:
    """The export sample: :func:`medimg.models.exporting.sample_input` (the OpenVINO IR's check input too).

    Args:
        shape: the network input shape, batch and channel first.
    """
    return sample_input(shape, SAMPLE_SEED)


def max_difference(out: np.ndarray, ref: torch.Tensor) -> float:
    """Largest absolute difference, relative to the eager output's range when that exceeds 1."""
    ref_np = ref.detach().cpu().float().numpy()
    if out.shape != ref_np.shape:
        return float("inf")
    return float(np.abs(out - ref_np).max()) / max(float(np.abs(ref_np).max()), 1.0)


def _program(network: nn.Module, sample: torch.Tensor) -> torch.export.ExportedProgram:
    batch = {0: torch.export.Dim.AUTO}
    with quiet_export():
        return torch.export.export(network, (sample,), dynamic_shapes=(batch,), strict=False)


def _checked_save(path: Path, ref: torch.Tensor, save: Any, run: Any, what: str) -> float:
    """Save to a temporary name beside ``path`` (same suffix), run it, and keep it only if it matches eager.

    Raises:
        ValueError: the saved file's output differs from eager beyond :data:`TOLERANCE`.
    """
    tmp = path.with_name(f".partial-{path.name}")  # keeps the suffix: torch.export wants .pt2
    try:
        save(tmp)
        with torch.no_grad():
            diff = max_difference(run(tmp), ref)
        if not diff <= TOLERANCE:
            raise ValueError(f"{what} differs from eager by {diff:.2e} (> {TOLERANCE})")
        tmp.rename(path)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def write_program(program: torch.export.ExportedProgram, sample: torch.Tensor, ref: torch.Tensor,
                  path: Path) -> tuple[float, list[int | str]]:
    """Save a ``torch.export`` program, reload it from disk and check it on the sample.

    Returns:
        The checked difference from eager, and the input shape the program accepts (``"batch"``
        where the batch size is dynamic).

    Raises:
        ValueError: the reloaded program disagrees with eager beyond :data:`TOLERANCE`.
    """
    diff = _checked_save(path, ref, lambda tmp: torch.export.save(program, tmp),
                         lambda tmp: torch.export.load(tmp).module()(sample).numpy(), "reloaded program")
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.name == name)
    return diff, [int(d) if isinstance(d, int) else "batch" for d in node.meta["val"].shape]


def write_onnx(program: torch.export.ExportedProgram, sample: torch.Tensor, ref: torch.Tensor,
               path: Path) -> tuple[float, list[int | str]]:
    """Export to ONNX from a ``torch.export`` program, run it in onnxruntime and check it on the sample.

    Returns:
        The checked difference from eager, and the input shape the file accepts (``"batch"`` where
        the batch size is dynamic).

    Raises:
        ValueError: onnxruntime's output disagrees with eager beyond :data:`TOLERANCE`.
    """
    import onnxruntime as ort

    def save(tmp: Path) -> None:
        with quiet_export(), contextlib.redirect_stdout(None):
            torch.onnx.export(program, (sample,), dynamo=True, verbose=False, optimize=True,
                              input_names=["image"], output_names=["pred"]).save(str(tmp))

    sessions: list[Any] = []

    def run(tmp: Path) -> np.ndarray:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sessions.append(ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"]))
        return np.asarray(sessions[0].run(None, {sessions[0].get_inputs()[0].name: sample.numpy()})[0])

    diff = _checked_save(path, ref, save, run, "onnxruntime output")
    session = sessions[0]
    return diff, [d if isinstance(d, int) else "batch" for d in session.get_inputs()[0].shape]


def export_standard(network: nn.Module, input_shape: Sequence[int], models_dir: str | Path) -> dict[str, Any]:
    """Write ``model.onnx`` and ``model.pt2`` into ``models_dir``, each checked against eager first.

    Args:
        network: the trained network (single image tensor in, one tensor out).
        input_shape: the export sample's shape, batch and channel first.
        models_dir: the bundle's ``models`` folder.

    Returns:
        Metadata for ``metadata.json``: per format, the file, the input shape, and the checked
        difference; or the reason it was not written (also logged as one warning line).
    """
    models_dir = Path(models_dir)
    network = network.cpu().eval()
    sample = export_sample(input_shape)
    report: dict[str, Any] = {"sample": f"torch.rand{tuple(int(s) for s in input_shape)}, seed {SAMPLE_SEED}",
                              "tolerance": TOLERANCE}
    try:
        with torch.no_grad():
            ref = network(sample)
        if not isinstance(ref, torch.Tensor):
            raise TypeError(f"forward returns {type(ref).__name__}, not one tensor")
        program = _program(network, sample)
    except Exception as exc:  # noqa: BLE001 - export fails in many ways; the bundle is still complete
        reason = one_line(exc)
        for name, fmt in ((ONNX_FILE, "ONNX"), (PROGRAM_FILE, "torch.export")):
            log.warning("models/%s not written: the network does not export to %s (%s)", name, fmt, reason)
            report[fmt] = {"written": False, "reason": reason}
        return report
    for name, fmt, write in ((PROGRAM_FILE, "torch.export", write_program), (ONNX_FILE, "ONNX", write_onnx)):
        try:
            diff, accepts = write(program, sample, ref, models_dir / name)
        except Exception as exc:  # noqa: BLE001
            log.warning("models/%s not written: the network does not export to %s (%s)", name, fmt, one_line(exc))
            report[fmt] = {"written": False, "reason": one_line(exc)}
            continue
        log.info("models/%s written and checked against eager on the export sample (difference %.1e)", name, diff)
        report[fmt] = {"written": True, "file": f"models/{name}", "input_shape": accepts,
                       "max_difference": diff}
    return report
