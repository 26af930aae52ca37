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
