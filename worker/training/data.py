"""Datasets as in-memory tensors: load, split, subset, add label noise, standardize.

Nothing is downloaded: scikit-learn ships the tabular sets, and the synthetic ones are
generated from the spec's dataset seed. Uploaded arrays arrive from the caller (the worker
task reads them from the database); this module never touches storage.
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch

from app.core.catalog import BUILTIN_DATASETS, DatasetInfo
from app.core.spec import DatasetSpec


@dataclass(frozen=True)
class PreparedData:
    x_train: torch.Tensor  # float32, [n, *input_shape]
    y_train: torch.Tensor  # int64, [n]
    x_val: torch.Tensor
    y_val: torch.Tensor
    info: DatasetInfo


def _two_moons(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n_outer = n // 2
    outer = np.linspace(0, np.pi, n_outer)
    inner = np.linspace(0, np.pi, n - n_outer)
    x = np.concatenate(
        [
            np.stack([np.cos(outer), np.sin(outer)], 1),
            np.stack([1 - np.cos(inner), 0.5 - np.sin(inner)], 1),
        ]
    )
    y = np.repeat([0, 1], [n_outer, n - n_outer])
    return x + rng.normal(scale=noise, size=x.shape), y


def _spirals(
    n: int, noise: float, rng: np.random.Generator, arms: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(n) % arms
    radius = rng.uniform(0.05, 1.0, size=n)
    angle = y * (2 * np.pi / arms) + radius * 3 * np.pi + rng.normal(scale=noise, size=n)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1), y


def _gaussian_blobs(
    n: int, noise: float, rng: np.random.Generator, centers: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(n) % centers
    means = (
        np.stack(
            [
                np.cos(2 * np.pi * np.arange(centers) / centers),
                np.sin(2 * np.pi * np.arange(centers) / centers),
            ],
            1,
        )
        * 3
    )
    return means[y] + rng.normal(scale=noise, size=(n, 2)), y


SYNTHETIC = {
    # name: (generator, default noise)
    "two_moons": (_two_moons, 0.1),
    "spirals": (_spirals, 0.2),
    "gaussian_blobs": (_gaussian_blobs, 1.0),
}


@functools.cache
def _mnist1d() -> tuple[np.ndarray, np.ndarray]:
    # The package's own generator with its default (published) arguments: 4000 + 1000
    # samples, seed 42, generated offline. Never its download URL. Cached: it takes seconds.
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    return np.concatenate([data["x"], data["x_test"]]), np.concatenate([data["y"], data["y_test"]])


def import_loaders() -> None:
    """Import the built-in datasets' generators (about 1.4 s), which each loader otherwise
    imports on its first call: a worker calls this before its pool forks."""
    import mnist1d.data  # noqa: F401
    import sklearn.datasets  # noqa: F401


def _sklearn(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
    }[name]
    bunch = loader()
    return bunch.data, bunch.target


def load_builtin(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a built-in dataset, in a fixed order, shaped [n, *input_shape]."""
    info = BUILTIN_DATASETS[spec.name]
    if spec.name in SYNTHETIC:
        generate, default_noise = SYNTHETIC[spec.name]
        assert spec.n_samples is not None  # the spec fills it in for synthetic datasets
        noise = default_noise if spec.noise is None else spec.noise
        x, y = generate(spec.n_samples, noise, np.random.default_rng(spec.seed))
    elif spec.name == "mnist1d":
        x, y = _mnist1d()
    else:
        x, y = _sklearn(spec.name)
    x = np.asarray(x, dtype=np.float32).reshape(len(x), *info.input_shape)
    return x, np.asarray(y, dtype=np.int64)


def prepare(
    spec: DatasetSpec, info: DatasetInfo, arrays: tuple[np.ndarray, np.ndarray]
) -> PreparedData:
    """Split (seeded), subset, corrupt labels, standardize with training statistics only."""
    x, y = arrays
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(x))
    n_val = max(1, round(len(x) * spec.val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if spec.train_subset is not None:
        train_idx = train_idx[: spec.train_subset]
    x_train, y_train = x[train_idx], y[train_idx].copy()
    x_val, y_val = x[val_idx], y[val_idx]
    if spec.label_noise > 0:
        flip = rng.random(len(y_train)) < spec.label_noise
        y_train[flip] = rng.integers(0, info.num_classes, size=int(flip.sum()))
    if spec.standardize:
        mean = x_train.mean(axis=0, keepdims=True)
        std = x_train.std(axis=0, keepdims=True)
        std[std < 1e-8] = 1.0  # constant features (digits' blank border pixels) stay as they are
        x_train = (x_train - mean) / std
        x_val = (x_val - mean) / std
    return PreparedData(
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train)),
        x_val=torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.float32)),
        y_val=torch.from_numpy(np.ascontiguousarray(y_val)),
        info=info,
    )
