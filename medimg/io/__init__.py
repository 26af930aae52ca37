"""Files in and out.

Images (NIfTI, NRRD, MHA), DICOM series and multi-frame, the MONAI reader, prompts JSON, and
in-memory images (nibabel, SimpleITK, MetaTensor, arrays).
"""

from __future__ import annotations

from medimg.io.image import Image, read_image, write_like

__all__ = ["Image", "read_image", "write_like"]
