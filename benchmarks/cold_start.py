"""``medimg.infer`` cold start: process start to the first network call, and to a bad-input error.

    python benchmarks/cold_start.py --bundle <swin_unetr bundle> [--bundle <litemedsam bundle>] [--repeats 3]

Each run is a fresh ``python`` process. The child stops the clock at the bundle network's first
forward (or the 2D SAM runtime's first encode) and exits, so the time covers interpreter start,
imports, input validation, bundle parsing, network build and weight loading. The reference is the
same command with MONAI imported the ordinary way (every optional package it probes), as before
:mod:`medimg.fastimport`. A missing input must fail with exit code 2 before MONAI or PyTorch load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from timing import Result, cli

CHILD = r"""
import os, runpy, sys, time
t0 = float(os.environ["MEDIMG_T0"])
def stop(what):
    print("FIRST_CALL", time.time() - t0, what, flush=True)
    os._exit(0)
import medimg.bundle.loader as loader
import medimg.fastimport as fastimport
if os.environ.get("MEDIMG_PLAIN_MONAI"):
    fastimport.import_monai_lean = lambda: __import__("monai")
original = loader.load_bundle_network
def hooked(*a, **k):
    net = original(*a, **k)
    net.register_forward_pre_hook(lambda m, i: stop(type(m).__name__))
    import medimg.models.sam.runtime as rt
    import medimg.models.openvino_ir as ovir
    for cls in (rt.OpenVINOSAMRuntime, rt.TorchSAMRuntime):
        cls.encode = lambda self, x, _c=cls: stop(_c.__name__)
    ovir.OpenVINONetwork.forward = lambda self, x: stop("OpenVINONetwork")
    return net
loader.load_bundle_network = hooked
sys.argv = ["medimg.infer"] + sys.argv[1:]
runpy.run_module("medimg.infer", run_name="__main__")
"""


def _first_call(args: list[str], plain: bool) -> float:
    env = dict(os.environ)
    if plain:
        env["MEDIMG_PLAIN_MONAI"] = "1"
    env["MEDIMG_T0"] = repr(time.time())
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("FIRST_CALL")), None)
    if line is None:
        raise RuntimeError(f"no network call: {proc.stderr[-2000:]}")
    return float(line.split()[1])


def _bad_input(bundle: str, tmp: Path) -> float:
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "medimg.infer", "--bundle", bundle, "--input",
                           str(tmp / "missing.nii.gz"), "--output", str(tmp / "o.nii.gz")], capture_output=True)
    assert proc.returncode == 2, proc.stderr
    return time.time() - t


def run(bundles: list[str], repeats: int = 3) -> list[Result]:
    """Cold starts of each bundle's CLI against the same CLI importing MONAI fully."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        img = tmp / "small.nii.gz"
        nib.save(nib.Nifti1Image(np.random.default_rng(0).random((48, 48, 48)).astype(np.float32), np.eye(4)),
                 str(img))
        (tmp / "p.json").write_text(json.dumps({"boxes": [[10, 10, 24, 30, 30, 24]], "propagate": False}))
        for bundle in bundles:
            meta = json.loads((Path(bundle) / "configs" / "metadata.json").read_text())
            task = meta.get("medimg_task", "segmentation")
            args = ["--bundle", bundle, "--input", str(img), "--output", str(tmp / "o.nii.gz"), "--device", "cpu"]
            if task == "promptable":
                args += ["--prompts", str(tmp / "p.json")]
            ours = [_first_call(args, False) for _ in range(repeats)]
            ref = [_first_call(args, True) for _ in range(repeats)]
            out.append(Result("medimg.infer", f"process start to first network call ({task} bundle)", ours, ref,
                              "same, MONAI imported fully", "<= 5 s"))
        bad = [_bad_input(bundles[0], tmp) for _ in range(repeats)]
        ref = []
        for _ in range(repeats):
            t = time.time()
            subprocess.run([sys.executable, "-c", "import monai"], check=True, capture_output=True)
            ref.append(time.time() - t)
        out.append(Result("medimg.infer", "missing input reported (exit 2)", bad, ref, "python -c 'import monai'",
                          "reported"))
    return out


def main() -> None:
    cli(run, lambda p: (p.add_argument("--bundle", dest="bundles", action="append", required=True),
                     p.add_argument("--repeats", type=int, default=3)))


if __name__ == "__main__":
    main()
