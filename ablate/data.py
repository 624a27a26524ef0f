"""Datasets, the data axis (nested class-balanced fractions) and on-device batches.

Torch only (plus PIL for decoding). Whole splits live in memory as uint8 tensors; batches
are cast, augmented and normalized as batched tensor ops on the trial's device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ablate.errors import DataError
from ablate.sources import (  # noqa: F401  (re-exported: ablate.data is the public entry)
    IMAGE_SUFFIXES,
    Source,
    cache_dir,
    cifar_source,
    imagefolder_source,
    load_source,
    resolve_root,
    synthetic_source,
)
from ablate.study import DatasetSpec


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    _on: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False)  # copies on other devices, by device

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) on `device`: on a GPU, one copy per split, which every seed of a
        cell and every evaluation shares (a copy per `Batches` was a train split per seed and
        new val and test splits each epoch); on the CPU, the split's own tensors."""
        if device.type == "cpu":
            return self.images, self.labels
        key = str(device)
        if key not in self._on:
            self._on[key] = (self.images.to(device), self.labels.to(device))
        return self._on[key]


@dataclass
class DataBundle:
    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]  # per channel, in [0, 1] units, of the training split
    std: tuple[float, ...]
    n_train_full: int = 0  # training images at dataset.fraction 1.0 (what `budget: steps` uses)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])


# ---------------------------------------------------------------- splits and the data axis

def _class_perms(labels: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def stratified_cap(labels: np.ndarray, n_max: int, num_classes: int, seed: int) -> np.ndarray:
    """Indices of a class-stratified subset of at most n_max items."""
    if n_max >= len(labels):
        return np.arange(len(labels))
    perms = _class_perms(labels, num_classes, seed)
    keep = [p[: round(len(p) * n_max / len(labels))] for p in perms]
    return np.sort(np.concatenate(keep))


def split_indices(labels: np.ndarray, num_classes: int, val_fraction: float, fraction: float,
                  seed: int, classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: a fixed stratified val hold-out, then a nested class-balanced
    `fraction` of the rest. Every prefix comes from one per-class permutation, so a smaller
    fraction's subset is inside a larger one's and val never changes with the fraction."""
    train, val = [], []
    for c, perm in enumerate(_class_perms(labels, num_classes, seed)):
        n_val = round(len(perm) * val_fraction)
        rest = perm[n_val:]
        n_train = round(len(rest) * fraction)
        name = classes[c] if classes else str(c)
        if len(perm) == 0:
            raise DataError(f"dataset: class '{name}' has no training images")
        if n_train == 0:
            raise DataError(f"dataset.fraction: {fraction} leaves class '{name}' with no "
                            f"training image (it has {len(rest)} after the val hold-out); "
                            "raise dataset.fraction or dataset.max_train")
        val.append(perm[:n_val])
        train.append(rest[:n_train])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def full_train_size(labels: np.ndarray, num_classes: int, val_fraction: float) -> int:
    """Training images at fraction 1.0: everything but the per-class val hold-out."""
    counts = np.bincount(labels, minlength=num_classes)
    return int(sum(int(n) - round(int(n) * val_fraction) for n in counts))


def _to_channels(x: np.ndarray, channels: int | None, origin: str) -> np.ndarray:
    if channels is None or channels == x.shape[1]:
        return x
    if channels > x.shape[1]:
        raise DataError(f"dataset.channels: {channels} requested but the images of {origin} "
                        f"have {x.shape[1]}; use channels: {x.shape[1]} or leave it out")
    if channels == 1 and x.shape[1] == 3:  # ITU-R 601 luma
        w = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)[None, :, None, None]
        return (x.astype(np.float32) * w).sum(1, keepdims=True).round().astype(np.uint8)
    raise DataError(f"dataset.channels: cannot make {channels} channels from "
                    f"{x.shape[1]}; use 1 (grayscale) or {x.shape[1]}")


def _resize(x: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = []
    for s in range(0, len(x), 1024):
        t = torch.from_numpy(x[s:s + 1024]).float()
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        out.append(t.round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


def load_dataset(spec: DatasetSpec, root: Path | None = None) -> DataBundle:
    """Load the dataset of a trial: splits, the data-axis subset and normalization stats."""
    src = load_source(spec, root)
    origin = spec.name if spec.root is None else str(root or spec.root)
    num_classes = len(src.classes)
    tx = _resize(_to_channels(src.train_x, spec.channels, origin), spec.image_size)
    vx = _resize(_to_channels(src.test_x, spec.channels, origin), spec.image_size)
    ty, vy = src.train_y, src.test_y
    if spec.max_train is not None:
        keep = stratified_cap(ty, spec.max_train, num_classes, spec.split_seed)
        tx, ty = tx[keep], ty[keep]
    if spec.max_test is not None:
        keep = stratified_cap(vy, spec.max_test, num_classes, spec.split_seed + 1)
        vx, vy = vx[keep], vy[keep]
    tr, va = split_indices(ty, num_classes, spec.val_fraction, spec.fraction, spec.split_seed,
                           src.classes)
    train = Split(torch.from_numpy(np.ascontiguousarray(tx[tr])), torch.from_numpy(ty[tr]))
    val = Split(torch.from_numpy(np.ascontiguousarray(tx[va])), torch.from_numpy(ty[va]))
    test = Split(torch.from_numpy(np.ascontiguousarray(vx)), torch.from_numpy(vy))
    f = train.images.float().div_(255)
    mean = tuple(f.mean(dim=(0, 2, 3)).tolist())
    std = tuple(f.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return DataBundle(train, val, test, list(src.classes), mean, std,
                      full_train_size(ty, num_classes, spec.val_fraction))


# ---------------------------------------------------------------- batches

def augment(x: torch.Tensor, padding: int, crop: bool, flip: bool,
            gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the zero-padded batch and random horizontal flip, done as
    one gather over flat pixel indices (no per-image Python loop). Draws, in order: row
    offsets, column offsets (if crop), then flip coins (if flip)."""
    b, c, h, w = x.shape
    p = padding if crop else 0
    if not crop and not flip:
        return x
    dev = x.device
    if p:
        x = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=gen.device).to(dev)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=gen.device).to(dev)
    else:
        oy = ox = torch.zeros(b, dtype=torch.long, device=dev)
    hp, wp = h + 2 * p, w + 2 * p
    cols = torch.arange(w, device=dev).expand(b, w)
    if flip:
        coin = torch.rand(b, generator=gen, device=gen.device).to(dev) < 0.5
        cols = torch.where(coin[:, None], (w - 1) - cols, cols)
    rows = torch.arange(h, device=dev)
    flat = ((oy[:, None, None] + rows[None, :, None]) * wp
            + (ox[:, None] + cols)[:, None, :]).view(b, 1, h * w)
    out = torch.gather(x.reshape(b, c, hp * wp), 2, flat.expand(b, c, h * w))
    return out.view(b, c, h, w)


class Batches:
    """Iterate (images, labels) batches of a split, on `device`, normalized and augmented."""

    def __init__(self, split: Split, mean: tuple[float, ...], std: tuple[float, ...],
                 batch_size: int, device: str | torch.device = "cpu", *, shuffle: bool = False,
                 augment: tuple[str, ...] = (), padding: int = 4, seed: int = 0,
                 channels_last: bool = False, drop_last: bool = False,
                 fill: bool = False) -> None:
        """`fill`: a split smaller than one batch still gives full batches, each its images
        in a new order, then the first of another order's, up to `batch_size` (a `steps`
        budget: every fraction takes the same steps of the same batch size); else such a
        split is one smaller batch."""
        self.device = torch.device(device)
        self.images, self.labels = split.on(self.device)
        c = self.images.shape[1]
        self.mean = torch.tensor(mean, device=self.device).view(1, c, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, device=self.device).view(1, c, 1, 1) * 255)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, tuple(augment)
        self.padding, self.channels_last, self.drop_last = padding, channels_last, drop_last
        self.fill = fill and 0 < len(self.labels) < batch_size
        gdev = "cuda" if self.device.type == "cuda" else "cpu"
        self.gen = torch.Generator(device=gdev).manual_seed(seed)
        self.cpu_gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        if self.fill:
            return 1
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        orders = math.ceil(self.batch_size / n) if self.fill else 1
        order = torch.cat([torch.randperm(n, generator=self.cpu_gen) if self.shuffle
                           else torch.arange(n) for _ in range(orders)])
        order = order[:self.batch_size] if self.fill else order
        order = order.to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = augment(self.images[idx], self.padding, "crop" in self.augment,
                        "flip" in self.augment, self.gen)
            x = (x.float() - self.mean) * self.inv_std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]
