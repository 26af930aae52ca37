"""``python -m medimg.export RUN_DIR_OR_CKPT --out DIR``: trained run -> verified MONAI bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import medimg.cpu  # noqa: F401 - OpenMP spin default, before PyTorch loads
from medimg.bundle.writer import write_bundle
from medimg.errors import ConfigError, WeightsError, exit_on_sigterm, run_cli
from medimg.models import build_network
from medimg.models.weights import read_network_state
from medimg.runs.parts import RECORD_FILE, RunRecord


def find_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint of a run (by its monitored validation metric), else ``last.ckpt``."""
    ckpts = run_dir / "checkpoints"
    best = sorted(ckpts.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    if best:
        return best[-1]
    if (ckpts / "last.ckpt").is_file():
        return ckpts / "last.ckpt"
    raise WeightsError(ckpts, "no checkpoint found in this run")


def export_run(source: str | Path, out: str | Path, schema: str | Path | None = None,
               overwrite: bool = False, verify: bool = True, standard_exports: bool = True) -> Path:
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

    Returns:
        The bundle folder.
    """
    source = Path(source)
    if not source.exists():
        raise ConfigError(source, "no such run folder or checkpoint")
    if source.is_file():
        ckpt, run_dir = source, source.parent.parent
    else:
        run_dir = source
        ckpt = find_checkpoint(run_dir)
    if not (run_dir / RECORD_FILE).is_file():
        raise ConfigError(run_dir / RECORD_FILE, "run record missing; is this a medimg run folder?")
    record = RunRecord.load(run_dir)
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
                        overwrite=overwrite, standard_exports=standard_exports)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m medimg.export", description=__doc__)
    parser.add_argument("source", help="run folder or checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="bundle folder to create")
    parser.add_argument("--schema", default=None, help="local MONAI metadata schema JSON (offline)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-verify", action="store_true", help="skip MONAI's bundle verification")
    parser.add_argument("--no-standard", action="store_true", help="skip the checked ONNX and torch.export files")
    args = parser.parse_args(argv)

    def body() -> None:
        path = export_run(args.source, args.out, args.schema, args.overwrite, not args.no_verify,
                          not args.no_standard)
        print(f"bundle written and verified: {path}" if not args.no_verify else f"bundle written: {path}")

    return run_cli(body)


if __name__ == "__main__":
    exit_on_sigterm()  # SIGTERM leaves through the clean-ups: no partial outputs
    sys.exit(main())
