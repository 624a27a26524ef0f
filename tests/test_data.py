"""Datasets, safe archives, the cache, nested fractions and on-device batches."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ablate.data import (
    Batches,
    Split,
    augment,
    cache_dir,
    load_dataset,
    split_indices,
    synthetic_source,
)
from ablate.errors import DataError
from ablate.study import DatasetSpec
from tests.conftest import CIFAR_JPG, needs_cifar

CLASSES = ("cat", "dog", "frog")


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root: Path, n_train: int = 6, n_test: int = 2, size: int = 8,
                gray: bool = False, test_name: str = "test") -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), (test_name, n_test)):
        for ci, c in enumerate(CLASSES):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size, size) if gray else (size, size, 3)
                arr = (rng.integers(0, 50, shape) + 80 * ci).astype(np.uint8)
                (d / f"{i:03d}.png").write_bytes(png(arr))
    return root


def spec(root: Path, **kw) -> DatasetSpec:
    return DatasetSpec(name="imagefolder", root=str(root), val_fraction=kw.pop("val_fraction",
                                                                               0.0), **kw)


def test_synthetic_is_deterministic_and_seeded():
    a = synthetic_source(16, 4, 3, 64, 16, seed=1)
    b = synthetic_source(16, 4, 3, 64, 16, seed=1)
    c = synthetic_source(16, 4, 3, 64, 16, seed=2)
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.train_y, b.train_y)
    assert not np.array_equal(a.train_x, c.train_x)
    assert a.train_x.shape == (64, 3, 16, 16) and a.train_x.dtype == np.uint8
    assert np.bincount(a.train_y).tolist() == [16, 16, 16, 16]
    g = synthetic_source(24, 3, 1, 30, 6, seed=0)
    assert g.train_x.shape == (30, 1, 24, 24)


def test_synthetic_classes_differ_in_layout_and_texture():
    """Class means differ spatially (layout) and classes sharing a layout differ (texture)."""
    s = synthetic_source(32, 10, 1, 2000, 10, seed=0)
    means = np.stack([s.train_x[s.train_y == c, 0].mean(0) for c in range(10)])
    # layout: classes 0 and 2 (different anchors) have different mean images
    assert np.abs(means[0] - means[2]).max() > 20
    # texture: classes 0 and 1 share an anchor; their mean brightness maps are alike
    assert np.abs(means[0] - means[1]).mean() < np.abs(means[0] - means[2]).mean()


def test_nested_fractions_fixed_val_class_balanced():
    labels = np.repeat(np.arange(5), 40)
    np.random.default_rng(0).shuffle(labels)
    subsets, vals = {}, set()
    for f in (0.1, 0.25, 0.5, 1.0):
        tr, va = split_indices(labels, 5, 0.1, f, seed=3)
        subsets[f] = set(tr.tolist())
        vals.add(tuple(va.tolist()))
        assert not subsets[f] & set(va.tolist())
        counts = np.bincount(labels[tr], minlength=5)
        assert counts.min() == counts.max() == round(36 * f)
    assert len(vals) == 1  # every fraction sees the same val images
    assert subsets[0.1] < subsets[0.25] < subsets[0.5] < subsets[1.0]
    other, _ = split_indices(labels, 5, 0.1, 0.5, seed=4)
    assert set(other.tolist()) != subsets[0.5]


def test_fraction_leaving_a_class_empty_is_an_error():
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(DataError, match="leaves class '0' with no training image"):
        split_indices(labels, 3, 0.1, 0.01, seed=0)


def test_imagefolder_folder_tar_zip_agree(tmp_path):
    folder = make_folder(tmp_path / "f")
    tgz = tmp_path / "f.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(folder / "train", arcname="top/train")
        tf.add(folder / "test", arcname="top/test")
    zp = tmp_path / "f.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, p.relative_to(folder).as_posix())
    bundles = [load_dataset(spec(p)) for p in (folder, tgz, zp)]
    for b in bundles:
        assert b.classes == list(CLASSES)
        assert len(b.train) == 18 and len(b.test) == 6
        assert b.train.images.shape == (18, 3, 8, 8)
    assert torch.equal(bundles[0].train.images, bundles[1].train.images)
    assert torch.equal(bundles[0].test.labels, bundles[2].test.labels)


def test_imagefolder_val_dir_grayscale_resize_channels(tmp_path):
    folder = make_folder(tmp_path / "g", gray=True, test_name="val")
    b = load_dataset(spec(folder, image_size=12))
    assert b.train.images.shape == (18, 1, 12, 12) and len(b.test) == 6
    with pytest.raises(DataError, match="dataset.channels: 3 requested but the images"):
        load_dataset(spec(folder, channels=3))
    rgb = make_folder(tmp_path / "rgb")
    assert load_dataset(spec(rgb, channels=1)).train.images.shape[1] == 1


def test_cache_is_used_and_written_atomically(tmp_path):
    folder = make_folder(tmp_path / "c")
    tgz = tmp_path / "c.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(folder, arcname=".")
    first = load_dataset(spec(tgz))
    # one cache file (and the lock that makes concurrent trials decode once)
    entries = [p for p in cache_dir().glob("c.tar.gz-*") if p.suffix != ".lock"]
    assert len(entries) == 1 and entries[0].suffix == ".npz"
    assert not list(cache_dir().glob("*.tmp"))
    # prove the second load reads the cache: alter the cached labels, see them come back
    with np.load(entries[0]) as z:
        data = dict(z)
    data["train_x"] = np.zeros_like(data["train_x"])
    np.savez(entries[0], **data)
    second = load_dataset(spec(tgz))
    assert second.train.images.sum() == 0 and first.train.images.sum() > 0
    # a corrupt cache entry is ignored and the archive decoded again
    entries[0].write_bytes(b"garbage")
    third = load_dataset(spec(tgz))
    assert torch.equal(third.train.images, first.train.images)
    # touching the archive (new mtime) makes a new cache key
    os.utime(tgz, ns=(1, 10**18))
    load_dataset(spec(tgz))
    assert len(list(cache_dir().glob("c.tar.gz-*.npz"))) == 2


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    p = tmp_path / "bad.tar"
    with tarfile.open(p, "w") as tf:
        tf.addfile(member, io.BytesIO(data) if data else None)
    return p


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink", "device"])
def test_unsafe_archive_members_are_refused(tmp_path, kind):
    info = tarfile.TarInfo({"absolute": "/etc/evil.png", "dotdot": "train/../../evil.png"}.get(
        kind, "train/cat/link.png"))
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    elif kind == "device":
        info.type = tarfile.CHRTYPE
    data = b"" if kind in ("symlink", "hardlink", "device") else b"x"
    info.size = len(data)
    p = _tar_with(tmp_path, info, data)
    with pytest.raises(DataError, match=f"refusing archive member '{info.name}'"):
        load_dataset(spec(p))


def test_zip_with_dotdot_is_refused(tmp_path):
    p = tmp_path / "bad.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("../evil.png", b"x")
    with pytest.raises(DataError, match="'..' in its path"):
        load_dataset(spec(p))


def test_missing_root_names_path_and_fix(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} not found.*ABLATE_DATA"):
        load_dataset(spec(tmp_path / "nope"))
    with pytest.raises(DataError, match="cifar-10-batches-py.*not found.*download"):
        load_dataset(DatasetSpec(name="cifar10", root=str(tmp_path)))


def test_archive_without_train(tmp_path):
    folder = make_folder(tmp_path / "x")
    (folder / "train").rename(folder / "training")
    with pytest.raises(DataError, match="has no train/<class>/<image>"):
        load_dataset(spec(folder))


def test_class_folders_differ(tmp_path):
    folder = make_folder(tmp_path / "x")
    (folder / "test" / "frog").rename(folder / "test" / "toad")
    with pytest.raises(DataError, match=r"only in train: \['frog'\]; only in test: \['toad'\]"):
        load_dataset(spec(folder))


def test_corrupt_image_is_named(tmp_path):
    folder = make_folder(tmp_path / "x")
    (folder / "train" / "dog" / "001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"train/dog/001.png: unreadable or corrupt image"):
        load_dataset(spec(folder))


def test_empty_class(tmp_path):
    folder = make_folder(tmp_path / "x")
    for p in (folder / "test" / "cat").iterdir():
        p.unlink()
    (folder / "test" / "cat" / "README.txt").write_text("no images")
    with pytest.raises(DataError, match="class 'cat' has no images in test/"):
        load_dataset(spec(folder))


def _fake_cifar(root: Path) -> None:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 255, (20, 3072), dtype=np.uint8),
             b"labels": [i % 10 for i in range(20)]}
        (base / name).write_bytes(pickle.dumps(d))
    (base / "batches.meta").write_bytes(pickle.dumps(
        {b"label_names": [f"c{i}".encode() for i in range(10)]}))


def test_cifar_pickle_folder(tmp_path):
    _fake_cifar(tmp_path)
    b = load_dataset(DatasetSpec(name="cifar10", root=str(tmp_path), val_fraction=0.0))
    assert len(b.train) == 100 and len(b.test) == 20 and b.classes[3] == "c3"
    assert b.train.images.shape[1:] == (3, 32, 32)


def test_cifar_loader_refuses_code_in_pickles(tmp_path):
    _fake_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(
        {b"data": Evil()}))
    with pytest.raises(DataError, match="refusing to load posix.system"):
        load_dataset(DatasetSpec(name="cifar10", root=str(tmp_path)))


@pytest.mark.parametrize(("crop", "flip"), [(True, False), (False, True), (True, True)])
def test_augment_matches_per_image_reference(crop, flip):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (6, 3, 5, 7), dtype=torch.uint8)
    out = augment(x, 2, crop, flip, g)
    # replay the draws with the same generator state, one image at a time
    g2 = torch.Generator().manual_seed(0)
    oy = torch.randint(0, 5, (6,), generator=g2) if crop else torch.zeros(6, dtype=torch.long)
    ox = torch.randint(0, 5, (6,), generator=g2) if crop else torch.zeros(6, dtype=torch.long)
    coin = torch.rand(6, generator=g2) < 0.5 if flip else torch.zeros(6, dtype=torch.bool)
    p = 2 if crop else 0
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    for i in range(6):
        ref = padded[i, :, oy[i]:oy[i] + 5, ox[i]:ox[i] + 7]
        if coin[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)
    if flip:
        assert 0 < int(coin.sum()) < 6  # both kinds occurred, so the check saw both


def test_a_split_goes_to_a_gpu_once_for_every_seed_and_evaluation():
    """On a GPU every Batches copied its split there: one train split per lock-step seed and
    new val and test splits at every evaluation (helper-33's review). The device "meta"
    stands in for a CUDA device, which this machine has not: any device but the CPU."""
    src = synthetic_source(16, 4, 3, 64, 8, seed=0)
    split = Split(torch.from_numpy(src.train_x), torch.from_numpy(src.train_y))
    stats = ((0.5,) * 3, (0.25,) * 3)
    seeds = [Batches(split, *stats, 16, "meta", shuffle=True, seed=s) for s in (0, 1, 2)]
    assert seeds[0].images.device.type == "meta"
    assert all(b.images is seeds[0].images and b.labels is seeds[0].labels for b in seeds)
    again = Batches(split, *stats, 32, "meta")  # the next evaluation of the same split
    assert again.images is seeds[0].images
    other = Split(split.images.clone(), split.labels.clone())  # another split: its own copy
    assert Batches(other, *stats, 16, "meta").images is not seeds[0].images
    assert Batches(split, *stats, 16).images is split.images  # the CPU: no copy at all


def test_batches_normalize_augment_deterministically():
    src = synthetic_source(16, 4, 3, 256, 8, seed=0)
    split = Split(torch.from_numpy(src.train_x), torch.from_numpy(src.train_y))
    f = split.images.float() / 255
    mean = tuple(f.mean((0, 2, 3)).tolist())
    std = tuple(f.std((0, 2, 3)).tolist())
    plain = torch.cat([x for x, _ in Batches(split, mean, std, 64)])
    assert plain.mean().abs() < 1e-3 and (plain.std() - 1).abs() < 1e-2
    a = [x for x, _ in Batches(split, mean, std, 64, shuffle=True, augment=("crop", "flip"),
                               seed=7)]
    b = [x for x, _ in Batches(split, mean, std, 64, shuffle=True, augment=("crop", "flip"),
                               seed=7)]
    c = [x for x, _ in Batches(split, mean, std, 64, shuffle=True, augment=("crop", "flip"),
                               seed=8)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    labels = torch.cat([y for _, y in Batches(split, mean, std, 64, shuffle=True, seed=7)])
    assert sorted(labels.tolist()) == sorted(split.labels.tolist())
    cl = next(iter(Batches(split, mean, std, 8, channels_last=True)))[0]
    assert cl.is_contiguous(memory_format=torch.channels_last)


def test_max_train_and_max_test_caps():
    b = load_dataset(DatasetSpec(train_size=400, test_size=200, max_train=100, max_test=50,
                                 val_fraction=0.2))
    assert len(b.train) + len(b.val) == 100 and len(b.val) == 20 and len(b.test) == 50
    assert torch.bincount(b.train.labels).tolist() == [8] * 10


@needs_cifar()
def test_real_cifar10_jpeg_archive():
    s = DatasetSpec(name="imagefolder", root=str(CIFAR_JPG))
    b = load_dataset(s)
    assert b.classes[:3] == ["airplane", "automobile", "bird"]
    assert (len(b.train), len(b.val), len(b.test)) == (45000, 5000, 10000)
    assert b.train.images.shape[1:] == (3, 32, 32)
    assert all(abs(m - e) < 0.02 for m, e in zip(b.mean, (0.49, 0.48, 0.45), strict=True))
    assert torch.bincount(b.test.labels).tolist() == [1000] * 10
    again = load_dataset(s)  # from the cache
    assert torch.equal(again.test.images, b.test.images)


def test_zip_bomb_member_is_cut_off_while_reading(tmp_path, monkeypatch):
    p = tmp_path / "bomb.zip"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/cat/000.png", b"\0" * (8 << 20))  # 8 MiB of zeros: ~8 KiB zipped
    assert p.stat().st_size < 100_000
    monkeypatch.setenv("ABLATE_MAX_FILE_BYTES", str(1 << 20))
    with pytest.raises(DataError, match=r"member 'train/cat/000.png' is over 1,048,576 bytes"):
        load_dataset(spec(p))


def test_member_count_and_total_bytes_are_capped(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "x")  # 3 classes x (6 + 2) images
    monkeypatch.setenv("ABLATE_MAX_MEMBERS", "10")
    with pytest.raises(DataError, match=r"more than 10 files .*ABLATE_MAX_MEMBERS"):
        load_dataset(spec(folder))
    monkeypatch.delenv("ABLATE_MAX_MEMBERS")
    monkeypatch.setenv("ABLATE_MAX_DATA_BYTES", "500")
    with pytest.raises(DataError, match=r"over 500 bytes uncompressed .*ABLATE_MAX_DATA_BYTES"):
        load_dataset(spec(folder))


def test_decompression_bomb_image_is_refused_from_its_header(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "x")
    (folder / "train" / "dog" / "001.png").write_bytes(png(np.zeros((64, 64), np.uint8)))
    monkeypatch.setenv("ABLATE_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(DataError, match=r"train/dog/001.png: image of 64x64 pixels, over the "
                                        r"1,000-pixel limit"):
        load_dataset(spec(folder))


def test_concurrent_downloads_wait_for_one(tmp_path):
    """A second trial needing the download waits on the lock, then finds the data there."""
    import threading

    from filelock import FileLock

    from ablate.sources import _download_once

    base = tmp_path / "cifar-10-batches-py"
    errors: list[BaseException] = []

    def second() -> None:
        try:
            _download_once(tmp_path, "cifar10", base, base.name)
        except BaseException as e:  # noqa: BLE001 - asserted on below
            errors.append(e)

    with FileLock(str(tmp_path / ".cifar10.download.lock")):  # the first download, running
        t = threading.Thread(target=second)
        t.start()
        t.join(1.0)
        assert t.is_alive()  # waiting, not downloading beside it
        base.mkdir()  # the first download finishes
    t.join(10)
    assert not t.is_alive() and not errors  # it did not try to download (offline: it would fail)


def test_driver_checks_the_data_root_before_ray_starts(tmp_path):
    import subprocess
    import sys

    study = tmp_path / "s.yaml"
    study.write_text(f"""name: noroot
dataset: {{name: imagefolder, root: {tmp_path / 'missing.tar.gz'}}}
model: {{dim: 16, depth: 2, patch_size: 4}}
factors: {{model.mixer: [mlp, conv]}}
""")
    exe = Path(sys.executable).with_name("ablate")
    res = subprocess.run([str(exe), "run", str(study), "--tracking-uri",
                          f"sqlite:///{tmp_path / 'm.db'}"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{tmp_path / 'missing.tar.gz'} not found" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "m.db").exists()


def test_imagefolder_without_root_reads_ablate_data(tmp_path, monkeypatch):
    make_folder(tmp_path / "imgs")
    monkeypatch.setenv("ABLATE_DATA", str(tmp_path / "imgs"))
    b = load_dataset(DatasetSpec(name="imagefolder", val_fraction=0.0))
    assert b.classes == sorted(CLASSES) and len(b.train) == 6 * len(CLASSES)


def test_cifar10_without_root_reads_ablate_data(tmp_path, monkeypatch):
    _fake_cifar(tmp_path)
    monkeypatch.setenv("ABLATE_DATA", str(tmp_path))
    b = load_dataset(DatasetSpec(name="cifar10", val_fraction=0.0))
    assert len(b.train) == 100 and len(b.test) == 20


@pytest.mark.parametrize("name", ["imagefolder", "cifar10"])
def test_no_root_and_no_ablate_data_says_set_one(name, monkeypatch):
    monkeypatch.delenv("ABLATE_DATA", raising=False)
    with pytest.raises(DataError, match="dataset.root.*ABLATE_DATA"):
        load_dataset(DatasetSpec(name=name))


def test_driver_expands_the_root_and_trial_ids_keep_it_as_written(tmp_path, monkeypatch):
    from ablate.study import load_study
    from ablate.tune.driver import data_root

    make_folder(tmp_path / "d" / "imgs")
    text = ("name: r\ndataset: {name: imagefolder, image_size: 8, root: '${MYDATA}/imgs'}\n"
            "model: {dim: 16, depth: 1, patch_size: 4}\n")
    (tmp_path / "s.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MYDATA", "d")  # relative: to where `ablate run` is called
    s = load_study(tmp_path / "s.yaml")
    assert data_root(s) == str(tmp_path / "d" / "imgs")
    monkeypatch.setenv("MYDATA", str(tmp_path / "d"))
    assert [t.trial_id for t in load_study(tmp_path / "s.yaml").trials] == \
        [t.trial_id for t in s.trials]


def test_a_linked_class_folder_is_read_and_a_dangling_link_skipped(tmp_path):
    """helper-36: a class folder linked into train/ and test/ (how a subset of a big dataset
    is made) was silently left out, and one dangling link failed every load."""
    full = make_folder(tmp_path / "full")
    sub = tmp_path / "subset"
    for split in ("train", "test"):
        for c in CLASSES:
            (sub / split).mkdir(parents=True, exist_ok=True)
            (sub / split / c).symlink_to(full / split / c, target_is_directory=True)
    (sub / "train" / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (sub / "train" / "loop").symlink_to(sub / "train", target_is_directory=True)  # no class
    a, b = load_dataset(spec(full)), load_dataset(spec(sub))
    assert b.classes == list(CLASSES) and len(b.train) == 18 and len(b.test) == 6
    assert torch.equal(a.train.images, b.train.images)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_cache_file_is_decoded_again(tmp_path, damage):
    """A cache file cut short (a crash before the data reached the disk) raised BadZipFile
    or EOFError in every trial instead of counting as no cache (helper-36)."""
    folder = make_folder(tmp_path / f"d{damage}")
    first = load_dataset(spec(folder))
    (entry,) = [p for p in cache_dir().glob(f"d{damage}-*") if p.suffix == ".npz"]
    raw = entry.read_bytes()
    entry.write_bytes(raw[:len(raw) // 2] if damage == "truncated" else b"")
    assert torch.equal(load_dataset(spec(folder)).train.images, first.train.images)
    with np.load(entry) as z:  # and the cache is whole again
        assert z["train_x"].shape == tuple(first.train.images.shape)


def test_an_image_rewritten_with_its_old_timestamp_is_decoded_again(tmp_path):
    """`cp -p` (or rsync -a, tar x) restores a file with its old modification time: the
    cache key, the folder's newest mtime and file count, stayed the same and trials trained
    on the old pixels (helper-36)."""
    folder = make_folder(tmp_path / "t")
    before = load_dataset(spec(folder))
    img = folder / "train" / "cat" / "000.png"
    st = img.stat()
    img.write_bytes(png(np.full((8, 8, 3), 200, np.uint8)))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = load_dataset(spec(folder))
    assert not torch.equal(before.train.images, after.train.images)
    assert (after.train.images == 200).all(dim=(1, 2, 3)).sum() == 1
