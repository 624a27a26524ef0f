"""Where images come from: synthetic data, CIFAR pickles and image folders/archives.

Each reader returns a `Source` (uint8 arrays, whole splits in memory); decoded image folders are
cached as .npz keyed by each file's path, size, mtime and ctime (`_cache_path`).
"""

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import pickle
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from ablate.cache import cache_dir
from ablate.errors import DataError
from ablate.study import DatasetSpec, expand_vars

CACHE_VERSION = 1
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm"}



@dataclass
class Source:
    train_x: np.ndarray  # (N, C, H, W) uint8
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]


# ---------------------------------------------------------------- synthetic

def synthetic_source(image_size: int = 32, num_classes: int = 10, channels: int = 3,
                     train_size: int = 5000, test_size: int = 1000, seed: int = 0) -> Source:
    """Procedural class-conditional images with a global (layout) and a local (texture) cue.

    A class is a pair (where the object is, which texture it has): classifying needs both the
    layout, which only token mixing can relate, and the texture, which a patch sees alone.
    Jitter, a textured distractor, random colours and noise keep it from being trivial.
    """
    n_tex = 2 if num_classes > 1 else 1
    n_lay = math.ceil(num_classes / n_tex)
    g = torch.Generator().manual_seed(10_007 * seed + 17)
    # class layouts: anchor points on a ring; class textures: grating orientation/frequency
    angles = torch.arange(n_lay) * (2 * math.pi / n_lay)
    anchors = torch.stack([0.5 + 0.28 * torch.cos(angles), 0.5 + 0.28 * torch.sin(angles)], 1)
    tex_theta = torch.arange(n_tex) * (math.pi / n_tex) + math.pi / 8
    tex_freq = 0.30 + 0.12 * torch.arange(n_tex)

    def make(n: int, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=gen)]
        out = torch.empty(n, channels, image_size, image_size, dtype=torch.uint8)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, image_size), torch.linspace(0, 1, image_size),
                                indexing="ij")
        px = torch.arange(image_size, dtype=torch.float32)
        py, pxx = torch.meshgrid(px, px, indexing="ij")
        for s in range(0, n, 512):
            lab = labels[s:s + 512]
            b = lab.shape[0]
            lay, tex = lab // n_tex, lab % n_tex
            center = anchors[lay] + 0.08 * torch.randn(b, 2, generator=gen)
            d_center = torch.rand(b, 2, generator=gen) * 0.8 + 0.1
            d_tex = torch.randint(0, n_tex, (b,), generator=gen)
            radius = 0.16 + 0.04 * torch.rand(b, generator=gen)

            def blob(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
                d2 = (xx[None] - c[:, 0, None, None]) ** 2 + (yy[None] - c[:, 1, None, None]) ** 2
                return torch.exp(-d2 / (2 * (r[:, None, None] ** 2)))

            def grating(t: torch.Tensor) -> torch.Tensor:
                th = tex_theta[t] + 0.15 * torch.randn(t.shape[0], generator=gen)
                fr = tex_freq[t] * (1 + 0.1 * torch.randn(t.shape[0], generator=gen))
                phase = 2 * math.pi * torch.rand(t.shape[0], generator=gen)
                u = pxx[None] * torch.cos(th)[:, None, None] + py[None] * torch.sin(th)[:, None,
                                                                                           None]
                return torch.cos(2 * math.pi * fr[:, None, None] * u / 2 + phase[:, None, None])

            obj = blob(center, radius) * (0.6 + 0.4 * grating(tex))
            dis = 0.7 * blob(d_center, radius * 0.8) * (0.6 + 0.4 * grating(d_tex))
            base = obj + dis  # (b, H, W)
            color = 0.4 + 0.6 * torch.rand(b, channels, generator=gen)
            bg = 0.25 * torch.rand(b, channels, generator=gen)
            img = bg[:, :, None, None] + color[:, :, None, None] * base[:, None]
            img = img + 0.18 * torch.randn(img.shape, generator=gen)
            out[s:s + b] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        return out.numpy(), labels.numpy().astype(np.int64)

    tx, ty = make(train_size, g)
    vx, vy = make(test_size, g)
    return Source(tx, ty, vx, vy, [f"class_{i}" for i in range(num_classes)])


# ---------------------------------------------------------------- CIFAR (python pickle)

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches' dicts, lists and numpy arrays, and nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                                                            "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "dict"),
               ("builtins", "list")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable CIFAR batch ({e}); delete it and download "
                        "again") from None


def _download_once(root: Path, name: str, base: Path, folder: str) -> None:
    """Download under a file lock: trials (or nodes sharing a folder) that need the data at
    the same time wait for one download instead of writing the same files together."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.download.lock")):
        if base.is_dir():  # another trial finished it while we waited
            return
        try:
            import torchvision.datasets as tvd

            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            cls(str(root), train=True, download=True)
        except Exception as e:  # noqa: BLE001 - any network failure means the same fix
            raise DataError(
                f"dataset.root: {base} is missing and downloading {name} failed ({e}); put "
                f"the extracted '{folder}' folder under {root}") from None


def check_root(spec: DatasetSpec, root: Path) -> None:
    """What the driver checks once before Ray starts, so a bad root is one clear error and
    not every trial failing and retrying: it exists, is readable, and has the layout."""
    if spec.name in ("cifar10", "cifar100"):
        folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[spec.name]
        if not (root / folder).is_dir() and not spec.download:
            raise DataError(f"dataset.root: {root / folder} not found; put the extracted "
                            f"'{folder}' folder under {root}, or set dataset.download: true "
                            "where the network allows")
        return
    if not root.exists():
        raise DataError(f"dataset.root: {root} not found; point it at a folder or a "
                        ".tar.gz/.zip with train/<class>/* and test/<class>/* "
                        "(e.g. export ABLATE_DATA=../shared/data for the CIFAR-10 JPEGs)")
    if not os.access(root, os.R_OK | (os.X_OK if root.is_dir() else 0)):
        raise DataError(f"dataset.root: {root} is not readable by this user; fix its "
                        "permissions")
    if root.is_dir():
        tops = [root, *(p for p in root.iterdir() if p.is_dir())]
        if not any((t / "train").is_dir() for t in tops):
            raise DataError(f"dataset.root: {root} has no train/ folder (nor one level down); "
                            "an image folder needs train/<class>/* and test/<class>/*")
    elif not (tarfile.is_tarfile(root) or zipfile.is_zipfile(root)):
        raise DataError(f"dataset.root: {root} is not a folder, .tar, .tar.gz or .zip")


def cifar_source(root: Path, name: str, download: bool) -> Source:
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    base = root / folder
    if not base.is_dir():
        if download:
            _download_once(root, name, base, folder)
        else:
            raise DataError(
                f"dataset.root: {base} not found; put the extracted '{folder}' folder "
                f"under {root}, or set dataset.download: true where the network allows")
    if name == "cifar10":
        train_files = [base / f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, meta = [base / "test_batch"], b"labels", base / "batches.meta"
        names_key = b"label_names"
    else:
        train_files, test_files = [base / "train"], [base / "test"]
        label_key, meta, names_key = b"fine_labels", base / "meta", b"fine_label_names"

    def read(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            if not f.exists():
                raise DataError(f"dataset.root: {f} is missing from {base}; re-download {name}")
            d = _read_cifar_batch(f)
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    tx, ty = read(train_files)
    vx, vy = read(test_files)
    names = [n.decode() for n in _read_cifar_batch(meta)[names_key]] if meta.exists() else [
        str(i) for i in range(int(ty.max()) + 1)]
    return Source(tx, ty, vx, vy, names)


# ---------------------------------------------------------------- image folders and archives

def _check_member(archive: Path, name: str, *, is_link: bool, is_special: bool) -> None:
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or (parts and parts[0].endswith(":")):
        raise DataError(f"{archive}: refusing archive member {name!r}: absolute path")
    if ".." in parts:
        raise DataError(f"{archive}: refusing archive member {name!r}: '..' in its path")
    if is_link:
        raise DataError(f"{archive}: refusing archive member {name!r}: links are not allowed")
    if is_special:
        raise DataError(f"{archive}: refusing archive member {name!r}: device or special file")


def _limit(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class _Budget:
    """Caps on what a folder or archive may hold, checked while reading (a zip bomb is cut
    off at the cap, not inflated first). Raise them with the named environment variables."""

    def __init__(self, root: Path) -> None:
        self.root, self.members, self.total = root, 0, 0
        self.max_members = _limit("ABLATE_MAX_MEMBERS", 5_000_000)
        self.max_member = _limit("ABLATE_MAX_FILE_BYTES", 256 << 20)
        self.max_total = _limit("ABLATE_MAX_DATA_BYTES", 64 << 30)

    def read(self, member: str, stream: IO[bytes]) -> bytes:
        self.members += 1
        if self.members > self.max_members:
            raise DataError(f"{self.root}: more than {self.max_members:,} files (at {member!r}); "
                            "refusing it (raise ABLATE_MAX_MEMBERS if it is really a dataset)")
        data = stream.read(self.max_member + 1)
        if len(data) > self.max_member:
            raise DataError(f"{self.root}: member {member!r} is over {self.max_member:,} bytes "
                            "uncompressed; refusing it (raise ABLATE_MAX_FILE_BYTES if it is "
                            "really an image)")
        self.total += len(data)
        if self.total > self.max_total:
            raise DataError(f"{self.root}: over {self.max_total:,} bytes uncompressed (at "
                            f"{member!r}); refusing it (raise ABLATE_MAX_DATA_BYTES)")
        return data


def _folder_files(root: Path) -> list[tuple[Path, os.stat_result]]:
    """Every regular file under a folder with its stat, in path order, through linked folders
    (`ln -s /data/imagenet/train/n01440764 subset/`: how a subset is made); a link that leads
    nowhere, or back up its own tree, is left out."""
    out = []

    def walk(folder: str, chain: frozenset[str]) -> None:
        with os.scandir(folder) as entries:
            for e in entries:
                if e.is_dir():  # through a link too
                    real = os.path.realpath(e.path)
                    if real not in chain:
                        walk(e.path, chain | {real})
                elif e.is_file():  # a dangling link is neither
                    out.append((Path(e.path), e.stat()))

    walk(str(root), frozenset({os.path.realpath(root)}))
    return sorted(out, key=lambda f: f[0])


def _iter_files(root: Path) -> Iterator[tuple[str, bytes]]:
    """(relative path, bytes) of every regular file in a folder or a safe archive."""
    budget = _Budget(root)
    if root.is_dir():
        for p, _ in _folder_files(root):
            rel = p.relative_to(root).as_posix()
            with open(p, "rb") as f:
                yield rel, budget.read(rel, f)
        return
    name = root.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(root) as zf:
            for info in zf.infolist():
                mode = info.external_attr >> 16
                _check_member(root, info.filename, is_link=stat.S_ISLNK(mode),
                              # no type bits (Python's writestr): a plain file
                              is_special=stat.S_IFMT(mode) not in (0, stat.S_IFREG,
                                                                   stat.S_IFDIR))
                if not info.is_dir():
                    with zf.open(info) as f:
                        yield info.filename, budget.read(info.filename, f)
        return
    try:
        tf = tarfile.open(root, mode="r:*")
    except tarfile.TarError as e:
        raise DataError(f"dataset.root: {root} is not a folder, .tar, .tar.gz or .zip ({e})"
                        ) from None
    with tf:
        for m in tf:
            _check_member(root, m.name, is_link=m.issym() or m.islnk(),
                          is_special=m.ischr() or m.isblk() or m.isfifo() or m.isdev())
            if m.isfile():
                f = tf.extractfile(m)
                if f is not None:
                    yield m.name, budget.read(m.name, f)


def _decode(origin: str, data: bytes, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    max_pixels = _limit("ABLATE_MAX_IMAGE_PIXELS", 8192 * 8192)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > max_pixels:  # the header only: nothing decoded yet
                raise DataError(f"{origin}: image of {im.size[0]}x{im.size[1]} pixels, over "
                                f"the {max_pixels:,}-pixel limit (a decompression bomb?); "
                                "refusing it (raise ABLATE_MAX_IMAGE_PIXELS)")
            im = im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F", "LA") else "RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as e:
        raise DataError(f"{origin}: unreadable or corrupt image ({e}); remove or replace it"
                        ) from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def imagefolder_source(root: Path, size: int | None) -> Source:
    """`train/<class>/*` and `test/<class>/*` (or `val/`) from a folder or an archive."""
    files: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    prefix: str | None = None
    for rel, data in _iter_files(root):
        parts = rel.strip("/").split("/")
        # accept one enclosing folder (archive/<top>/train/...)
        for i, p in enumerate(parts[:2]):
            if p in ("train", "test", "val") and len(parts) - i == 3:
                if prefix is None:
                    prefix = "/".join(parts[:i])
                if "/".join(parts[:i]) == prefix:
                    split = "test" if p == "val" else p
                    if Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES:
                        files.setdefault(split, {}).setdefault(parts[i + 1], []).append(
                            (rel, data))
                    else:
                        files.setdefault(split, {}).setdefault(parts[i + 1], [])
                break
    if "train" not in files:
        raise DataError(f"dataset.root: {root} has no train/<class>/<image> files; an image "
                        "folder needs train/<class>/* and test/<class>/* (or val/)")
    if "test" not in files:
        raise DataError(f"dataset.root: {root} has no test/<class>/* (or val/<class>/*) "
                        "files; add a test split")
    train_c, test_c = sorted(files["train"]), sorted(files["test"])
    if train_c != test_c:
        only_tr = sorted(set(train_c) - set(test_c))
        only_te = sorted(set(test_c) - set(train_c))
        raise DataError(f"dataset.root: {root}: class folders differ between train and test "
                        f"(only in train: {only_tr}; only in test: {only_te}); make them match")
    for split in ("train", "test"):
        for c in train_c:
            if not files[split][c]:
                raise DataError(f"dataset.root: {root}: class '{c}' has no images in {split}/; "
                                "add images or remove the class")
    out = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for ci, c in enumerate(train_c):
            for rel, data in sorted(files[split][c]):
                xs.append(_decode(f"{root}: {rel}", data, size))
                ys.append(ci)
        shapes = {x.shape[1:] for x in xs}
        if len(shapes) > 1:
            raise DataError(f"dataset.image_size: images in {root} differ in size "
                            f"({sorted(shapes)[:3]}); set dataset.image_size to resize them")
        chans = {x.shape[0] for x in xs}
        if len(chans) > 1:  # mixed grayscale and RGB: make all RGB
            xs = [np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x for x in xs]
        out[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    tc, vc = out["train"][0].shape[1], out["test"][0].shape[1]
    if tc != vc:
        out = {k: (np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x, y)
               for k, (x, y) in out.items()}
    return Source(out["train"][0], out["train"][1], out["test"][0], out["test"][1], train_c)


# ---------------------------------------------------------------- cache
def _cache_path(root: Path, size: int | None) -> Path:
    """The cache file of a folder or archive decoded at `size`, keyed by the path and each
    file's name, size, mtime and ctime (which moves on every write, even where a copy keeps
    the old mtime: `cp -p`, `rsync -a`, `tar x`)."""
    h = hashlib.sha256(json.dumps([str(root.resolve()), size, CACHE_VERSION]).encode())
    for p, st in _folder_files(root) if root.is_dir() else [(root, root.stat())]:
        h.update(f"{p.relative_to(root).as_posix() if p != root else ''}\0{st.st_size}\0"
                 f"{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return cache_dir() / f"{root.name}-{h.hexdigest()[:16]}.npz"


def _load_cached(path: Path) -> Source | None:
    """The cached source; None where it cannot be read whole (cut short by a crash): decode."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return Source(z["train_x"], z["train_y"], z["test_x"], z["test_y"],
                          [str(c) for c in z["classes"]])
    except Exception:  # zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError, ...
        return None


def _save_cached(path: Path, src: Source) -> None:
    """Write atomically: a temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, train_x=src.train_x, train_y=src.train_y, test_x=src.test_x,
                     test_y=src.test_y, classes=np.asarray(src.classes))
            f.flush()
            os.fsync(f.fileno())  # on disk before its name is: a crash leaves no short file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_root(spec: DatasetSpec, base: Path | None = None) -> Path:
    """Expand ${VAR} and ~ in dataset.root; relative paths are relative to `base` (or cwd).
    Without `root`, `$ABLATE_DATA` is the root, for cifar10/cifar100 (the folder holding the
    extracted batches) and imagefolder (the folder or archive with train/ and test/) alike."""
    if spec.root is None:
        env = os.environ.get("ABLATE_DATA")
        if not env:
            raise DataError(f"dataset.root: not set for dataset '{spec.name}' and ABLATE_DATA "
                            "is not set; give dataset.root in the study file or export "
                            "ABLATE_DATA=/path/to/data")
        p = Path(env)
    else:
        try:
            p = Path(expand_vars(spec.root))
        except KeyError as e:
            raise DataError(f"dataset.root: environment variable {e.args[0]} is not set; "
                            f"export {e.args[0]}=...") from None
    p = p.expanduser()
    if not p.is_absolute():
        p = (base or Path.cwd()) / p
    return p


def load_source(spec: DatasetSpec, root: Path | None = None) -> Source:
    if spec.name == "synthetic":
        return synthetic_source(spec.image_size or 32, spec.num_classes or 10,
                                spec.channels or 3, spec.train_size, spec.test_size, spec.seed)
    root = root if root is not None else resolve_root(spec)
    if spec.name in ("cifar10", "cifar100"):
        return cifar_source(root, spec.name, spec.download)
    if not root.exists():
        raise DataError(f"dataset.root: {root} not found; point it at a folder or a "
                        ".tar.gz/.zip with train/<class>/* and test/<class>/* "
                        "(e.g. export ABLATE_DATA=../shared/data for the CIFAR-10 JPEGs)")
    cached = _cache_path(root, spec.image_size)
    src = _load_cached(cached) if cached.exists() else None
    if src is not None:
        return src
    with _decode_lock(cached):  # trials starting together on a node: one decodes, the rest wait
        src = _load_cached(cached) if cached.exists() else None
        if src is not None:
            return src
        src = imagefolder_source(root, spec.image_size)
        log = os.environ.get("ABLATE_DECODE_LOG")  # test hook: one line per decode
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {root}\n")
        try:
            _save_cached(cached, src)
        except OSError:
            pass  # a read-only cache only costs the next load a re-decode
    return src


@contextlib.contextmanager
def _decode_lock(cached: Path) -> Iterator[None]:
    """An exclusive lock beside the cache file (none where the cache cannot be written)."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        f = open(cached.with_suffix(".lock"), "a")  # noqa: SIM115 - held across the yield
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
