"""Embedded datasets that need no download.

The real MNI152 template (3D tissue labels; 2D slices for classification) and synthetic phantoms.
"""

from __future__ import annotations

from pathlib import Path

from medimg.data.embedded.mni152 import default_data_root, prepare_mni152, prepare_mni152_head
from medimg.data.embedded.phantom import prepare_phantom
from medimg.errors import DataError
from medimg.resources import resource_dir


def embedded_manifest(name: str, dataset_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Materialise an embedded dataset and return ``(manifest_path, dataset_dir)``.

    Args:
        name: ``mni152`` (the skull-stripped template), ``mni152_head`` (its brain inside a real
            head), ``structures`` (many labelled structures on real MR and CT, for promptable
            models) or ``phantom``.
        dataset_dir: where to write its files (default under :func:`default_data_root`).
    """
    if name == "mni152":
        folder = prepare_mni152(dataset_dir)
        return resource_dir("data_manifests") / "mni152.json", folder
    if name == "mni152_head":
        folder = prepare_mni152_head(dataset_dir)
        return resource_dir("data_manifests") / "mni152_head.json", folder
    if name == "structures":
        from medimg.data.embedded.structures import prepare_structures

        manifest = prepare_structures(dataset_dir)
        return manifest, manifest.parent
    if name == "phantom":
        folder = Path(dataset_dir) if dataset_dir else default_data_root() / "phantom"
        return prepare_phantom(folder), folder
    raise DataError(name, "unknown embedded dataset; choose mni152, mni152_head, structures or phantom")
