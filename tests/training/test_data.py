"""Datasets: shapes as the catalog says, seeded splits, train-only statistics, subsets, noise."""

import numpy as np
import pytest

from app.core.catalog import BUILTIN_DATASETS
from app.core.spec import DatasetSpec
from worker.training.data import load_builtin, prepare


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_loaders_produce_what_the_catalog_says(name: str) -> None:
    info = BUILTIN_DATASETS[name]
    x, y = load_builtin(DatasetSpec.model_validate({"name": name}))
    assert x.shape == (info.n_samples, *info.input_shape)
    assert x.dtype == np.float32
    assert set(np.unique(y)) == set(range(info.num_classes))
    assert np.isfinite(x).all()


def test_synthetic_data_is_seeded() -> None:
    def moons(**options: object) -> np.ndarray:
        return load_builtin(DatasetSpec.model_validate({"name": "two_moons", **options}))[0]

    assert np.array_equal(moons(seed=1), moons(seed=1))
    assert not np.array_equal(moons(seed=1), moons(seed=2))
    assert moons(n_samples=300).shape == (300, 2)
    assert moons(noise=0.0).std() < moons(noise=1.0).std()


def _prepared(**options: object):  # type: ignore[no-untyped-def]
    spec = DatasetSpec.model_validate({"name": "wine", **options})
    return prepare(spec, BUILTIN_DATASETS["wine"], load_builtin(spec))


def test_split_is_seeded_and_standardized_with_training_statistics_only() -> None:
    a, b, c = _prepared(seed=5), _prepared(seed=5), _prepared(seed=6)
    assert np.array_equal(a.x_val.numpy(), b.x_val.numpy())
    assert not np.array_equal(a.x_val.numpy(), c.x_val.numpy())
    assert len(a.x_val) == round(178 * 0.2)
    # Training features are exactly centred; validation ones only roughly (no leakage).
    assert np.abs(a.x_train.numpy().mean(0)).max() < 1e-5
    assert np.abs(a.x_val.numpy().mean(0)).max() > 1e-3
    assert np.abs(a.x_train.numpy().std(0) - 1).max() < 1e-4


def test_train_subset_and_label_noise() -> None:
    clean, noisy = _prepared(train_subset=50), _prepared(train_subset=50, label_noise=0.5)
    assert len(clean.x_train) == 50
    assert np.array_equal(clean.x_train.numpy(), noisy.x_train.numpy())
    changed = (clean.y_train != noisy.y_train).float().mean().item()
    assert 0.15 < changed < 0.5  # half are redrawn, and a redraw may land on the true class
    assert np.array_equal(clean.y_val.numpy(), noisy.y_val.numpy())  # validation stays clean
