"""Training speed of our paper-faithful ViT, Mixer and ConvMixer against timm's, side by side.

Prints img/s and ratios (ours / timm) in fp32 and bf16 autocast, the six backbone mixers at
one size, and achieved GFLOP/s against this machine's matmul peak measured in the same run.
Measurements alternate between the two implementations (A B A B ...) and take the median,
so background load hits both alike. Usage: python benchmarks/bench_models.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from ablate.cost import count_gmacs
from ablate.models import MIXERS, create_model
from ablate.models.reference import ConvMixer, MlpMixer, VisionTransformer


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
    return 2 * n**3 * k / (time.perf_counter() - t0) / 1e9


def train_step_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
                    steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    ctx = (torch.autocast("cpu", dtype=dtype) if dtype != torch.float32
           else torch.autocast("cpu", enabled=False))

    def step() -> None:
        with ctx:
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return x.shape[0] * steps / (time.perf_counter() - t0)


def compare(pairs: dict, x, y, dtype, rounds: int, steps: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {k: [] for k in pairs}
    for _ in range(rounds):
        for k, m in pairs.items():
            rates[k].append(train_step_rate(m, x, y, dtype, steps))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps (noisier)")
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    import timm.models.convmixer as tcm
    import timm.models.mlp_mixer as tmm
    import timm.models.vision_transformer as tvit

    torch.manual_seed(0)
    rounds, steps = (2, 2) if args.quick else (3, 4)
    bs = args.batch_size
    x = torch.randn(bs, 3, 32, 32)
    y = torch.randint(0, 10, (bs,))
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"threads {torch.get_num_threads()}, batch {bs}, 32x32, 10 classes")
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    families = {
        "ViT d256 x8 p4": (
            VisionTransformer(image_size=32, patch_size=4, num_classes=10, dim=256, depth=8,
                              heads=8),
            tvit.VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=256,
                                   depth=8, num_heads=8)),
        "Mixer d256 x8 p4": (
            MlpMixer(image_size=32, patch_size=4, num_classes=10, dim=256, depth=8),
            tmm.MlpMixer(img_size=32, patch_size=4, num_classes=10, embed_dim=256,
                         num_blocks=8)),
        "ConvMixer-256/8 p2 k5": (
            ConvMixer(dim=256, depth=8, kernel_size=5, patch_size=2, num_classes=10),
            tcm.ConvMixer(dim=256, depth=8, kernel_size=5, patch_size=2, num_classes=10)),
    }
    print(f"\n{'model':24s} {'dtype':5s} {'ours img/s':>10s} {'timm img/s':>10s} "
          f"{'ours/timm':>9s} {'GFLOP/s':>8s} {'% peak':>7s}")
    for name, (ours, theirs) in families.items():
        macs = count_gmacs(ours, 32) * 1e9
        for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            r = compare({"ours": ours, "timm": theirs}, x, y, dtype, rounds, steps)
            o, t = statistics.median(r["ours"]), statistics.median(r["timm"])
            gflops = 6 * macs * o / 1e9  # forward + backward ~ 3x forward, 2 FLOPs per MAC
            print(f"{name:24s} {dname:5s} {o:10.1f} {t:10.1f} {o / t:9.2f}x {gflops:8.1f} "
                  f"{100 * gflops / peaks[dname]:6.1f}%")
    layouts = {}
    cm = families["ConvMixer-256/8 p2 k5"][0]
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for fmt in ("contiguous", "channels_last"):
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            m = cm.to(memory_format=mf)
            xx = x.contiguous(memory_format=mf)
            layouts[(dname, fmt)] = statistics.median(
                compare({"m": m}, xx, y, dtype, rounds, steps)["m"])
    base = layouts[("fp32", "contiguous")]
    print("\nConvMixer-256/8 CPU layouts (training img/s, relative to fp32 contiguous):")
    for (dname, fmt), v in layouts.items():
        print(f"  {dname} {fmt:13s} {v:8.1f} img/s  {v / base:5.2f}x")
    print("\nbackbone mixers, dim 256, depth 8, patch 4, heads 8, window 4 (training img/s):")
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        row = []
        for mixer in MIXERS:
            m = create_model(mixer=mixer, dim=256, depth=8, patch_size=4, heads=8,
                             window_size=4, image_size=32, num_classes=10)
            rate = statistics.median(compare({"m": m}, x, y, dtype, 1 if args.quick else 2,
                                             steps)["m"])
            row.append(f"{mixer} {rate:.0f}")
        print(f"  {dname}: " + ", ".join(row))


if __name__ == "__main__":
    main()
