"""OpenVINO on the CPU: IR files tied to a bundle's weights, compiled-model cache, and a network wrapper.

A bundle stores the OpenVINO IR of its network beside ``models/model.pt`` (``models/openvino/``),
each file tagged with a digest of the weights it was made from; reading refuses a file made from
other weights. :class:`OpenVINONetwork` runs such an IR where the PyTorch network ran, so MONAI's
inferers (sliding window) call it unchanged. The 2D SAM runtime (:mod:`medimg.models.sam.runtime`)
builds on the same helpers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medimg.errors import BundleError, ConfigError
from medimg.models.exporting import quiet_export

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "openvino")
PRECISIONS = ("f32", "bf16", "f16", "auto")
RUNTIME_DIR = "models/openvino"  # inside a bundle
DIGEST_KEY = ["medimg", "weights_digest"]


def weights_digest(network: nn.Module) -> str:
    """A digest of the network's weights, recorded with derived runtime files to tie them to ``model.pt``."""
    h = hashlib.blake2b(digest_size=16)
    for name, value in sorted(network.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compiled_cache_dir() -> Path | None:
    """Where OpenVINO keeps compiled models (``None``: no cache).

    ``$MEDIMG_OPENVINO_CACHE`` (``none`` turns the cache off), else ``~/.cache/medimg/openvino``;
    ``None`` too when the folder cannot be created.
    """
    value = os.environ.get("MEDIMG_OPENVINO_CACHE", str(Path.home() / ".cache" / "medimg" / "openvino"))
    if value.lower() == "none":
        return None
    try:
        Path(value).mkdir(parents=True, exist_ok=True)
    except OSError:
        log.info("OpenVINO compile cache %s cannot be created; compiling without it", value)
        return None
    return Path(value)


def cpu_core() -> Any:
    """An OpenVINO ``Core`` with the compiled-model cache set (a later start compiles in a third of the time)."""
    import openvino as ov

    core = ov.Core()
    cache = compiled_cache_dir()
    if cache is not None:
        core.set_property({"CACHE_DIR": str(cache)})
    return core


def compile_config(precision: str = "f32", **extra: Any) -> dict[str, Any]:
    """Latency-first CPU settings; ``precision`` ``auto`` leaves OpenVINO's choice (bf16 on AMX CPUs)."""
    if precision not in PRECISIONS:
        raise ConfigError("precision", f"unknown OpenVINO precision {precision!r}; choose from {PRECISIONS}")
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", **extra}
    if precision != "auto":
        config["INFERENCE_PRECISION_HINT"] = precision
    return config


def use_openvino(backend: str, device: torch.device | str | None) -> bool:
    """Whether ``backend`` means OpenVINO on ``device``: ``auto`` picks it on a CPU, eager PyTorch on a GPU.

    Raises:
        ConfigError: an unknown backend, or ``openvino`` asked for on a GPU (never a silent switch).
    """
    if backend not in BACKENDS:
        raise ConfigError("backend", f"unknown inference backend {backend!r}; choose from {BACKENDS}")
    on_cpu = device is None or torch.device(device).type == "cpu"
    if backend == "openvino" and not on_cpu:
        raise ConfigError("backend", f"'openvino' runs on the CPU; pass backend='torch' for device {device}")
    return backend == "openvino" or (backend == "auto" and on_cpu)


def write_ir(models: dict[str, Any], out_dir: str | Path, digest: str, fp16: bool = False) -> None:
    """Save OpenVINO models as ``<name>.xml`` / ``.bin`` in ``out_dir``, each tagged with ``digest``.

    ``fp16``: store the weights in half precision (lossless for weights already rounded to fp16,
    as shipped bundles store them; the CPU still computes in the compiled precision).
    """
    import openvino as ov

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        model.set_rt_info(digest, DIGEST_KEY)
        ov.save_model(model, str(out_dir / f"{name}.xml"), compress_to_fp16=fp16)


def read_ir(names: Sequence[str], ir_dir: str | Path, digest: str) -> list[Any]:
    """Read stored IR files and check each was made from the weights with ``digest``.

    Raises:
        BundleError: a missing file, or one made from other weights (a stale or swapped file).
    """
    import openvino as ov

    core = ov.Core()
    models = []
    for name in names:
        path = Path(ir_dir) / f"{name}.xml"
        if not path.is_file() or not path.with_suffix(".bin").is_file():
            raise BundleError(path, "missing (the OpenVINO backend needs the .xml and .bin the export wrote)")
        model = core.read_model(str(path))
        stored = model.get_rt_info(DIGEST_KEY).astype(str) if model.has_rt_info(DIGEST_KEY) else ""
        if stored != digest:
            raise BundleError(path, "was not made from models/model.pt (weights digest differs); export again")
        models.append(model)
    return models


NETWORK_IR = "network"


def has_ir(names: Sequence[str], ir_dir: str | Path | None) -> bool:
    """Whether ``ir_dir`` holds the ``.xml`` and ``.bin`` of every named IR."""
    return ir_dir is not None and all((Path(ir_dir) / f"{n}.{ext}").is_file() for n in names for ext in ("xml", "bin"))


def derived_ir_dir(network: nn.Module, names: Sequence[str], build: Callable[[Path], Any]) -> Path | None:
    """The IR of a bundle that ships without it, made once from its weights into the user's cache.

    Shipped bundles may leave their OpenVINO IR out to save space (``medimg/zoo``'s budget): the IR
    is then converted from ``model.pt`` on first use, checked against the eager network by
    ``build`` (as the bundle writer checks it), and kept in ``$MEDIMG_IR_CACHE`` (else
    ``~/.cache/medimg/ir``) under the weights' digest, so later starts read it like a stored one.

    Returns:
        The folder, or ``None`` when no cache folder can be written (convert in memory instead).
    """
    root = Path(os.environ.get("MEDIMG_IR_CACHE", str(Path.home() / ".cache" / "medimg" / "ir")))
    folder = root / weights_digest(network)
    if has_ir(names, folder):
        return folder
    tmp = root / f".{folder.name}.{os.getpid()}.{threading.get_ident()}.partial"
    try:
        root.mkdir(parents=True, exist_ok=True)
        log.info("OpenVINO IR not in the bundle: converting from its weights once into %s", folder)
        build(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("OpenVINO IR cache %s cannot be written (%s); converting in memory", root, exc)
        return None
    return folder if has_ir(names, folder) else None


class OpenVINONetwork(nn.Module):
    """A dense-prediction network compiled by OpenVINO, called like the PyTorch network (batch dynamic).

    Args:
        network: the loaded PyTorch network (its weights' digest must match the IR's).
        ir_dir: the bundle's ``models/openvino`` (``None``: convert ``network`` in memory, for
            ``example_shape``).
        example_shape: the input shape ``(B, C, *spatial)`` to convert for when there is no IR.
        precision: OpenVINO inference precision (``f32``: the eager arithmetic).
    """

    def __init__(self, network: nn.Module, ir_dir: str | Path | None = None,
                 example_shape: Sequence[int] | None = None, precision: str = "f32") -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._network, self._precision, self._request = network, precision, None
        if ir_dir is not None and not has_ir([NETWORK_IR], ir_dir):
            return  # a bundle shipped without its IR: derived on the first batch (its shape), see derived_ir_dir
        if ir_dir is not None:
            (model,) = read_ir([NETWORK_IR], ir_dir, weights_digest(network))
        elif example_shape is not None:
            model = convert_network(network, example_shape)
        else:
            raise ConfigError("runtime_dir", "the OpenVINO backend needs the bundle's IR or an example shape")
        self._compile(model)

    def _compile(self, model: Any) -> None:
        self._compiled = cpu_core().compile_model(model, "CPU", compile_config(self._precision))
        self._request = self._compiled.create_infer_request()

    def _derive(self, shape: Sequence[int]) -> None:
        """Convert (checked) and cache the IR for a bundle that ships without it, then compile it."""
        folder = derived_ir_dir(self._network, [NETWORK_IR], lambda out: save_network_ir(self._network, shape, out))
        if folder is None:
            self._compile(convert_network(self._network, shape))
        else:
            self._compile(read_ir([NETWORK_IR], folder, weights_digest(self._network))[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch, as the PyTorch network returns them (float32, on ``x``'s device)."""
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        with self._lock:  # an infer request serves one call at a time
            if self._request is None:
                self._derive(arr.shape)
            out = np.array(self._request.infer([arr], share_inputs=True)[0])
        return torch.from_numpy(out).to(x.device)


def check_outputs(pairs: Sequence[tuple[np.ndarray, torch.Tensor]], where: str | Path, tol: float) -> float:
    """Largest difference of converted outputs from eager ones, relative to the eager range (at least 1).

    Raises:
        BundleError: the difference is over ``tol`` (named after ``where``).
    """
    diff = max(float(np.abs(out - ref.numpy()).max()) / max(float(ref.abs().max()), 1.0) for out, ref in pairs)
    if not diff <= tol:
        raise BundleError(where, f"the OpenVINO conversion disagrees with the eager network (relative {diff:.2e})")
    return diff


def convert_network(network: nn.Module, example_shape: Sequence[int]) -> Any:
    """Convert a dense-prediction network for inputs of ``example_shape`` (the batch size left dynamic)."""
    import openvino as ov

    network = network.cpu().eval()
    example = torch.zeros(*[int(s) for s in example_shape])
    with torch.no_grad(), quiet_export():  # OpenVINO traces with TorchScript: its deprecation chatter is muted
        return ov.convert_model(network, example_input=example, input=[[-1, *example.shape[1:]]])


def save_network_ir(network: nn.Module, example_shape: Sequence[int], out_dir: str | Path,
                    tol: float = 1e-3) -> None:
    """Convert, check against the eager network on a fixed smooth input, and save the IR.

    Raises:
        BundleError: the converted network's logits differ from the eager ones by more than ``tol``
            (relative to their range).
    """
    model = convert_network(network, example_shape)
    shape = [int(s) for s in example_shape]
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape[2:]], indexing="ij")
    x = torch.cos(3 * sum(grids)).expand(shape).contiguous()  # a smooth pattern in every batch item and channel
    with torch.inference_mode():
        ref = network(x)
    compiled = cpu_core().compile_model(model, "CPU", compile_config("f32"))
    check_outputs([(np.array(compiled([x.numpy()])[0]), ref)], out_dir, tol)
    write_ir({NETWORK_IR: model}, out_dir, weights_digest(network))
