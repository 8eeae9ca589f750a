"""Model builders: a spec in, an nn.Module out. They only build; the loop trains."""

from torch import nn

from app.datasets.catalog import DatasetInfo
from app.jobs.spec import ModelSpec, NormalizationSpec

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "selu": nn.SELU,
}


def feature_norm(spec: NormalizationSpec, width: int) -> nn.Module:
    """A normalization layer over a [batch, width] activation."""
    if spec.type == "batch_norm":
        return nn.BatchNorm1d(width, eps=spec.eps, momentum=spec.momentum, affine=spec.affine)
    if spec.type == "layer_norm":
        return nn.LayerNorm(width, eps=spec.eps, elementwise_affine=spec.affine)
    if spec.type == "group_norm":
        return nn.GroupNorm(spec.num_groups, width, eps=spec.eps, affine=spec.affine)
    if spec.type == "rms_norm":
        return nn.RMSNorm(width, eps=spec.eps, elementwise_affine=spec.affine)
    raise ValueError(f"normalization {spec.type!r} does not apply to an mlp")


def dropout_layer(kind: str, rate: float) -> nn.Module:
    return nn.AlphaDropout(rate) if kind == "alpha" else nn.Dropout(rate)


def build_mlp(spec: ModelSpec, info: DatasetInfo) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    if spec.dropout.input_rate:
        layers.append(dropout_layer(spec.dropout.type, spec.dropout.input_rate))
    fan_in = info.num_features
    norm = spec.normalization
    for width, rate in zip(spec.widths, spec.dropout.rates(len(spec.widths)), strict=True):
        layers.append(nn.Linear(fan_in, width))
        block = [ACTIVATIONS[spec.activation]()]
        if norm.type != "none":
            position = 0 if norm.position == "before_activation" else 1
            block.insert(position, feature_norm(norm, width))
        layers.extend(block)
        if rate:
            layers.append(dropout_layer(spec.dropout.type, rate))
        fan_in = width
    layers.append(nn.Linear(fan_in, info.num_classes))
    return nn.Sequential(*layers)


def build_model(spec: ModelSpec, info: DatasetInfo) -> nn.Module:
    if spec.architecture == "mlp":
        return build_mlp(spec, info)
    raise ValueError(f"architecture {spec.architecture!r} is not available in this worker")
