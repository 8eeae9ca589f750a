"""Datasets as in-memory tensors: load, split, subset, add label noise, standardize.

Nothing is downloaded: scikit-learn ships the tabular sets, and the synthetic ones are
generated from the spec's dataset seed. Uploaded arrays arrive from the caller (the worker
task reads them from the database); this module never touches storage.
"""

from dataclasses import dataclass

import numpy as np
import torch

from app.datasets.catalog import BUILTIN_DATASETS, DatasetInfo
from app.jobs.spec import DatasetSpec


@dataclass(frozen=True)
class PreparedData:
    x_train: torch.Tensor  # float32, [n, *input_shape]
    y_train: torch.Tensor  # int64, [n]
    x_val: torch.Tensor
    y_val: torch.Tensor
    info: DatasetInfo


def _two_moons(
    n_samples: int, noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    n_out = n_samples // 2
    n_in = n_samples - n_out
    outer = np.linspace(0, np.pi, n_out)
    inner = np.linspace(0, np.pi, n_in)
    x = np.concatenate(
        [
            np.stack([np.cos(outer), np.sin(outer)], 1),
            np.stack([1 - np.cos(inner), 0.5 - np.sin(inner)], 1),
        ]
    )
    y = np.concatenate([np.zeros(n_out, dtype=np.int64), np.ones(n_in, dtype=np.int64)])
    return x + rng.normal(scale=noise, size=x.shape), y


def load_builtin(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a built-in dataset, in a fixed order, shaped [n, *input_shape]."""
    rng = np.random.default_rng(spec.seed)
    info = BUILTIN_DATASETS[spec.name]
    if spec.name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = bunch.images, bunch.target
    elif spec.name == "two_moons":
        assert spec.n_samples is not None
        x, y = _two_moons(spec.n_samples, 0.1 if spec.noise is None else spec.noise, rng)
    else:
        raise ValueError(f"dataset {spec.name!r} is not available in this worker")
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
