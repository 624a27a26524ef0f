"""Training speed per mixer and setting, and our models against timm's, side by side.

Default: per mixer (attention, mlp, conv, dual, pool, identity) at dim 192, depth 8, patch 2
and 4, 32x32 images, batch 128: training img/s of fp32 contiguous, then of every fixed
(precision, layout) setting `auto` may pick on this machine (--all-settings: emulated bf16
too), of `auto` (the setting the profile's own probe picks, read off that setting's row: a
second timing of the same setting would only add noise) and of `compile` (torch.compile at
auto's setting; its compile time printed apart), as ratios to fp32 contiguous, and auto's
speed over the fastest fixed setting's, beside the spread of the rounds (a gap smaller than
that spread is this run's noise, not a wrong pick). The settings of one model are measured in
interleaved rounds (A B C ... A B C ...) and the median taken, so background load hits all
alike.

`--vs-timm`: our paper-faithful ViT, Mixer and ConvMixer against timm's (img/s, ratios,
GFLOP/s against this machine's matmul peak).

Usage: python benchmarks/bench_models.py [--mixers conv,mlp] [--patches 2,4] [--steps 3]
       [--rounds 3] [--no-compile] [--all-settings] [--vs-timm [--quick]]
"""

from __future__ import annotations

import argparse
import copy
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


def vs_timm(args) -> None:
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


SETTINGS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))


def _name(setting: tuple[str, bool]) -> str:
    return f"{setting[0]}{'/cl' if setting[1] else ''}"


def _prepared(model: nn.Module, setting: tuple[str, bool], compile_: bool = False
              ) -> nn.Module:
    m = copy.deepcopy(model)
    if setting[1]:
        m = m.to(memory_format=torch.channels_last)
    return torch.compile(m) if compile_ else m


def _input(x: torch.Tensor, setting: tuple[str, bool]) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if setting[1] else
                        torch.contiguous_format)


def settings_table(args) -> None:
    from ablate.cost import probe_settings, supported_candidates

    bs = args.batch_size
    torch.manual_seed(0)
    x = torch.randn(bs, 3, 32, 32)
    y = torch.randint(0, 10, (bs,))
    supported = supported_candidates("cpu")
    fixed = [s for s in SETTINGS if args.all_settings or s in supported]
    left = [_name(s) for s in SETTINGS if s not in fixed]
    cols = [_name(s) for s in fixed] + ["auto"] + ([] if args.no_compile else ["compile"])
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, batch {bs}, 32x32, "
          f"10 classes, dim {args.dim}, depth {args.depth}; {args.rounds} interleaved rounds x "
          f"{args.steps} steps, medians; ratios to fp32 contiguous")
    if left:
        print(f"not timed: {', '.join(left)} (no native bf16 kernels on this CPU, so `auto` "
              "never picks them; --all-settings times them anyway)")
    print("auto = the fixed setting the profile's probe picked (its own short probe at batch "
          f"{args.probe_batch_size or args.batch_size}), timed here as that setting; auto/best "
          "= its speed over the fastest fixed setting's, in this same run (goal >= 0.95)")
    print(f"{'mixer':9s} {'p':>2s} {'fp32 img/s':>10s} " + " ".join(f"{c:>8s}" for c in cols)
          + f" {'auto/best':>9s} {'spread':>6s} {'auto pick':>9s} {'probe s':>7s} "
          f"{'compile s':>9s}")
    print("spread = (max - min) / median over the rounds of the fastest fixed setting or of "
          "auto's pick, the larger: a gap below it is within this run's noise")
    misses, noisy = [], []
    for patch in args.patches:
        for mixer in args.mixers:
            model = create_model(mixer=mixer, dim=args.dim, depth=args.depth, patch_size=patch,
                                 heads=max(1, args.dim // 64), window_size=4, image_size=32,
                                 num_classes=10)
            t0 = time.perf_counter()
            pick, _ = probe_settings(model, 32, 3, 10,
                                     batch_size=args.probe_batch_size or args.batch_size,
                                     min_seconds=args.probe_seconds)
            probe_s = time.perf_counter() - t0
            runs = {_name(s): (_prepared(model, s), _input(x, s), s) for s in fixed}
            compile_s = float("nan")
            if not args.no_compile:
                # each model is a new entry in the cache of Backbone.forward; past dynamo's
                # recompile limit (8) it would run eager and `compile` would time eager
                torch._dynamo.reset()
                m = _prepared(model, pick, compile_=True)
                t0 = time.perf_counter()
                train_step_rate(m, _input(x, pick), y, DT[pick[0]], 0)  # compiles
                compile_s = time.perf_counter() - t0
                runs["compile"] = (m, _input(x, pick), pick)
            rates: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.rounds):
                for k, (m, xx, s) in runs.items():
                    rates[k].append(train_step_rate(m, xx, y, DT[s[0]], args.steps))
            med = {k: statistics.median(v) for k, v in rates.items()}
            med["auto"] = med.get(_name(pick), float("nan"))
            base = med["fp32"]
            top = max(fixed, key=lambda s: med[_name(s)])
            best = med[_name(top)]
            spread = max((max(rates[_name(s)]) - min(rates[_name(s)])) / med[_name(s)]
                         for s in {top, pick} if _name(s) in rates)
            if med["auto"] / best < 0.95:
                (noisy if 1 - med["auto"] / best <= spread else misses).append(
                    f"{mixer} p{patch}")
            print(f"{mixer:9s} {patch:2d} {base:10.1f} "
                  + " ".join(f"{med[c] / base:7.2f}x" for c in cols)
                  + f" {med['auto'] / best:9.2f} {spread:6.2f} {_name(pick):>9s} "
                  f"{probe_s:7.1f} {compile_s:9.1f}", flush=True)
    print("auto within 5% of the fastest fixed setting: "
          + ("every model" if not misses and not noisy else "not for "
             + ", ".join(misses + [f"{n} (a gap within the rounds' spread)" for n in noisy])))


DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vs-timm", action="store_true", help="our models against timm's")
    ap.add_argument("--quick", action="store_true", help="--vs-timm: fewer steps (noisier)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--mixers", type=lambda s: s.split(","), default=list(MIXERS))
    ap.add_argument("--patches", type=lambda s: [int(p) for p in s.split(",")], default=[2, 4])
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--probe-batch-size", type=int, default=None,
                    help="the auto probe's batch (default: --batch-size, as in a study: the "
                    "probe times the batch the trials train at)")
    ap.add_argument("--probe-seconds", type=float, default=0.5,
                    help="the auto probe's budget per setting (train.profile_seconds)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--all-settings", action="store_true",
                    help="also time the settings auto may not pick here (emulated bf16)")
    args = ap.parse_args()
    if args.vs_timm:
        vs_timm(args)
    else:
        settings_table(args)


if __name__ == "__main__":
    main()
