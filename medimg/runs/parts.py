"""What one training run is made of (a leaf module: it imports nothing from medimg but its errors).

A task kind's assembly returns :class:`TaskParts`: the LightningModule, the data, what to monitor,
and a :class:`RunRecord`. The record is the run's explicit contract with export: the network
spec, the predictor's preprocessing, the labels and, once validation ran, the metrics. It is
written to ``run.json`` in the run folder; ``medimg.export`` builds the bundle from it alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from medimg.errors import ConfigError, atomic_output

RECORD_FILE = "run.json"
# builder arguments that point at local pretrained files: a bundle carries its own weights instead
PRETRAINED_KEYS = ("pretrained", "pretrained_format", "checkpoint", "backbone_checkpoint", "backbone_format")


def save_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` as indented JSON atomically: a killed run or a full disk leaves the old file whole."""
    text = json.dumps(value, indent=2, default=str)
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def network_spec(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The registry name and builder arguments of a run's network, pretrained file paths dropped."""
    return {k: v for k, v in model_kwargs.items() if k not in PRETRAINED_KEYS}


@dataclass
class RunRecord:
    """Everything export needs from a run, stated explicitly.

    Attributes:
        task: ``segmentation``, ``promptable``, ``classification`` or ``mae``.
        template: the bundle template under ``bundles/``.
        network: ``{"name": registry name, **builder arguments}`` (no pretrained paths).
        contract: the predictor's preprocessing contract: the inference variables of the bundle
            (plane, intensity, pixdim, roi_size, ...) and, for segmentation, ``preprocessing``: the
            transform spec the bundle's ``inference.json`` runs.
        labels: ``{"0": "background", ...}`` (class names for classification).
        data_source: what the model was trained on.
        meta: extra bundle metadata (input channels, input spatial shape).
        validation_split: which data produced the metrics.
        metrics: the final validation metrics (filled after training).
    """

    task: str
    template: str
    network: dict[str, Any]
    contract: dict[str, Any]
    labels: dict[str, str]
    data_source: str
    meta: dict[str, Any] = field(default_factory=dict)
    validation_split: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def save(self, run_dir: str | Path) -> Path:
        """Write ``run.json`` into ``run_dir``."""
        return save_json(Path(run_dir) / RECORD_FILE, asdict(self))

    @classmethod
    def load(cls, run_dir: str | Path) -> RunRecord:
        """Read a run folder's ``run.json``.

        Raises:
            ConfigError: naming the file: unreadable, not JSON, or not a run record.
        """
        path = Path(run_dir) / RECORD_FILE
        try:
            value = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(path, f"cannot read the run record ({exc})") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(path, f"not valid JSON ({exc}); the run may have been killed while writing it") from exc
        if not isinstance(value, dict):
            raise ConfigError(path, f"not a run record (a JSON {type(value).__name__}, not an object)")
        try:
            return cls(**value)
        except TypeError as exc:
            why = str(exc).removeprefix(f"{cls.__name__}.__init__() ")
            raise ConfigError(path, f"not a run record ({why})") from exc


@dataclass
class TaskParts:
    """What a task kind contributes to a run.

    Attributes:
        task: the LightningModule (it holds the network).
        datamodule: training and validation data.
        monitor: the validation metric the best checkpoint is chosen by (higher is better).
        report: prints the final metrics for the user.
        record: the run record export reads.
        zero_shot: validate once before training (pretrained models).
        export: write a MONAI bundle at the end.
        finish: called on rank 0 with the best checkpoint (e.g. MAE writes its encoder).
        before_final_validation: called before the final validation (the 3D promptable task then
            also runs the bundle's whole-volume predictor).
    """

    task: L.LightningModule
    datamodule: L.LightningDataModule
    monitor: str
    report: Callable[[dict[str, float]], None]
    record: RunRecord
    zero_shot: bool = False
    export: bool = True
    finish: Callable[[str | None], None] | None = None
    before_final_validation: Callable[[], None] | None = None
