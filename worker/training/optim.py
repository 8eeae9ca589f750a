"""Optimizers and learning-rate schedules from the spec."""

import math
from collections.abc import Callable, Iterable

import torch

from app.core.spec import OptimizerSpec, ScheduleSpec


def build_optimizer(
    spec: OptimizerSpec, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    if spec.type == "sgd":
        return torch.optim.SGD(
            params,
            lr=spec.lr,
            momentum=spec.momentum,
            nesterov=spec.nesterov,
            weight_decay=spec.weight_decay,
        )
    if spec.type == "adam":
        return torch.optim.Adam(
            params, lr=spec.lr, betas=(spec.betas[0], spec.betas[1]), weight_decay=spec.weight_decay
        )
    if spec.type == "adamw":
        return torch.optim.AdamW(
            params, lr=spec.lr, betas=(spec.betas[0], spec.betas[1]), weight_decay=spec.weight_decay
        )
    return torch.optim.RMSprop(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )


def lr_factor(
    spec: ScheduleSpec, base_lr: float, epochs: int, steps_per_epoch: int
) -> Callable[[int], float]:
    """The multiplier of the base learning rate at each optimizer step: one function for every
    schedule, stepped once per batch, so warm-up and decay are smooth and resume exactly."""
    total = max(1, epochs * steps_per_epoch)
    warmup = spec.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        if spec.type == "constant":
            return 1.0
        if spec.type == "step":
            return float(spec.gamma ** ((step // steps_per_epoch) // spec.step_size))
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if spec.type == "cosine":
            floor = spec.min_lr / base_lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        # one_cycle: up from lr/25 to lr over the first 30%, then cosine down to lr/1e4
        peak = 0.3
        if progress < peak:
            return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * progress / peak))
        tail = (progress - peak) / (1 - peak)
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * tail))

    return factor
