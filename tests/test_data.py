"""Datasets: tiny files in the real CIFAR pickle and SVHN .mat formats, read by the real loaders."""
import pickle

import numpy as np
import pytest

import sdsurgery.train.data as data
from sdsurgery.train.data import DataError, load_datasets


def write_cifar10(root, n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    per = n_train // 5
    for i in range(1, 6):
        labels = rng.integers(0, 10, per).tolist()
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8), "labels": labels}, f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                     "labels": rng.integers(0, 10, n_test).tolist()}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def write_svhn(root, splits=("train", "test"), n=12, seed=0):
    from scipy.io import savemat
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split in splits:
        savemat(str(root / f"{split}_32x32.mat"),
                {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                 "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})  # 10 means digit 0


@pytest.fixture
def no_md5(monkeypatch):
    # torchvision checks md5 sums of the real archives; these files are tiny fakes
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(svhn, "check_integrity", lambda *a, **k: True)


def test_cifar10_real_format(tmp_path, no_md5):
    write_cifar10(tmp_path)
    s = load_datasets("cifar10", tmp_path, val_split=5)
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (15, 5, 10, 10)
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    assert s.mean == (0.4914, 0.4822, 0.4465)
    # the validation images are not among the training ones
    assert not set(s.val.indices) & set(s.train.indices)


def test_svhn_real_format_with_extra_and_labels(tmp_path, no_md5):
    write_svhn(tmp_path, ("train", "test", "extra"))
    s = load_datasets("svhn", tmp_path, train_split="train+extra", image_size=16)
    assert (len(s.train), len(s.test)) == (24, 12)
    x, y = s.test[0]
    assert x.shape == (3, 16, 16) and 0 <= y <= 9


def test_missing_data_says_where_and_how(tmp_path, no_md5):
    with pytest.raises(DataError, match=r"cifar10 not found in .*cifar-10-batches-py.*data.download=true; eval: --download"):
        load_datasets("cifar10", tmp_path)
    with pytest.raises(DataError, match=r"svhn not found .*train_32x32.mat"):
        load_datasets("svhn", tmp_path)
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_datasets("mnist", tmp_path)


def test_digits_are_bundled_and_split():
    s = load_datasets("digits", image_size=16)
    assert (len(s.train), len(s.test), s.num_classes) == (1437, 360, 10)
    x, y = s.test[3]
    assert x.shape == (3, 16, 16) and x.min() >= -1.0 and x.max() <= 1.0


def test_no_flip_for_svhn_and_digits():
    flips = lambda t: any(type(s).__name__ == "RandomHorizontalFlip" for s in t.transforms)
    assert not flips(data._transforms(True, 32, 32, (0.5,) * 3, (0.5,) * 3, False, True))
    assert flips(data._transforms(True, 32, 32, (0.5,) * 3, (0.5,) * 3, True, True))
