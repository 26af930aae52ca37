"""3D SAM adaptation (3DSAM-adapter style).

A volumetric encoder reusing 2D SAM/MedSAM weights, a 3D prompt encoder and a full-resolution 3D
mask decoder.
"""

from __future__ import annotations

from medimg.models.sam3d.encoder import SpatialAdapter3D, VolumetricSAMEncoder
from medimg.models.sam3d.heads import MaskDecoder3D, PromptEncoder3D
from medimg.models.sam3d.network import PromptableSAM3D, VolumeFeatures, build_medsam3d

__all__ = ["MaskDecoder3D", "PromptEncoder3D", "PromptableSAM3D", "SpatialAdapter3D", "VolumeFeatures",
           "VolumetricSAMEncoder", "build_medsam3d"]
