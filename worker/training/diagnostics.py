"""What the trainer measures beyond loss and accuracy: the numbers that show normalization
steadying each layer's inputs and dropout narrowing the generalization gap.

Per layer: the weight norm, the gradient norm (mean over the epoch's steps), and the mean and
standard deviation of the pre-activations (the activation function's input) on a fixed probe
batch (the first training samples) in eval mode. Gradient norms accumulate on the device;
nothing here syncs with the host more than once per epoch.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from worker.training.models import ACTIVATIONS

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
ACTIVATION_TYPES = tuple(ACTIVATIONS.values())


class LayerDiagnostics:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.layers = [
            (name, module) for name, module in model.named_modules() if isinstance(module, WEIGHTED)
        ]
        self.activations = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, ACTIVATION_TYPES)
        ]
        position = {id(p): i for i, p in enumerate(self.params)}
        device = self.params[0].device
        self.layer_params = torch.tensor(
            [position[id(module.weight)] for _, module in self.layers], device=device
        )
        self.grad_norm_sums = torch.zeros(len(self.layers), device=device)
        self.captured: dict[str, torch.Tensor] = {}

    def clip_and_measure(self, max_norm: float | None) -> torch.Tensor:
        """The step's global gradient norm (before clipping), clipping to max_norm if given.

        One foreach norm over every gradient serves the global norm, the clipping and the
        per-layer sums, where clip_grad_norm_ plus a second pass would compute it twice.
        """
        grads = [p.grad for p in self.params]
        norms = torch.stack(torch._foreach_norm(grads))  # type: ignore[arg-type]
        total: torch.Tensor = torch.linalg.vector_norm(norms)
        self.grad_norm_sums += norms[self.layer_params]
        if max_norm is not None:
            # As clip_grad_norm_ scales: only when over the limit, and without a host sync.
            scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, scale)  # type: ignore[arg-type]
        return total

    @contextmanager
    def capturing_pre_activations(self) -> Iterator[None]:
        """While open, a forward pass records each activation's input mean and std.

        The trainer opens it around its eval-mode pass over the fixed training slice, so the
        probe batch costs no forward pass of its own.
        """
        self.captured.clear()

        def capture(name: str) -> Any:
            def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0].float()
                self.captured[name] = torch.stack([x.mean(), x.std()])

            return hook

        handles = [
            module.register_forward_pre_hook(capture(name)) for name, module in self.activations
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.inference_mode()
    def epoch_report(self, steps: int) -> list[dict[str, Any]]:
        captured = self.captured
        weight_norms = torch.stack(
            torch._foreach_norm([module.weight for _, module in self.layers])
        )
        # One transfer for everything: a host sync per epoch, not per layer.
        grad_means = (self.grad_norm_sums / max(steps, 1)).tolist()
        weight_norms_list = weight_norms.tolist()
        stats = {name: value.tolist() for name, value in captured.items()}
        self.grad_norm_sums.zero_()
        report: list[dict[str, Any]] = [
            {"name": name, "kind": type(module).__name__, "weight_norm": weight, "grad_norm": grad}
            for (name, module), weight, grad in zip(
                self.layers, weight_norms_list, grad_means, strict=True
            )
        ]
        report += [
            {
                "name": name,
                "kind": "activation",
                "pre_activation_mean": stats[name][0],
                "pre_activation_std": stats[name][1],
            }
            for name, _ in self.activations
            if name in stats
        ]
        return report
