"""What the trainer measures beyond loss and accuracy: the numbers that show normalization
steadying each layer's inputs and dropout narrowing the generalization gap.

Per layer: the weight norm, the gradient norm (mean over the epoch's steps), and the mean and
standard deviation of the pre-activations (the activation function's input) on a fixed probe
batch in eval mode. Gradient norms accumulate on the device; nothing here syncs with the host
more than once per epoch.
"""

from typing import Any

import torch
from torch import nn

from worker.training.models import ACTIVATIONS

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
ACTIVATION_TYPES = tuple(ACTIVATIONS.values())


class LayerDiagnostics:
    def __init__(self, model: nn.Module, steps: int) -> None:
        self.model = model
        self.layers = [
            (name, module) for name, module in model.named_modules() if isinstance(module, WEIGHTED)
        ]
        self.activations = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, ACTIVATION_TYPES)
        ]
        device = next(model.parameters()).device
        self.grad_norm_sums = torch.zeros(len(self.layers), device=device)

    def after_backward(self) -> None:
        grads = [module.weight.grad for _, module in self.layers]
        if all(grad is not None for grad in grads):
            self.grad_norm_sums += torch.stack(torch._foreach_norm(grads))  # type: ignore[arg-type]

    @torch.no_grad()
    def epoch_report(self, probe: torch.Tensor, steps: int) -> list[dict[str, Any]]:
        captured: dict[str, torch.Tensor] = {}

        def capture(name: str) -> Any:
            def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0].float()
                captured[name] = torch.stack([x.mean(), x.std()])

            return hook

        handles = [
            module.register_forward_pre_hook(capture(name)) for name, module in self.activations
        ]
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(probe)
        finally:
            self.model.train(was_training)
            for handle in handles:
                handle.remove()
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
