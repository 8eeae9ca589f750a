"""What each built-in dataset is, without loading it: the API validates and lists from this.

The worker's loaders (worker/training/data.py) produce exactly these shapes; a test holds
the two together. Nothing here is downloaded: scikit-learn ships the small tabular sets,
mnist1d is generated offline by its package, and the synthetic sets are generated from a seed.
"""

from dataclasses import dataclass
from typing import Literal

# tabular: a feature vector; sequence: one channel of length L (1-D CNNs); image: H x W (2-D CNNs)
DataKind = Literal["tabular", "sequence", "image"]

UPLOAD_PREFIX = "upload:"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    kind: DataKind
    input_shape: tuple[int, ...]  # per sample, without a channel axis
    num_classes: int
    n_samples: int
    synthetic: bool = False
    description: str = ""

    @property
    def num_features(self) -> int:
        size = 1
        for dim in self.input_shape:
            size *= dim
        return size


SYNTHETIC_DEFAULT_SAMPLES = 1000

BUILTIN_DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "digits", "image", (8, 8), 10, 1797, description="scikit-learn's 8x8 handwritten digits"
        ),
        DatasetInfo(
            "breast_cancer",
            "tabular",
            (30,),
            2,
            569,
            description="scikit-learn's Wisconsin breast cancer",
        ),
        DatasetInfo(
            "wine", "tabular", (13,), 3, 178, description="scikit-learn's wine recognition"
        ),
        DatasetInfo("iris", "tabular", (4,), 3, 150, description="scikit-learn's iris"),
        DatasetInfo(
            "mnist1d", "sequence", (40,), 10, 5000, description="MNIST-1D, generated offline"
        ),
        DatasetInfo(
            "two_moons",
            "tabular",
            (2,),
            2,
            SYNTHETIC_DEFAULT_SAMPLES,
            True,
            "two interleaved half circles",
        ),
        DatasetInfo(
            "spirals",
            "tabular",
            (2,),
            3,
            SYNTHETIC_DEFAULT_SAMPLES,
            True,
            "three interleaved spirals",
        ),
        DatasetInfo(
            "gaussian_blobs",
            "tabular",
            (2,),
            3,
            SYNTHETIC_DEFAULT_SAMPLES,
            True,
            "three isotropic Gaussian blobs",
        ),
    )
}
