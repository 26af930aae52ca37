"""medimg: adapt medical-imaging foundation models and ship them as MONAI bundles.

The library API::

    import medimg

    predictor = medimg.load_bundle("runs/swin_unetr/.../bundle")
    labels = predictor.predict(nibabel_image)          # a nibabel image back, same geometry

Names are imported on first use, so ``import medimg`` (and each CLI's start) stays fast.
"""

from __future__ import annotations

import logging
import warnings

from medimg.lazy import lazy_attributes

__version__ = "0.1.0"

# MONAI's DICOM reader registry announces, on every reader it builds, that NVIDIA's optional GPU JPEG
# codec (nvImageCodec) is not installed and pydicom's own decoders are used: what medimg relies on
# (pylibjpeg). Two lines of noise on every command otherwise; any other MONAI warning still shows.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")

_API = {
    "load_bundle": "medimg.bundle.loader",
    "bundle_task": "medimg.bundle.loader",
    "read_image": "medimg.io.image",
    "Image": "medimg.io.image",
    "Segmenter": "medimg.predictors.protocols",
    "PromptSegmenter": "medimg.predictors.protocols",
    "Classifier": "medimg.predictors.protocols",
    "PromptableNetwork2D": "medimg.predictors.protocols",
    "PromptableNetwork3D": "medimg.predictors.protocols",
    "MedimgError": "medimg.errors",
    "DataError": "medimg.errors",
    "BundleError": "medimg.errors",
}
__all__ = sorted(_API)

__getattr__ = lazy_attributes(__name__, _API)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
