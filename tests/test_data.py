"""Data layer tests on the real archives (RABO_DATA_DIR, default <repo>/../shared/data).

Decoded arrays go to a per-session temporary cache, so each real split is decoded once per run
(~15 s in all); everything else uses small archives built in tmp_path or synthetic labels.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from rabo_flwr.data import (
    CIFAR10_CLASSES,
    DataError,
    EpisodeSampler,
    cache_dir,
    data_dir,
    load_cifar10,
    load_omniglot,
    load_one_shot_runs,
    long_tail_indices,
    shard_classes,
    shard_classes_by_alphabet,
    split_clients,
    subsample_per_class,
)
from rabo_flwr.data import cifar, omniglot

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("RABO_DATA_DIR") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rabo_cache")


@pytest.fixture
def real_env(monkeypatch, session_cache):
    monkeypatch.setenv("RABO_DATA_DIR", str(REAL_DATA))
    monkeypatch.setenv("RABO_CACHE_DIR", str(session_cache))


@pytest.fixture
def tmp_env(monkeypatch, tmp_path) -> Path:
    """Empty data dir and fresh cache dir under tmp_path; returns the data dir."""
    monkeypatch.setenv("RABO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RABO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "data"


def _load_real(session_cache, fn, *args):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RABO_DATA_DIR", str(REAL_DATA))
        mp.setenv("RABO_CACHE_DIR", str(session_cache))
        return fn(*args)


@pytest.fixture(scope="session")
def background(session_cache):
    return _load_real(session_cache, load_omniglot, True)


@pytest.fixture(scope="session")
def evaluation(session_cache):
    return _load_real(session_cache, load_omniglot, False)


def _png(offset: int) -> bytes:
    """105x105 1-bit PNG like Omniglot's: white background, a black stroke."""
    im = Image.new("1", (105, 105), 1)
    ImageDraw.Draw(im).rectangle([10 + offset, 20, 40 + offset, 80], fill=0)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _write_omniglot_zip(path: Path, split: str, alphabets: int, chars: int, images: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for a in range(alphabets):
            for c in range(chars):
                for i in range(images):
                    name = f"{split}/Alpha{a}/character{c + 1:02d}/{a}{c}_{i + 1:02d}.png"
                    z.writestr(name, _png(i))


# ---------------------------------------------------------------- paths


def test_paths_env_and_xdg_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("RABO_DATA_DIR", raising=False)
    monkeypatch.delenv("RABO_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data_dir() == tmp_path / "rabo_flwr" / "data"
    assert cache_dir() == tmp_path / "rabo_flwr" / "cache"
    monkeypatch.setenv("RABO_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("RABO_CACHE_DIR", str(tmp_path / "c"))
    assert (data_dir(), cache_dir()) == (tmp_path / "d", tmp_path / "c")


# ---------------------------------------------------------------- Omniglot splits


@pytest.mark.parametrize(
    "split_name, classes, images, alphabets",
    [("background", 964, 19280, 30), ("evaluation", 659, 13180, 20)],
)
def test_omniglot_split_sizes_and_format(request, split_name, classes, images, alphabets):
    s = request.getfixturevalue(split_name)
    assert s.images.shape == (images, 28, 28) and s.images.dtype == np.uint8
    assert s.labels.shape == (images,) and s.labels.dtype == np.int64
    assert len(s.class_names) == classes and len(s.alphabets) == alphabets
    assert s.alphabets == sorted(s.alphabets) and s.class_names == sorted(s.class_names)
    assert np.array_equal(np.bincount(s.labels), np.full(classes, 20))
    assert np.all(np.diff(s.labels) >= 0)  # sorted paths -> grouped by character
    assert s.alphabet_of_class.shape == (classes,) and s.alphabet_of_class.dtype == np.int64
    assert all(
        n.split("/")[0] == s.alphabets[a] for n, a in zip(s.class_names, s.alphabet_of_class)
    )
    assert s.images.min() == 0 and s.images.max() == 255
    # Stroke polarity: strokes are 255 on a 0 background, so the mean is low.
    assert s.images.mean() < 40
    assert np.median(s.images[:, 0, :]) == 0  # borders are background


def test_omniglot_cache_hit_skips_decoding(real_env, background, monkeypatch):
    def fail(*_):
        raise AssertionError("decoded although the cache should have been used")

    monkeypatch.setattr(omniglot, "_decode", fail)
    again = load_omniglot(True)
    assert np.array_equal(again.images, background.images)
    assert again.class_names == background.class_names


def test_omniglot_cache_key_tracks_archive_and_size(tmp_env, monkeypatch):
    path = tmp_env / "omniglot" / "images_background.zip"
    _write_omniglot_zip(path, "images_background", alphabets=2, chars=2, images=3)
    s = load_omniglot(True)
    assert s.images.shape == (12, 28, 28) and s.alphabets == ["Alpha0", "Alpha1"]
    assert s.class_names[:2] == ["Alpha0/character01", "Alpha0/character02"]
    assert np.array_equal(s.alphabet_of_class, [0, 0, 1, 1])
    assert s.images[0, 0].max() == 0 and s.images[0].max() == 255  # ink 255 on 0, top row blank
    assert load_omniglot(True, image_size=105).images.shape == (12, 105, 105)

    _write_omniglot_zip(path, "images_background", alphabets=3, chars=1, images=2)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_omniglot(True).images.shape == (6, 28, 28)  # re-decoded, not the stale cache

    monkeypatch.setattr(omniglot, "_decode", lambda *_: pytest.fail("cache not used"))
    assert load_omniglot(True).images.shape == (6, 28, 28)


def test_missing_archive_names_the_directory_the_files_and_the_command(tmp_env):
    with pytest.raises(DataError) as err:
        load_omniglot(False)
    msg = str(err.value)
    assert f"not found in the data directory {tmp_env} (downloads are off: RABO_OFFLINE=1" in msg
    for name in ("images_background.zip", "images_evaluation.zip", "all_runs.zip"):
        assert str(tmp_env / "omniglot" / name) in msg
    assert "`RABO_DATA_DIR=/path/to/data flwr run . --stream`" in msg


def test_corrupt_zip_raises_data_error(tmp_env):
    path = tmp_env / "omniglot" / "images_background.zip"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError, match="corrupt archive") as err:
        load_omniglot(True)
    assert str(path) in str(err.value)

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images_background/A/character01/x_01.png", b"not a png")
    with pytest.raises(DataError, match="x_01.png"):
        load_omniglot(True)


def test_zip_without_expected_layout_raises(tmp_env):
    path = tmp_env / "omniglot" / "images_background.zip"
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("something/else.png", _png(0))
    with pytest.raises(DataError, match="images_background/<Alphabet>/characterNN"):
        load_omniglot(True)


def test_failed_download_leaves_no_file_and_says_what_to_do(tmp_env, monkeypatch):
    monkeypatch.delenv("RABO_OFFLINE")

    def broken(url, root, filename=None, md5=None):
        (Path(root) / filename).write_bytes(b"partial")
        raise OSError("network unreachable")

    monkeypatch.setattr(omniglot, "download_url", broken)
    with pytest.raises(DataError, match="could not download .* network unreachable") as err:
        load_omniglot(True)  # downloads are on by default
    assert "RABO_DATA_DIR=/path/to/data" in str(err.value)
    assert list((tmp_env / "omniglot").iterdir()) == []

    # a download that is not a zip (an error page) is rejected as well
    def html_page(url, root, filename=None, md5=None):
        (Path(root) / filename).write_text("<html>")

    monkeypatch.setattr(omniglot, "download_url", html_page)
    with pytest.raises(DataError, match="not a valid zip"):
        load_one_shot_runs(download=True)
    assert list((tmp_env / "omniglot").iterdir()) == []


def test_download_uses_official_url_and_md5(tmp_env, monkeypatch):
    monkeypatch.delenv("RABO_OFFLINE")
    calls = []

    def fake(url, root, filename=None, md5=None):
        calls.append((url, md5))
        _write_omniglot_zip(Path(root) / filename, "images_evaluation", 1, 1, 2)

    monkeypatch.setattr(omniglot, "download_url", fake)
    assert load_omniglot(False, download=True).images.shape == (2, 28, 28)
    assert calls == [
        (
            "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
            "images_evaluation.zip",
            "6b91aef0f799c5bb55b94e3f2daec811",
        )
    ]
    assert [p.name for p in (tmp_env / "omniglot").iterdir()] == ["images_evaluation.zip"]
    load_omniglot(False, download=True)  # present now: no second download
    assert len(calls) == 1
    monkeypatch.setenv("RABO_OFFLINE", "1")  # the offline switch wins over task.download
    with pytest.raises(DataError, match="downloads are off"):
        load_one_shot_runs(download=True)
    assert len(calls) == 1


# ---------------------------------------------------------------- one-shot runs


def test_one_shot_runs(real_env):
    runs = load_one_shot_runs()
    assert [r.name for r in runs] == [f"run{i:02d}" for i in range(1, 21)]
    for r in runs:
        assert r.train_images.shape == r.test_images.shape == (20, 28, 28)
        assert r.train_images.dtype == np.uint8 and r.test_labels.dtype == np.int64
        assert sorted(r.test_labels.tolist()) == list(range(20))  # one test item per class
        assert r.test_images.mean() < 40  # same polarity as the splits
    assert runs[0].test_labels[0] == 7  # run01/test/item01.png -> run01/training/class08.png
    # Labels align with images: pixel 1-NN beats chance (5%) by far (~21% measured).
    hits = []
    for r in runs:
        test = r.test_images.reshape(20, 1, -1).astype(float)
        dist = ((test - r.train_images.reshape(1, 20, -1)) ** 2).sum(-1)
        hits.append(dist.argmin(1) == r.test_labels)
    acc = np.mean(hits)
    assert acc > 0.12


# ---------------------------------------------------------------- episodes


def test_episode_shapes_labels_and_content(background):
    sampler = EpisodeSampler(background.images, background.labels)
    pool = np.arange(100, 300)
    gen = torch.Generator().manual_seed(0)
    ep = sampler.sample(pool, n_way=5, k_shot=1, n_query=15, generator=gen)
    assert ep.support_x.shape == (5, 1, 28, 28) and ep.support_x.dtype == torch.float32
    assert ep.query_x.shape == (75, 1, 28, 28)
    assert ep.support_y.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(ep.query_y, torch.arange(5).repeat_interleave(15))
    assert 0.0 <= ep.support_x.min() and ep.support_x.max() <= 1.0
    assert set(ep.classes.tolist()) <= set(pool.tolist()) and len(set(ep.classes.tolist())) == 5
    # Each image really belongs to the class its label names, and support/query are disjoint.
    for x, y in [(ep.support_x, ep.support_y), (ep.query_x, ep.query_y)]:
        for img, lab in zip(x, y):
            cls = ep.classes[lab].item()
            cls_imgs = torch.from_numpy(background.images[background.labels == cls])
            as_uint8 = (img[0] * 255).round().to(torch.uint8)
            assert (cls_imgs == as_uint8).flatten(1).all(1).any()
    flat = torch.cat([ep.support_x, ep.query_x]).flatten(1)
    assert len(torch.unique(flat, dim=0)) == 80


def test_episode_determinism_and_all_remaining_queries(background):
    sampler = EpisodeSampler(background.images, background.labels)
    classes = np.arange(964)
    a = sampler.sample(classes, 20, 5, None, torch.Generator().manual_seed(3))
    b = EpisodeSampler(background.images, background.labels).sample(classes, 20, 5, None, torch.Generator().manual_seed(3))
    c = sampler.sample(classes, 20, 5, None, torch.Generator().manual_seed(4))
    fields = ("support_x", "support_y", "query_x", "query_y", "classes")
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)
    assert not torch.equal(a.classes, c.classes)
    assert a.support_x.shape[0] == 100 and a.query_x.shape[0] == 20 * 15  # 20 - k_shot per class
    with pytest.raises(ValueError, match="needs at least"):
        sampler.sample(classes, 5, 10, 11, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="n_way"):
        sampler.sample(np.arange(3), 5, 1, 1, torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- sharding


def test_shard_by_alphabet_keeps_alphabets_whole(background):
    shards = shard_classes_by_alphabet(background.alphabet_of_class, num_shards=7, seed=1)
    assert len(shards) == 7
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(964))
    owners = [{int(background.alphabet_of_class[c]) for c in s} for s in shards]
    assert sum(len(o) for o in owners) == 30 and len(set().union(*owners)) == 30  # disjoint
    assert all(len(o) in (4, 5) for o in owners)  # round-robin over 30 alphabets
    again = shard_classes_by_alphabet(background.alphabet_of_class, 7, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(shards, again))
    other = shard_classes_by_alphabet(background.alphabet_of_class, 7, seed=2)
    assert not all(np.array_equal(x, y) for x, y in zip(shards, other))
    with pytest.raises(DataError, match="only 30 alphabets"):
        shard_classes_by_alphabet(background.alphabet_of_class, 31, seed=0)


def test_shard_classes_equal_and_complete():
    shards = shard_classes(964, 10, seed=0)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(964))
    assert {len(s) for s in shards} == {96, 97}
    assert all(np.array_equal(x, y) for x, y in zip(shards, shard_classes(964, 10, seed=0)))


# ---------------------------------------------------------------- CIFAR-10


def test_long_tail_counts_exact():
    labels = np.repeat(np.arange(10), 5000)
    np.random.default_rng(0).shuffle(labels)
    idx = long_tail_indices(labels, imbalance_ratio=100, num_classes=10, seed=0)
    assert np.bincount(labels[idx]).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(np.unique(idx)) == len(idx) and idx.dtype == np.int64
    assert np.array_equal(idx, long_tail_indices(labels, 100, 10, seed=0))
    assert not np.array_equal(idx, long_tail_indices(labels, 100, 10, seed=1))
    counts10 = np.bincount(labels[long_tail_indices(labels, 10, 10, seed=0)])
    assert counts10[0] == 5000 and counts10[-1] == 500


def test_split_clients_partitions_and_stratifies():
    labels = np.repeat(np.arange(10), 5000)
    idx = long_tail_indices(labels, 100, 10, seed=0)
    splits = split_clients(idx, labels, num_clients=10, seed=0)
    allidx = np.concatenate([np.concatenate(s) for s in splits])
    assert len(allidx) == len(idx) and np.array_equal(np.sort(allidx), idx)  # disjoint, complete
    sizes = [len(t) + len(v) for t, v in splits]
    assert max(sizes) - min(sizes) <= 1
    for train, val in splits:
        assert abs(len(val) / (len(train) + len(val)) - 0.2) < 0.01
        for c in range(10):
            n_c = np.sum(labels[train] == c) + np.sum(labels[val] == c)
            assert np.sum(labels[val] == c) == np.floor(0.2 * n_c + 0.5)
    again = split_clients(idx, labels, 10, seed=0)
    for (t1, v1), (t2, v2) in zip(splits, again):
        assert np.array_equal(t1, t2) and np.array_equal(v1, v2)


def _jpg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _tiny_cifar_items():
    """(member name, bytes): 2 train and 1 test image per class, colour encodes the class."""
    for split, n in (("train", 2), ("test", 1)):
        for c, name in enumerate(CIFAR10_CLASSES):
            for i in range(n):
                yield f"{split}/{name}/{i:04d}.jpg", _jpg((c * 25, 100, i * 100))


def test_cifar_tar_archive_and_cache(tmp_env, monkeypatch):
    archive = tmp_env / "cifar10" / "cifar10-jpg.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in reversed(list(_tiny_cifar_items())):  # order in the tar must not matter
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    x, y, names = load_cifar10(True)
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert names == list(CIFAR10_CLASSES) and y.tolist() == list(np.repeat(np.arange(10), 2))
    assert np.abs(x[:, :, :, 0].mean(axis=(1, 2)) - y * 25).max() < 4  # JPEG is lossy
    assert np.abs(x[1, :, :, 2].astype(int) - 100).max() < 4  # sorted by name within class
    assert load_cifar10(False)[0].shape == (10, 32, 32, 3)
    monkeypatch.setattr(cifar, "_decode_items", lambda *_: pytest.fail("cache not used"))
    assert np.array_equal(load_cifar10(True)[0], x)


def test_cifar_extracted_folder(tmp_env):
    for name, data in _tiny_cifar_items():
        path = tmp_env / "cifar10" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    x, y, _ = load_cifar10(False)
    assert x.shape == (10, 32, 32, 3) and y.tolist() == list(range(10))
    (tmp_env / "cifar10" / "test" / "zebra").mkdir()
    (tmp_env / "cifar10" / "test" / "zebra" / "0000.jpg").write_bytes(_jpg((0, 0, 0)))
    with pytest.raises(DataError, match="unknown class folder 'zebra'"):
        load_cifar10(False)


def test_cifar_missing_corrupt_and_failed_download(tmp_env, monkeypatch):
    with pytest.raises(DataError) as err:
        load_cifar10(True)
    assert str(tmp_env / "cifar10" / "cifar10-jpg.tar.gz") in str(err.value)
    assert str(tmp_env / "cifar-10-batches-py") in str(err.value) and "RABO_DATA_DIR=" in str(err.value)
    monkeypatch.delenv("RABO_OFFLINE")

    def broken(root, train, download):
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(cifar, "CIFAR10", broken)
    with pytest.raises(DataError, match="could not download"):
        load_cifar10(True, download=True)
    assert list(tmp_env.iterdir()) == []

    archive = tmp_env / "cifar10" / "cifar10-jpg.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="corrupt archive") as err:
        load_cifar10(True)
    assert str(archive) in str(err.value)


def test_cifar_real_test_split(real_env):
    x, y, names = load_cifar10(False)
    assert x.shape == (10000, 32, 32, 3) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10 and names == list(CIFAR10_CLASSES)
    assert 80 < x.mean() < 160 and x.std() > 40


def test_subsample_per_class_keeps_a_seeded_fraction_of_each_class():
    labels = np.repeat(np.arange(10), 50)
    kept = subsample_per_class(np.arange(500), labels, 0.1, seed=0)
    assert np.bincount(labels[kept]).tolist() == [5] * 10 and (np.diff(kept) > 0).all()
    assert np.array_equal(kept, subsample_per_class(np.arange(500), labels, 0.1, seed=0))
    assert not np.array_equal(kept, subsample_per_class(np.arange(500), labels, 0.1, seed=1))
    assert np.bincount(labels[subsample_per_class(np.arange(500), labels, 0.001, seed=0)]).tolist() == [1] * 10
