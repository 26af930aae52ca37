"""Locate the resource folders (configs, bundle templates, manifests) in a checkout or a wheel."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """Return the folder ``name`` (``configs``, ``bundles`` or ``data_manifests``).

    In an installed wheel they live in ``medimg/_resources``; in a checkout (also an editable
    install) they sit at the top of the repository beside the package.

    Args:
        name: one of ``configs``, ``bundles``, ``data_manifests``.

    Returns:
        The absolute path of the folder.

    Raises:
        FileNotFoundError: when neither location holds it (a broken install).
    """
    for candidate in (_PKG / "_resources" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"medimg resource folder {name!r} is missing from this installation")
