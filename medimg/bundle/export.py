"""A training run (its record ``run.json`` and a checkpoint) -> a verified MONAI bundle.

What ``python -m medimg.export`` and the end of ``python -m medimg.train`` call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medimg.bundle.writer import write_bundle
from medimg.errors import ConfigError, WeightsError, check_output_location
from medimg.models import build_network
from medimg.models.weights import read_network_state
from medimg.runs.parts import RECORD_FILE, RunRecord


def find_checkpoint(run_dir: Path, record: RunRecord | None = None) -> Path:
    """The checkpoint to export: the one the run's final validation used, else the best, else ``last.ckpt``.

    The record's ``metrics["checkpoint"]`` names the checkpoint the reported metrics belong to; it
    is taken by its name from this run folder's own ``checkpoints/`` (a moved or copied run exports
    its own file, never the one at the recorded path); without it, the newest ``best-*.ckpt``.
    """
    ckpts = run_dir / "checkpoints"
    chosen = (record.metrics.get("checkpoint") if record is not None else None) or None
    if chosen:
        own = ckpts / Path(chosen).name
        if own.is_file():
            return own
        raise WeightsError(own, "the checkpoint the run's metrics.json names is gone")
    best = sorted(ckpts.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    if best:
        return best[-1]
    if (ckpts / "last.ckpt").is_file():
        return ckpts / "last.ckpt"
    raise WeightsError(ckpts, "no checkpoint found in this run")


def export_run(source: str | Path, out: str | Path, schema: str | Path | None = None,
               overwrite: bool = False, verify: bool = True, standard_exports: bool = True,
               openvino_ir: bool = True) -> Path:
    """Export a training run (or one of its checkpoints) as a MONAI bundle.

    Everything comes from the run's record (``run.json``): the network spec, the predictor's
    preprocessing contract, the labels and the validation metrics.

    Args:
        source: a run folder (``run.json`` + ``checkpoints/``) or a ``.ckpt`` inside one.
        out: bundle folder to create.
        schema: local MONAI metadata schema for verification.
        overwrite: replace an existing ``out``.
        verify: run MONAI's bundle verification.
        standard_exports: also write the checked ONNX and ``torch.export`` files.
        openvino_ir: also write the checked OpenVINO IR (else CPU runs convert it once into a cache).

    Returns:
        The bundle folder.
    """
    source = Path(source)
    check_output_location(out, folder=True)
    if not source.exists():
        raise ConfigError(source, "no such run folder or checkpoint")
    run_dir = source.parent.parent if source.is_file() else source
    if not (run_dir / RECORD_FILE).is_file():
        raise ConfigError(run_dir / RECORD_FILE, "run record missing; is this a medimg run folder?")
    record = RunRecord.load(run_dir)
    ckpt = source if source.is_file() else find_checkpoint(run_dir, record)
    if not record.template:
        raise ConfigError(run_dir, f"a {record.task} run has no bundle to export")
    network = build_network(**record.network)
    try:
        network.load_state_dict(read_network_state(ckpt), strict=True)
    except RuntimeError as exc:
        raise WeightsError(ckpt, f"weights do not fit the run's network ({str(exc).splitlines()[0]})") from exc
    contract = dict(record.contract)
    if "keep_main_component" in contract:  # "auto": the validation decides (nnU-Net-style post-processing)
        from medimg.data.postprocess import choose_main_component

        contract["keep_main_component"] = choose_main_component(contract["keep_main_component"], record.metrics)
    if "intensity_refinement" in contract:  # likewise (medimg.data.refine)
        from medimg.data.refine import choose_refinement

        contract["intensity_refinement"] = choose_refinement(contract["intensity_refinement"], record.metrics)
    preprocessing = contract.pop("preprocessing", None)
    numbers = {k: v for k, v in record.metrics.items() if isinstance(v, (int, float))}
    meta_updates: dict[str, Any] = {
        **record.meta, "data_source": record.data_source,
        "eval_metrics": {**numbers, "validation_split": str(record.metrics.get("validation_split", "unknown"))}}
    config = run_dir / "config.yaml"
    return write_bundle(out, record.template, network, {"_target_": "medimg.models.build_network", **record.network},
                        preprocessing, contract, record.labels, meta_updates,
                        train_config=config.read_text() if config.is_file() else None, schema=schema, verify=verify,
                        overwrite=overwrite, standard_exports=standard_exports, openvino_ir=openvino_ir)
