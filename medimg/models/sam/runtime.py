"""Inference backends for 2D SAM-family networks: eager PyTorch and OpenVINO.

A backend runs the two neural parts of :class:`~medimg.models.sam.network.PromptableSAM` (the image
encoder, and the prompt encoder plus mask decoder); preprocessing, coordinate scaling and
postprocessing stay the network's own, so every backend sees and returns exactly what the eager
model does.

The OpenVINO backend converts both parts once (from the loaded weights, in memory, or from the IR
files a bundle stores beside ``model.pt``) and compiles them for the CPU. The prompt side becomes one
graph, :class:`PromptDecoderGraph`, whose inputs are SAM's own sparse-prompt convention: clicks and
box corners as a ``(1, N, 2)`` coordinate array with a label per point (``1``/``0`` clicks, ``2``/``3``
box corners, ``-1`` padding), a low-resolution mask and a flag saying whether that mask is given.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medimg.errors import BundleError
from medimg.models.exporting import one_line, quiet_export, sample_input
from medimg.models.ir_cache import cache_key, cached_models
from medimg.models.openvino_ir import (
    RUNTIME_DIR,
    TOLERANCE,
    check_outputs,
    compile_config,
    cpu_core,
    has_ir,
    owner_name,
    paired,
    read_ir,
    run_compiled,
    use_openvino,
    weights_digest,
    write_ir,
)
from medimg.models.sam.fast_decoder import predict_masks

__all__ = ["RUNTIME_DIR", "OpenVINOSAMRuntime", "PromptDecoderGraph", "TorchSAMRuntime", "make_runtime",
           "prompt_arrays", "read_openvino_ir", "save_openvino_ir"]

log = logging.getLogger(__name__)
IR_FILES = {"encoder": "sam_encoder", "decoder": "sam_decoder", "decoder_mask": "sam_decoder_mask"}


class PromptDecoderGraph(nn.Module):
    """SAM's prompt encoder and mask decoder as one graph of plain tensors (exportable).

    Equal to ``PromptEncoder`` + ``MaskDecoder.predict_masks`` for any prompt set: positional
    encodings of the points, the label embeddings SAM adds per point kind, the mask (or no-mask)
    dense embedding, then the decoder (:func:`medimg.models.sam.fast_decoder.predict_masks`: SAM's
    decoder with its image-side attention reassociated, half the arithmetic). All four masks and
    IoU predictions come out; the caller picks the single-mask output (index 0) or the best of the
    three ambiguity-aware ones.
    """

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module, with_mask: bool = False) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.with_mask = with_mask

    def forward(self, embeddings: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                mask_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one prompt set.

        Args:
            embeddings: ``(1, 256, h, w)`` image embedding.
            coords: ``(1, N, 2)`` point coordinates in the model input frame, already shifted by 0.5.
            labels: ``(1, N)`` float labels (see the module docstring).
            mask_input: ``(1, 1, 4h, 4w)`` previous low-resolution logits (the ``with_mask`` graph only;
                the other adds SAM's no-mask embedding and skips the mask encoder).

        Returns:
            ``(low_res_logits (1, 4, 4h, 4w), iou_predictions (1, 4))``.
        """
        pe = self.prompt_encoder
        h, w = pe.input_image_size
        enc = pe.pe_layer._pe_encoding(coords / torch.tensor([w, h], dtype=coords.dtype))
        lab = labels[..., None]
        sparse = enc * (lab != -1)
        sparse = sparse + pe.not_a_point_embed.weight * (lab == -1)
        for kind, emb in enumerate(pe.point_embeddings):
            sparse = sparse + emb.weight * (lab == kind)
        if self.with_mask:
            dense = pe.mask_downscaling(mask_input)
        else:
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *embeddings.shape[2:])
        return predict_masks(self.mask_decoder, embeddings, pe.get_dense_pe(), sparse, dense)


def prompt_arrays(points: tuple[torch.Tensor, torch.Tensor] | None,
                  boxes: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """SAM's sparse prompts as ``(coords (1, N, 2), labels (1, N))`` arrays for :class:`PromptDecoderGraph`.

    Clicks first, then the two box corners (labels 2, 3); without a box one padding point (label
    -1) follows the clicks, as ``PromptEncoder`` does. Coordinates get SAM's +0.5 pixel-centre shift.
    """
    coords, labels = [], []
    if points is not None:
        coords.append(points[0].detach().cpu().numpy().reshape(-1, 2) + 0.5)
        labels.append(points[1].detach().cpu().numpy().reshape(-1).astype(np.float32))
    if boxes is not None:
        coords.append(boxes.detach().cpu().numpy().reshape(-1, 2) + 0.5)
        labels.append(np.array([2.0, 3.0], dtype=np.float32))
    else:
        coords.append(np.zeros((1, 2)))
        labels.append(np.array([-1.0], dtype=np.float32))
    return (np.concatenate(coords).astype(np.float32)[None],
            np.concatenate(labels).astype(np.float32)[None])


def pick_masks(low: torch.Tensor, iou: torch.Tensor, multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's output selection: mask 0 for one mask, masks 1..3 for the ambiguity-aware three."""
    return (low[:, 1:], iou[:, 1:]) if multimask_output else (low[:, :1], iou[:, :1])


class TorchSAMRuntime:
    """The eager reference: the network's own :meth:`encode` and :meth:`decode`."""

    name = "torch"

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings of preprocessed inputs ``(B, 3, S, S)``."""
        with torch.inference_mode():
            return self.network.encode(x)

    def decode(self, embeddings: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None,
               boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None,
               multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder, as :meth:`PromptableSAM.decode`."""
        with torch.inference_mode():
            return self.network.decode(embeddings, points, boxes, masks, multimask_output)


class OpenVINOSAMRuntime:
    """The encoder and the prompt decoder compiled by OpenVINO for the CPU.

    Args:
        network: the loaded :class:`~medimg.models.sam.network.PromptableSAM` (2D, batch-1 prompts).
        ir_dir: a folder with the IR files :func:`save_openvino_ir` wrote; without them (or when they
            are stale or damaged) the IR is converted into the user's cache (see :func:`sam_ir`).
            ``None``: convert in memory.
        precision: OpenVINO's inference precision: ``f32`` (default: the eager model's arithmetic),
            ``bf16`` / ``f16``, or ``auto`` (what OpenVINO picks for the CPU: bf16 on AMX Xeons).
        threads: CPU threads (0: OpenVINO's choice).
    """

    name = "openvino"

    def __init__(self, network: nn.Module, ir_dir: str | Path | None = None, precision: str = "f32",
                 threads: int = 0) -> None:
        config = compile_config(precision, **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {}))
        self.network = network
        self.precision = precision
        t0 = time.perf_counter()
        enc_model, dec_model, mask_model = sam_ir(network, ir_dir)
        core = cpu_core()
        self._encoder = core.compile_model(enc_model, "CPU", config)
        # OpenVINO's fused-attention snippets are slower than plain kernels on the decoder's 56 x 4096 attention
        self._decoder = core.compile_model(dec_model, "CPU", {**config, "SNIPPETS_MODE": "DISABLE"})
        self._mask_decoder = core.compile_model(mask_model, "CPU", {**config, "SNIPPETS_MODE": "DISABLE"})
        self._enc_request = self._encoder.create_infer_request()
        self._dec_request = self._decoder.create_infer_request()
        self._mask_request = self._mask_decoder.create_infer_request()
        self._lock = threading.Lock()
        log.info("OpenVINO %s runtime ready in %.1f s", precision, time.perf_counter() - t0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings of preprocessed inputs ``(B, 3, S, S)`` (one request per image)."""
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        with self._lock:  # an infer request serves one call at a time
            out = [torch.from_numpy(np.array(self._enc_request.infer([arr[i:i + 1]])[0])) for i in range(len(arr))]
        return torch.cat(out).to(x.device)

    def decode(self, embeddings: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None,
               boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None,
               multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for one embedding, as :meth:`PromptableSAM.decode`."""
        if embeddings.shape[0] != 1:
            raise ValueError("the OpenVINO decoder takes one embedding per call")
        coords, labels = prompt_arrays(points, boxes)
        inputs = [np.ascontiguousarray(embeddings.detach().cpu().numpy(), dtype=np.float32), coords, labels]
        request = self._dec_request
        if masks is not None:  # a previous mask: the graph with SAM's mask encoder
            inputs.append(np.ascontiguousarray(masks.detach().cpu().numpy(), dtype=np.float32))
            request = self._mask_request
        with self._lock:  # an infer request serves one call at a time
            res = request.infer(inputs, share_inputs=True)
        low, iou = torch.from_numpy(np.array(res[0])), torch.from_numpy(np.array(res[1]))
        low, iou = pick_masks(low, iou, multimask_output)
        return low.to(embeddings.device), iou.to(embeddings.device)


def convert_openvino(network: nn.Module) -> tuple[Any, Any, Any]:
    """Convert the encoder and both :class:`PromptDecoderGraph` variants to OpenVINO models (in memory).

    The decoders' number of points is dynamic; everything else is static.

    Returns:
        ``(encoder, decoder without a mask input, decoder with one)``.
    """
    import openvino as ov

    network = network.cpu().eval()
    img = int(network.img_size)
    with torch.no_grad(), quiet_export():  # OpenVINO traces with TorchScript: its deprecation chatter is muted
        x = torch.zeros(1, 3, img, img)
        encoder = ov.convert_model(network.image_encoder, example_input=x, input=[list(x.shape)])
    return (encoder, *convert_decoders(network))


def convert_decoders(network: nn.Module) -> tuple[Any, Any]:
    """The two :class:`PromptDecoderGraph` variants as OpenVINO models: without and with a mask input."""
    import openvino as ov

    network = network.cpu().eval()
    emb = torch.zeros(1, 256, *network.prompt_encoder.image_embedding_size)
    mask = torch.zeros(1, 1, *network.prompt_encoder.mask_input_size)
    prompt = (torch.zeros(1, 3, 2), torch.tensor([[1.0, 2.0, 3.0]]))
    shapes = [list(emb.shape), [1, -1, 2], [1, -1]]
    models = []
    with torch.no_grad(), quiet_export():
        for with_mask in (False, True):
            graph = PromptDecoderGraph(network.prompt_encoder, network.mask_decoder, with_mask).eval()
            example = (emb, *prompt, mask) if with_mask else (emb, *prompt)
            models.append(ov.convert_model(graph, example_input=example,
                                           input=shapes + ([list(mask.shape)] if with_mask else [])))
    return models[0], models[1]


def save_openvino_ir(network: nn.Module, out_dir: str | Path, fp16: bool = False) -> dict[str, str]:
    """Write the OpenVINO IR of both parts into ``out_dir``, tagged with the weights' digest and hashed.

    ``fp16`` stores the weights in half precision (see :func:`~medimg.models.openvino_ir.write_ir`).
    Before anything is written the conversion is checked (:func:`check_conversion`).

    Returns:
        The files written (part -> file name).

    Raises:
        BundleError: the converted network disagrees with the eager one.
    """
    out_dir = Path(out_dir)
    models = checked_openvino(network, out_dir)
    write_ir(dict(zip(IR_FILES.values(), models)), out_dir, weights_digest(network), fp16)
    return {part: f"{name}.xml" for part, name in IR_FILES.items()}


def checked_openvino(network: nn.Module, where: str | Path) -> tuple[Any, Any, Any]:
    """:func:`convert_openvino`, then :func:`check_conversion` (raises when they disagree)."""
    network = network.cpu().eval()
    models = convert_openvino(network)
    check_conversion(network, models, where)
    return models


def all_masks(network: nn.Module, embeddings: torch.Tensor, **prompts: Any) -> list[torch.Tensor]:
    """The eager decoder's four masks and IoU predictions, as :class:`PromptDecoderGraph` returns them."""
    one = network.decode(embeddings, multimask_output=False, **prompts)
    three = network.decode(embeddings, multimask_output=True, **prompts)
    return [torch.cat([one[0], three[0]], 1), torch.cat([one[1], three[1]], 1)]


def check_conversion(network: nn.Module, models: tuple[Any, Any, Any], where: str | Path,
                     tol: float = TOLERANCE) -> float:
    """Largest difference between the converted parts (f32) and the eager network; raises over ``tol``.

    The image is noise that differs per channel; the prompts are a box, three clicks of both
    labels, and a click with a box, each decoded without and with the first mask fed back. Every
    output (all four masks, all four IoU predictions) is compared, shapes exactly
    (:func:`~medimg.models.openvino_ir.check_outputs`).
    """
    enc, dec, dec_mask = (cpu_core().compile_model(m, "CPU", compile_config("f32")) for m in models)
    size = float(network.img_size)
    x = sample_input([1, 3, int(size), int(size)])
    box = torch.tensor([[0.25 * size, 0.2 * size, 0.7 * size, 0.8 * size]])
    clicks = (torch.tensor([[[0.4 * size, 0.5 * size], [0.6 * size, 0.3 * size], [0.5 * size, 0.7 * size]]]),
              torch.tensor([[1, 0, 1]]))
    prompt_sets = [{"boxes": box}, {"points": clicks}, {"points": (clicks[0][:, :1], clicks[1][:, :1]), "boxes": box}]
    with torch.inference_mode():
        emb = network.encode(x)
    pairs = paired(run_compiled(enc, [x.numpy()]), [emb], where)
    for prompts in prompt_sets:
        coords, labels = prompt_arrays(prompts.get("points"), prompts.get("boxes"))
        with torch.inference_mode():
            plain = all_masks(network, emb, **prompts)
            previous = plain[0][:, :1]
            refined = all_masks(network, emb, masks=previous, **prompts)
        pairs += paired(run_compiled(dec, [emb.numpy(), coords, labels]), plain, where)
        pairs += paired(run_compiled(dec_mask, [emb.numpy(), coords, labels, previous.numpy()]), refined, where)
    return check_outputs(pairs, where, tol)


def read_openvino_ir(network: nn.Module, ir_dir: str | Path) -> tuple[Any, Any, Any]:
    """Read the stored IR and check it was made from exactly these weights, its bytes intact.

    Raises:
        BundleError: a missing IR file, one made from other weights (a stale or swapped file), or
            one whose bytes differ from its manifest's hash.
    """
    enc, dec, dec_mask = read_ir(list(IR_FILES.values()), ir_dir, weights_digest(network))
    return enc, dec, dec_mask


def sam_ir(network: nn.Module, ir_dir: str | Path | None) -> tuple[Any, Any, Any]:
    """The checked IR of a 2D SAM network: the stored one, else converted once into the user's cache.

    A stored IR that is missing, stale (other weights) or damaged is replaced by a conversion from
    the weights, keyed and hashed in the cache (:mod:`medimg.models.ir_cache`); ``ir_dir`` ``None``
    converts in memory. Every conversion is checked (:func:`check_conversion`).

    Raises:
        BundleError: the conversion disagrees with the eager network (the caller runs eager).
    """
    names = list(IR_FILES.values())
    where = owner_name(ir_dir, network)
    if ir_dir is None:
        return checked_openvino(network, where)
    problem = None
    if has_ir(names, ir_dir):
        try:
            return read_openvino_ir(network, ir_dir)
        except (BundleError, OSError, RuntimeError) as exc:
            problem = one_line(exc)
    size = int(network.img_size)
    emb, mask = network.prompt_encoder.image_embedding_size, network.prompt_encoder.mask_input_size
    digest = weights_digest(network)
    key = cache_key(digest, names, [[1, 3, size, size], [1, 256, *emb], [1, 1, *mask]])
    try:
        models = cached_models(names, key, lambda: list(checked_openvino(network, where)),
                               lambda models, out: write_ir(dict(zip(names, models)), out, digest), where)
    except Exception as exc:
        if problem:
            raise BundleError(Path(ir_dir), f"stored IR: {problem}; conversion: {one_line(exc)}") from exc
        raise
    if problem:
        log.warning("%s: stored OpenVINO IR not used (%s); using an IR converted from the weights", where, problem)
    return models[0], models[1], models[2]


def make_runtime(network: nn.Module, backend: str = "torch", ir_dir: str | Path | None = None,
                 precision: str = "f32", device: torch.device | None = None) -> TorchSAMRuntime | OpenVINOSAMRuntime:
    """The backend that runs a 2D SAM network.

    ``torch`` (eager), ``openvino`` (CPU only) or ``auto``: OpenVINO on the CPU, eager PyTorch on a
    GPU. ``openvino`` asked for on a CUDA device is a configuration error, not a silent switch. An
    OpenVINO IR that cannot be read, converted or checked gives the eager runtime and one warning
    line naming the bundle and the reason.
    """
    if use_openvino(backend, device):
        compile_config(precision)  # an unknown precision is a configuration error, not a fallback
        try:
            return OpenVINOSAMRuntime(network, ir_dir=ir_dir, precision=precision)
        except Exception as exc:  # noqa: BLE001 - any failure of the fast path means eager, with one line
            log.warning("%s: OpenVINO IR not used (%s); running eager PyTorch", owner_name(ir_dir, network),
                        one_line(exc))
    return TorchSAMRuntime(network)
