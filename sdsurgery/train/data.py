"""Datasets for fine-tuning: CIFAR-10/100 and SVHN through torchvision's own classes (the real
on-disk formats), ImageFolder, torchvision FakeData, and scikit-learn's bundled handwritten
digits (1,797 real 8x8 images: the offline demo).

All images come out as float tensors (3, S, S), normalised per dataset (or with the mean/std a
pretrained model wants).
"""
from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy
import torch
from torch.utils.data import Dataset, Subset

from ..errors import SurgeryError

# name: (num_classes, native size, mean, std, flip)
_STATS = {
    "cifar10": (10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": (100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "svhn": (10, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False),
    "digits": (10, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False),
    "fake": (10, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), True),
    "imagefolder": (None, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True),
}
DATASETS = tuple(_STATS)
CROP_PCT = 0.875  # imagefolder evaluation: resize to size / 0.875, centre crop (timm's default)


class DataError(SurgeryError, ValueError):
    """A dataset is missing, unknown or malformed."""


class SeededAugmentation(Dataset):
    """Makes a dataset's random augmentation a function of (seed, epoch, index).

    Each item is drawn under its own seed instead of the global RNG's running state, so the
    same image gets the same crop and flip however the data is split over processes or
    workers, and a run resumed mid-epoch sees exactly what an uninterrupted one saw (data
    loaders fetch ahead, so the global RNG at a checkpoint is already past the next batch).
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        # torch, Python and NumPy: timm's transforms draw from all three
        seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i)
        py, np_state = random.getstate(), numpy.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                numpy.random.seed(seed % 2**32)
                return self.dataset[i]
        finally:
            random.setstate(py)
            numpy.random.set_state(np_state)


def num_classes_of(name: str) -> int | None:
    """Classes of a named dataset (None for imagefolder: it depends on the folder)."""
    if name not in _STATS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return _STATS[name][0]


@dataclass
class Preprocessing:
    """How test images are prepared for a model trained on ``dataset``: recorded in exported
    checkpoints, so that ``eval`` prepares them the same way without being told."""

    dataset: str
    num_classes: int
    image_size: int                  # pixels, square
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"  # of the resize to image_size
    crop_pct: float | None = None    # centre crop of image_size / crop_pct (imagefolder)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Splits:
    """Train, validation (may be None) and test sets, and what a model needs to know."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    preprocessing: Preprocessing | None = None


@dataclass
class TimmTransforms:
    """Options of timm's ``create_transform`` for training images, as timm's train.py names them
    (None: timm's default). Evaluation images: resize to ``size / crop_pct``, centre crop."""

    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float | None = 0.4
    auto_augment: str | None = None
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1


@functools.cache
def _posterize_zero_bits() -> None:
    """timm's RandAugment (``inc1`` policies, as in its train.py recipes) posterizes to 0 bits at
    its top magnitude, which Pillow gave as a black image; Pillow 13 refuses 0 bits with a
    ValueError that ends the run. When this Pillow refuses, timm's posterize ops get the black
    image Pillow used to return; nothing changes where Pillow still accepts 0 bits."""
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return
    except ValueError:
        pass
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize  # module-level: transforms still pickle


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits the black image Pillow < 13 gave (see _posterize_zero_bits)."""
    from PIL import Image
    from timm.data import auto_augment

    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _transforms(train: bool, size: int, native: int | None, mean, std, flip: bool, augment: bool,
                interpolation: str = "bilinear", crop_pct: float | None = None,
                timm: TimmTransforms | None = None):
    """The dataset's own pipeline (resize, then pad-and-crop and flips for training: the paper's
    CIFAR augmentation), or timm's create_transform (``timm`` given; evaluation: ``crop_pct``)."""
    from timm.data import create_transform
    from torchvision import transforms as T

    if timm is not None or crop_pct is not None:
        if train:
            t = timm or TimmTransforms()
            if t.auto_augment:
                _posterize_zero_bits()
            return create_transform(size, is_training=True, no_aug=not augment, interpolation=interpolation,
                                    mean=mean, std=std, scale=t.scale, ratio=t.ratio, hflip=t.hflip,
                                    vflip=t.vflip, color_jitter=t.color_jitter, auto_augment=t.auto_augment,
                                    re_prob=t.re_prob, re_mode=t.re_mode, re_count=t.re_count)
        return create_transform(size, is_training=False, interpolation=interpolation, mean=mean, std=std,
                                crop_pct=crop_pct)
    steps = []
    if size != native:
        steps.append(T.Resize(size, interpolation=T.InterpolationMode(interpolation), antialias=True))
    if train and augment:
        pad = max(1, round(4 * size / 32))  # the standard 4-pixel padding at 32 px
        steps.append(T.RandomCrop(size, padding=pad))
    if train and augment and flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class _TensorImages(Dataset):
    """Images held as a uint8 tensor (N, H, W), served through a PIL-based transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.fromarray(self.images[i].numpy()).convert("RGB")
        return self.transform(img), int(self.labels[i])


def _digits(train: bool, transform) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DataError("the digits dataset needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    images = torch.tensor(d.images * (255.0 / 16.0)).round().to(torch.uint8)
    labels = torch.tensor(d.target)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = 360  # a fixed 20% test split
    idx = perm[n_test:] if train else perm[:n_test]
    return _TensorImages(images[idx], labels[idx], transform)


def _missing(name: str, root: Path, files: str) -> DataError:
    return DataError(f"{name} not found in {root} (looked for {files}); let sdsurgery fetch it "
                     f"(finetune: --set data.download=true; eval: --download) or put the files "
                     f"there (finetune: data.data_dir; eval: --data-dir)")


def _cifar(name: str, root: Path, download: bool, t_train, t_val, t_test, _split: str):
    import torchvision.datasets as D

    cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if not download and not (root / folder).is_dir():
        raise _missing(name, root, f"{folder}/")
    try:
        return (cls(str(root), train=True, transform=t_train, download=download),
                cls(str(root), train=True, transform=t_val, download=False),
                cls(str(root), train=False, transform=t_test, download=False))
    except RuntimeError as e:
        if "not found" in str(e).lower() or "corrupted" in str(e).lower():
            raise _missing(name, root, f"{folder}/") from e
        raise


def _svhn(name: str, root: Path, download: bool, t_train, t_val, t_test, train_split: str):
    import torchvision.datasets as D

    parts = train_split.split("+")
    if any(p not in ("train", "extra") for p in parts):
        raise DataError(f"svhn train_split must be 'train' or 'train+extra', got {train_split!r}")
    files = ", ".join(f"{p}_32x32.mat" for p in parts + ["test"])
    if not download and not all((root / f).is_file() for f in files.split(", ")):
        raise _missing(name, root, files)
    try:
        sets = [D.SVHN(str(root), split=p, transform=t_train, download=download) for p in parts]
        val_sets = [D.SVHN(str(root), split=p, transform=t_val, download=False) for p in parts]
        test = D.SVHN(str(root), split="test", transform=t_test, download=download)
    except RuntimeError as e:
        if "not found" in str(e).lower() or "corrupted" in str(e).lower():
            raise _missing(name, root, files) from e
        raise
    joined = (lambda s: s[0] if len(s) == 1 else torch.utils.data.ConcatDataset(s))
    return joined(sets), joined(val_sets), test


def _digits_splits(name: str, root: Path, download: bool, t_train, t_val, t_test, _split: str):
    return _digits(True, t_train), _digits(True, t_val), _digits(False, t_test)


def _fake(name: str, root: Path, download: bool, t_train, t_val, t_test, _split: str,
          size: int = 256, native: int = 32, classes: int = 10):
    import torchvision.datasets as D

    return (D.FakeData(size, (3, native, native), classes, t_train, random_offset=0),
            D.FakeData(size, (3, native, native), classes, t_val, random_offset=0),
            D.FakeData(max(size // 4, 8), (3, native, native), classes, t_test, random_offset=size))


def _imagefolder(name: str, root: Path, download: bool, t_train, t_val, t_test, _split: str):
    import torchvision.datasets as D

    for sub in ("train", "val"):
        if not (root / sub).is_dir():
            raise DataError(f"imagefolder needs {root / sub}/CLASS/IMAGE files")
    return (D.ImageFolder(str(root / "train"), transform=t_train),
            D.ImageFolder(str(root / "train"), transform=t_val),
            D.ImageFolder(str(root / "val"), transform=t_test))


# name -> builder(name, root, download, t_train, t_val, t_test, train_split) -> (train, val base, test)
_BUILDERS = {"cifar10": _cifar, "cifar100": _cifar, "svhn": _svhn, "digits": _digits_splits,
             "fake": _fake, "imagefolder": _imagefolder}


def load_datasets(name: str, root: str | Path = "data", *, download: bool = False,
                  image_size: int | None = None, val_split: int = 0, seed: int = 0,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  augment: bool = True, train_split: str = "train", fake_size: int = 256,
                  interpolation: str = "bilinear", crop_pct: float | None = None,
                  timm: TimmTransforms | None = None) -> Splits:
    """Build the train / val / test datasets of ``name``.

    Args:
        name: cifar10, cifar100, svhn, digits, fake or imagefolder.
        root: data directory (CIFAR: ``root/cifar-10-batches-py`` ...; SVHN:
            ``root/{train,test,extra}_32x32.mat``; imagefolder: ``root/train``, ``root/val``).
        download: let torchvision download missing files.
        image_size: output size in pixels (default: the dataset's native size; digits: 32).
        val_split: hold out this many training images (a seeded random subset) for validation.
        mean, std: normalisation (default: the dataset's own statistics).
        augment: random crop with padding and (except SVHN and digits) horizontal flips; with
            ``timm``, timm's training augmentation (else its no-augmentation transform).
        interpolation: of every resize.
        crop_pct: evaluation images are resized to ``image_size / crop_pct`` and centre-cropped
            (timm's eval transform; default for imagefolder: 0.875); None: resized to image_size.
        timm: train through timm's create_transform with these options (imagefolder: always).
        train_split: for SVHN, ``train`` or ``train+extra``.
    """
    if name not in _STATS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    num_classes, native, dmean, dstd, flip = _STATS[name]
    mean, std = tuple(mean or dmean), tuple(std or dstd)
    size = image_size or (32 if name == "digits" else native or 224)
    if native is None:  # ImageFolder: arbitrary sizes, cropped the timm way
        timm, crop_pct = timm or TimmTransforms(), crop_pct or CROP_PCT
    if timm is not None and crop_pct is None:
        crop_pct = 1.0  # no crop unless asked (the dataset's images are the whole picture)
    transforms = [_transforms(train, size, native, mean, std, flip, augment, interpolation, crop_pct, timm)
                  for train in (True, False, False)]
    root = Path(root)
    builder = _BUILDERS[name]
    if name == "fake":
        builder = functools.partial(_fake, size=fake_size, native=native, classes=num_classes)
    try:
        train, val_base, test = builder(name, root, download, *transforms, train_split)
    except OSError as e:  # download failures, unreadable files
        raise DataError(f"cannot load {name} from {root}: {type(e).__name__}: {e}") from e
    if name == "imagefolder":
        num_classes = len(train.classes)
    val = None
    if val_split:
        n = len(train)
        if not 0 < val_split < n:
            raise DataError(f"val_split must be between 0 and the {n} training images, got {val_split}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        val = Subset(val_base, perm[:val_split])
        train = Subset(train, perm[val_split:])
    pre = Preprocessing(dataset=name, num_classes=num_classes, image_size=size, mean=list(mean),
                        std=list(std), interpolation=interpolation, crop_pct=crop_pct)
    return Splits(train=train, val=val, test=test, num_classes=num_classes, mean=mean, std=std,
                  preprocessing=pre)


__all__ = ["DATASETS", "DataError", "Preprocessing", "Splits", "TimmTransforms", "load_datasets"]
