"""Datasets as users already keep them -> medimg's Decathlon-style manifest.

Three layouts are read:

- an nnU-Net v2 raw dataset: ``dataset.json`` (``channel_names``, ``labels`` as name -> value,
  ``file_ending``, ``numTraining``), ``imagesTr/CASE_XXXX<ending>`` with one file per channel,
  ``labelsTr/CASE<ending>``, optionally ``imagesTs/``;
- a Medical Segmentation Decathlon task folder: ``dataset.json`` listing ``training`` pairs and
  ``test`` images, ``labels`` as value -> name;
- two folders of images and labels paired by file name (an image's ``_0000`` channel suffix may be
  absent from its label's name).

Every case is checked before the manifest is written (missing label, channel suffix gap, label
values the dataset does not declare, image/label geometry), and the first problem is reported as
one :class:`~medimg.errors.DataError` naming the file. The manifest's paths are relative to its own
folder, so a dataset and its manifest can move together.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medimg.errors import ConfigError, DataError, atomic_output
from medimg.io.image import has_suffix, strip_suffix
from medimg.io.jsonfile import read_json_object

LAYOUTS = ("auto", "nnunet", "msd", "folders")
CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class ImportedDataset:
    """What an importer found.

    Attributes:
        layout: ``nnunet``, ``msd`` or ``folders``.
        name: the dataset's name.
        labels: label value (as string) -> class name, background included.
        training: ``[{"image": path, "label": path, "subject": case}]`` with absolute paths.
        test: absolute paths of unlabelled test images.
        meta: extra manifest fields (description, modality, source).
    """

    layout: str
    name: str
    labels: dict[str, str]
    training: list[dict[str, str]]
    test: list[str] = field(default_factory=list)
    meta: dict[str, object] = field(default_factory=dict)


def _image_files(folder: Path, ending: str | None = None) -> list[Path]:
    """Image files of a folder (hidden files such as macOS ``._`` forks skipped), sorted by name."""
    if not folder.is_dir():
        raise DataError(folder, "folder missing")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and (p.name.endswith(ending) if ending else has_suffix(p)))


def _contiguous_labels(path: Path, values: dict[int, str]) -> dict[str, str]:
    """Label value -> name, required to be 0..N-1 (medimg trains one output channel per value)."""
    if sorted(values) != list(range(len(values))):
        raise DataError(path, f"label values {sorted(values)} are not 0..{len(values) - 1}; "
                              "medimg needs consecutive label values with 0 = background")
    return {str(v): values[v] for v in sorted(values)}


def _pick_channel(path: Path, channels: dict[str, str], channel: str | None) -> int:
    """The index of the channel to import; several channels need an explicit choice."""
    if channel is None:
        if len(channels) == 1:
            return 0
        names = ", ".join(f"{k} ({v})" for k, v in channels.items())
        raise ConfigError(path, f"declares {len(channels)} channels: {names}; medimg's bundles take one channel: "
                                "pass --channel INDEX_OR_NAME to import one")
    for key, name in channels.items():
        if channel in (key, name):
            return int(key)
    raise ConfigError("--channel", f"{channel!r} is not a channel of {path} ({', '.join(channels.values())})")


def read_nnunet(root: Path, channel: str | None = None) -> ImportedDataset:
    """An nnU-Net v2 raw dataset folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``).

    Args:
        root: the ``DatasetXXX_Name`` folder.
        channel: which channel to import (index or name) when the dataset has several.

    Returns:
        The cases found, with the chosen channel's image and the label of each case.

    Raises:
        DataError: a missing label or image, a channel suffix gap, a malformed ``dataset.json``.
        ConfigError: several channels and no ``channel`` chosen.
    """
    spec_path = root / "dataset.json"
    spec = read_json_object(spec_path, "nnU-Net dataset.json")
    for key in ("channel_names", "labels", "file_ending"):
        if key not in spec:
            raise DataError(spec_path, f"nnU-Net v2 dataset.json needs '{key}'")
    ending = str(spec["file_ending"])
    channels = {str(k): str(v) for k, v in spec["channel_names"].items()}
    if sorted(int(k) for k in channels) != list(range(len(channels))):
        raise DataError(spec_path, f"channel_names keys {sorted(channels)} are not 0..{len(channels) - 1}")
    values: dict[int, str] = {}
    for name, value in spec["labels"].items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(spec_path, f"label {name!r} is region-based ({value!r}); medimg needs one value per class")
        values[value] = str(name)
    labels = _contiguous_labels(spec_path, values)
    pick = _pick_channel(spec_path, channels, channel)

    def cases_of(folder: Path) -> dict[str, dict[int, Path]]:
        cases: dict[str, dict[int, Path]] = {}
        for path in _image_files(folder, ending):
            match = CHANNEL.match(path.name[: -len(ending)])
            if not match:
                raise DataError(path, f"image name lacks nnU-Net's _XXXX channel suffix (CASE_0000{ending})")
            cases.setdefault(match["case"], {})[int(match["channel"])] = path
        for case, files in cases.items():
            for c in range(len(channels)):
                if c not in files:
                    present = ", ".join(f"_{k:04d}" for k in sorted(files))
                    raise DataError(folder / f"{case}_{c:04d}{ending}",
                                    f"channel suffix gap: case {case} has {present} but not _{c:04d} "
                                    f"({len(channels)} channels declared in dataset.json)")
            extra = sorted(set(files) - set(range(len(channels))))
            if extra:
                raise DataError(files[extra[0]], f"channel _{extra[0]:04d} beyond the {len(channels)} channels "
                                                 "that dataset.json declares")
        return cases

    train_cases = cases_of(root / "imagesTr")
    if not train_cases:
        raise DataError(root / "imagesTr", f"no images ending in {ending}")
    label_dir = root / "labelsTr"
    label_files = {p.name[: -len(ending)]: p for p in _image_files(label_dir, ending)}
    for case in sorted(train_cases):
        if case not in label_files:
            raise DataError(label_dir / f"{case}{ending}", f"label missing for training case {case}")
    for case in sorted(set(label_files) - set(train_cases)):
        raise DataError(label_files[case], f"label has no image {case}_0000{ending} in imagesTr")
    declared = spec.get("numTraining")
    if declared is not None and int(declared) != len(train_cases):
        raise DataError(spec_path, f"numTraining is {declared} but imagesTr holds {len(train_cases)} cases")
    test_dir = root / "imagesTs"
    test = [files[pick] for _, files in sorted(cases_of(test_dir).items())] if test_dir.is_dir() else []
    training = [{"image": str(files[pick]), "label": str(label_files[case]), "subject": case}
                for case, files in sorted(train_cases.items())]
    meta = {"description": str(spec.get("description") or spec.get("name") or root.name),
            "modality": channels[str(pick)], "source": f"nnU-Net v2 raw dataset {root.name}"}
    return ImportedDataset("nnunet", str(spec.get("name") or root.name), labels, training, [str(p) for p in test], meta)


def read_msd(root: Path, channel: str | None = None) -> ImportedDataset:
    """A Medical Segmentation Decathlon task folder (``dataset.json`` listing its pairs).

    Args:
        root: the ``TaskXX_Name`` folder.
        channel: unused for single-modality tasks; multi-modal (4D) tasks are refused.

    Returns:
        The listed training pairs and test images.

    Raises:
        DataError: a listed file missing, a malformed ``dataset.json``, or 4D multi-modal images.
    """
    spec_path = root / "dataset.json"
    spec = read_json_object(spec_path, "Decathlon dataset.json")
    if not isinstance(spec.get("training"), list) or not spec["training"]:
        raise DataError(spec_path, "a Decathlon dataset.json needs a non-empty 'training' list")
    modality = {str(k): str(v) for k, v in (spec.get("modality") or {"0": "image"}).items()}
    if len(modality) > 1:
        raise DataError(spec_path, f"declares {len(modality)} modalities stored as 4D images "
                                   f"({', '.join(modality.values())}); medimg's bundles take one channel")
    try:
        values = {int(k): str(v) for k, v in (spec.get("labels") or {}).items()}
    except ValueError as exc:
        raise DataError(spec_path, f"labels must map label values to names ({exc})") from exc
    labels = _contiguous_labels(spec_path, values)

    def resolve(entry: object, where: str) -> Path:
        if not isinstance(entry, str) or not entry:
            raise DataError(spec_path, f"{where} must be a relative file path")
        path = (root / entry).resolve()
        if not path.is_file():
            raise DataError(root / entry, f"listed in dataset.json ({where}) but missing")
        return path

    training = []
    for i, item in enumerate(spec["training"]):
        if not isinstance(item, dict) or "image" not in item:
            raise DataError(spec_path, f"training[{i}] needs 'image' and 'label'")
        if "label" not in item:
            raise DataError(root / str(item["image"]), f"label missing for training[{i}] in dataset.json")
        image, label = resolve(item["image"], f"training[{i}].image"), resolve(item["label"], f"training[{i}].label")
        training.append({"image": str(image), "label": str(label), "subject": strip_suffix(image.name) or image.name})
    test = [str(resolve(p, f"test[{i}]")) for i, p in enumerate(spec.get("test") or [])]
    meta = {"description": str(spec.get("description") or spec.get("name") or root.name),
            "modality": modality["0"], "source": f"Medical Segmentation Decathlon folder {root.name}"}
    for key in ("reference", "licence", "tensorImageSize"):
        if key in spec:
            meta[key] = spec[key]
    return ImportedDataset("msd", str(spec.get("name") or root.name), labels, training, test, meta)


def read_folders(images: Path, labels_dir: Path, classes: list[str] | None = None) -> ImportedDataset:
    """Two folders of images and labels, paired by file name.

    A label pairs with the image of the same name (NIfTI, NRRD, MHA, or a DICOM series folder);
    an image name may carry nnU-Net's ``_0000`` channel suffix that its label lacks.

    Args:
        images: the image folder.
        labels_dir: the label folder.
        classes: class names by label value (background first); default ``label_1 ..`` up to the
            largest value found.

    Returns:
        The pairs found.

    Raises:
        DataError: an image without a label, a label without an image, or names that clash.
    """
    label_by_stem: dict[str, Path] = {}
    for path in _image_files(labels_dir):
        stem = str(strip_suffix(path.name))
        if stem in label_by_stem:
            raise DataError(path, f"two labels share the name {stem} ({label_by_stem[stem].name})")
        label_by_stem[stem] = path
    from medimg.io.dicom import folder_has_dicom

    training, used = [], set()
    series = sorted(p for p in images.iterdir() if p.is_dir() and folder_has_dicom(p)) if images.is_dir() else []
    for path in _image_files(images) + series:  # files, and DICOM series folders named like their label
        stem = str(strip_suffix(path.name)) if path.is_file() else path.name
        match = CHANNEL.match(stem)
        key = stem if stem in label_by_stem else (match["case"] if match else stem)
        if key not in label_by_stem:
            raise DataError(path, f"no label named {key}.* in {labels_dir}")
        if key in used:
            raise DataError(path, f"a second image pairs with label {label_by_stem[key].name}")
        used.add(key)
        training.append({"image": str(path), "label": str(label_by_stem[key]), "subject": key})
    if not training:
        raise DataError(images, "folder holds no images (NIfTI, NRRD, MHA, DICOM series folders)")
    for stem in sorted(set(label_by_stem) - used):
        raise DataError(label_by_stem[stem], f"label has no image named {stem}.* in {images}")
    if classes:
        names = {str(i): n for i, n in enumerate(classes)}
    else:
        from medimg.io.image import read_image

        top = max(int(np.max(read_image(item["label"], spatial_dims=None).array)) for item in training)
        names = {"0": "background", **{str(v): f"label_{v}" for v in range(1, max(top, 1) + 1)}}
    return ImportedDataset("folders", images.name, names, training, [],
                           {"description": f"{images.name} paired with {labels_dir.name} by file name",
                            "source": f"image folder {images} + label folder {labels_dir}"})


def detect_layout(source: Path, labels_dir: Path | None) -> str:
    """``nnunet``, ``msd`` or ``folders``, from what ``source`` holds."""
    if labels_dir is not None:
        return "folders"
    spec_path = source / "dataset.json"
    if not source.is_dir():
        raise DataError(source, "no such folder")
    if not spec_path.is_file():
        raise DataError(source, "holds no dataset.json (nnU-Net v2 or Decathlon); for a folder of images and "
                                "a folder of labels pass --labels LABEL_DIR")
    spec = read_json_object(spec_path, "dataset.json")
    if "channel_names" in spec or "file_ending" in spec:
        return "nnunet"
    if "training" in spec:
        return "msd"
    raise DataError(spec_path, "neither nnU-Net v2 (channel_names, file_ending) nor Decathlon (training list)")


def _split(training: list[dict[str, str]], val_fraction: float | None, seed: int) -> tuple[list, list]:
    if not val_fraction:
        return training, []
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("--val-fraction", f"must lie between 0 and 1, not {val_fraction}")
    if len(training) < 2:
        raise ConfigError("--val-fraction", "one training case: nothing can be held out")
    n_val = min(max(1, round(len(training) * val_fraction)), len(training) - 1)
    held = set(np.random.default_rng(seed).permutation(len(training))[:n_val].tolist())
    return ([t for i, t in enumerate(training) if i not in held], [t for i, t in enumerate(training) if i in held])


def import_dataset(source: str | Path, out: str | Path, layout: str = "auto", labels_dir: str | Path | None = None,
                   channel: str | None = None, classes: list[str] | None = None, val_fraction: float | None = None,
                   seed: int = 0, read_data: bool = True) -> tuple[Path, ImportedDataset]:
    """Write medimg's manifest for a dataset kept in nnU-Net, Decathlon or paired-folder layout.

    Every pair is checked with :func:`medimg.data.manifest.validate_manifest` (shape, affine, label
    values against the declared classes, readable data) before the manifest appears at ``out``.

    Args:
        source: dataset folder (nnU-Net / Decathlon), or the image folder of a paired layout.
        out: manifest JSON to write; its paths are relative to its folder.
        layout: ``auto`` (detect), ``nnunet``, ``msd`` or ``folders``.
        labels_dir: label folder of the paired layout.
        channel: the channel to import (index or name) from a multi-channel nnU-Net dataset.
        classes: class names by value for the paired layout (background first).
        val_fraction: share of cases written as the ``validation`` split (default: none).
        seed: seed of that draw.
        read_data: read every file (not only headers) while checking.

    Returns:
        The manifest path and what was imported.
    """
    from medimg.data.manifest import load_manifest, validate_manifest

    source, out = Path(source), Path(out)
    if layout not in LAYOUTS:
        raise ConfigError("--layout", f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(source, Path(labels_dir) if labels_dir else None)
    if layout == "folders":
        if labels_dir is None:
            raise ConfigError("--labels", "the folders layout needs the label folder")
        found = read_folders(source, Path(labels_dir), classes)
    else:
        found = (read_nnunet if layout == "nnunet" else read_msd)(source, channel)
    if out.suffix.lower() != ".json":
        raise ConfigError(out, "the manifest is JSON: give a file name ending in .json")
    base = out.resolve().parent

    def rel(path: str) -> str:
        return os.path.relpath(path, base)

    train, val = _split(found.training, val_fraction, seed)
    manifest = {"name": found.name, **found.meta, "labels": found.labels,
                "training": [{k: rel(v) if k != "subject" else v for k, v in t.items()} for t in train]}
    if val:
        manifest["validation"] = [{k: rel(v) if k != "subject" else v for k, v in t.items()} for t in val]
    if found.test:
        manifest["test"] = [rel(p) for p in found.test]
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        loaded = load_manifest(tmp, base)
        validate_manifest(loaded, read_data=read_data)
    return out, found
