"""GPU throughput on a lent device: each figure beside its reference, measured in the same run.

    python benchmarks/gpu.py [--parts swin lite sam3d sw compile] [--out results.json]

- ``swin``: MONAI Swin-UNETR (feature size 48, the BTCV configuration), 96³ crops, batch 2, one
  AdamW training step: fp32, bf16 autocast, bf16 + channels_last_3d. Samples/s and MFU (FLOPs of
  one step counted by ``torch.utils.flop_counter``, against the H100 SXM dense bf16 peak).
- ``lite``: LiteMedSAM (real weights) batch inference, image encoder + box decoding, slices/s in
  fp32 / bf16 / fp16.
- ``sam3d``: medsam3d ViT-B, one training step at 128³ in fp32 and bf16, with the top CUDA kernels
  of each (why bf16 is slower).
- ``sw``: Swin-UNETR sliding-window inference over a 192³ volume: MONAI ``sliding_window_inference``
  fp32 / bf16 against the same with a ``torch.compile``d network; outputs compared.
- ``compile``: the ``swin`` training step with ``torch.compile`` (bf16).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

H100_BF16_DENSE = 989.4e12  # FLOP/s, SXM, dense


def timed(step, warmup: int = 3, repeats: int = 10) -> list[float]:
    """Milliseconds per call, each synchronised."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        out.append(1000 * (time.perf_counter() - t))
    return out


def p50(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def swin_step(mode: str, batch: int = 2, size: int = 96):
    from monai.losses import DiceCELoss
    from monai.networks.nets import SwinUNETR

    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=48).cuda()
    x = torch.randn(batch, 1, size, size, size, device="cuda")
    y = torch.randint(0, 14, (batch, 1, size, size, size), device="cuda")
    if "cl" in mode:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    model = torch.compile(net) if "compile" in mode else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    bf16 = "bf16" in mode

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return net, x, step


def step_flops(net, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        net(x).float().sum().backward()
    net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_swin(results: dict, modes: tuple[str, ...]) -> None:
    flops = None
    for mode in modes:
        torch.cuda.reset_peak_memory_stats()
        net, x, step = swin_step(mode)
        if flops is None:
            flops = step_flops(net, x)
        ms = timed(step, warmup=5 if "compile" in mode else 3)
        rate = x.shape[0] / (p50(ms) / 1000)
        results[f"swin_train_{mode}"] = {"ms_p50": p50(ms), "ms_p95": sorted(ms)[-1], "samples_per_s": rate,
                                         "tflop_per_step": flops / 1e12,
                                         "mfu_vs_bf16_peak": flops / (p50(ms) / 1000) / H100_BF16_DENSE,
                                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        print(f"swin 96^3 b2 {mode:>16}: {p50(ms):7.1f} ms/step  {rate:6.2f} samples/s  "
              f"MFU {results[f'swin_train_{mode}']['mfu_vs_bf16_peak']:.3f}", flush=True)
        del net, step


def bench_lite(results: dict, batch: int = 32) -> None:
    from medimg.models import build_network

    net = build_network("litemedsam").cuda().eval()
    x = torch.randn(batch, 3, 256, 256, device="cuda")
    boxes = torch.tensor([[60.0, 60.0, 180.0, 190.0]], device="cuda").repeat(batch, 1)
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        def run(dtype=dtype):
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32,
                                                        enabled=dtype is not None):
                emb = net.encode(x)
                net.decode(emb, boxes=boxes)
        ms = timed(run, warmup=3, repeats=10)
        results[f"litemedsam_batch{batch}_{name}"] = {"ms_p50": p50(ms), "slices_per_s": batch / (p50(ms) / 1000)}
        rate = batch / (p50(ms) / 1000)
        print(f"litemedsam batch {batch} {name}: {p50(ms):.1f} ms  {rate:.0f} slices/s", flush=True)


SAM3D_VARIANTS = ("fp32", "bf16", "bf16_native", "bf16_compile", "fp32_compile", "bf16_cudagraph", "fp32_cudagraph")


def bench_sam3d(results: dict, size: int = 128, variants: tuple[str, ...] = SAM3D_VARIANTS) -> None:
    """medsam3d ViT-B training step. ``bf16`` is the product (instance norms and the adapters'
    depth-wise convolutions in float32); ``bf16_native`` the earlier code (both in bf16); ``*_compile``
    with the image encoder compiled in place (``compile=true`` in the training config)."""
    from monai.losses import DiceLoss
    from torch.profiler import ProfilerActivity, profile

    from medimg.models import build_network
    from medimg.models.compiling import compile_encoder
    from medimg.models.peft import apply_freeze_policy
    from medimg.models.precision import Float32Forward

    x = torch.randn(1, 1, size, size, size, device="cuda")
    target = torch.zeros(1, 1, size, size, size, device="cuda")
    target[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    pts = (torch.full((1, 1, 3), size / 2, device="cuda"), torch.ones(1, 1, dtype=torch.int64, device="cuda"))
    dice = DiceLoss(sigmoid=True)
    fp32_forward = Float32Forward.forward
    for name in variants:
        torch.manual_seed(0)
        net = build_network("medsam3d", size="vit_b").cuda()
        apply_freeze_policy(net, "adapters_only")
        if "compile" in name or "cudagraph" in name:
            compile_encoder(net, "reduce-overhead" if "cudagraph" in name else None)
        Float32Forward.forward = (lambda self, x: super(Float32Forward, self).forward(x)) if "native" in name \
            else fp32_forward
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        bf16 = name.startswith("bf16")

        def step(bf16=bf16, net=net, opt=opt):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                logits, _ = net.decode(net.encode(x), points=pts)
                loss = dice(logits.float(), target)
            loss.backward()
            opt.step()
        t = time.perf_counter()
        ms = timed(step, warmup=4 if "compile" in name or "cudagraph" in name else 2, repeats=8)
        results[f"medsam3d_vitb_{size}_{name}"] = {"ms_p50": p50(ms), "first_steps_s": time.perf_counter() - t}
        print(f"medsam3d ViT-B {size}^3 {name}: {p50(ms):.1f} ms/step", flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernel_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
        results[f"medsam3d_vitb_{size}_{name}"]["gpu_kernel_ms"] = kernel_ms
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60)
        results[f"medsam3d_vitb_{size}_{name}"]["top_kernels"] = table
        print(f"  GPU kernel time {kernel_ms:.1f} ms", flush=True)
        del net, opt
        torch.cuda.empty_cache()
    Float32Forward.forward = fp32_forward
    base = results[f"medsam3d_vitb_{size}_fp32"]["ms_p50"]
    for name in variants:
        r = results[f"medsam3d_vitb_{size}_{name}"]
        r["speedup_vs_fp32"] = base / r["ms_p50"]
        print(f"{name}: {r['speedup_vs_fp32']:.2f}x fp32", flush=True)


def bench_sliding_window(results: dict) -> None:
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SwinUNETR

    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=48).cuda().eval()
    vol = torch.randn(1, 1, 192, 192, 192, device="cuda")
    outs = {}
    for name, model, bf16 in (("monai_fp32", net, False), ("monai_bf16", net, True),
                              ("compiled_bf16", torch.compile(net), True)):
        def run(name=name, model=model, bf16=bf16):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                outs[name] = sliding_window_inference(vol, (96, 96, 96), 4, model, overlap=0.25, mode="gaussian")
        ms = timed(run, warmup=2, repeats=5)
        results[f"swin_sw192_{name}"] = {"ms_p50": p50(ms)}
        print(f"sliding window 192^3 {name}: {p50(ms):.0f} ms", flush=True)
    same = (outs["compiled_bf16"].argmax(1) == outs["monai_bf16"].argmax(1)).float().mean().item()
    results["swin_sw192_compiled_vs_monai_bf16_label_agreement"] = same
    print(f"compiled vs plain (bf16) label agreement {same:.5f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["swin", "lite", "sam3d", "sw", "compile"])
    parser.add_argument("--sam3d-variants", nargs="+", default=None, help="fp32 bf16 bf16_native bf16_compile ...")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "python": platform.python_version()}
    print(results, flush=True)
    parts = {"swin": lambda: bench_swin(results, ("fp32", "bf16", "bf16_cl")), "lite": lambda: bench_lite(results),
             "sam3d": lambda: bench_sam3d(results, variants=tuple(args.sam3d_variants or SAM3D_VARIANTS)),
             "sw": lambda: bench_sliding_window(results),
             "compile": lambda: bench_swin(results, ("bf16_compile",))}
    for part in args.parts:
        t = time.perf_counter()
        try:
            parts[part]()
        except Exception as exc:  # noqa: BLE001 - report and go on to the next figure
            results[f"{part}_error"] = repr(exc)[:500]
            print(f"{part} failed: {exc!r}"[:500], flush=True)
        print(f"[{part}: {time.perf_counter() - t:.0f} s]", flush=True)
        torch.cuda.empty_cache()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
