from __future__ import annotations

import numpy as np
import pytest

from medimg import load_bundle


@pytest.mark.gpu
def test_cuda_amp_prediction_matches_cpu(phantom_run, phantom_manifest):
    image = phantom_manifest.parent / "img05.nii.gz"
    ref = load_bundle(phantom_run / "bundle", device="cpu").predict(image)
    cpu = ref.array
    gpu_predictor = load_bundle(phantom_run / "bundle")
    assert gpu_predictor.device.type == "cuda" and gpu_predictor.amp
    ref_gpu = gpu_predictor.predict(image)
    gpu = ref_gpu.array
    assert gpu.shape == cpu.shape == ref.array.shape
    np.testing.assert_array_equal(ref_gpu.affine, ref.affine)
    assert (gpu == cpu).mean() >= 0.99  # fp16 autocast may flip a few near-tie voxels
