"""Debian packages some tests read: real atlases and heads (``mricron-data``, ``invesalius-examples``), a
real PACS (``orthanc``, ``orthanc-dicomweb``) and real compressors (``tabix``'s ``bgzip``, ``pigz``).

On a machine without them (no root, macOS, another Linux) those tests skip, each with one line naming the
package (``-rs`` in pytest's addopts prints it). CI installs them and sets ``MEDIMG_REQUIRE_ORACLES=1``:
there a missing package fails the test instead, so CI never skips one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from medimg.data.embedded.structures import INVESALIUS_FILE, MRICRON_DIR

SWITCH = "MEDIMG_REQUIRE_ORACLES"
COLIN = MRICRON_DIR / "ch2.nii.gz"
ORTHANC = Path(shutil.which("Orthanc") or "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
# the one file each package is known by
DEBIAN = {"mricron-data": COLIN, "invesalius-examples": INVESALIUS_FILE, "orthanc": ORTHANC,
          "orthanc-dicomweb": DICOMWEB_PLUGIN, "tabix": Path(shutil.which("bgzip") or "/usr/bin/bgzip"),
          "pigz": Path(shutil.which("pigz") or "/usr/bin/pigz")}


def need_debian(*packages: str) -> None:
    """Skip the calling test (or fail it under ``MEDIMG_REQUIRE_ORACLES=1``) unless ``packages`` are installed."""
    missing = [name for name in packages if not DEBIAN[name].is_file()]
    if not missing:
        return
    line = f"needs Debian {', '.join(missing)}: apt-get install {' '.join(missing)}"
    if os.environ.get(SWITCH, "") not in ("", "0"):
        pytest.fail(f"{line} ({SWITCH} is set: CI installs them)", pytrace=False)
    pytest.skip(line)
