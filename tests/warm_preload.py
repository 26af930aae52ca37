"""Imported once by the suite's warm fork server (:mod:`tests.warm_cli`): the CLIs' heavy third-party imports."""

import hydra  # noqa: F401
import lightning  # noqa: F401
import monai  # noqa: F401
import nibabel  # noqa: F401
import pydicom  # noqa: F401
import SimpleITK  # noqa: F401
import timm  # noqa: F401
import torch  # noqa: F401
import torchvision  # noqa: F401
