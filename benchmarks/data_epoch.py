"""A training epoch of the default ``swin_unetr`` data, uncached against cached (MONAI ``CacheDataset``).

    python benchmarks/data_epoch.py [--epochs 3]

The default bundle's own pipeline (``bundle=swin_unetr``: MNI152 at 2 mm, ``synth`` augmentation,
4 repeats of the training volume, 2 crops of 64^3 each). ``data.cache=none`` re-reads and
re-resamples the volume on every draw; ``data.cache=memory`` (the default) keeps the
deterministic prefix (read, orient, resample, window, crop to the head) and reruns only the random
transforms. The first cached epoch builds the cache and is reported apart. Data only: the network
step is the same either way (about 6 s per step on this CPU, see BENCHMARKS.md).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from timing import Result, cli

from medimg.resources import resource_dir
from medimg.runs.segmentation import build_datamodule


def _epochs(cache: str, epochs: int, run_dir: Path) -> tuple[float, list[float]]:
    with initialize_config_dir(str(resource_dir("configs")), version_base="1.3"):
        cfg = compose("train", overrides=["bundle=swin_unetr", f"data.cache={cache}"])
    t = time.perf_counter()
    dm = build_datamodule(cfg, run_dir)
    dm.setup("fit")
    loader = dm.train_dataloader()
    build = time.perf_counter() - t
    out = []
    for _ in range(epochs):
        t = time.perf_counter()
        n = sum(1 for _ in loader)
        out.append(time.perf_counter() - t)
    assert n == len(loader)
    return build, out


def run(epochs: int = 3) -> list[Result]:
    """Uncached and cached epochs of the default segmentation data."""
    with tempfile.TemporaryDirectory() as tmp:
        _, plain = _epochs("none", epochs, Path(tmp))
        build, cached = _epochs("memory", epochs, Path(tmp))
    return [Result("swin_unetr data", "training epoch (4 draws, 2x64^3 crops each, synth)", cached, plain,
                   "the same epoch uncached", "<= 0.2x (>= 5x faster)",
                   [f"cache build (once per run): {build:.1f} s"])]


def main() -> None:
    cli(run, lambda p: p.add_argument("--epochs", type=int, default=3))


if __name__ == "__main__":
    main()
