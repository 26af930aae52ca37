"""Build hook: ship the top-level configs/, bundles/ and data_manifests/ inside the wheel."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RESOURCE_DIRS = ("configs", "bundles", "data_manifests")


class BuildPyWithResources(build_py):
    """Copy the resource folders to ``medimg/_resources`` in the build tree."""

    def run(self) -> None:
        """Build the package, then copy the resource folders next to it."""
        super().run()
        root = Path(__file__).parent
        target = Path(self.build_lib) / "medimg" / "_resources"
        for name in RESOURCE_DIRS:
            src = root / name
            if src.is_dir():
                shutil.copytree(src, target / name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithResources})
