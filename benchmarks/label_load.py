"""Load test of the MONAI Label server on loopback: N annotators clicking at once, each on its own image.

    python benchmarks/label_load.py --models MODELS [--clients 8] [--seconds 120] [--cache-mb 512]

``MODELS`` holds a 2D click bundle (``litemedsam``) and a 3D one (``medsam3d``), e.g. the runs of
``python -m medimg.train bundle=litemedsam`` and ``bundle=medsam3d``. Every client gets its own
image (the MNI152 T1 shifted by a few voxels and stored in its own orientation, so each has its
own fingerprint and its own slice embeddings) and, for the whole duration, clicks in deep white
matter on slices near its centre: three 2D clicks, then one 3D click, over and over, each request
waiting for the last, as an annotator does.

Reported: p50 / p95 latency of each kind of click, the error count (target 0), requests served,
and the peak resident memory of the server's whole process group (sampled every 0.2 s). The
server runs with a token and with ``embedding_cache_mb`` set, as a hospital would run it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import machine  # noqa: E402

from medimg.data.embedded.mni152 import prepare_mni152  # noqa: E402
from tests.cli.label_client import LabelServer  # noqa: E402

WM_RAS = np.array([-26.0, -10.0, 26.0])  # deep white matter of the template, RAS mm
TOKEN = "medimg-load-test-token-0123456789"


def make_studies(folder: Path, clients: int) -> list[str]:
    """One image per client: the template shifted by ``c`` voxels, every other one stored LPS."""
    t1 = nib.load(prepare_mni152() / "t1.nii.gz")
    data = np.asarray(t1.dataobj, dtype=np.float32)
    names = []
    for c in range(clients):
        img = nib.Nifti1Image(np.roll(data, c, axis=0), t1.affine)
        if c % 2:
            img = img.as_reoriented(np.array([[0, -1], [1, -1], [2, 1]]))
        names.append(f"annotator{c}")
        nib.save(img, folder / f"{names[-1]}.nii.gz")
    return names


def annotate(server: LabelServer, image: Path, stop: float, out: dict, lock: threading.Lock,
             rng: np.random.Generator, work: Path) -> None:
    """One annotator: 2D clicks and a 3D click near deep white matter until ``stop``."""
    affine = nib.load(image).affine
    centre = np.round(np.linalg.inv(affine) @ [*WM_RAS, 1.0])[:3].astype(int)
    n = 0
    while time.monotonic() < stop:
        click = (centre + rng.integers(-2, 3, 3)).tolist()
        model = "medsam3d" if n % 4 == 3 else "litemedsam"
        params = {"foreground": [click]} | ({"slice": click[2]} if model == "litemedsam" else {})
        start = time.perf_counter()
        try:
            code, res, path = server.infer(model, image.name.split(".")[0], params, work)
            if path is not None:
                path.unlink()
        except Exception as exc:  # noqa: BLE001 - counted as an error
            code, res = -1, str(exc)
        seconds = time.perf_counter() - start
        with lock:
            out.setdefault(model, []).append(seconds)
            if code != 200:
                out.setdefault("errors", []).append(f"{model} {code}: {str(res)[:200]}")
        n += 1


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in the server's process group."""
    total = 0
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                total += proc.memory_info().rss
        except (psutil.Error, ProcessLookupError):
            continue
    return total


def main() -> None:
    """Start the server, run the clients, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="folder with litemedsam/ and medsam3d/ bundles")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--cache-mb", type=float, default=512.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medimg-load-") as tmp:
        work = Path(tmp)
        studies = work / "studies"
        studies.mkdir()
        names = make_studies(studies, args.clients)
        server = LabelServer(Path(args.models), studies, work, token=TOKEN,
                             extra=["--conf", "embedding_cache_mb", str(args.cache_mb)])
        try:
            for name in names[:1]:  # load both models once, as the first real request would
                server.infer("litemedsam", name, {"foreground": [[90, 120, 90]], "slice": 90}, work)
            out: dict[str, list] = {}
            lock, peak, done = threading.Lock(), [0], threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], group_rss(server.pgid))
                    time.sleep(0.2)

            sampler = threading.Thread(target=sample)
            sampler.start()
            stop = time.monotonic() + args.seconds
            clients = [threading.Thread(target=annotate, args=(server, studies / f"{n}.nii.gz", stop, out, lock,
                                                               np.random.default_rng(i), work))
                       for i, n in enumerate(names)]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            done.set()
            sampler.join()
        finally:
            server.stop()
    print(f"Machine: {machine()}")
    print(f"{args.clients} annotators, {args.seconds:.0f} s, each on its own image; embedding cache "
          f"{args.cache_mb:.0f} MB per model\n")
    print("| request | served | p50 | p95 | errors |\n|---|---|---|---|---|")
    errors = out.get("errors", [])
    for model in ("litemedsam", "medsam3d"):
        xs = out.get(model, [])
        if xs:
            q = statistics.quantiles(xs, n=20) if len(xs) > 1 else [xs[0]] * 19
            fails = sum(e.startswith(model) for e in errors)
            print(f"| {model} click | {len(xs)} | {statistics.median(xs) * 1e3:.0f} ms | {q[18] * 1e3:.0f} ms "
                  f"| {fails} |")
    print(f"\nserver peak resident memory (all its processes): {peak[0] / 2**30:.2f} GiB")
    for e in errors[:10]:
        print("error:", e)


if __name__ == "__main__":
    main()
