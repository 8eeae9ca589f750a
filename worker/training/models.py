"""Model builders: a spec in, an nn.Module out. They only build; the loop trains.

Three architectures share one vocabulary of normalization, activation and dropout, so a study
can change exactly one of them. The trainable parameter count of every model equals
app.core.spec.count_parameters (a test holds the two together), which lets the API enforce
its parameter limit without torch.
"""

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from app.core.catalog import DatasetInfo
from app.core.spec import ModelSpec, NormalizationSpec
from worker.training.dropout import Dropout, name_dropouts

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "selu": nn.SELU,
}


class ChannelRMSNorm(nn.Module):
    """RMSNorm for conv activations: scales each sample by the RMS over channels and positions,
    with a learned per-channel gain (the conv analogue of LayerNorm without centring)."""

    def __init__(self, channels: int, eps: float, affine: bool) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim()))
        x = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + self.eps)
        if self.weight is None:
            return x
        return x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))


class AddChannel(nn.Module):
    """[n, *spatial] -> [n, 1, *spatial]: datasets store samples without a channel axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


def feature_norm(spec: NormalizationSpec, width: int) -> nn.Module:
    """A normalization layer over [batch, width] activations (the MLP's)."""
    if spec.type == "batch_norm":
        return nn.BatchNorm1d(width, eps=spec.eps, momentum=spec.momentum, affine=spec.affine)
    if spec.type == "layer_norm":
        return nn.LayerNorm(width, eps=spec.eps, elementwise_affine=spec.affine)
    if spec.type == "group_norm":
        return nn.GroupNorm(spec.num_groups, width, eps=spec.eps, affine=spec.affine)
    if spec.type == "rms_norm":
        return nn.RMSNorm(width, eps=spec.eps, elementwise_affine=spec.affine)
    raise ValueError(f"normalization {spec.type!r} does not apply to an mlp")


def channel_norm(spec: NormalizationSpec, channels: int, dims: int) -> nn.Module:
    """A normalization layer over [batch, channels, *spatial] activations (1-D or 2-D)."""
    if spec.type == "batch_norm":
        batch_norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        return batch_norm(channels, eps=spec.eps, momentum=spec.momentum, affine=spec.affine)
    if spec.type == "layer_norm":
        # Over channels and positions together: one group is LayerNorm for feature maps.
        return nn.GroupNorm(1, channels, eps=spec.eps, affine=spec.affine)
    if spec.type == "group_norm":
        return nn.GroupNorm(spec.num_groups, channels, eps=spec.eps, affine=spec.affine)
    if spec.type == "instance_norm":
        instance_norm = nn.InstanceNorm1d if dims == 1 else nn.InstanceNorm2d
        return instance_norm(channels, eps=spec.eps, affine=spec.affine)
    if spec.type == "rms_norm":
        return ChannelRMSNorm(channels, spec.eps, spec.affine)
    raise ValueError(f"unknown normalization {spec.type!r}")


def dropout_layer(kind: str, rate: float, dims: int = 0) -> Dropout:
    """dims=0 for feature vectors; 1 or 2 for feature maps (where spatial dropout applies)."""
    return Dropout(rate, alpha=kind == "alpha", feature=kind == "spatial" and dims > 0)


def _norm_and_activation(spec: ModelSpec, norm: nn.Module | None) -> list[tuple[str, nn.Module]]:
    """The activation, with the normalization before or after it as the spec places it."""
    layers: list[tuple[str, nn.Module]] = [("activation", ACTIVATIONS[spec.activation]())]
    if norm is not None:
        position = 0 if spec.normalization.position == "before_activation" else 1
        layers.insert(position, ("norm", norm))
    return layers


def _named(layers: list[tuple[str, nn.Module]]) -> nn.Sequential:
    """A Sequential whose children are named for what they are: `linear`, `norm`, ..."""
    return nn.Sequential(OrderedDict(layers))


def _indexed(blocks: Sequence[nn.Module]) -> nn.Sequential:
    return nn.Sequential(*blocks)  # children 0, 1, ...: the position is the name


def _input_dropout(spec: ModelSpec) -> list[tuple[str, nn.Module]]:
    if not spec.dropout.input_rate:
        return []
    # Input dropout is element-wise even for "spatial": a sample has a single channel.
    kind = "alpha" if spec.dropout.type == "alpha" else "standard"
    return [("input_dropout", dropout_layer(kind, spec.dropout.input_rate))]


def build_mlp(spec: ModelSpec, info: DatasetInfo) -> nn.Sequential:
    """flatten, input_dropout, hidden.<i>.{linear, norm, activation, dropout}, output."""
    fan_in = info.num_features
    has_norm = spec.normalization.type != "none"
    hidden: list[nn.Module] = []
    for width, rate in zip(
        spec.hidden_sizes, spec.dropout.rates(len(spec.hidden_sizes)), strict=True
    ):
        layer: list[tuple[str, nn.Module]] = [("linear", nn.Linear(fan_in, width))]
        layer += _norm_and_activation(
            spec, feature_norm(spec.normalization, width) if has_norm else None
        )
        if rate:
            layer.append(("dropout", dropout_layer(spec.dropout.type, rate)))
        hidden.append(_named(layer))
        fan_in = width
    return _named(
        [
            ("flatten", nn.Flatten()),
            *_input_dropout(spec),
            ("hidden", _indexed(hidden)),
            ("output", nn.Linear(fan_in, info.num_classes)),
        ]
    )


def _conv(dims: int, channels_in: int, channels_out: int, kernel: int) -> nn.Module:
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    return conv(channels_in, channels_out, kernel, padding=kernel // 2)


def _pool(dims: int) -> nn.Module:
    return nn.MaxPool1d(2) if dims == 1 else nn.MaxPool2d(2)


def _head(dims: int, channels: int, classes: int) -> nn.Sequential:
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    return _named(
        [("pool", pool), ("flatten", nn.Flatten()), ("linear", nn.Linear(channels, classes))]
    )


def build_cnn(spec: ModelSpec, info: DatasetInfo) -> nn.Sequential:
    """Conv blocks (conv, norm/activation, dropout), halving the resolution while it is >= 4:
    add_channel, input_dropout, blocks.<i>.{conv, norm, activation, dropout, pool}, head."""
    dims = len(info.input_shape)
    size = min(info.input_shape)
    channels_in = 1
    has_norm = spec.normalization.type != "none"
    blocks: list[nn.Module] = []
    for width, rate in zip(
        spec.hidden_sizes, spec.dropout.rates(len(spec.hidden_sizes)), strict=True
    ):
        block: list[tuple[str, nn.Module]] = [
            ("conv", _conv(dims, channels_in, width, spec.kernel_size))
        ]
        block += _norm_and_activation(
            spec, channel_norm(spec.normalization, width, dims) if has_norm else None
        )
        if rate:
            block.append(("dropout", dropout_layer(spec.dropout.type, rate, dims)))
        if size >= 4:
            block.append(("pool", _pool(dims)))
            size //= 2
        blocks.append(_named(block))
        channels_in = width
    return _named(
        [
            ("add_channel", AddChannel()),
            *_input_dropout(spec),
            ("blocks", _indexed(blocks)),
            ("head", _head(dims, channels_in, info.num_classes)),
        ]
    )


class ResidualBlock(nn.Module):
    """Two convs with normalization, plus the identity (or a 1x1 projection when widths change).

    first.{conv, norm, activation, dropout}, second.{conv, norm}, shortcut, activation, and
    output_norm where the normalization comes after the activation.
    """

    def __init__(
        self, spec: ModelSpec, dims: int, channels_in: int, width: int, rate: float
    ) -> None:
        super().__init__()
        has_norm = spec.normalization.type != "none"

        def norm() -> nn.Module | None:
            return channel_norm(spec.normalization, width, dims) if has_norm else None

        first: list[tuple[str, nn.Module]] = [
            ("conv", _conv(dims, channels_in, width, spec.kernel_size)),
            *_norm_and_activation(spec, norm()),
        ]
        if rate:
            first.append(("dropout", dropout_layer(spec.dropout.type, rate, dims)))
        self.first = _named(first)
        second: list[tuple[str, nn.Module]] = [
            ("conv", _conv(dims, width, width, spec.kernel_size))
        ]
        second_norm = norm()
        if second_norm is not None and spec.normalization.position == "before_activation":
            second.append(("norm", second_norm))  # normalize the residual branch before the sum
        self.second = _named(second)
        self.shortcut = (
            _conv(dims, channels_in, width, 1) if channels_in != width else nn.Identity()
        )
        self.activation = ACTIVATIONS[spec.activation]()
        # With the normalization after the activation, it applies to the block's output.
        self.output_norm = (
            second_norm if spec.normalization.position == "after_activation" else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.activation(self.second(self.first(x)) + self.shortcut(x))
        return self.output_norm(out) if self.output_norm is not None else out


def build_resnet(spec: ModelSpec, info: DatasetInfo) -> nn.Sequential:
    """A stem conv, then per width a stage of residual blocks, halving resolution between
    stages: add_channel, input_dropout, stem.{conv, norm, activation},
    stages.<i>.{pool, blocks.<j>.*}, head."""
    dims = len(info.input_shape)
    size = min(info.input_shape)
    stem_width = spec.hidden_sizes[0]
    has_norm = spec.normalization.type != "none"
    stem = _named(
        [
            ("conv", _conv(dims, 1, stem_width, spec.kernel_size)),
            *_norm_and_activation(
                spec, channel_norm(spec.normalization, stem_width, dims) if has_norm else None
            ),
        ]
    )
    channels_in = stem_width
    stages: list[nn.Module] = []
    for stage, (width, rate) in enumerate(
        zip(spec.hidden_sizes, spec.dropout.rates(len(spec.hidden_sizes)), strict=True)
    ):
        layers: list[tuple[str, nn.Module]] = []
        if stage and size >= 4:
            layers.append(("pool", _pool(dims)))
            size //= 2
        blocks = [
            ResidualBlock(spec, dims, channels_in if block == 0 else width, width, rate)
            for block in range(spec.blocks_per_stage)
        ]
        layers.append(("blocks", _indexed(blocks)))
        stages.append(_named(layers))
        channels_in = width
    return _named(
        [
            ("add_channel", AddChannel()),
            *_input_dropout(spec),
            ("stem", stem),
            ("stages", _indexed(stages)),
            ("head", _head(dims, channels_in, info.num_classes)),
        ]
    )


def build_model(spec: ModelSpec, info: DatasetInfo) -> nn.Module:
    if spec.architecture == "mlp":
        model = build_mlp(spec, info)
    elif info.kind == "tabular":
        raise ValueError(
            f"{spec.architecture} needs image or sequence data; {info.name!r} is tabular"
        )
    else:
        model = build_cnn(spec, info) if spec.architecture == "cnn" else build_resnet(spec, info)
    name_dropouts(model)
    return model
