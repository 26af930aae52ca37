"""``structures``: many labelled anatomical structures on real images, for promptable (click / box) models.

Three real volumes that install offline, each read with a reader that keeps its geometry:

- **MNI152 atlas** (MR T1, 1 mm): FSL's MNI152 NLin6 head (``nimare`` wheel resources) with the
  Harvard-Oxford cortical atlas (48 regions, maximum probability, Debian ``mricron-data``; stored
  left-right flipped and resampled through both affines) and the JHU white-matter atlas (48 tracts,
  ``mricron-data``) where Harvard-Oxford has no label, and twelve deep grey structures from the
  AICHA atlas (``mricron-data``; thalamus, caudate, putamen, pallidum, hippocampus and amygdala,
  each side: AICHA's parcels merged by structure and split at the midline) where neither has one
  (so the held-out Harvard-Oxford and JHU structures keep every voxel).
  Values 1-48, 101-148 and 401-412.
- **Chest CT** (3 x 3 x 10 mm): 3D Slicer's ``CTChest4`` with its 7-segment segmentation (ribs,
  vertebral column parts, both lungs, tissue), from the ``slicerio`` wheel. Values 201-207.
- **Head CT** (0.96 x 0.96 x 1.5 mm): InVesalius' ``Cranium.inv3`` (Debian ``invesalius-examples``),
  its bone mask (>= 226 HU) and the soft tissue of its soft-tissue mask's largest component (the
  head holder dropped). Values 301-302.

**The split holds out whole structures.** Every fourth Harvard-Oxford region, five JHU tracts (both
sides) and the thoracic vertebral column never appear in training: the training label files have
them erased, and validation reads only them (``labels_heldout``). Colin27 and its AAL atlas (the
``benchmarks/forgetting.py`` structures) are in no file here: they are the held-out *volume*.

Each manifest entry carries its ``intensity`` window and the ``planes`` it is sliced in (the 10 mm
chest CT only axially).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medimg.data.embedded.locking import prepare_once
from medimg.data.embedded.mni152 import (
    NLIN6_FILES,
    default_data_root,
    nlin6_source_dir,
    package_data_dir,
    resample_to,
    save_nifti,
)
from medimg.errors import DataError, atomic_output

MRICRON_DIR = Path("/usr/share/mricron/templates")
INVESALIUS_FILE = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
HO_FILE = "HarvardOxford-cort-maxprob-thr0-1mm.nii.gz"
JHU_FILE = "JHU-WhiteMatter-labels-1mm.nii.gz"
AICHA_FILE = "AICHAmc.nii.gz"
SLICERIO_FILES = {"image": "CTChest4.nrrd", "seg": "Segmentation.seg.nrrd"}
HARVARD_OXFORD = (
    "Frontal Pole", "Insular Cortex", "Superior Frontal Gyrus", "Middle Frontal Gyrus",
    "Inferior Frontal Gyrus, pars triangularis", "Inferior Frontal Gyrus, pars opercularis", "Precentral Gyrus",
    "Temporal Pole", "Superior Temporal Gyrus, anterior", "Superior Temporal Gyrus, posterior",
    "Middle Temporal Gyrus, anterior", "Middle Temporal Gyrus, posterior", "Middle Temporal Gyrus, temporooccipital",
    "Inferior Temporal Gyrus, anterior", "Inferior Temporal Gyrus, posterior",
    "Inferior Temporal Gyrus, temporooccipital", "Postcentral Gyrus", "Superior Parietal Lobule",
    "Supramarginal Gyrus, anterior", "Supramarginal Gyrus, posterior", "Angular Gyrus",
    "Lateral Occipital Cortex, superior", "Lateral Occipital Cortex, inferior", "Intracalcarine Cortex",
    "Frontal Medial Cortex", "Juxtapositional Lobule Cortex", "Subcallosal Cortex", "Paracingulate Gyrus",
    "Cingulate Gyrus, anterior", "Cingulate Gyrus, posterior", "Precuneous Cortex", "Cuneal Cortex",
    "Frontal Orbital Cortex", "Parahippocampal Gyrus, anterior", "Parahippocampal Gyrus, posterior",
    "Lingual Gyrus", "Temporal Fusiform Cortex, anterior", "Temporal Fusiform Cortex, posterior",
    "Temporal Occipital Fusiform Cortex", "Occipital Fusiform Gyrus", "Frontal Operculum Cortex",
    "Central Opercular Cortex", "Parietal Operculum Cortex", "Planum Polare", "Heschl's Gyrus",
    "Planum Temporale", "Supracalcarine Cortex", "Occipital Pole",
)
JHU_OFFSET, CHEST_OFFSET, HEAD_CT_OFFSET, DEEP_OFFSET = 100, 200, 300, 400
# AICHA parcel name prefixes merged into one deep grey structure each (then split into left and right)
DEEP_GREY = ("N_Thalamus", "N_Caudate", "N_Putamen", "N_Pallidum", "G_Hippocampus", "N_Amygdala")
# never in training: every 4th Harvard-Oxford region; genu of the corpus callosum, anterior limbs of
# the internal capsule, external capsules, superior longitudinal and uncinate fasciculi (both sides);
# the thoracic vertebral column
HELD_OUT = frozenset([*range(4, 49, 4), *(JHU_OFFSET + v for v in (3, 17, 18, 33, 34, 41, 42, 45, 46)),
                      CHEST_OFFSET + 3])
VOLUMES = {  # name: (intensity window, slicing planes)
    "mni152_atlas": ("mr", ["axial", "coronal", "sagittal"]),
    "chest_ct": ("ct_lung", ["axial"]),
    "head_ct": ("ct_bone", ["axial", "coronal", "sagittal"]),
}


def _mricron(name: str) -> Path:
    path = MRICRON_DIR / name
    if not path.is_file():
        raise DataError(path, "missing; install Debian's mricron-data (apt-get install mricron-data)")
    return path


def _jhu_names() -> dict[int, str]:
    """JHU tract names from mricron-data's lookup text (``value<TAB>name`` lines)."""
    path = _mricron(JHU_FILE.replace(".nii.gz", ".nii.txt"))
    names = {}
    for line in path.read_text().splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) > 0:
            names[int(parts[0])] = parts[1].strip().replace("_", " ")
    return names


def deep_grey(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """AICHA's deep grey structures on a grid: ``(labels 401-412 or 0, names)``.

    AICHA (2 mm, MNI space) parcels each structure into bilateral parts named ``PREFIX-N`` (its lookup
    text has ``value name colour`` lines); the parts are merged by prefix (:data:`DEEP_GREY`) and split
    at the midline (world x = 0): odd values are the left side, even the right.
    """
    path = _mricron(AICHA_FILE)
    values: dict[str, list[int]] = {p: [] for p in DEEP_GREY}
    for line in _mricron(AICHA_FILE.replace(".nii.gz", ".nii.txt")).read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit():  # image value, name, colour index (value + 1)
            prefix = parts[1].rsplit("-", 1)[0]
            if prefix in values:
                values[prefix].append(int(parts[0]))
    if not all(values.values()):
        raise DataError(path, f"no parcels named {[p for p, v in values.items() if not v]} in its lookup text")
    aicha = np.rint(resample_to(nib.load(str(path)), shape, affine, order=0)).astype(np.int16)
    world_x = np.tensordot(affine[0, :3], np.indices(shape), axes=1) + affine[0, 3]
    labels, names = np.zeros(shape, dtype=np.int16), {}
    for i, prefix in enumerate(DEEP_GREY):
        inside = np.isin(aicha, values[prefix])
        for side, value, half in (("Left", DEEP_OFFSET + 2 * i + 1, world_x < 0),
                                  ("Right", DEEP_OFFSET + 2 * i + 2, world_x >= 0)):
            labels[inside & half] = value
            names[value] = f"{side} {prefix.split('_', 1)[1]}"
    return labels, names


def mni152_atlas() -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    """FSL's MNI152 NLin6 T1; Harvard-Oxford (1-48), JHU (101-148) and deep grey (401-412) labels, by priority."""
    head = nib.load(str(nlin6_source_dir() / NLIN6_FILES["t1"]))
    t1, affine = np.asarray(head.dataobj, dtype=np.float32), np.asarray(head.affine)
    ho = np.rint(resample_to(nib.load(str(_mricron(HO_FILE))), t1.shape, affine, order=0)).astype(np.int16)
    jhu = np.rint(resample_to(nib.load(str(_mricron(JHU_FILE))), t1.shape, affine, order=0)).astype(np.int16)
    deep, deep_names = deep_grey(t1.shape, affine)
    labels = np.where(ho > 0, ho, np.where(jhu > 0, jhu + JHU_OFFSET, deep)).astype(np.int16)
    names = {i + 1: n for i, n in enumerate(HARVARD_OXFORD)}
    names.update({JHU_OFFSET + v: n for v, n in _jhu_names().items()})
    names.update(deep_names)
    return t1, labels, affine, names


def chest_ct() -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    """3D Slicer's CTChest4 and its segmentation (values 201-207), geometry from the NRRD headers."""
    import slicerio

    from medimg.io.image import read_image

    folder = package_data_dir("slicerio", "data", SLICERIO_FILES, "pip install slicerio")
    image, seg = read_image(folder / SLICERIO_FILES["image"]), read_image(folder / SLICERIO_FILES["seg"])
    if image.array.shape != seg.array.shape or not np.allclose(image.affine, seg.affine, atol=1e-3):
        raise DataError(folder / SLICERIO_FILES["seg"], "the segmentation's grid differs from CTChest4's")
    segments = slicerio.read_segmentation(str(folder / SLICERIO_FILES["seg"]), skip_voxels=True)["segments"]
    names = {CHEST_OFFSET + int(s["labelValue"]): str(s["name"]) for s in segments}
    labels = np.where(seg.array > 0, seg.array + CHEST_OFFSET, 0).astype(np.int16)
    return image.array.astype(np.float32), labels, image.affine, names


def head_ct(path: str | Path = INVESALIUS_FILE) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    """InVesalius' Cranium: bone (301) and soft tissue (302) from its two threshold masks."""
    from medimg.io.invesalius import read_inv3

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "missing; install Debian's invesalius-examples (apt-get install invesalius-examples)")
    project = read_inv3(path)
    if len(project.masks) < 2:
        raise DataError(path, "expected a bone mask and a soft-tissue mask")
    by_low = sorted(project.masks, key=lambda n: project.thresholds.get(n, (0.0, 0.0))[0])
    soft, bone = project.masks[by_low[0]], project.masks[by_low[-1]]
    comp, n = ndimage.label(soft)
    if n == 0:
        raise DataError(path, "the soft-tissue mask is empty")
    head = comp == (np.argmax(np.bincount(comp.ravel())[1:]) + 1)  # the head, without the holder
    labels = np.zeros(project.array.shape, dtype=np.int16)
    labels[head & ~bone] = HEAD_CT_OFFSET + 2
    labels[bone] = HEAD_CT_OFFSET + 1
    return project.array, labels, project.affine, {HEAD_CT_OFFSET + 1: "bone", HEAD_CT_OFFSET + 2: "soft tissue"}


SOURCES = {"mni152_atlas": mni152_atlas, "chest_ct": chest_ct, "head_ct": head_ct}


def split_labels(labels: np.ndarray, held_out: frozenset[int] = HELD_OUT) -> tuple[np.ndarray, np.ndarray]:
    """``(training labels, held-out labels)``: each keeps only its own structures (the rest 0)."""
    out = np.isin(labels, sorted(held_out))
    return np.where(out, 0, labels).astype(np.int16), np.where(out, labels, 0).astype(np.int16)


def prepare_structures(root: str | Path | None = None, volumes: tuple[str, ...] = tuple(VOLUMES)) -> Path:
    """Materialise the ``structures`` dataset once; return the path of its manifest (in ``root``).

    Files per volume: ``NAME.nii.gz`` (image), ``NAME_train.nii.gz`` (held-out structures erased),
    ``NAME_heldout.nii.gz`` (only the held-out structures).
    """
    root = Path(root) if root is not None else default_data_root() / "structures"
    manifest = root / "structures.json"
    prepare_once(root, manifest, lambda: _write_structures(root, manifest, volumes))
    return manifest


def _write_structures(root: Path, manifest: Path, volumes: tuple[str, ...]) -> None:
    """Write the volumes, their training / held-out label files and, last, the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    names: dict[int, str] = {}
    doc = {"name": "structures", "modality": "MR T1 and CT",
           "description": "Real labelled volumes for promptable training; whole structures held out "
                          f"(values {sorted(HELD_OUT)}); Colin27/AAL is the held-out volume.",
           "labels": {}, "held_out": sorted(HELD_OUT), "training": [], "validation": []}
    for name in volumes:
        image, labels, affine, vol_names = SOURCES[name]()
        names.update(vol_names)
        train, held = split_labels(labels)
        code = 4 if name.startswith("mni") else 1  # template space, else scanner space
        save_nifti(image, affine, root / f"{name}.nii.gz", code)
        save_nifti(train, affine, root / f"{name}_train.nii.gz", code)
        intensity, planes = VOLUMES[name]
        entry = {"image": f"{name}.nii.gz", "intensity": intensity, "planes": planes, "subject": name}
        doc["training"].append({**entry, "label": f"{name}_train.nii.gz"})
        if held.any():
            save_nifti(held, affine, root / f"{name}_heldout.nii.gz", code)
            doc["validation"].append({**entry, "label": f"{name}_heldout.nii.gz"})
    doc["labels"] = {"0": "background", **{str(k): v for k, v in sorted(names.items())}}
    with atomic_output(manifest) as tmp:
        tmp.write_text(json.dumps(doc, indent=2))
