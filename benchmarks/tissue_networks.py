"""Candidate networks for the 1 mm tissue model: size, training step time and whole-head inference time.

    python benchmarks/tissue_networks.py [--roi 96] [--steps 4] [--threads 2]

Each candidate is built exactly as ``medimg.train`` builds it (``medimg.models.build_network``),
then timed on the same machine in the same run:

- one AdamW training step (forward, Dice-CE loss, backward, update) on a batch of two ``roi``³
  crops, the ``tissue_t1`` recipe's batch;
- sliding-window inference (MONAI ``sliding_window_inference``, ``roi``³ windows, overlap 0.25,
  Gaussian blending, eager PyTorch) over a 1 mm head the size of the MNI152 grid (197×233×189).

Dice needs training, so it comes from the equal-time ``medimg.train`` runs recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from timing import times

from medimg.models import build_network

CANDIDATES = {
    "swin_unetr (feature 12)": ("swin_unetr", {"feature_size": 12, "depths": [2, 2, 2, 2]}),
    "segresnet (16 filters)": ("segresnet", {"init_filters": 16}),
    "segresnet (8 filters)": ("segresnet", {"init_filters": 8}),
    "dynunet (16-192)": ("dynunet", {"filters": [16, 32, 64, 128, 192]}),
}
HEAD = (197, 233, 189)


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    return float(np.median(times(fn, repeats)))


def measure(name: str, kwargs: dict, roi: int, steps: int) -> dict[str, float]:
    """Parameters, seconds per training step and seconds per whole-head inference of one candidate."""
    torch.manual_seed(0)
    extra = {"patch": [roi] * 3} if name == "dynunet" else {}
    net = build_network(name, in_channels=1, out_channels=3, **kwargs, **extra)
    params = sum(p.numel() for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.rand(2, 1, roi, roi, roi)
    y = torch.randint(0, 3, (2, 1, roi, roi, roi))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    net.train()
    train_s = median_seconds(step, steps)
    net.eval()
    head = torch.rand(1, 1, *HEAD)

    def infer() -> None:
        with torch.inference_mode():
            sliding_window_inference(head, (roi,) * 3, 2, net, overlap=0.25, mode="gaussian")

    infer_s = median_seconds(infer, 1)
    return {"params_m": params / 1e6, "step_s": train_s, "infer_s": infer_s}


def main() -> None:
    """Print one Markdown row per candidate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="candidate labels to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"train batch 2x{args.roi}^3, inference {'x'.join(map(str, HEAD))} at roi {args.roi}^3")
    print("| network | parameters | training step | steps / s | whole-head inference (eager) |")
    print("|---|---|---|---|---|")
    for label, (name, kwargs) in CANDIDATES.items():
        if args.only and not any(o in label for o in args.only):
            continue
        r = measure(name, kwargs, args.roi, args.steps)
        print(f"| {label} | {r['params_m']:.2f} M | {r['step_s']:.2f} s | {1 / r['step_s']:.2f} | "
              f"{r['infer_s']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
