"""``python -m medimg.export RUN_DIR_OR_CKPT --out DIR``: trained run -> verified MONAI bundle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from medimg.bundle.writer import write_bundle
from medimg.errors import ConfigError, WeightsError, run_cli
from medimg.models import build_network
from medimg.models.weights import read_checkpoint

NETWORK_PREFIX = "network."


def find_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint of a run (by validation Dice), else ``last.ckpt``."""
    ckpts = run_dir / "checkpoints"
    best = sorted(ckpts.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    if best:
        return best[-1]
    if (ckpts / "last.ckpt").is_file():
        return ckpts / "last.ckpt"
    raise WeightsError(ckpts, "no checkpoint found in this run")


def read_network_state(ckpt: str | Path) -> dict[str, Any]:
    """The network's weights from a Lightning checkpoint of a medimg task (``network.`` keys, unprefixed).

    Raises:
        WeightsError: unreadable checkpoint, or one without network weights.
    """
    state = read_checkpoint(ckpt)
    state = state.get("state_dict", state)
    net_state = {k[len(NETWORK_PREFIX):]: v for k, v in state.items() if k.startswith(NETWORK_PREFIX)}
    if not net_state:
        raise WeightsError(ckpt, "checkpoint holds no network weights")
    return net_state


def network_spec(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The bundle ``network_def`` for a run's model config (pretrained paths dropped)."""
    dropped = ("name", "pretrained", "pretrained_format", "checkpoint", "backbone_checkpoint", "backbone_format")
    kwargs = {k: v for k, v in model_cfg.items() if k not in dropped}
    return {"_target_": "medimg.models.build_network", "name": model_cfg["name"], **kwargs}


def export_run(source: str | Path, out: str | Path, schema: str | Path | None = None,
               overwrite: bool = False, verify: bool = True) -> Path:
    """Export a training run (or one of its checkpoints) as a MONAI bundle.

    Args:
        source: a run folder (``config.yaml`` + ``checkpoints/``) or a ``.ckpt`` inside one.
        out: bundle folder to create.
        schema: local MONAI metadata schema for verification.
        overwrite: replace an existing ``out``.
        verify: run MONAI's bundle verification.

    Returns:
        The bundle folder.
    """
    from medimg.data.transforms import segmentation_spec

    source = Path(source)
    if not source.exists():
        raise ConfigError(source, "no such run folder or checkpoint")
    if source.is_file():
        ckpt, run_dir = source, source.parent.parent
    else:
        run_dir = source
        ckpt = find_checkpoint(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(cfg_path, "run configuration missing; is this a medimg run folder?")
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
    assert isinstance(cfg, dict)
    model_cfg, data_cfg = dict(cfg["model"]), dict(cfg["data"])

    net_state = read_network_state(ckpt)
    spec = network_spec(model_cfg)
    network = build_network(**{k: v for k, v in spec.items() if k != "_target_"})
    try:
        network.load_state_dict(net_state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(ckpt, f"weights do not fit the run's network ({str(exc).splitlines()[0]})") from exc

    labels = data_cfg["labels"]
    kind = cfg["bundle"].get("task", "segmentation")
    meta_updates: dict[str, Any] = {}
    if kind == "classification":  # the predictor preprocesses each image as training did
        preprocessing = None
        inference_vars = {"img_size": int(model_cfg["img_size"]), "in_chans": int(model_cfg["in_chans"]),
                          "normalize": data_cfg["normalize"], "multilabel": bool(data_cfg.get("multilabel")),
                          "class_names": [labels[k] for k in sorted(labels, key=int)]}
        meta_updates["input_channels"] = int(model_cfg["in_chans"])
    elif kind == "promptable":  # the predictor prepares volumes as training did
        preprocessing = None
        if getattr(network, "spatial_dims", 2) == 3:
            inference_vars = {"roi_size": list(data_cfg["roi_size"]), "pixdim": data_cfg["pixdim"],
                              "intensity": data_cfg["intensity"]}
        else:
            if "plane" not in data_cfg:
                raise ConfigError(cfg_path, "a 2D promptable run must record data.plane (its slicing plane)")
            inference_vars = {"plane": data_cfg["plane"], "intensity": data_cfg.get("intensity", "mr")}
    else:
        preprocessing = segmentation_spec("infer", pixdim=data_cfg["pixdim"], intensity=data_cfg["intensity"],
                                          crop_foreground=data_cfg["crop_foreground"])
        task_cfg = dict(cfg.get("task", {}))  # the validation's sliding-window settings, exactly
        inference_vars = {"roi_size": list(data_cfg["roi_size"]), "overlap": float(task_cfg.get("overlap", 0.25)),
                          "sw_batch_size": int(task_cfg.get("sw_batch_size", 4))}
        if data_cfg.get("slice_axis") is not None:  # a 2D network over the volume's slices
            inference_vars["slice_axis"] = int(data_cfg["slice_axis"])
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    meta_updates.update({
        "data_source": data_cfg.get("source", "user manifest"),
        "eval_metrics": {**{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                         "validation_split": str(metrics.get("validation_split", "unknown"))},
    })
    if hasattr(network, "img_size") and getattr(network, "spatial_dims", 2) == 2:  # the network's input size
        meta_updates["input_spatial_shape"] = [int(network.img_size)] * 2
    return write_bundle(out, cfg["bundle"]["template"], network, spec, preprocessing,
                        inference_vars, labels, meta_updates,
                        train_config=OmegaConf.to_yaml(cfg), schema=schema, verify=verify, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m medimg.export", description=__doc__)
    parser.add_argument("source", help="run folder or checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="bundle folder to create")
    parser.add_argument("--schema", default=None, help="local MONAI metadata schema JSON (offline)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-verify", action="store_true", help="skip MONAI's bundle verification")
    args = parser.parse_args(argv)

    def body() -> None:
        path = export_run(args.source, args.out, args.schema, args.overwrite, not args.no_verify)
        print(f"bundle written and verified: {path}" if not args.no_verify else f"bundle written: {path}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
