"""Write a MONAI bundle from a trained network and its run configuration."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from torch import nn

from medimg.bundle.standard import export_standard
from medimg.bundle.verify import verify_bundle
from medimg.errors import BundleError
from medimg.io.jsonfile import dumps_strict
from medimg.resources import resource_dir

log = logging.getLogger(__name__)
REQUIRED_PACKAGES = ("medimg", "nibabel", "pydicom", "SimpleITK", "pytorch-ignite")


def _package_versions() -> dict[str, str]:
    out = {}
    for name in REQUIRED_PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def _write_runtime(network: nn.Module, inference: dict[str, Any], channels: int, bundle: Path) -> None:
    """The OpenVINO IR a template's predictor asks for: 2D SAM parts, or the segmentation network."""
    from medimg.models.openvino_ir import RUNTIME_DIR, save_network_ir

    target = str(inference.get("predictor", {}).get("_target_", ""))
    if target.endswith("PromptablePredictor"):
        from medimg.models.sam.runtime import save_openvino_ir

        save_openvino_ir(network, bundle / RUNTIME_DIR)
    elif target.endswith("SegmentationPredictor"):
        shape = [int(inference["sw_batch_size"]), int(channels), *[int(r) for r in inference["roi_size"]]]
        save_network_ir(network, shape, bundle / RUNTIME_DIR)
    else:
        raise BundleError(bundle / "configs" / "inference.json", f"no OpenVINO runtime for predictor {target!r}")


OWNER_FILE = ".owner"  # in a partial folder: locked (flock) by the export writing it, for as long as it lives
STALE_UNLOCKED_S = 86_400.0  # a partial folder this old with no owner file: left by a medimg before owner files


def _partial_folder(out_dir: Path) -> tuple[Path, int]:
    """A temporary folder of this export's own beside ``out_dir``, locked as in use, and the lock's descriptor.

    The lock (``flock`` on the folder's owner file) lasts while this process holds the descriptor:
    the kernel drops it when the process ends, however it ends (SIGKILL included). First every
    partial folder of the same bundle name whose lock nobody holds is removed: what a killed
    export left.
    """
    import fcntl
    import time

    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        try:
            fd = os.open(stale / OWNER_FILE, os.O_RDWR)
        except FileNotFoundError:  # being created or renamed this instant, or left by an older medimg
            if stale.is_dir() and time.time() - stale.stat().st_mtime > STALE_UNLOCKED_S:
                shutil.rmtree(stale, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another export is writing it
            os.close(fd)
            continue
        try:
            shutil.rmtree(stale, ignore_errors=True)
            log.info("removed %s, left by an export that was killed", stale)
        finally:
            os.close(fd)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    fd = os.open(tmp / f"{OWNER_FILE}-new", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())  # for a person looking: which process writes it
    os.rename(tmp / f"{OWNER_FILE}-new", tmp / OWNER_FILE)  # seen by others only once locked
    return tmp, fd


def write_bundle(out_dir: str | Path, template: str, network: nn.Module, network_def: dict[str, Any],
                 preprocessing: list[dict[str, Any]] | None, inference_vars: dict[str, Any], labels: dict[str, str],
                 metadata_updates: dict[str, Any], train_config: str | None = None,
                 schema: str | Path | None = None, verify: bool = True, overwrite: bool = False,
                 standard_exports: bool = True, openvino_ir: bool = True) -> Path:
    """Write (and verify) a MONAI bundle atomically.

    Args:
        out_dir: destination folder (must not exist unless ``overwrite``).
        template: folder name under ``bundles/`` with configs, docs and LICENSE.
        network: the trained network; its state dict becomes ``models/model.pt``.
        network_def: bundle component that rebuilds the network (``_target_`` plus arguments).
        preprocessing: the transform spec list (the one training used, ``infer`` stage); ``None``
            for templates that have no ``preprocessing`` (promptable bundles).
        inference_vars: top-level ``inference.json`` values to set (``roi_size``, ...).
        labels: label index -> name.
        metadata_updates: ``metadata.json`` fields to set (``eval_metrics``, ``data_source``, ...).
        train_config: the run's resolved YAML, stored as ``configs/train_config.yaml``.
        schema: local metadata schema for verification.
        verify: run MONAI's verification.
        overwrite: replace an existing ``out_dir``.
        standard_exports: also write ``models/model.onnx`` and ``models/model.pt2``, each checked
            against the eager network (:mod:`medimg.bundle.standard`).
        openvino_ir: also write the OpenVINO IR of the CPU fast path, checked against eager. Without
            it the bundle is complete; a CPU run converts the IR once into the user's cache
            (:mod:`medimg.models.ir_cache`). Off for bundles that only ever run on GPUs.

    Returns:
        The bundle folder.
    """
    out_dir = Path(out_dir)
    src = resource_dir("bundles") / template
    if not (src / "configs" / "inference.json").is_file():
        raise BundleError(src, "bundle template has no configs/inference.json")
    if out_dir.exists() and not overwrite:
        raise BundleError(out_dir, "already exists; choose another --out or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a folder of this process's own: two exports of one run folder never write into each other's
    tmp, owner = _partial_folder(out_dir)
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        (tmp / "models").mkdir(exist_ok=True)
        network = network.cpu().eval()
        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, tmp / "models" / "model.pt")

        inference = json.loads((tmp / "configs" / "inference.json").read_text())
        inference["network_def"] = network_def
        if preprocessing is not None:
            inference["preprocessing"]["transforms"] = preprocessing
        inference.update(inference_vars)
        (tmp / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))

        meta = json.loads((tmp / "configs" / "metadata.json").read_text())
        names = [labels[k] for k in sorted(labels, key=int)]
        meta.update({
            "monai_version": monai.__version__,
            "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": np.__version__,
            "required_packages_version": _package_versions(),
            "label_classes": ", ".join(f"{k}: {v}" for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))),
            "pred_classes": ", ".join(f"{i}: {n}" for i, n in enumerate(names)),
            "labels": {n: int(k) for k, n in labels.items()},
            "python_version": sys.version.split()[0],
            "name": meta.get("name") or f"medimg {template}",
        })
        input_shape = metadata_updates.pop("input_spatial_shape", None)
        input_channels = metadata_updates.pop("input_channels", None)
        meta.update(metadata_updates)
        if input_shape is not None:
            meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = input_shape
        if input_channels is not None:
            meta["network_data_format"]["inputs"]["image"]["num_channels"] = int(input_channels)
        out_fmt = meta["network_data_format"]["outputs"]["pred"]
        if meta.get("medimg_task") == "classification":
            out_fmt["spatial_shape"] = [1, len(names)]
        if meta.get("medimg_task") != "promptable":  # promptable nets output one mask per prompt
            out_fmt["num_channels"] = len(names)
        out_fmt["channel_def"] = {str(i): n for i, n in enumerate(names)}
        if train_config is not None:
            (tmp / "configs" / "train_config.yaml").write_text(train_config)

        image_fmt = meta["network_data_format"]["inputs"]["image"]
        if standard_exports and meta.get("medimg_task") == "promptable":
            log.warning("models/model.onnx and models/model.pt2 not written: a promptable network takes prompts "
                        "besides the image (serve it with medimg's predictor or its OpenVINO IR)")
        elif standard_exports:  # ONNX + torch.export, on the shape the predictor feeds (batch 2: batch stays dynamic)
            roi = inference.get("roi_size")
            spatial = roi if isinstance(roi, list) else [s if isinstance(s, int) else 32
                                                         for s in image_fmt["spatial_shape"]]
            shape = [2, int(image_fmt["num_channels"]), *[int(r) for r in spatial]]
            meta["medimg_exports"] = export_standard(network, shape, tmp / "models")
        (tmp / "configs" / "metadata.json").write_text(dumps_strict(meta, indent=2))
        if openvino_ir and "runtime_dir" in inference:  # the CPU fast path's OpenVINO IR, checked against eager first
            _write_runtime(network, inference, int(image_fmt["num_channels"]), tmp)
        if verify:
            verify_bundle(tmp, schema)
        (tmp / OWNER_FILE).unlink()  # the bundle itself has no owner file; the lock holds until the rename
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(owner)
    return out_dir
