"""Input pipeline: our on-device batched augmentation vs a torchvision DataLoader, and the
CIFAR-10 archive's first (decode) vs cached load. Ratios measured side by side in one run.

Usage: python benchmarks/bench_data.py [--archive ../shared/data/cifar10-jpg.tar.gz]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ablate.data import Batches, load_dataset
from ablate.study import DatasetSpec

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


class ArrayDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does: one PIL image per item, transforms per image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def batches_per_s(it, n: int) -> float:
    it = iter(it)
    next(it)  # warm-up (and worker start-up)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archive", default=str(ARCHIVE))
    ap.add_argument("--batches", type=int, default=100)
    args = ap.parse_args()
    archive = Path(args.archive)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ABLATE_CACHE"] = cache
        spec = DatasetSpec(name="imagefolder", root=str(archive)) if archive.exists() else \
            DatasetSpec(train_size=50000, test_size=1000)
        t0 = time.perf_counter()
        data = load_dataset(spec)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_dataset(spec)
        cached = time.perf_counter() - t0
    print(f"dataset: {'CIFAR-10 archive ' + str(archive) if archive.exists() else 'synthetic'}"
          f" ({len(data.train)} train images)")
    if archive.exists():
        print(f"load: first (decode) {first:.1f} s, cached {cached:.2f} s, "
              f"{first / cached:.0f}x faster (goal: cached < 2 s)")
    import torchvision.transforms as T

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(data.mean, data.std)])
    imgs = data.train.images.permute(0, 2, 3, 1).contiguous().numpy()
    loader = torch.utils.data.DataLoader(ArrayDataset(imgs, data.train.labels.numpy(), tf),
                                         batch_size=128, shuffle=True, num_workers=2,
                                         drop_last=True, persistent_workers=True)
    ours = Batches(data.train, data.mean, data.std, 128, shuffle=True, augment=("crop", "flip"),
                   drop_last=True)
    n = min(args.batches, len(ours) - 1)
    rates = {"ours": [], "torchvision": []}
    for _ in range(2):  # alternate, so background load hits both
        rates["ours"].append(batches_per_s(ours, n))
        rates["torchvision"].append(batches_per_s(loader, n))
    o, t = max(rates["ours"]), max(rates["torchvision"])
    print(f"augmented 32x32 batches of 128: ours {o:.0f}/s, torchvision DataLoader (2 workers) "
          f"{t:.1f}/s: ours is {o / t:.1f}x faster (goal >= 10x)")


if __name__ == "__main__":
    main()
