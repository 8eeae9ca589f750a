"""The training-job spec: the one contract between the API and the worker.

Imported by both sides, so it imports neither FastAPI nor torch. A spec is validated strictly
(an unknown field is an error that names it) and stored normalized, with every default filled
in, so what a job ran is always exactly what GET /v1/jobs/{id} shows.
"""

import re
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Secret,
    StringConstraints,
    model_validator,
)

from app.core.catalog import (
    BUILTIN_DATASETS,
    SYNTHETIC_DEFAULT_SAMPLES,
    UPLOAD_PREFIX,
    DatasetInfo,
)

# upload:<id> with the id in a UUID's own layout, matched whole (fullmatch: a `$` would let a
# trailing newline through), so that every name it admits is one uuid.UUID parses.
_UPLOAD_NAME = re.compile(
    UPLOAD_PREFIX + "-".join(f"[0-9a-fA-F]{{{digits}}}" for digits in (8, 4, 4, 4, 12))
)

Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
NormalizationType = Literal[
    "none", "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"
]
Activation = Literal["relu", "gelu", "tanh", "silu", "selu"]


class SpecError(ValueError):
    """A spec that is well-formed but impossible; `field` is the dotted path it concerns,
    relative to the model that raised it (the error handler joins it to pydantic's location)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class _Strict(BaseModel):
    # allow_inf_nan=False: JSON cannot carry Infinity or NaN back out (GET showed null for a
    # stored 1e999), and no setting of this spec means anything at infinity.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def unstorable(value: str) -> str | None:
    """Why a string cannot be stored and served back, or None. PostgreSQL text cannot hold
    NUL; a lone surrogate (JSON's "\\ud800" escape parses to one) has no UTF-8 encoding, so
    neither database nor response could hold it. Refused here, not inside the database."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode: it holds an unpaired surrogate (U+D800 to U+DFFF)"
    return None


def _storable(value: str) -> str:
    if (reason := unstorable(value)) is not None:
        raise ValueError(reason)
    return value


# Every free-text string (names, tags, URLs), each with its length limit: declared inside the
# annotation, before the check, so that its error reads "String should have at most 200
# characters" (outside, pydantic checks the validated value's length as "items").
Name = Annotated[str, StringConstraints(max_length=200), AfterValidator(_storable)]
TagKey = Annotated[str, StringConstraints(max_length=64), AfterValidator(_storable)]
TagValue = Annotated[str, StringConstraints(max_length=256), AfterValidator(_storable)]
UrlText = Annotated[str, StringConstraints(max_length=2000), AfterValidator(_storable)]


class DatasetSpec(_Strict):
    name: Name = Field(description="a built-in dataset, or upload:<id> for an uploaded one")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    batch_size: int = Field(64, ge=1, le=65536)
    train_subset: int | None = Field(
        None, ge=1, description="train on the first N training samples only"
    )
    label_noise: Probability = Field(
        0.0, description="fraction of training labels replaced at random"
    )
    standardize: bool = Field(
        True, description="standardize features with training-split statistics"
    )
    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="seeds data generation and the train/val split"
    )
    n_samples: int | None = Field(None, ge=20, le=1_000_000, description="synthetic datasets only")
    noise: float | None = Field(None, ge=0.0, le=10.0, description="synthetic datasets only")

    @model_validator(mode="before")
    @classmethod
    def _fill_synthetic_defaults(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("n_samples") is None:
            builtin = BUILTIN_DATASETS.get(str(data.get("name")))
            if builtin and builtin.synthetic:
                return {**data, "n_samples": SYNTHETIC_DEFAULT_SAMPLES}
        return data

    @model_validator(mode="after")
    def _check_name(self) -> Self:
        if self.name not in BUILTIN_DATASETS and not _UPLOAD_NAME.fullmatch(self.name):
            known = ", ".join(sorted(BUILTIN_DATASETS))
            raise SpecError(
                "name", f"unknown dataset {self.name!r}; use one of {known} or upload:<id>"
            )
        builtin = BUILTIN_DATASETS.get(self.name)
        if not (builtin and builtin.synthetic):
            for option in ("n_samples", "noise"):
                if getattr(self, option) is not None:
                    raise SpecError(
                        option, f"{option} applies to synthetic datasets only, not {self.name!r}"
                    )
        return self


class NormalizationSpec(_Strict):
    type: NormalizationType = "none"
    position: Literal["before_activation", "after_activation"] = "before_activation"
    num_groups: int = Field(8, ge=1, description="group_norm only: must divide every layer's width")
    momentum: float = Field(0.1, gt=0.0, le=1.0, description="batch_norm only")
    eps: float = Field(1e-5, gt=0.0, le=0.1)
    affine: bool = True


class DropoutSpec(_Strict):
    rate: Probability | list[Probability] = Field(
        0.0, description="one rate for every hidden layer, or a list with one per layer"
    )
    input_rate: Probability = 0.0
    type: Literal["standard", "alpha", "spatial"] = "standard"

    def rates(self, layers: int) -> list[float]:
        return list(self.rate) if isinstance(self.rate, list) else [self.rate] * layers


_DEFAULT_WIDTHS = {"mlp": [128, 64], "cnn": [16, 32], "resnet": [16, 32]}


class ModelSpec(_Strict):
    architecture: Literal["mlp", "cnn", "resnet"] = "mlp"
    hidden_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        min_length=1,
        description="mlp: hidden widths; cnn: channels per conv layer; resnet: channels per stage",
    )
    activation: Activation = "relu"
    normalization: NormalizationSpec = Field(default_factory=NormalizationSpec)
    dropout: DropoutSpec = Field(default_factory=DropoutSpec)
    kernel_size: int = Field(3, ge=1, le=15, description="cnn and resnet only")
    blocks_per_stage: int = Field(1, ge=1, le=8, description="resnet only")

    @model_validator(mode="before")
    @classmethod
    def _fill_widths(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("hidden_sizes") is None:
            architecture = data.get("architecture", "mlp")
            if architecture in _DEFAULT_WIDTHS:
                return {**data, "hidden_sizes": list(_DEFAULT_WIDTHS[architecture])}
        return data

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        widths = self.hidden_sizes
        norm = self.normalization
        if norm.type == "group_norm":
            bad = [w for w in widths if w % norm.num_groups]
            if bad:
                raise SpecError(
                    "normalization.num_groups",
                    f"group_norm with num_groups={norm.num_groups} needs widths divisible by it; "
                    f"{bad} are not",
                )
        if norm.type == "instance_norm" and self.architecture == "mlp":
            raise SpecError(
                "normalization.type",
                "instance_norm normalizes over spatial positions; an mlp has none "
                "(use cnn or resnet)",
            )
        if self.dropout.type == "spatial" and self.architecture == "mlp":
            raise SpecError(
                "dropout.type",
                "spatial dropout drops whole channels; an mlp has none (use cnn or resnet)",
            )
        if isinstance(self.dropout.rate, list) and len(self.dropout.rate) != len(widths):
            raise SpecError(
                "dropout.rate",
                f"dropout.rate lists {len(self.dropout.rate)} rates "
                f"for {len(widths)} hidden layers",
            )
        if self.architecture == "mlp" and (error := lone_value_norm(self)) is not None:
            raise error
        return self


def lone_value_norm(model: ModelSpec) -> SpecError | None:
    """Why the normalization would take groups of one value each, or None; for a model whose
    channels hold one value per sample (an mlp's features, or a conv net's on one feature).

    A value normalized alone is always 0: the layer would pass on only the norm's bias, and
    the output would not depend on the input. `field` is relative to the model.
    """
    norm = model.normalization
    if norm.type == "group_norm" and norm.num_groups in model.hidden_sizes:
        return SpecError(
            "normalization.num_groups",
            f"group_norm with num_groups={norm.num_groups} puts each channel of a layer "
            f"{norm.num_groups} wide in a group of its own, of one value per sample here: "
            "normalized alone, it is always 0, and the output would not depend on the input "
            "(use fewer groups)",
        )
    if norm.type == "layer_norm" and 1 in model.hidden_sizes:
        return SpecError(
            "hidden_sizes",
            "layer_norm over a layer of width 1 normalizes one value per sample, which is "
            "always 0: the output would not depend on the input (use widths of 2 or more)",
        )
    return None


class OptimizerSpec(_Strict):
    type: Literal["sgd", "adam", "adamw", "rmsprop"] = "adam"
    lr: float = Field(1e-3, gt=0.0, le=100.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="sgd and rmsprop")
    nesterov: bool = Field(False, description="sgd only; needs momentum > 0")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    betas: list[float] = Field(
        [0.9, 0.999], min_length=2, max_length=2, description="adam and adamw"
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.nesterov and (self.type != "sgd" or self.momentum == 0.0):
            raise SpecError("nesterov", "nesterov needs type 'sgd' with momentum > 0")
        if self.momentum and self.type not in ("sgd", "rmsprop"):
            raise SpecError("momentum", f"momentum applies to sgd and rmsprop, not {self.type}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise SpecError("betas", "betas must each be in [0, 1)")
        return self


class ScheduleSpec(_Strict):
    type: Literal["constant", "step", "cosine", "one_cycle"] = "constant"
    warmup_epochs: int = Field(0, ge=0, description="linear warm-up from lr/10, not with one_cycle")
    step_size: int = Field(10, ge=1, description="step only: epochs between decays")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step only: decay factor")
    min_lr: float = Field(0.0, ge=0.0, description="cosine only: the final learning rate")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.type == "one_cycle" and self.warmup_epochs:
            raise SpecError(
                "warmup_epochs", "one_cycle has its own warm-up; leave warmup_epochs at 0"
            )
        return self


class EarlyStoppingSpec(_Strict):
    metric: Literal["val_loss", "val_accuracy"] = "val_loss"
    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.0, ge=0.0)


class CallbackSpec(_Strict):
    """Where to POST the job when it ends, and the secret that signs the POST.

    The secret is write-only: excluded from every dump (so from the stored spec, its hash and
    GET), and optional here so that the stored form, which has no secret, still validates in
    the worker. The API requires it at submit (app/api/jobs/service.py check_callback).
    """

    url: UrlText = Field(description="an http:// or https:// URL")
    # Secret[...] over a constrained str (not SecretStr with Field limits): a short secret is
    # "String should have at least 16 characters", not "... at least 16 items".
    secret: Secret[Annotated[str, StringConstraints(min_length=16, max_length=256)]] | None = Field(
        None,
        exclude=True,
        description="signs each delivery (X-Trainsvc-Signature); required at submit, never shown",
        json_schema_extra={"format": "password", "writeOnly": True},
    )

    @model_validator(mode="after")
    def _check_scheme(self) -> Self:
        if not self.url.lower().startswith(("http://", "https://")):
            raise SpecError("url", "must be an http:// or https:// URL")
        return self


# Probes that measure *why* a configuration trains as it does (worker/training/probes.py).
# Each is off unless asked for; a job that asks for none trains exactly as one without them.
EverySteps = Annotated[
    int,
    Field(
        ge=1,
        le=10_000,
        description="probe at step 0 of each epoch and every N steps after it within the epoch",
    ),
]


class LandscapeSpec(_Strict):
    """Santurkar et al. 2018, section 3.2: loss and gradient along the gradient direction."""

    every_steps: EverySteps = 100
    step_multipliers: list[Annotated[float, Field(gt=0.0, le=1000.0)]] = Field(
        [0.5, 1.0, 2.0, 4.0],
        min_length=1,
        max_length=8,
        description="s in theta - s * lr * gradient; each positive and finite",
    )


class CovariateShiftSpec(_Strict):
    """Santurkar et al. 2018, definition 2.1: a layer's gradient before and after the layers
    before it take their update, on the same batch."""

    every_steps: EverySteps = 100


class GradientNoiseSpec(_Strict):
    """McCandlish et al. 2018: the simple noise scale tr(Sigma) / |G|^2."""

    every_steps: EverySteps = 100
    micro_batch_size: int = Field(
        8, ge=1, le=1024, description="samples per gradient estimate (1: per-example gradients)"
    )


class DiagnosticsSpec(_Strict):
    landscape: LandscapeSpec | None = None
    covariate_shift: CovariateShiftSpec | None = None
    gradient_noise: GradientNoiseSpec | None = None

    @property
    def asked(self) -> bool:
        """Whether any probe is on: `{}` asks for none, and trains as a job without it."""
        return any(
            probe is not None
            for probe in (self.landscape, self.covariate_shift, self.gradient_noise)
        )


class JobSpec(_Strict):
    name: Name | None = None
    dataset: DatasetSpec
    model: ModelSpec = Field(default_factory=lambda: ModelSpec.model_validate({}))
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    grad_clip_norm: float | None = Field(None, gt=0.0)
    early_stopping: EarlyStoppingSpec | None = None
    epochs: int = Field(ge=1)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["none", "bf16"] = Field("none", description="bf16 autocast, on CUDA")
    max_wall_seconds: int | None = Field(None, ge=1, description="fail with timeout past this")
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=32)
    callback: CallbackSpec | None = Field(
        None, description="POSTed to, signed, when the job ends (see README: Webhooks)"
    )
    diagnostics: DiagnosticsSpec | None = Field(
        None, description="opt-in probes of the loss landscape, covariate shift, gradient noise"
    )

    @property
    def noise_micro_batch_size(self) -> int | None:
        """The gradient-noise probe's micro-batch: a training forward of its own, when on."""
        noise = self.diagnostics.gradient_noise if self.diagnostics else None
        return noise.micro_batch_size if noise else None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.mixed_precision == "bf16" and self.device == "cpu":
            raise SpecError(
                "mixed_precision",
                "mixed_precision 'bf16' runs on CUDA; with device 'cpu' use 'none'",
            )
        if self.schedule.warmup_epochs >= self.epochs and self.schedule.warmup_epochs:
            raise SpecError(
                "schedule.warmup_epochs",
                f"schedule.warmup_epochs ({self.schedule.warmup_epochs}) must be below "
                f"epochs ({self.epochs})",
            )
        if (
            self.dataset.batch_size == 1
            and self.model.architecture == "mlp"
            and self.model.normalization.type == "batch_norm"
        ):
            # An mlp's batch norm takes each feature's statistics over the batch alone; a
            # cnn's also over positions, so it trains on one sample.
            raise SpecError(
                "dataset.batch_size",
                "batch_norm in an mlp normalizes each feature over the batch, which needs at "
                "least 2 samples: use a batch_size of 2 or more",
            )
        if (
            self.noise_micro_batch_size == 1
            and self.model.architecture == "mlp"
            and self.model.normalization.type == "batch_norm"
        ):
            # Each micro-batch's gradient is a training forward of its own: the same rule.
            raise SpecError(
                "diagnostics.gradient_noise.micro_batch_size",
                "batch_norm in an mlp normalizes each feature over the batch, which needs at "
                "least 2 samples: use a micro_batch_size of 2 or more",
            )
        if self.schedule.type == "cosine" and self.schedule.min_lr > self.optimizer.lr:
            raise SpecError(
                "schedule.min_lr",
                f"cosine decays from lr ({self.optimizer.lr}) down to min_lr "
                f"({self.schedule.min_lr}); min_lr must not exceed lr",
            )
        return self


def check_fits_dataset(spec: JobSpec, info: DatasetInfo) -> None:
    """Raise SpecError if the model cannot take this dataset's samples, or could not learn
    from them."""
    model = spec.model
    if model.architecture in ("cnn", "resnet") and info.kind == "tabular":
        raise SpecError(
            "model.architecture",
            f"{model.architecture} needs image or sequence data; "
            f"{info.name!r} is tabular (use mlp)",
        )
    norm = model.normalization
    if model.architecture != "mlp" and info.num_features == 1:
        # One position per channel (pooling keeps at least 2 of any larger input): norms
        # that average over positions have one value, or crash in the worker ("Expected more
        # than 1 spatial element when training").
        if (error := lone_value_norm(model)) is not None:
            raise SpecError(f"model.{error.field}", error.message)
        if norm.type == "instance_norm":
            raise SpecError(
                "model.normalization.type",
                f"instance_norm normalizes each channel over its positions; {info.name!r} has "
                "one feature, so one position (use another normalization)",
            )
        if norm.type == "batch_norm" and 1 in (
            spec.dataset.batch_size,
            spec.noise_micro_batch_size,
        ):
            field = (
                "dataset.batch_size"
                if spec.dataset.batch_size == 1
                else "diagnostics.gradient_noise.micro_batch_size"
            )
            raise SpecError(
                field,
                f"batch_norm on {info.name!r}, which has one feature, normalizes each channel "
                f"over the batch alone, which needs at least 2 samples: use a "
                f"{field.rsplit('.', 1)[-1]} of 2 or more",
            )
    # group_norm with one channel per group is instance_norm.
    per_channel = norm.type == "instance_norm" or (
        norm.type == "group_norm" and norm.num_groups == model.hidden_sizes[-1]
    )
    if per_channel and norm.position == "after_activation" and not _last_block_pools(model, info):
        # Instance norm gives each sample's channel a mean of exactly its bias, and the head
        # averages each channel over positions: the logits would see those biases only, and
        # every other gradient would be zero. (A max pool between the two breaks the mean.)
        what = "instance_norm" if norm.type == "instance_norm" else "group_norm of one channel"
        raise SpecError(
            "model.normalization.position",
            f"{what} after the activation of this {model.architecture}'s last "
            "block feeds the head's average pooling, which reduces each channel to the "
            "norm's bias: the output would not depend on the input (use before_activation, "
            "or another normalization)",
        )


def _last_block_pools(model: ModelSpec, info: DatasetInfo) -> bool:
    """Whether a max pool follows the last block's normalization (as build_cnn halves the
    resolution while it is at least 4; a ResNet pools between stages, never after the last)."""
    if model.architecture != "cnn":
        return False
    size = min(info.input_shape)
    for _ in model.hidden_sizes[:-1]:
        if size >= 4:
            size //= 2
    return size >= 4


def count_parameters(spec: JobSpec, info: DatasetInfo) -> int:
    """The trainable parameter count of the model the worker will build, without torch.

    Kept exact (a worker test compares it with the built model) so that the parameter limit
    is judged at submit, not discovered by a worker.
    """
    model = spec.model
    norm = model.normalization
    widths = model.hidden_sizes
    normalized = norm.type != "none" and norm.affine
    if model.architecture == "mlp":
        total, fan_in = 0, info.num_features
        for width in widths:
            total += fan_in * width + width
            if normalized:
                # rms_norm has a scale but no shift; the others have both.
                total += width if norm.type == "rms_norm" else 2 * width
            fan_in = width
        return total + fan_in * info.num_classes + info.num_classes
    spatial_dims = len(info.input_shape)
    kernel = model.kernel_size**spatial_dims

    def norm_params(channels: int) -> int:
        if not normalized:
            return 0
        return channels if norm.type == "rms_norm" else 2 * channels

    total, channels_in = 0, 1
    if model.architecture == "cnn":
        for width in widths:
            total += channels_in * width * kernel + width + norm_params(width)
            channels_in = width
    else:  # resnet: a stem, then per stage blocks of two convs, a 1x1 projection when widths change
        stem = widths[0]
        total += channels_in * stem * kernel + stem + norm_params(stem)
        channels_in = stem
        for width in widths:
            for block in range(model.blocks_per_stage):
                block_in = channels_in if block == 0 else width
                total += block_in * width * kernel + width + norm_params(width)
                total += width * width * kernel + width + norm_params(width)
                if block == 0 and block_in != width:
                    total += block_in * width + width
            channels_in = width
    return total + channels_in * info.num_classes + info.num_classes


# The memory estimate: what a run keeps per parameter besides its optimizer's slots (the
# weight, its gradient, and the frozen copy of the last epoch and the best epoch's copy that
# snapshots index into), and per activation for the backward pass (the layer's output, the
# normalized, activated and dropped-out values: a mask of the same size).
_COPIES_PER_PARAMETER = 4
_OPTIMIZER_SLOTS = {"adam": 2, "adamw": 2, "rmsprop": 1}  # sgd: 1 with momentum, else 0
_TENSORS_PER_ACTIVATION = 4
EVALUATION_CHUNK_SAMPLES = 1024


def evaluation_chunk(batch_size: int) -> int:
    """Samples per forward in evaluation: the largest chunk the trainer computes at once."""
    return max(batch_size, EVALUATION_CHUNK_SAMPLES)


def sample_count(dataset: DatasetSpec, info: DatasetInfo) -> int:
    """The dataset's samples: a synthetic one has as many as its spec asks for."""
    return dataset.n_samples if info.synthetic and dataset.n_samples else info.n_samples


def memory_bytes(spec: JobSpec, info: DatasetInfo, itemsize: int) -> int:
    """An estimate of the device memory a run of this spec takes, without torch.

    Its parameters' state (weights, gradients, optimizer slots, the snapshots' copies) plus
    the activations of the largest chunk it computes at once (a training batch, or an
    evaluation chunk, never more than the dataset's samples) as autograd keeps them, in
    values of `itemsize` bytes. The data is not counted (uploads have limits of their own).
    The API refuses a spec over TRAINSVC_MAX_JOB_MEMORY_BYTES with it, and a worker sizes its
    packs with it (in half the device's free memory, and fewer after an out-of-memory).

    An order of magnitude, not a bound: one CPU epoch's peak RSS measured 0.8 to 1.6 times
    it (benchmarks/memory_estimate.py, docs/benchmarks.md); not yet measured on a GPU.
    """
    optimizer = spec.optimizer
    slots = _OPTIMIZER_SLOTS.get(optimizer.type, 1 if optimizer.momentum > 0 else 0)
    state = count_parameters(spec, info) * (_COPIES_PER_PARAMETER + slots)
    model = spec.model
    if model.architecture == "mlp":
        per_sample = sum(model.hidden_sizes) + info.num_classes
    else:  # as build_cnn and build_resnet halve the resolution, while it is at least 4
        dims, size = len(info.input_shape), min(info.input_shape)
        positions, per_sample = info.num_features, 0
        for width in model.hidden_sizes:
            blocks = model.blocks_per_stage * 2 if model.architecture == "resnet" else 1
            per_sample += width * positions * blocks
            if size >= 4:
                positions, size = max(1, positions // 2**dims), size // 2
        per_sample += info.num_classes
    samples = min(evaluation_chunk(spec.dataset.batch_size), sample_count(spec.dataset, info))
    return (state + samples * per_sample * _TENSORS_PER_ACTIVATION) * itemsize
