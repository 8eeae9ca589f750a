"""Trainer tests: those marked gpu skip cleanly where no CUDA device is visible (CI has none)."""

import pytest
import torch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run with `pytest -m gpu` where one is")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
