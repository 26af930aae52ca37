"""One import-time incompatibility between MONAI Label 0.8.5 and the pydicom 3 medimg needs.

MONAI Label's infer endpoint imports ``pydicom_seg`` (its DICOMweb SEG converter), and
``pydicom_seg`` 0.4.1 imports ``pydicom._storage_sopclass_uids``, a module pydicom 3 removed; its
UIDs live in ``pydicom.uid`` since pydicom 2.3 (pydicom-seg issue #60, MONAI Label issue #1841).
highdicom, which writes medimg's DICOM SEG, needs pydicom 3, so medimg cannot pin pydicom 2.

:func:`install` makes the old module name refer to ``pydicom.uid``. It is applied by
``python -m medimg.label serve`` before MONAI Label is imported, and by the ``sitecustomize``
it places in the app folder for MONAI Label's train subprocess. medimg never calls ``pydicom_seg``.
"""

from __future__ import annotations

import importlib.util
import sys


def install() -> None:
    """Alias ``pydicom._storage_sopclass_uids`` to ``pydicom.uid`` when pydicom lacks it (pydicom >= 3)."""
    name = "pydicom._storage_sopclass_uids"
    if name in sys.modules:
        return
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        import pydicom
        import pydicom.uid

        sys.modules[name] = pydicom.uid
        pydicom._storage_sopclass_uids = pydicom.uid  # type: ignore[attr-defined]
