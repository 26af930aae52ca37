"""One training run: assemble the task kind's parts, train with Lightning, validate, export.

The run folder holds ``config.yaml`` (the composed config, as given), ``run.json`` (the
:class:`~medimg.runs.parts.RunRecord` export reads), ``metrics.json``, ``checkpoints/``, logs, and
``bundle/`` (the verified MONAI bundle).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from medimg.errors import ConfigError, WeightsError
from medimg.models.compiling import compile_encoder, resolve_speed
from medimg.models.peft import trainable_summary
from medimg.runs.folders import new_folder
from medimg.runs.parts import TaskParts, save_json

log = logging.getLogger("medimg.train")
RUN_DIR_ENV = "MEDIMG_RUN_DIR"
RANK0_WAIT_S = 600  # torchrun ranks > 0 wait this long for rank 0's run folder
_RUNS = itertools.count()  # run_training calls in this process


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file and rename: a killed run never leaves a torn file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


class SaveLastOnTrainEnd(L.Callback):
    """Refresh ``last.ckpt`` when training ends (the step-based saver may be a few steps behind)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the final state."""
        trainer.save_checkpoint(self.path)


def _is_rank_zero() -> bool:
    """Whether this process is the first rank (or the only process) of a run."""
    if "RANK" in os.environ:  # torchrun
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _natural_key(path: Path) -> list[int | str]:
    """Sort key that orders ``20250101-120000-10`` after ``20250101-120000-9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _resuming(resume: Any) -> bool:
    """Whether ``cfg.resume`` asks to continue a run (``true`` or a run folder)."""
    return resume not in (False, None, "false", "False")


def run_config(config: dict[Any, Any], run_dir: Path) -> dict[Any, Any]:
    """The config a run folder records: the given one with the folder it got (a rerun of it claims anew)."""
    return {**config, "run_dir": str(run_dir), **({"run_dir_claimed": False} if "run_dir_claimed" in config else {})}


def claim_run_dir(wanted: Path, config: dict[Any, Any], prepared: bool = False) -> Path:
    """Create a new run folder that no other run uses, and write its ``config.yaml``.

    The folder is claimed by creating it (:func:`~medimg.runs.folders.new_folder`), so two runs
    started in the same second (separate processes, the jobs of one Hydra multirun, a MONAI Label
    fine-tune) never share one: the later gets ``wanted-2``, then ``-3``, ... An existing folder,
    whatever it holds, is another run's. Only ``prepared`` (``run_dir_claimed=true``: the caller
    created ``wanted`` for this run, as the MONAI Label train task does) takes an existing folder
    over, once: its ``config.yaml`` is created exclusively.

    Args:
        wanted: the configured ``run_dir``.
        config: the composed config, written as the claimed folder's ``config.yaml`` (with its ``run_dir``).
        prepared: take over ``wanted``, which the caller created for this run.

    Returns:
        The claimed folder (absolute).

    Raises:
        ConfigError: a prepared folder that is missing or already holds a run.
    """
    wanted = wanted.resolve()
    if prepared:
        if not wanted.is_dir():
            raise ConfigError(wanted, "run_dir_claimed=true, but there is no such folder to take over")
        try:
            with open(wanted / "config.yaml", "x") as fh:
                fh.write(OmegaConf.to_yaml(run_config(config, wanted)))
        except FileExistsError:
            raise ConfigError(wanted, "holds a run already (config.yaml); run_dir_claimed=true takes over only "
                                      "a folder prepared for this run") from None
        return wanted
    run_dir = new_folder(wanted)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(run_config(config, run_dir)))
    if run_dir != wanted:
        log.info("%s holds another run: this run is in %s", wanted, run_dir)
    return run_dir


def share_run_dir(run_dir: Path) -> Path:
    """Rank 0's run folder, for every rank of a ``torchrun`` job (each rank is its own process).

    Rank 0 decides the folder (it may claim ``-2``; a default name holds each process's start
    time) and puts it in the store torchrun's agent serves to all its ranks
    (``$MASTER_ADDR:$MASTER_PORT``, the one ``init_process_group`` uses); the other ranks wait for
    it there. Without torchrun's agent store (one process, or workers Lightning starts, which
    inherit ``$MEDIMG_RUN_DIR``) ``run_dir`` is returned as it is.

    Raises:
        ConfigError: rank 0 did not name its folder within :data:`RANK0_WAIT_S`.
    """
    job = next(_RUNS)  # every rank runs the same jobs in the same order (a Hydra multirun too)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_PORT" not in os.environ:
        return run_dir
    from torch.distributed import TCPStore

    key = f"medimg/run_dir/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{job}"
    try:
        store = TCPStore(os.environ.get("MASTER_ADDR", "localhost"), int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=timedelta(seconds=RANK0_WAIT_S))
        if _is_rank_zero():
            store.set(key, str(run_dir))
            return run_dir
        return Path(store.get(key).decode())
    except RuntimeError as exc:  # torch's DistStoreError / DistNetworkError
        raise ConfigError("run_dir", f"rank 0 did not name its run folder through torchrun's store "
                                     f"({str(exc).splitlines()[0]})") from exc


def resolve_run_dir(cfg: DictConfig) -> tuple[Path, Path | None]:
    """Decide the run folder and the checkpoint to resume from.

    DDP worker processes that Lightning starts inherit the folder rank 0 claimed through
    ``$MEDIMG_RUN_DIR``; rank 0 (and a single process) ignores that variable, so the jobs of a
    Hydra multirun, which share one process, each get their own folder. A new run's folder is
    claimed later by :func:`claim_run_dir`; a resumed run continues in its own folder; ``torchrun``
    ranks then take rank 0's (:func:`share_run_dir`).

    Returns:
        ``(run_dir, resume_checkpoint_or_None)``.
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    resume = cfg.resume
    if inherited and not _is_rank_zero():
        run_dir = Path(inherited)
    elif _resuming(resume):
        if resume in (True, "true", "True"):
            parent = Path(cfg.runs_dir) / cfg.bundle.name
            runs = sorted((p for p in parent.glob("*") if (p / "checkpoints" / "last.ckpt").is_file()),
                          key=_natural_key)
            if not runs:
                raise ConfigError("resume", f"no run of {cfg.bundle.name} with a last.ckpt under {parent}")
            run_dir = runs[-1]
        else:
            run_dir = Path(str(resume))
            if not (run_dir / "checkpoints" / "last.ckpt").is_file():
                raise ConfigError(run_dir, "resume: no checkpoints/last.ckpt in this run folder")
    else:
        run_dir = Path(cfg.run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    return run_dir.resolve(), (ckpt if _resuming(resume) and ckpt.is_file() else None)


def _builder(kind: str) -> Callable[[DictConfig, Path], TaskParts]:
    """The assembly function of a task kind (imported on demand: each pulls in its own stack)."""
    if kind == "segmentation":
        from medimg.runs.segmentation import build_segmentation as build
    elif kind == "promptable":
        from medimg.runs.promptable import build_promptable as build
    elif kind == "classification":
        from medimg.runs.classification import build_classification as build
    elif kind == "mae":
        from medimg.runs.mae import build_mae as build
    else:
        raise ConfigError("bundle.task", f"unknown task {kind!r}; choose from {', '.join(TASK_KINDS)}")
    return build


def load_init_weights(network: torch.nn.Module, source: str | Path) -> None:
    """Start from trained weights: a bundle folder or shipped name, its ``models/model.pt``, or a run checkpoint.

    This is how an exported bundle is fine-tuned on new data (the MONAI Label train task does it).
    The weights must fit the configured network exactly, with one exception: adapters or LoRA the
    run adds (``model.lora_r``, ``model.adapters``) that the weights lack keep their zero-effect
    initialisation, so a bundle is tuned further through new adapters (logged by count).

    Raises:
        WeightsError: no such file, or weights that do not fit the network.
    """
    from medimg.bundles import shipped_bundles
    from medimg.models.peft import into_peft_layout
    from medimg.models.weights import read_checkpoint, read_network_state

    path = Path(source)
    if not path.exists():  # a shipped bundle's short name
        path = shipped_bundles().get(str(source), path)
    if path.is_dir():
        path = path / "models" / "model.pt"
    if not path.is_file():
        raise WeightsError(path, "init_weights: no such bundle or weight file")
    state = read_network_state(path) if path.suffix == ".ckpt" else dict(read_checkpoint(path))
    state, new_peft = into_peft_layout(network, state)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise WeightsError(path, f"init_weights do not fit the configured network ({first})") from exc
    log.info("initialised all %d tensors from %s%s", len(state) - len(new_peft), path,
             f"; {len(new_peft)} new adapter / LoRA tensors keep their initialisation" if new_peft else "")


TASK_KINDS = ("segmentation", "promptable", "classification", "mae")


def run_training(cfg: DictConfig) -> Path:
    """Train the configured bundle, then export and verify its MONAI bundle.

    Args:
        cfg: the composed Hydra config (``configs/train.yaml`` + ``configs/bundle/NAME.yaml``).

    Returns:
        The run folder.
    """
    run_dir, resume_ckpt = resolve_run_dir(cfg)
    given = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(given, dict)
    inherited = os.environ.get(RUN_DIR_ENV)
    if _is_rank_zero() and not _resuming(cfg.resume):
        run_dir = claim_run_dir(run_dir, given, prepared=bool(cfg.get("run_dir_claimed", False)))
    run_dir = share_run_dir(run_dir)  # torchrun: every rank in rank 0's folder
    os.environ[RUN_DIR_ENV] = str(run_dir)  # DDP workers started by Lightning land in the same run
    try:
        return _train(cfg, run_dir, resume_ckpt, given)
    finally:  # the next job of a Hydra multirun (same process) claims its own folder
        if inherited is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = inherited


def _train(cfg: DictConfig, run_dir: Path, resume_ckpt: Path | None, given: dict[Any, Any]) -> Path:
    """:func:`run_training` in its run folder."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    parts = _builder(cfg.bundle.get("task", "segmentation"))(cfg, run_dir)
    task, dm = parts.task, parts.datamodule
    if cfg.get("init_weights") and resume_ckpt is None:
        load_init_weights(task.network, cfg.init_weights)
    log.info("network %s: %s", cfg.model.name, trainable_summary(task.network))
    precision, compile_mode = resolve_speed(str(cfg.trainer.precision), cfg.get("compile"),
                                            cfg.trainer.get("accelerator"))
    if compile_mode:
        compile_encoder(task.network, compile_mode)

    if _is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(run_config(given, run_dir)))
        parts.record.save(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch:03d}", monitor=parts.monitor, mode="max",
                        save_top_k=1, save_last=False),
        ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, enable_version_counter=False,
                        every_n_train_steps=int(cfg.checkpoint.every_n_train_steps)),
        SaveLastOnTrainEnd(ckpt_dir / "last.ckpt"),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    loggers = [CSVLogger(str(run_dir), name="logs", version=""),
               TensorBoardLogger(str(run_dir), name="tensorboard", version="", default_hp_metric=False)]
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_kwargs, dict)
    trainer_kwargs["precision"] = precision
    trainer = L.Trainer(**trainer_kwargs, default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers,
                        plugins=[AtomicCheckpointIO()])
    zero_shot: dict[str, float] = {}
    if (parts.zero_shot or cfg.get("validate_init")) and resume_ckpt is None:  # the weights before fine-tuning
        before = {k: float(v) for k, v in trainer.validate(task, datamodule=dm, verbose=False)[0].items()}
        zero_shot = {f"{'zero_shot' if parts.zero_shot else 'initial'}/{k}": v for k, v in before.items()}
        if parts.zero_shot and cfg.get("validate_init"):
            zero_shot.update({f"initial/{k}": v for k, v in before.items()})
    if resume_ckpt is not None:
        log.info("resuming from %s", resume_ckpt)
    # checkpoints are read with torch.load(weights_only=True), as every weight file medimg opens
    trainer.fit(task, datamodule=dm, ckpt_path=str(resume_ckpt) if resume_ckpt else None, weights_only=True)

    best = callbacks[0].best_model_path or None
    if best is None and not (ckpt_dir / "last.ckpt").is_file():  # max_epochs=0: the initial weights, as they are
        trainer.save_checkpoint(ckpt_dir / "last.ckpt")
    if parts.before_final_validation is not None:
        parts.before_final_validation()
    results = trainer.validate(task, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    metrics.update(zero_shot)
    if trainer.is_global_zero:
        metrics["epochs"] = trainer.current_epoch
        metrics["monitor"] = parts.monitor
        metrics["validation_split"] = parts.record.validation_split or "validation split"
        metrics["checkpoint"] = str(best or ckpt_dir / "last.ckpt")
        save_json(run_dir / "metrics.json", metrics)
        parts.record.metrics = metrics
        parts.record.save(run_dir)
        parts.report(metrics)
        if parts.finish is not None:
            parts.finish(best)
        if cfg.export.enabled and parts.export:
            from medimg.bundle.export import export_run

            bundle = export_run(run_dir, run_dir / "bundle", schema=cfg.export.schema, overwrite=True,
                                standard_exports=bool(cfg.export.get("standard", True)),
                                openvino_ir=bool(cfg.export.get("openvino", True)))
            print(f"bundle written and verified: {bundle}")
        if cfg.bundle.get("demo_note") and cfg.data.get("dataset") == "mni152":  # the quick-start demo
            print(str(cfg.bundle.demo_note))
    return run_dir
