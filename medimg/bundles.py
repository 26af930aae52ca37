"""Trained bundles shipped inside medimg, by short name: ``python -m medimg.bundles`` lists them.

Every shipped bundle is a complete, verified MONAI bundle in ``medimg/zoo/<name>/`` (so a wheel and
an editable install both carry it), with a model card in ``docs/README.md``. A short name works
wherever a bundle folder does: ``medimg.infer --bundle tissue_t1``, ``medimg.load_bundle("tissue_t1")``,
``medimg.label serve`` (every shipped bundle when ``--models`` is not given) and
``init_weights=tissue_t1`` for fine-tuning.

A path that exists always wins over a name, so a user's own folder called ``tissue_t1`` is theirs.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medimg.errors import BundleError
from medimg.io.jsonfile import dumps_strict

ZOO = Path(__file__).resolve().parent / "zoo"


def shipped_bundles() -> dict[str, Path]:
    """Shipped bundle names and their folders (those with a ``configs/metadata.json``)."""
    if not ZOO.is_dir():
        return {}
    return {d.name: d for d in sorted(ZOO.iterdir()) if (d / "configs" / "metadata.json").is_file()}


def resolve_bundle(bundle: str | Path) -> Path:
    """The folder of ``bundle``: an existing path as given, else a shipped bundle's short name.

    Args:
        bundle: a bundle folder, or a name from :func:`shipped_bundles`.

    Returns:
        The bundle folder.

    Raises:
        BundleError: neither an existing path nor a shipped name.
    """
    path = Path(bundle)
    if path.exists():
        return path
    shipped = shipped_bundles()
    if str(bundle) in shipped:
        return shipped[str(bundle)]
    names = ", ".join(shipped) or "none installed"
    raise BundleError(path, f"no such bundle folder, and not a shipped bundle name (shipped: {names})")


def install_staged(staged: Path, name: str, meta: dict[str, Any], card: Callable[[float], str],
                   schema: str | Path | None = None) -> Path:
    """Finish a staged copy of a bundle and move it into the zoo as ``name`` (what the ship benchmarks do).

    Writes ``meta`` as its ``metadata.json`` and ``card(size_mb)`` as its ``docs/README.md``,
    verifies it with MONAI, then replaces ``zoo/<name>`` by it.
    """
    from medimg.bundle.verify import verify_bundle

    (staged / "configs" / "metadata.json").write_text(dumps_strict(meta, indent=2))
    size = folder_mb(staged)
    (staged / "docs" / "README.md").write_text(card(size))
    verify_bundle(staged, schema)
    dest = ZOO / name
    shutil.rmtree(dest, ignore_errors=True)
    staged.rename(dest)
    print(f"shipped: {dest} ({size:.1f} MB)")
    return dest


log = logging.getLogger("medimg.bundles")
HELD_OUT_3D = "medimg_held_out_3d"  # a card's held-out 3D Dice, measured beside the other 3D models (same run)


def held_out_3d(folder: Path) -> dict[str, Any] | None:
    """A bundle card's held-out 3D figures (``medimg_held_out_3d``), or ``None`` for a card without them.

    ``benchmarks/propagation_vs_3d.py`` measures every shipped model that takes 3D prompts (the 2D
    model by slice propagation, the 3D model on whole volumes) in one run, on the same held-out
    structures and prompts; ``dice`` is the mean of box, 1-click and 3-click Dice over its held-out
    sets, ``summary`` one line for clients.
    """
    card = Path(folder) / "configs" / "metadata.json"
    try:
        meta = json.loads(card.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):  # a hand-edited or foreign card: listed without figures, never a crash
        log.warning("%s: not a JSON object (a %s); the bundle is listed without held-out 3D figures", card,
                    type(meta).__name__)
        return None
    value = meta.get(HELD_OUT_3D)
    return value if isinstance(value, dict) and isinstance(value.get("dice"), (int, float)) else None


def serving_order(folders: list[Path]) -> list[Path]:
    """Bundles in the order a server offers them: the best held-out 3D Dice first, then the rest by name.

    So the model that measured better for 3D work is the one MONAI Label's clients (3D Slicer,
    OHIF) list, and select, first.
    """
    def key(folder: Path) -> tuple[float, str]:
        figures = held_out_3d(folder)
        return (-float(figures["dice"]) if figures else float("inf"), folder.name)

    return sorted(folders, key=key)


def folder_mb(folder: Path) -> float:
    """Size of every file under ``folder``, in MB."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def describe(folder: Path) -> dict[str, Any]:
    """Task, labels, size on disk and headline metrics of one bundle (from its metadata only)."""
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    headline = meta.get("medimg_headline") or {}
    return {"task": meta.get("task", ""), "labels": meta.get("labels", {}), "size_mb": folder_mb(folder),
            "version": meta.get("version", ""), "headline": headline}


def main(argv: list[str] | None = None) -> int:
    """Print the shipped bundles, one block per name."""
    del argv
    shipped = shipped_bundles()
    if not shipped:
        print("no bundles are shipped with this installation")
        return 0
    for name, folder in shipped.items():
        d = describe(folder)
        labels = ", ".join(f"{v}: {k}" for k, v in sorted(d["labels"].items(), key=lambda kv: kv[1]))
        print(f"{name}  (v{d['version']}, {d['size_mb']:.1f} MB)  {d['task']}")
        print(f"    labels: {labels}")
        for key, value in d["headline"].items():
            print(f"    {key}: {value}")
        print(f"    card: {folder / 'docs' / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
