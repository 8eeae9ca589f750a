"""Probes of *why* a configuration trains as it does, measured on sampled steps when a spec asks.

Three measurements from the literature, each opt-in (JobSpec.diagnostics):

- the loss landscape along the gradient (Santurkar, Tsipras, Ilyas, Madry 2018, section 3.2):
  at weights theta with gradient g (on a fixed probe batch) and learning rate lr, the loss and
  gradient at theta - s * lr * g for each multiplier s. loss_variation is the range of those
  losses, gradient_predictiveness the largest |grad L(theta) - grad L(theta')|, beta_smoothness
  the largest |grad L(theta) - grad L(theta')| / |theta - theta'|; each also relative (to the
  loss, to |grad L(theta)|), because a network stuck where the signal vanishes looks smooth in
  raw terms;
- internal covariate shift (ibid., definition 2.1): per weighted layer, its gradient G on the
  step's batch at the step's starting weights, and G' with every parameter before the layer
  already moved by the optimizer's actual update (momentum, Adam and all); |G - G'| and
  cos(G, G'). "Before" is the order in which the model registers its parameters, which is
  forward order for the MLP and CNN; in a residual block the shortcut counts after the branch;
- the simple gradient noise scale (McCandlish, Kaplan, Amodei et al. 2018, appendix A.1):
  B_simple = tr(Sigma) / |G|^2, from the gradients of micro-batches of the probe batch, with
  the paper's unbiased estimators of both from two batch sizes (a micro-batch and the whole).

A probe never changes the training trajectory: parameters, buffers (batch-norm running
statistics), the dropout layers' stream position and the modules' train/eval flags are put
back bit for bit (nothing here draws from torch's generators),
the optimizer is never touched, and gradients come from torch.autograd.grad, so the step's own
.grad is left as it was. Probes run in train mode, as the optimizer sees the loss: batch norm
normalizes with the probe batch's statistics. Dropout is switched off for the landscape and the
covariate shift (a fresh mask per evaluation would make theta and theta', G and G', differ by
the masks rather than by the step, swamping what is measured), and left on for the gradient
noise, whose question is exactly how noisy the gradients the optimizer follows are, dropout's
noise included: each micro-batch draws masks of its own, from the step's stream position
tagged with the micro-batch (worker/training/dropout.py), never the training step's masks.
Probes compute in float32 (no autocast).
"""

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812  (the PyTorch convention)
from torch import nn

from app.core.spec import DiagnosticsSpec
from worker.training.diagnostics import WEIGHTED
from worker.training.dropout import dropouts, position_of, set_position

# Cap on the probe batch: the landscape's batch is the training batch size, up to this.
MAX_PROBE_SAMPLES = 512


@contextmanager
def preserved(model: nn.Module, *, dropout: bool) -> Iterator[None]:
    """While open the model may be moved, run and trained on; on exit it is exactly as before:
    parameters, buffers, the dropout layers' stream position and every module's train flag."""
    parameters = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    modes = [module.training for module in model.modules()]
    position = position_of(model)
    if not dropout:
        for _, layer in dropouts(model):
            layer.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, saved in zip(model.parameters(), parameters, strict=True):
                parameter.copy_(saved)
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode
        set_position(model, position)


def _loss_and_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, wrt: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(wrt), allow_unused=True, materialize_grads=True)
    return loss.detach(), list(grads)


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _set(parameters: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, value in zip(parameters, values, strict=True):
            parameter.copy_(value)


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


# -- the measurements, each on given weights and batch ---------------------------------------


@dataclass(frozen=True)
class LandscapeSample:
    loss: float
    grad_norm: float
    loss_variation: float
    gradient_predictiveness: float
    beta_smoothness: float


def measure_landscape(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, multipliers: Sequence[float]
) -> LandscapeSample:
    """The landscape along -lr * grad L(theta) on (x, y); the model is left as it was."""
    parameters = _trainable(model)
    with preserved(model, dropout=False):
        loss, grads = _loss_and_grads(model, x, y, parameters)
        origin = [p.detach().clone() for p in parameters]
        flat_origin, flat_grad = _flat(origin), _flat(grads)
        losses, differences, ratios = [], [], []
        for multiplier in multipliers:
            _set(parameters, [o - multiplier * lr * g for o, g in zip(origin, grads, strict=True)])
            moved_loss, moved_grads = _loss_and_grads(model, x, y, parameters)
            difference = torch.linalg.vector_norm(flat_grad - _flat(moved_grads))
            # The distance actually travelled, as rounded into the weights.
            distance = torch.linalg.vector_norm(
                _flat([p.detach() for p in parameters]) - flat_origin
            )
            losses.append(moved_loss)
            differences.append(difference)
            ratios.append(torch.where(distance > 0, difference / distance, 0.0))
        values = torch.stack(
            [
                loss,
                torch.linalg.vector_norm(flat_grad),
                torch.stack(losses).max() - torch.stack(losses).min(),
                torch.stack(differences).max(),
                torch.stack(ratios).max(),
            ]
        ).tolist()  # one host sync per sampled step
    return LandscapeSample(*values)


@dataclass(frozen=True)
class LayerShift:
    name: str
    l2: float  # |G - G'|
    l2_relative: float  # |G - G'| / |G|
    cosine: float  # cos(G, G')


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHTED)]


def measure_covariate_shift(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, before: Sequence[torch.Tensor]
) -> list[LayerShift]:
    """Per weighted layer: its weight's gradient on (x, y) at `before` (G), and with every
    parameter registered before that weight at the model's current values, the rest at
    `before` (G'). The model's current weights are `before` after one optimizer step."""
    parameters = _trainable(model)
    position = {id(p): i for i, p in enumerate(parameters)}
    layers = weighted_layers(model)
    weights: list[torch.Tensor] = [module.weight for _, module in layers]  # type: ignore[misc]
    found = []
    with preserved(model, dropout=False):
        after = [p.detach().clone() for p in parameters]
        _set(parameters, before)
        _, base_grads = _loss_and_grads(model, x, y, weights)
        rows = []
        for weight, base in zip(weights, base_grads, strict=True):
            first_own = position[id(weight)]
            _set(parameters, [*after[:first_own], *before[first_own:]])
            _, (shifted,) = _loss_and_grads(model, x, y, [weight])
            g, g_shifted = base.reshape(-1), shifted.reshape(-1)
            l2 = torch.linalg.vector_norm(g - g_shifted)
            norm = torch.linalg.vector_norm(g)
            rows.append(
                torch.stack([l2, l2 / norm, F.cosine_similarity(g, g_shifted, dim=0, eps=1e-30)])
            )
        values = torch.stack(rows).tolist()
    for (name, _), (l2_value, relative, cosine) in zip(layers, values, strict=True):
        found.append(LayerShift(name, l2_value, relative, cosine))
    return found


@dataclass(frozen=True)
class NoiseSample:
    trace_sigma: float  # unbiased estimate of tr(Sigma), the per-example gradient covariance
    grad_sq_norm: float  # unbiased estimate of |G|^2, the true gradient's squared norm


def measure_gradient_noise(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batch_size: int
) -> NoiseSample | None:
    """McCandlish et al.'s estimators from the micro-batch gradients (size b) and their mean
    (size B = m * b): |G|^2 = (B |G_B|^2 - b E|G_b|^2) / (B - b) and
    tr(Sigma) = (E|G_b|^2 - |G_B|^2) / (1/b - 1/B). None if fewer than two micro-batches fit."""
    b = micro_batch_size
    count = len(x) // b
    if count < 2:
        return None
    parameters = _trainable(model)
    step = position_of(model) or ()
    with preserved(model, dropout=True):
        total: torch.Tensor | None = None
        square_sum = torch.zeros((), device=x.device, dtype=x.dtype)
        for i in range(count):
            set_position(model, (*step, "gradient-noise", i))
            _, grads = _loss_and_grads(
                model, x[i * b : (i + 1) * b], y[i * b : (i + 1) * b], parameters
            )
            flat = _flat(grads)
            total = flat if total is None else total + flat
            square_sum = square_sum + flat.dot(flat)
        assert total is not None
        small = square_sum / count  # E|G_b|^2
        mean = total / count
        big = mean.dot(mean)  # |G_B|^2
        batch = count * b
        grad_sq = (batch * big - b * small) / (batch - b)
        trace = (small - big) / (1.0 / b - 1.0 / batch)
        trace_value, grad_sq_value = torch.stack([trace, grad_sq]).tolist()
    return NoiseSample(trace_value, grad_sq_value)


# -- sampling within training and the per-epoch report ---------------------------------------


def _finite(value: Any) -> Any:
    """NaN and infinities as None: a probe step 4 x lr long may overflow where training does
    not, and JSON (and PostgreSQL's json) cannot carry them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _mean_max(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return sum(values) / len(values), max(values)


class Probes:
    """The probes one job asked for, called by the loop around its optimizer steps.

    A probe is due at step 0 of every epoch and every `every_steps` steps after it, so each
    epoch has at least one sample and a resumed run samples the same steps.
    """

    def __init__(
        self,
        spec: DiagnosticsSpec,
        model: nn.Module,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        batch_size: int,
    ) -> None:
        self.spec = spec
        self.model = model
        size = min(batch_size, MAX_PROBE_SAMPLES, len(x_train))
        self.x_probe, self.y_probe = x_train[:size], y_train[:size]
        noise = spec.gradient_noise
        # The noise scale needs at least two micro-batches in its probe batch.
        noise_size = min(max(size, 2 * noise.micro_batch_size if noise else 0), len(x_train))
        self.x_noise, self.y_noise = x_train[:noise_size], y_train[:noise_size]
        self._before: list[torch.Tensor] | None = None
        self._reset()

    def _reset(self) -> None:
        self.landscape: list[LandscapeSample] = []
        self.shifts: list[list[LayerShift]] = []
        self.noise: list[NoiseSample] = []

    @staticmethod
    def _due(every: int, step: int) -> bool:
        return step % every == 0

    def before_step(self, step: int, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        """After backward, before the optimizer step: the probes at the step's weights."""
        spec = self.spec
        if spec.landscape and self._due(spec.landscape.every_steps, step):
            self.landscape.append(
                measure_landscape(
                    self.model, self.x_probe, self.y_probe, lr, spec.landscape.step_multipliers
                )
            )
        if spec.gradient_noise and self._due(spec.gradient_noise.every_steps, step):
            sample = measure_gradient_noise(
                self.model, self.x_noise, self.y_noise, spec.gradient_noise.micro_batch_size
            )
            if sample is not None:
                self.noise.append(sample)
        if spec.covariate_shift and self._due(spec.covariate_shift.every_steps, step):
            self._before = [p.detach().clone() for p in _trainable(self.model)]

    def after_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """After the optimizer step: the covariate shift, if before_step started one."""
        if self._before is not None:
            self.shifts.append(measure_covariate_shift(self.model, x, y, self._before))
            self._before = None

    def epoch_report(self, grad_norms: torch.Tensor) -> dict[str, Any]:
        """The epoch's diagnostics under their probe's key; clears the samples."""
        report: dict[str, Any] = {}
        if self.spec.landscape:
            report["landscape"] = self._landscape_report()
        if self.spec.covariate_shift:
            report["covariate_shift"] = self._covariate_shift_report()
        if self.spec.gradient_noise:
            report["gradient_noise"] = self._noise_report(grad_norms)
        self._reset()
        finite: dict[str, Any] = _finite(report)
        return finite

    def _landscape_report(self) -> dict[str, Any]:
        samples = self.landscape
        report: dict[str, Any] = {"samples": len(samples)}
        columns = {
            "loss_variation": [s.loss_variation for s in samples],
            "gradient_predictiveness": [s.gradient_predictiveness for s in samples],
            "beta_smoothness": [s.beta_smoothness for s in samples],
            "loss_variation_relative": [
                s.loss_variation / s.loss if s.loss else 0.0 for s in samples
            ],
            "gradient_predictiveness_relative": [
                s.gradient_predictiveness / s.grad_norm if s.grad_norm else 0.0 for s in samples
            ],
            "beta_smoothness_relative": [
                s.beta_smoothness / s.grad_norm if s.grad_norm else 0.0 for s in samples
            ],
            "loss": [s.loss for s in samples],
            "grad_norm": [s.grad_norm for s in samples],
        }
        for name, values in columns.items():
            report[f"{name}_mean"], report[f"{name}_max"] = _mean_max(values)
        return report

    def _covariate_shift_report(self) -> dict[str, Any]:
        samples = self.shifts
        layers: list[dict[str, Any]] = []
        for index, (name, _) in enumerate(weighted_layers(self.model)):
            at_layer = [sample[index] for sample in samples]
            layers.append(
                {
                    "name": name,
                    "ics_l2": _mean_max([s.l2 for s in at_layer])[0],
                    "ics_l2_relative": _mean_max([s.l2_relative for s in at_layer])[0],
                    "ics_cosine": _mean_max([s.cosine for s in at_layer])[0],
                }
            )
        # The first layer has nothing before it (G' = G): the summaries leave it out.
        shifted = [layer for layer in layers[1:] if layer["ics_l2"] is not None]
        return {
            "samples": len(samples),
            "ics_l2_relative_mean": _mean_max([layer["ics_l2_relative"] for layer in shifted])[0],
            "ics_cosine_mean": _mean_max([layer["ics_cosine"] for layer in shifted])[0],
            "layers": layers,
        }

    def _noise_report(self, grad_norms: torch.Tensor) -> dict[str, Any]:
        samples = self.noise
        trace, grad_sq = (
            _mean_max([s.trace_sigma for s in samples])[0],
            _mean_max([s.grad_sq_norm for s in samples])[0],
        )
        # Ratio of means, as the paper advises: each estimator is unbiased, their ratio is not,
        # and a single small |G|^2 estimate would make a per-step ratio explode.
        scale = (
            trace / grad_sq if trace is not None and grad_sq is not None and grad_sq > 0 else None
        )
        return {
            "samples": len(samples),
            "micro_batch_size": self.spec.gradient_noise.micro_batch_size
            if self.spec.gradient_noise
            else None,
            "gradient_noise_scale": scale,
            "trace_sigma_mean": trace,
            "grad_sq_norm_mean": grad_sq,
            "grad_norm_var": float(grad_norms.var()) if grad_norms.numel() > 1 else 0.0,
        }
