"""3D SAM adaptation (3DSAM-adapter style): a volumetric encoder reusing 2D SAM/MedSAM weights."""

from __future__ import annotations

from medimg.models.sam3d.encoder import SpatialAdapter3D, VolumetricSAMEncoder

__all__ = ["SpatialAdapter3D", "VolumetricSAMEncoder"]
