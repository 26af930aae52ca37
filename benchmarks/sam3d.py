"""medsam3d: forward+backward time and peak memory of one training step, against MONAI's SwinUNETR.

    python benchmarks/sam3d.py [--device cpu|cuda] [--sizes 64 128] [--configs tiny vit_b] [--repeats 3]

One step = encode a ``(1, 1, S, S, S)`` patch, decode one click, Dice+BCE loss, backward, with the
3DSAM-adapter freeze (encoder frozen except its 3D adapters, norms and depth embedding). The
reference is MONAI's ``SwinUNETR`` (feature_size 48, the BTCV configuration, everything trained)
on the same patch, in the same run; the printed ratio is medimg / reference.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (fp32, bf16 autocast, and bf16 with
gradient checkpointing); on CPU each configuration runs in a fresh subprocess and its peak
resident set size is reported (weights included).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch


def _build(name: str, size: int, checkpointing: bool) -> tuple[torch.nn.Module, callable]:
    from monai.losses import DiceLoss

    from medimg.models import build_network
    from medimg.models.peft import apply_freeze_policy

    dice = DiceLoss(sigmoid=True)
    target = torch.zeros(1, 1, size, size, size)
    target[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    if name == "swin_unetr":
        from monai.networks.nets import SwinUNETR

        net = SwinUNETR(in_channels=1, out_channels=1, feature_size=48, use_checkpoint=checkpointing)

        def step(x: torch.Tensor) -> torch.Tensor:
            return net(x)
    else:
        net = build_network("medsam3d", size=name, use_checkpoint=checkpointing)
        apply_freeze_policy(net, "spatial_adapters")
        click = torch.tensor([[[size / 2, size / 2, size / 2]]])

        def step(x: torch.Tensor) -> torch.Tensor:
            pts = (click.to(x.device), torch.ones(1, 1, dtype=torch.int64, device=x.device))
            return net(x, points=pts)

    def loss_step(x: torch.Tensor, bf16: bool) -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = step(x)
        t = target.to(x.device)
        loss = dice(logits.float(), t) + torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), t)
        loss.backward()

    return net, loss_step


def measure(name: str, size: int, device: str, bf16: bool, checkpointing: bool, repeats: int) -> dict:
    """Median step time (s) and peak memory (GiB) of one configuration."""
    torch.manual_seed(0)
    net, loss_step = _build(name, size, checkpointing)
    net.to(device).train()
    x = torch.rand(1, 1, size, size, size, device=device)
    params = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    loss_step(x, bf16)  # warm-up
    net.zero_grad(set_to_none=True)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        loss_step(x, bf16)
        sync()
        times.append(time.perf_counter() - t)
        net.zero_grad(set_to_none=True)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"net": name, "size": size, "bf16": bf16, "ckpt": checkpointing, "time_s": sorted(times)[len(times) // 2],
            "peak_gib": peak, "params_m": params / 1e6, "trainable_pct": 100 * trainable / params}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--configs", nargs="+", default=["tiny", "vit_b"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one configuration
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return
    dev = args.device
    cpu = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name() if dev == "cuda" else cpu
    print(f"device: {name}; torch {torch.__version__}")
    variants = [(False, False)] if dev == "cpu" else [(False, False), (True, False), (True, True)]
    rows = []
    for size in args.sizes:
        for bf16, ckpt in variants:
            ref = None
            for net in ["swin_unetr", *args.configs]:
                job = dict(name=net, size=size, device=dev, bf16=bf16, checkpointing=ckpt, repeats=args.repeats)
                if dev == "cpu":  # fresh process: peak RSS belongs to this configuration alone
                    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True,
                                         text=True, check=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                else:
                    torch.cuda.empty_cache()
                    r = measure(**job)
                ref = ref or r
                r["time_ratio"], r["mem_ratio"] = r["time_s"] / ref["time_s"], r["peak_gib"] / ref["peak_gib"]
                rows.append(r)
                print(f"{r['net']:<11}{size:>4}^3 bf16={int(bf16)} ckpt={int(ckpt)}  step {r['time_s']:8.3f} s "
                      f"({r['time_ratio']:.2f}x SwinUNETR)  peak {r['peak_gib']:7.2f} GiB ({r['mem_ratio']:.2f}x)  "
                      f"params {r['params_m']:.1f} M, trainable {r['trainable_pct']:.1f}%", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
