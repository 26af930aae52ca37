"""OpenVINO on the CPU: IR files tied to a bundle's weights, compiled-model cache, and a network wrapper.

A bundle stores the OpenVINO IR of its network beside ``models/model.pt`` (``models/openvino/``),
each file tagged with a digest of the weights it was made from and hashed in a manifest; reading
refuses a file made from other weights or whose bytes changed. :class:`OpenVINONetwork` runs such an
IR where the PyTorch network ran, so MONAI's inferers (sliding window) call it unchanged. The 2D SAM
runtime (:mod:`medimg.models.sam.runtime`) builds on the same helpers.

One contract holds for every conversion, at export and at run time, stored or cached
(:mod:`medimg.models.ir_cache`) or in memory: it is compiled in f32 and compared with the eager
network on the real input shape, with a distinct input per batch item and channel, every output
compared and every shape checked exactly (:func:`check_outputs`). At run time an IR that cannot be
read, converted or checked is not an error: the network runs in eager PyTorch, and one warning line
names the bundle and the reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medimg.errors import BundleError, ConfigError
from medimg.models.exporting import one_line, quiet_export, sample_input
from medimg.models.ir_cache import cache_key, cached_models, models_from_bytes, read_checked, write_manifest

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "openvino")
PRECISIONS = ("f32", "bf16", "f16", "auto")
RUNTIME_DIR = "models/openvino"  # inside a bundle
DIGEST_KEY = ["medimg", "weights_digest"]
TOLERANCE = 1e-3
NETWORK_IR = "network"


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
    """Save OpenVINO models as ``<name>.xml`` / ``.bin`` in ``out_dir``, tagged with ``digest`` and hashed.

    ``fp16``: store the weights in half precision (lossless for weights already rounded to fp16,
    as shipped bundles store them; the CPU still computes in the compiled precision). The folder's
    ``manifest.json`` records each file's SHA-256 (:mod:`medimg.models.ir_cache`).
    """
    import openvino as ov

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        model.set_rt_info(digest, DIGEST_KEY)
        ov.save_model(model, str(out_dir / f"{name}.xml"), compress_to_fp16=fp16)
    write_manifest(out_dir, list(models))


def read_ir(names: Sequence[str], ir_dir: str | Path, digest: str) -> list[Any]:
    """Read stored IR files, check their hashes (when the folder has a manifest) and their weights' digest.

    Raises:
        BundleError: a missing file, a file whose bytes differ from its manifest's hash, or one made
            from other weights (a stale or swapped file).
    """
    models = []
    for name in names:
        path = Path(ir_dir) / f"{name}.xml"
        if not path.is_file() or not path.with_suffix(".bin").is_file():
            raise BundleError(path, "missing (the OpenVINO backend needs the .xml and .bin the export wrote)")
        (model,) = models_from_bytes(read_checked(Path(ir_dir), [name], require_manifest=False))
        stored = model.get_rt_info(DIGEST_KEY).astype(str) if model.has_rt_info(DIGEST_KEY) else ""
        if stored != digest:
            raise BundleError(path, "was not made from models/model.pt (weights digest differs); export again")
        models.append(model)
    return models


def has_ir(names: Sequence[str], ir_dir: str | Path | None) -> bool:
    """Whether ``ir_dir`` holds the ``.xml`` and ``.bin`` of every named IR."""
    return ir_dir is not None and all((Path(ir_dir) / f"{n}.{ext}").is_file() for n in names for ext in ("xml", "bin"))


def owner_name(ir_dir: str | Path | None, network: nn.Module) -> str:
    """What warnings call the network: its bundle's folder name (``<bundle>/models/openvino``), else its class."""
    return Path(ir_dir).parent.parent.name if ir_dir is not None else type(network).__name__


def check_outputs(pairs: Sequence[tuple[np.ndarray, torch.Tensor]], where: str | Path, tol: float = TOLERANCE) -> float:
    """Largest difference of converted outputs from eager ones, relative to each eager range (at least 1).

    Every pair is compared whole: shapes must be equal exactly (no broadcasting), values finite.

    Raises:
        BundleError: a shape differs, a value is not finite, or the difference is over ``tol``
            (named after ``where``).
    """
    worst = 0.0
    for i, (out, ref) in enumerate(pairs):
        out, want = np.asarray(out), ref.detach().cpu().float().numpy()
        if out.shape != want.shape:
            raise BundleError(where, f"the OpenVINO conversion's output {i} has shape {out.shape}, "
                                     f"the eager network's {want.shape}")
        if not np.isfinite(out).all():
            raise BundleError(where, f"the OpenVINO conversion's output {i} is not finite")
        diff = float(np.abs(out - want).max(initial=0.0)) / max(float(np.abs(want).max(initial=0.0)), 1.0)
        if not diff <= tol:
            raise BundleError(where, f"the OpenVINO conversion disagrees with the eager network on output {i} "
                                     f"(relative {diff:.2e})")
        worst = max(worst, diff)
    return worst


def run_compiled(compiled: Any, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Every output of a compiled model, in order, as NumPy arrays."""
    result = compiled([np.ascontiguousarray(a, dtype=np.float32) for a in inputs])
    return [np.array(result[i]) for i in range(len(compiled.outputs))]


def paired(outs: Sequence[np.ndarray], refs: Sequence[torch.Tensor],
           where: str | Path) -> list[tuple[np.ndarray, torch.Tensor]]:
    """Converted and eager outputs side by side for :func:`check_outputs`; their numbers must be equal.

    Raises:
        BundleError: the conversion has another number of outputs than the eager network.
    """
    if len(outs) != len(refs):
        raise BundleError(where, f"the OpenVINO conversion has {len(outs)} outputs, the eager network {len(refs)}")
    return list(zip(outs, refs))


def convert_network(network: nn.Module, example_shape: Sequence[int]) -> Any:
    """Convert a dense-prediction network for inputs of ``example_shape`` (the batch size left dynamic)."""
    import openvino as ov

    network = network.cpu().eval()
    example = torch.zeros(*[int(s) for s in example_shape])
    with torch.no_grad(), quiet_export():  # OpenVINO traces with TorchScript: its deprecation chatter is muted
        return ov.convert_model(network, example_input=example, input=[[-1, *example.shape[1:]]])


def check_network_ir(network: nn.Module, model: Any, shape: Sequence[int], where: str | Path,
                     tol: float = TOLERANCE) -> float:
    """Compare a converted network with the eager one on ``shape`` (at least two batch items), all outputs.

    Raises:
        BundleError: see :func:`check_outputs`.
    """
    shape = [max(int(shape[0]), 2), *[int(s) for s in shape[1:]]]
    x = sample_input(shape)
    with torch.inference_mode():
        ref = network.cpu().eval()(x)
    refs = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    compiled = cpu_core().compile_model(model, "CPU", compile_config("f32"))
    return check_outputs(paired(run_compiled(compiled, [x.numpy()]), refs, where), where, tol)


def checked_network(network: nn.Module, shape: Sequence[int], where: str | Path, tol: float = TOLERANCE) -> Any:
    """Convert a dense-prediction network for ``shape`` and check it (:func:`check_network_ir`)."""
    model = convert_network(network, shape)
    check_network_ir(network, model, shape, where, tol)
    return model


def save_network_ir(network: nn.Module, example_shape: Sequence[int], out_dir: str | Path,
                    tol: float = TOLERANCE) -> None:
    """Convert, check against the eager network (:func:`check_network_ir`), and save the IR.

    Raises:
        BundleError: the converted network disagrees with the eager one.
    """
    model = checked_network(network, example_shape, out_dir, tol)
    write_ir({NETWORK_IR: model}, out_dir, weights_digest(network))


def network_ir(network: nn.Module, shape: Sequence[int], cache: bool = True, where: str = "the network") -> Any:
    """The checked IR of ``network`` for inputs of ``shape``: from the user's cache, or converted once.

    Args:
        network: the loaded network.
        shape: the input shape ``(B, C, *spatial)`` (the batch stays dynamic).
        cache: keep the conversion in the IR cache (``False``: in memory only; checked all the same).
        where: the bundle, for log lines and errors.
    """
    digest = weights_digest(network)

    def convert() -> list[Any]:
        return [checked_network(network, shape, where)]

    if not cache:
        return convert()[0]
    key = cache_key(digest, [NETWORK_IR], [[-1, *[int(s) for s in shape[1:]]]])
    return cached_models([NETWORK_IR], key, convert,
                         lambda models, out: write_ir({NETWORK_IR: models[0]}, out, digest), where)[0]


class OpenVINONetwork(nn.Module):
    """A dense-prediction network compiled by OpenVINO, called like the PyTorch network (batch dynamic).

    The IR for an input shape is the bundle's stored one when it was made from these weights, its
    bytes are intact and it takes that shape; otherwise it is converted from the weights (checked)
    into the user's IR cache. Anything that fails on the way makes the network run in eager
    PyTorch from then on, after one warning line (:attr:`fallback` says why).

    Args:
        network: the loaded PyTorch network (on the CPU).
        ir_dir: the bundle's ``models/openvino`` (``None``: convert ``network`` in memory, for
            ``example_shape``).
        example_shape: an input shape ``(B, C, *spatial)`` to prepare now (else on the first batch).
        precision: OpenVINO inference precision (``f32``: the eager arithmetic).
        name: what the warnings call the network (default: the bundle's folder name).
    """

    def __init__(self, network: nn.Module, ir_dir: str | Path | None = None,
                 example_shape: Sequence[int] | None = None, precision: str = "f32", name: str | None = None) -> None:
        super().__init__()
        if ir_dir is None and example_shape is None:
            raise ConfigError("runtime_dir", "the OpenVINO backend needs the bundle's IR or an example shape")
        compile_config(precision)  # an unknown precision is a configuration error, not a fallback
        self._lock = threading.Lock()
        self._network, self._precision, self._ir_dir = network, precision, ir_dir
        self.name = name or owner_name(ir_dir, network)
        self._requests: dict[tuple[int, ...], Any] = {}
        self.fallback: str | None = None
        if example_shape is not None:
            with self._lock:
                self._request_for(tuple(int(s) for s in example_shape))

    def _stored(self, shape: Sequence[int]) -> tuple[Any | None, str | None]:
        """The bundle's own IR if usable for ``shape``, else ``None`` and why not (``None``: another shape)."""
        import openvino as ov

        if not has_ir([NETWORK_IR], self._ir_dir):
            return None, None
        try:
            (model,) = read_ir([NETWORK_IR], self._ir_dir, weights_digest(self._network))
        except (BundleError, OSError, RuntimeError) as exc:
            return None, f"stored IR: {one_line(exc)}"
        if model.input(0).get_partial_shape().compatible(ov.PartialShape([int(s) for s in shape])):
            return model, None
        log.info("%s: the stored OpenVINO IR takes %s, not %s; converting for this shape",
                 self.name, model.input(0).get_partial_shape(), list(shape))
        return None, None

    def _request_for(self, shape: tuple[int, ...]) -> Any | None:
        """The infer request for inputs of ``shape`` (made once per shape), ``None`` once eager runs instead."""
        if self.fallback is None and shape[1:] not in self._requests:
            model, problem = self._stored(shape)
            try:
                if model is None:
                    model = network_ir(self._network, shape, cache=self._ir_dir is not None, where=self.name)
                compiled = cpu_core().compile_model(model, "CPU", compile_config(self._precision))
                self._requests[shape[1:]] = compiled.create_infer_request()
            except Exception as exc:  # noqa: BLE001 - any failure of the fast path means eager, with one line
                self._fall_back("; ".join(filter(None, [problem, one_line(exc)])))
            else:
                if problem:
                    log.warning("%s: %s; using an IR converted from the weights instead", self.name, problem)
        return None if self.fallback is not None else self._requests[shape[1:]]

    def _fall_back(self, reason: str) -> None:
        self.fallback = reason
        log.warning("%s: OpenVINO IR not used (%s); running eager PyTorch", self.name, reason)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch, as the PyTorch network returns them (float32, on ``x``'s device)."""
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        with self._lock:  # an infer request serves one call at a time
            request = self._request_for(arr.shape)
            if request is not None:
                try:
                    return torch.from_numpy(np.array(request.infer([arr], share_inputs=True)[0])).to(x.device)
                except Exception as exc:  # noqa: BLE001
                    self._fall_back(one_line(exc))
        return self._network(x)
