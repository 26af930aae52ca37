"""One contract for converted models: keyed and hashed cache, locked conversions, checked IR, eager fallback.

Real OpenVINO on a tiny 3D U-Net (32^3); the scenarios are what a pipeline meets: another ROI size,
an upgrade, a corrupt file, an unwritable or full cache, ``kill -9``, two processes at once.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from medimg.errors import BundleError
from medimg.models.openvino_ir import NETWORK_IR, OpenVINONetwork, check_outputs, save_network_ir

SHAPE = (2, 1, 32, 32, 32)


def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0).eval()


class FrozenBranch(nn.Module):
    """A network whose forward branches on its data: tracing keeps the branch of the all-zeros example.

    With the same pattern in every batch item and channel the check takes that branch too and
    cannot see the difference; distinct inputs take the other one.
    """

    def __init__(self, in_channels: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(in_channels, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        same = bool(torch.equal(x[:1], x[-1:])) and bool(torch.equal(x[:, :1], x[:, -1:]))
        return self.conv(x) if same else -self.conv(x)


def eager(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return network(x)


def noise(shape=SHAPE, seed: int = 3) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "ir"
    monkeypatch.setenv("MEDIMG_IR_CACHE", str(root))
    monkeypatch.setenv("MEDIMG_OPENVINO_CACHE", "none")
    return root


def bundle_ir(tmp_path: Path, name: str = "tinyseg") -> Path:
    """A bundle's ``models/openvino`` that the bundle ships without (the zoo's case)."""
    (tmp_path / name / "models").mkdir(parents=True, exist_ok=True)
    return tmp_path / name / "models" / "openvino"


def folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def test_another_roi_size_does_not_poison_later_default_runs(cache, tmp_path):
    """``--set roi_size=[...]`` once, then the default: each shape gets its own checked IR."""
    net, ir = tiny_unet(), bundle_ir(tmp_path)
    big = noise((2, 1, 48, 48, 48))
    torch.testing.assert_close(OpenVINONetwork(net, ir)(big), eager(net, big), atol=1e-4, rtol=1e-4)
    x = noise()
    later = OpenVINONetwork(net, ir)
    torch.testing.assert_close(later(x), eager(net, x), atol=1e-4, rtol=1e-4)
    assert later.fallback is None
    assert len(folders(cache)) == 2


def test_an_upgrade_does_not_serve_the_old_graph(cache, tmp_path, monkeypatch):
    """The key holds the medimg and OpenVINO versions: after an upgrade the IR is converted again."""
    import importlib.metadata

    net, ir, x = tiny_unet(), bundle_ir(tmp_path), noise()
    OpenVINONetwork(net, ir)(x)
    (first,) = folders(cache)
    key = json.loads((first / "manifest.json").read_text())["key"]
    import openvino as ov

    assert key["inputs"] == [[-1, 1, 32, 32, 32]] and key["openvino"] == ov.get_version()
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda p: "99.0" if p == "medimg" else real(p))
    torch.testing.assert_close(OpenVINONetwork(net, ir)(x), eager(net, x), atol=1e-4, rtol=1e-4)
    assert len(folders(cache)) == 2


def test_a_corrupt_cached_bin_is_detected_and_reconverted(cache, tmp_path, caplog):
    net, ir, x = tiny_unet(), bundle_ir(tmp_path), noise()
    OpenVINONetwork(net, ir)(x)
    (folder,) = folders(cache)
    weights = folder / f"{NETWORK_IR}.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # same size, zeroed weights: a bad sector
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(OpenVINONetwork(net, ir)(x), eager(net, x), atol=1e-4, rtol=1e-4)
    assert "damaged" in caplog.text
    manifest = json.loads((folder / "manifest.json").read_text())
    import hashlib

    assert hashlib.sha256(weights.read_bytes()).hexdigest() == manifest["sha256"][weights.name]


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder no write can enter: read-only by mode, or (as root, whom modes do not stop) ``/sys``."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder = Path("/sys/medimg-home")
        try:
            folder.mkdir()
        except OSError:
            return folder
        folder.rmdir()
        pytest.skip("no read-only folder can be made here")
    return folder


def test_a_read_only_home_converts_in_memory_and_checks_it(tmp_path, monkeypatch, caplog):
    """No writable cache: the conversion stays in memory and is checked all the same (here: it fails)."""
    home = unwritable_dir(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MEDIMG_IR_CACHE", raising=False)
    monkeypatch.delenv("MEDIMG_OPENVINO_CACHE", raising=False)
    net, x = FrozenBranch(1), noise()
    with caplog.at_level(logging.WARNING):
        runner = OpenVINONetwork(net, bundle_ir(tmp_path))
        torch.testing.assert_close(runner(x), eager(net, x))
    assert runner.fallback is not None and "disagrees" in runner.fallback
    good = tiny_unet()
    fast = OpenVINONetwork(good, bundle_ir(tmp_path, "good"))
    torch.testing.assert_close(fast(x), eager(good, x), atol=1e-4, rtol=1e-4)
    assert fast.fallback is None


def test_a_full_cache_disk_converts_in_memory_and_leaves_nothing(cache, tmp_path):
    """Writes past a size limit fail as on a full disk (EFBIG, as ENOSPC): the checked IR runs from memory."""
    net, x = tiny_unet(), noise()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        runner = OpenVINONetwork(net, bundle_ir(tmp_path))
        out = runner(x)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    torch.testing.assert_close(out, eager(net, x), atol=1e-4, rtol=1e-4)
    assert runner.fallback is None
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no partial, no half-written folder


CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_ir_contract import eager, noise, tiny_unet
    from medimg.models.openvino_ir import OpenVINONetwork
    net, x = tiny_unet(), noise()
    runner = OpenVINONetwork(net, {ir!r})
    out = runner(x)
    print("DIFF", float((out - eager(net, x)).abs().max()), runner.fallback)
""")


def child(tmp_path: Path, cache: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "MEDIMG_IR_CACHE": str(cache), "MEDIMG_OPENVINO_CACHE": "none", "OMP_NUM_THREADS": "1"}
    code = CHILD.format(tests=str(Path(__file__).parent), ir=str(bundle_ir(tmp_path, name)))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).parents[2])


def test_kill_9_during_a_conversion_leaves_no_partial_folder_for_good(cache, tmp_path):
    proc = child(tmp_path, cache, "killed")
    deadline = time.monotonic() + 120
    while not list(cache.glob(".*.partial")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert list(cache.glob(".*.partial"))  # the dead conversion's folder
    net, x = tiny_unet(), noise()
    torch.testing.assert_close(OpenVINONetwork(net, bundle_ir(tmp_path))(x), eager(net, x), atol=1e-4, rtol=1e-4)
    assert not list(cache.glob(".*.partial"))
    (folder,) = folders(cache)
    assert (folder / "manifest.json").is_file()


def test_two_processes_converting_the_same_ir_both_end_with_a_correct_one(cache, tmp_path):
    procs = [child(tmp_path, cache, f"proc{i}") for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        diff, fallback = out.split("DIFF ")[1].split()
        assert float(diff) <= 1e-4 and fallback == "None", out
    (folder,) = folders(cache)
    assert not list(cache.glob(".*.partial"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["sha256"]) == {f"{NETWORK_IR}.xml", f"{NETWORK_IR}.bin"}


def test_the_check_uses_distinct_items_and_channels(tmp_path):
    """The export check used one pattern in every batch item and channel: a frozen branch passed it."""
    with pytest.raises(BundleError, match="disagrees"):
        save_network_ir(FrozenBranch(2), (2, 2, 16, 16, 16), tmp_path / "ir")
    assert not (tmp_path / "ir" / f"{NETWORK_IR}.xml").exists()


def test_the_check_compares_shapes_exactly_and_every_output(tmp_path):
    ref = torch.ones(2, 3)
    with pytest.raises(BundleError, match=r"shape \(1, 3\)"):  # NumPy would broadcast this into a pass
        check_outputs([(np.ones((1, 3), np.float32), ref)], tmp_path, 1e-3)
    with pytest.raises(BundleError, match="not finite"):
        check_outputs([(np.full((2, 3), np.nan, np.float32), ref)], tmp_path, 1e-3)
    with pytest.raises(BundleError, match="output 1"):
        check_outputs([(ref.numpy(), ref), (ref.numpy() + 1, ref)], tmp_path, 1e-3)


def test_a_failed_ir_falls_back_to_eager_with_one_warning_line(cache, tmp_path, caplog):
    net, x = FrozenBranch(1), noise()
    with caplog.at_level(logging.WARNING):
        runner = OpenVINONetwork(net, bundle_ir(tmp_path, "branchy"))
        out = [runner(x), runner(x)]
    torch.testing.assert_close(out[0], eager(net, x))
    torch.testing.assert_close(out[1], eager(net, x))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, caplog.text
    line = warnings[0].getMessage()
    assert "\n" not in line and "branchy" in line and "eager PyTorch" in line and "disagrees" in line
