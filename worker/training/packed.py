"""Packed trials: jobs that differ only in numbers, trained together as one batched model.

A study's jobs share a dataset and an architecture and differ in learning rates, seeds,
dropout rates, ... Trained one at a time, a small model runs at kernel-launch speed. Here the
weights of T such jobs ("trials") are stacked on a leading trial dimension and every step
trains all of them at once: linear layers as one batched matmul, convolutions as one grouped
convolution with the trials folded into channels (trial t's channels are group t), batch norm
folded into channels (one fused call), each trial's own optimizer hyper-parameters as tensors
over the trial dimension.

Every trial stays its own job, exactly (in float64 on CPU, to rounding) as TrainingRun trains
it alone:
- its initial weights are the single model's: each trial's model is built by build_model
  under torch.manual_seed(trial seed), as TrainingRun builds it, and the parameters stacked;
- its forward pass is the single model's, layer by layer: the pack walks the layers of the
  model build_model builds and applies each one's packed form;
- its data order comes from its own generator seeded seed + 1, as TrainingRun's;
- its dropout masks are the single model's: counter-based (worker/training/dropout.py), a
  function of its seed, epoch, step, layer and element, computed for every trial of the pack
  in one call. So a trial's masks never depend on the other trials or its position in the
  pack, and are the same on CPU and CUDA;
- its optimizer update follows torch.optim's single-tensor formulas (SGD with momentum and
  Nesterov, Adam with bias correction and eps outside the square root, AdamW's decoupled
  decay, RMSprop with alpha 0.99 and centered=False), its schedule is lr_factor at its own
  step, and gradients are clipped by the trial's own norm.

Its results unstack into the ordinary records: per-epoch metrics and diagnostics with
TrainingRun's keys and layer names, weights under the single model's state-dict names, and a
trainer state TrainingRun resumes from (and this class resumes from TrainingRun's). A trial
that diverges, stops early, finishes or is asked to leave (cancelled) leaves the pack; the
others go on.

MLPs, CNNs and ResNets pack: the packed forward walks the single model's modules in the order
its forward applies them (a Sequential's children in turn, a ResidualBlock's branch, shortcut
and sum as its forward has them) and applies each leaf's packed form.
"""

import math
import time
import weakref
from collections.abc import Callable, Collection, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812  (the PyTorch convention)
from torch import nn

from app.core.catalog import DatasetInfo
from app.core.spec import JobSpec, evaluation_chunk, memory_bytes
from worker.training.checkpoint import (
    optimizer_state_from_json,
    pack_state,
    pack_weights,
    unpack_state,
    unpack_weights,
)
from worker.training.data import PreparedData
from worker.training.diagnostics import ACTIVATION_TYPES, WEIGHTED
from worker.training.dropout import (
    Dropout,
    apply_noise,
    dropouts,
    keep_mask,
    keep_thresholds,
    mask_shape,
    stream_key,
)
from worker.training.loop import (
    TRAIN_EVAL_SAMPLES,
    Diverged,
    EpochResult,
    Progress,
    full_precision,
    resolve_device,
)
from worker.training.models import AddChannel, ChannelRMSNorm, ResidualBlock, build_model
from worker.training.optim import build_optimizer, lr_factor

RMSPROP_ALPHA = 0.99  # torch.optim.RMSprop's defaults, which build_optimizer keeps
OPTIMIZER_EPS = 1e-8  # Adam's, AdamW's and RMSprop's default eps
CHANNEL_WISE = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def pack_key(spec: JobSpec) -> Hashable | None:
    """Jobs with equal keys can train as one pack; None: this job trains alone.

    The key holds everything that shapes the computation: the dataset and its split (all of
    the dataset spec but label_noise, which changes labels only), the architecture, widths,
    a CNN's kernel size, activation, normalization type, position, affinity and groups, the
    dropout type and which layers have dropout at all, the batch size and epochs, the
    optimizer type (and whether it has momentum or Nesterov), the schedule type, whether
    gradients are clipped, the device and the precision. What is left may differ per trial:
    learning rate, momentum, weight decay, betas, dropout rates, normalization momentum and
    eps, the clipping norm, warm-up and schedule parameters, label noise, early stopping and
    the seed.
    """
    model = spec.model
    if spec.diagnostics is not None and spec.diagnostics.asked:
        return None  # probes measure one model's own steps: a probed job trains alone
    norm, dropout, optimizer = model.normalization, model.dropout, spec.optimizer
    return (
        spec.dataset.model_dump_json(exclude={"label_noise"}),
        model.architecture,
        tuple(model.hidden_sizes),
        model.kernel_size if model.architecture != "mlp" else 0,  # an MLP has no kernel
        model.blocks_per_stage if model.architecture == "resnet" else 0,
        model.activation,
        (
            norm.type,
            norm.position,
            norm.affine,
            norm.num_groups if norm.type == "group_norm" else 0,
        ),
        (dropout.type, tuple(rate > 0 for rate in dropout.rates(len(model.hidden_sizes)))),
        dropout.input_rate > 0,
        (optimizer.type, optimizer.momentum > 0, optimizer.nesterov),
        spec.schedule.type,
        spec.grad_clip_norm is not None,
        spec.epochs,
        spec.device,
        spec.mixed_precision,
    )


def trial_memory_bytes(spec: JobSpec, info: DatasetInfo) -> int:
    """A generous estimate of the device memory one more trial of this spec adds to a pack, in
    torch's default dtype (app.core.spec.memory_bytes; the data is the pack's, shared by every
    trial)."""
    return memory_bytes(spec, info, torch.get_default_dtype().itemsize)


def free_memory_bytes(device: torch.device) -> int | None:
    """The device's free memory now, to this process: CUDA's count plus what its caching
    allocator holds unused, or the host's available memory (None where the system does not
    say)."""
    if device.type == "cuda":
        # The driver counts the blocks PyTorch's caching allocator keeps for reuse (an earlier
        # job's, freed) as used; they are free to this process, the one that packs.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0] + cached)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class TrialEpoch:
    """What one epoch of the pack gave one trial: a result, or the divergence that ended it."""

    trial: int  # the trial's position in the list the pack was built from
    result: EpochResult | None
    diverged: Diverged | None = None


@dataclass(frozen=True)
class _EpsGroups:
    """The active trials grouped by batch norm eps (the fused kernel takes one), their
    positions as index tensors on the device: built when the trials change, since indexing by
    a host list in every forward copies the list to the device, on CUDA waiting for it, once a
    layer a step."""

    eps: list[float]
    positions: list[torch.Tensor]
    inverse: torch.Tensor  # from the groups' concatenation back to the trials' order
    same_momentum: bool  # then the kernel can update the running statistics itself

    @classmethod
    def of(cls, trials: Sequence["Trial"], device: torch.device) -> "_EpsGroups":
        norms = [t.spec.model.normalization for t in trials]
        by_eps: dict[float, list[int]] = {}
        for position, norm in enumerate(norms):
            by_eps.setdefault(norm.eps, []).append(position)
        order = [p for positions in by_eps.values() for p in positions]
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[order] = torch.arange(len(order))
        return cls(
            eps=list(by_eps),
            positions=[torch.tensor(p, device=device) for p in by_eps.values()],
            inverse=inverse.to(device),
            same_momentum=len({n.momentum for n in norms}) == 1,
        )


@dataclass(frozen=True)
class _Frozen:
    """The pack's tensors as of the end of one epoch (copies): snapshots index into them."""

    tensors: dict[str, torch.Tensor]  # weights and buffers, stacked
    optimizer: dict[str, dict[str, torch.Tensor]]  # per parameter, per state key, stacked


@dataclass(frozen=True)
class _Snapshot:
    epoch: int
    frozen: _Frozen
    position: int  # the trial's index on the trial dimension of `frozen`
    state: dict[str, Any]  # everything but tensors: progress, RNG states, step counts


class Trial:
    """One job of the pack: its spec, streams and bookkeeping, and its view of the results.

    It answers what TrainingRun answers (completed_epoch, best_epoch, finished, weights(),
    trainer_state(), summary()), so the worker records a trial as it records a run.
    """

    def __init__(self, pack: "PackedRun", index: int, spec: JobSpec) -> None:
        # Weak: the pack holds its trials, and a cycle would keep a finished pack's tensors
        # (on a GPU, its device memory) until the cycle collector ran, long after the next
        # pack on the device needed them.
        self._pack = weakref.ref(pack)
        self.index = index
        self.spec = spec
        self.progress = Progress()
        self.shuffle = torch.Generator().manual_seed(spec.seed + 1)
        self.dropout_rates: dict[str, float] = {}  # per dropout layer's name; set by the pack
        self.scheduled = spec.schedule.type != "constant" or spec.schedule.warmup_epochs > 0
        self.schedule_steps = 0  # the LambdaLR's last_epoch: advances only when scheduled
        self.optimizer_steps = 0  # Adam's and RMSprop's `step`
        self.factor = lr_factor(spec.schedule, spec.optimizer.lr, spec.epochs, pack.steps_per_epoch)
        self.snapshot: _Snapshot | None = None
        self.best: _Snapshot | None = None
        self.diverged = False

    @property
    def pack(self) -> "PackedRun":
        pack = self._pack()
        if pack is None:
            raise RuntimeError("the pack this trial trained in is gone")
        return pack

    @property
    def lr(self) -> float:
        return self.spec.optimizer.lr * self.factor(self.schedule_steps)

    @property
    def device(self) -> torch.device:
        return self.pack.device

    @property
    def x_train(self) -> torch.Tensor:
        return self.pack.x_train

    @property
    def completed_epoch(self) -> int:
        return self.snapshot.epoch if self.snapshot else 0

    @property
    def best_epoch(self) -> int:
        return self.progress.best_epoch

    @property
    def finished(self) -> bool:
        return self.progress.epoch >= self.spec.epochs or self.progress.stopped_early

    @property
    def parameters(self) -> int:
        return self.pack.parameters_per_trial

    def weights(self, metadata: dict[str, str] | None = None, *, best: bool = False) -> bytes:
        """The trial's model as safetensors under the single model's names (TrainingRun's)."""
        snapshot = self.best if best else self.snapshot
        if snapshot is None:
            raise ValueError("this trial has completed no epoch (or no best epoch) of its own")
        tensors = {
            name: snapshot.frozen.tensors[name][snapshot.position] for name in self.pack.state_names
        }
        return pack_weights(tensors, {**(metadata or {}), "epoch": str(snapshot.epoch)})

    def trainer_state(self) -> bytes:
        """A trainer state in TrainingRun's format: either trainer resumes from it."""
        if self.snapshot is None:
            raise ValueError("no epoch has completed yet: there is no state to resume from")
        return pack_state(self.pack.single_state(self, self.snapshot))

    def summary(self) -> dict[str, Any]:
        return {
            **self.progress.summary(),
            "parameters": self.parameters,
            "device": str(self.pack.device),
            "precision": "bf16" if self.pack.autocast else "fp32",
        }


def _template(spec: JobSpec, data: PreparedData) -> nn.Module:
    return build_model(spec.model, data.info)


def _per_trial(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[T] -> [T, 1, ...] broadcasting over a stacked tensor like `like`."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[T, C] -> [T, 1, C, 1, ...] broadcasting over activations [T, B, C, *spatial]."""
    return values.view(len(values), 1, -1, *([1] * (like.dim() - 3)))


def _trials_in_channels(x: torch.Tensor) -> torch.Tensor:
    """[T, B, C, *spatial] -> [B, T*C, *spatial]: channel group t is trial t."""
    return x.transpose(0, 1).flatten(1, 2)


def _per_trial_channels(x: torch.Tensor, trials: int) -> torch.Tensor:
    """[B, T*C, *spatial] -> [T, B, C, *spatial], a view."""
    unflattened: torch.Tensor = x.unflatten(1, (trials, -1))
    return unflattened.transpose(0, 1)


def _group_count(norm: nn.Module, channels: int) -> int:
    """The groups of a normalization that is group norm over a sample's [C, *spatial]."""
    if isinstance(norm, nn.LayerNorm):
        return 1
    if isinstance(norm, nn.GroupNorm):
        return norm.num_groups
    if isinstance(norm, nn.InstanceNorm1d | nn.InstanceNorm2d):
        return channels
    raise ValueError(f"{type(norm).__name__} does not pack")


class PackedRun:
    """Trains a list of jobs with equal pack_key as one model; yields each epoch per trial."""

    def __init__(
        self,
        specs: list[JobSpec],
        data: PreparedData,
        *,
        labels: list[torch.Tensor] | None = None,
        resume: list[tuple[bytes | None, bytes | None]] | None = None,
    ) -> None:
        """`data` is the first trial's; `labels` each trial's y_train where label noise
        differs (the features are the same for every key-equal spec); `resume` each trial's
        (weights, trainer state) from its last checkpoint, or (None, None)."""
        keys = {pack_key(spec) for spec in specs}
        if None in keys or len(keys) != 1:
            raise ValueError("a pack needs specs with one and the same (non-None) pack_key")
        first = specs[0]
        self.device = resolve_device(first.device)
        self.autocast = first.mixed_precision == "bf16" and self.device.type == "cuda"
        self.x_train = data.x_train.to(self.device)
        self.x_val = data.x_val.to(self.device)
        self.y_val = data.y_val.to(self.device)
        self.batch_size = min(first.dataset.batch_size, len(self.x_train))
        self.bounds = _batch_bounds(len(self.x_train), self.batch_size)
        self.steps_per_epoch = len(self.bounds)
        self.trials = [Trial(self, index, spec) for index, spec in enumerate(specs)]
        labels = labels or [data.y_train] * len(specs)
        self._labels = [y.to(self.device) for y in labels]

        models = []
        for trial in self.trials:
            torch.manual_seed(trial.spec.seed)  # as TrainingRun: the init draws from here
            model = _template(trial.spec, data)
            trial.dropout_rates = {name: module.p for name, module in dropouts(model)}
            models.append(model.to(self.device))
        template = models[0]
        self.state_names = list(template.state_dict())
        self.param_names = [name for name, _ in template.named_parameters()]
        self.parameters_per_trial = sum(p.numel() for p in template.parameters())
        self.layer_names = [
            (name, type(module).__name__)
            for name, module in template.named_modules()
            if isinstance(module, WEIGHTED)
        ]
        # Where each weighted layer's weight is among the parameters, as an index on the
        # device: a list would be copied from the host, and waited for, at every step.
        self.layer_positions = torch.tensor(
            [self.param_names.index(f"{name}.weight") for name, _ in self.layer_names],
            device=self.device,
        )
        # The single model's structure, which the packed forward walks (its own weights are
        # not used).
        self.template = template
        if resume:
            for model, (weights, _) in zip(models, resume, strict=True):
                if weights is not None:
                    unpack_weights(model, weights)
        # name -> [T, *shape]: parameters are leaves the step updates in place.
        self.tensors: dict[str, torch.Tensor] = {
            name: torch.stack([m.state_dict()[name] for m in models]) for name in self.state_names
        }
        for name in self.param_names:
            self.tensors[name].requires_grad_(True)
        self.optimizer_state: dict[str, dict[str, torch.Tensor]] = {
            name: self._fresh_optimizer_state(self.tensors[name]) for name in self.param_names
        }
        self.active = list(self.trials)
        self._dropout_layers = {name: i for i, (name, _) in enumerate(dropouts(self.template))}
        self._dropout_keys = torch.empty(0)  # [T, layers]: the step's stream keys
        if resume:
            for trial, (weights, state) in zip(self.trials, resume, strict=True):
                if weights is not None and state is not None:
                    self._load_state(trial, unpack_state(state))
        self._index_active()
        if resume:
            resumed = [i for i, (w, s) in enumerate(resume) if w is not None and s is not None]
            self._take_snapshots(resumed)

    # -- building blocks --------------------------------------------------------------------

    def _fresh_optimizer_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        kind = self.trials[0].spec.optimizer
        zeros = lambda: torch.zeros_like(param, requires_grad=False)  # noqa: E731
        if kind.type == "sgd":
            return {"momentum_buffer": zeros()} if kind.momentum > 0 else {}
        if kind.type in ("adam", "adamw"):
            return {"exp_avg": zeros(), "exp_avg_sq": zeros()}
        state = {"square_avg": zeros()}
        if kind.momentum > 0:
            state["momentum_buffer"] = zeros()
        return state

    def _index_active(self) -> None:
        """What the steps read of the active trials, rebuilt whenever those change."""
        self._hyper = self._hyper_parameters()
        self._eps_groups = _EpsGroups.of(self.active, self.device)
        # From the specs, not from _hyper["weight_decay"]: reading a device tensor on the host
        # would make every step wait for the GPU to finish the step before it.
        self._decaying = any(t.spec.optimizer.weight_decay != 0 for t in self.active)

    def _hyper_parameters(self) -> dict[str, torch.Tensor]:
        """Per-trial numbers as tensors over the trial dimension, for the active trials."""
        dtype = self.tensors[self.param_names[0]].dtype

        def tensor(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        specs = [trial.spec for trial in self.active]
        norms = [s.model.normalization for s in specs]
        return {
            "momentum": tensor([s.optimizer.momentum for s in specs]),
            "weight_decay": tensor([s.optimizer.weight_decay for s in specs]),
            "beta1": tensor([s.optimizer.betas[0] for s in specs]),
            "beta2": tensor([s.optimizer.betas[1] for s in specs]),
            "clip": tensor([s.grad_clip_norm or float("inf") for s in specs]),
            "norm_eps": tensor([n.eps for n in norms]),
            "norm_momentum": tensor([n.momentum for n in norms]),
            **self._dropout_rates(),
        }

    def _dropout_rates(self) -> dict[str, torch.Tensor]:
        """Each dropout layer's rates over the active trials, [T] in float64, and their keep
        thresholds, [T] in int64."""
        hyper = {}
        for name, _ in dropouts(self.template):
            rates = [t.dropout_rates[name] for t in self.active]
            hyper[f"{name}.rate"] = torch.tensor(rates, dtype=torch.float64, device=self.device)
            hyper[f"{name}.threshold"] = keep_thresholds(hyper[f"{name}.rate"])
        return hyper

    def _labels_active(self) -> torch.Tensor:
        return torch.stack([self._labels[trial.index] for trial in self.active])

    # -- the forward pass -------------------------------------------------------------------
    #
    # Activations are held per trial, [T, B, C, *spatial]: for each trial the single model's
    # [B, C, *spatial] (C: an MLP's features or a CNN's channels). Layers that act per channel
    # (convolutions, pools, batch norm) see them as one batch with the trials folded into
    # channels, [B, T*C, *spatial]. A convolution's output lies in that layout and the
    # per-trial form is a view of it, so a CNN goes between the two without copies.

    def _forward(
        self, x: torch.Tensor, training: bool, captured: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x: [T, B, *shape], each trial its own samples (training), or [B, *shape] shared by
        every trial (evaluation); -> logits [T, B, K]."""
        if x.dim() == self.x_train.dim():
            x = x.expand(len(self.active), *x.shape)
        return self._module("", self.template, x, training, captured)

    def _module(
        self,
        name: str,
        module: nn.Module,
        x: torch.Tensor,
        training: bool,
        captured: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """The packed form of a module of the single model, applied as its forward applies it:
        a Sequential's children in turn, a ResidualBlock's parts as ResidualBlock.forward."""

        def child(part: str, value: torch.Tensor) -> torch.Tensor:
            path = f"{name}.{part}" if name else part
            return self._module(path, getattr(module, part), value, training, captured)

        if isinstance(module, nn.Sequential):
            for part, _ in module.named_children():
                x = child(part, x)
            return x
        if isinstance(module, ResidualBlock):
            # activation(second(first(x)) + shortcut(x)), then the output norm where the
            # normalization comes after the activation.
            out = child("activation", child("second", child("first", x)) + child("shortcut", x))
            return out if module.output_norm is None else child("output_norm", out)
        return self._layer(name, module, x, training, captured)

    def _layer(
        self,
        name: str,
        module: nn.Module,
        x: torch.Tensor,
        training: bool,
        captured: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """The packed form of one layer of the single model: x and the result per trial."""
        if isinstance(module, nn.Identity):  # a ResidualBlock's shortcut between equal widths
            return x
        if isinstance(module, nn.Flatten):  # an MLP's input, a CNN's pooled head
            return x.flatten(2)
        if isinstance(module, AddChannel):
            return x.unsqueeze(2)
        if isinstance(module, nn.Linear):
            return self._linear(name, x)
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            return self._conv(name, module, x)
        if isinstance(module, CHANNEL_WISE):
            return _per_trial_channels(module(_trials_in_channels(x)), len(x))
        if isinstance(module, ACTIVATION_TYPES):
            if captured is not None:
                captured[name] = x.detach()
            return module(x)  # type: ignore[no-any-return]
        if isinstance(module, Dropout):
            return self._dropout(name, module, x) if training else x
        return self._norm(name, module, x, training)

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.tensors[f"{name}.weight"], self.tensors[f"{name}.bias"]
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    def _conv(self, name: str, module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """One grouped convolution: trial t's channels are group t, seen by its kernels only."""
        weight, bias = self.tensors[f"{name}.weight"], self.tensors[f"{name}.bias"]
        convolve = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
        out = convolve(
            _trials_in_channels(x),
            weight.flatten(0, 1),  # [T, C_out, C_in, *k] -> [T*C_out, C_in, *k]
            bias.flatten(),
            module.stride,
            module.padding,
            module.dilation,
            groups=len(x),
        )
        return _per_trial_channels(out, len(x))

    def _dropout(self, name: str, module: Dropout, x: torch.Tensor) -> torch.Tensor:
        """Every trial's mask in one call, each from its own stream: the single model's masks
        (Dropout.forward is this computation for a pack of one)."""
        keys = self._dropout_keys[:, self._dropout_layers[name]]
        thresholds = self._hyper[f"{name}.threshold"]
        keep = keep_mask(keys, thresholds, mask_shape(x.shape[1:], module.feature), x)
        return apply_noise(x, keep, _per_trial(self._hyper[f"{name}.rate"], keep), module.alpha)

    def _norm(self, name: str, module: nn.Module, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Per-trial normalization of x [T, B, C, *spatial], each trial with its own eps."""
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            return self._batch_norm(name, x, training)
        eps = self._hyper["norm_eps"]
        if isinstance(module, nn.RMSNorm | ChannelRMSNorm):
            # Over the features (an MLP's) or over channels and positions (a CNN's): all of
            # a sample's values either way.
            dims = tuple(range(2, x.dim()))
            out = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + _per_trial(eps, x))
        else:
            # Layer norm (an MLP's LayerNorm, a CNN's GroupNorm(1, C)), group norm and instance
            # norm (one group per channel, without running statistics) are all group norm.
            grouped = x.unflatten(2, (_group_count(module, x.shape[2]), -1))
            dims = tuple(range(3, grouped.dim()))
            mean = grouped.mean(dims, keepdim=True)
            var = grouped.var(dims, unbiased=False, keepdim=True)
            out = ((grouped - mean) * torch.rsqrt(var + _per_trial(eps, grouped))).flatten(2, 3)
        weight = self.tensors.get(f"{name}.weight")
        bias = self.tensors.get(f"{name}.bias")
        if weight is not None:
            out = out * _per_channel(weight, x)
        if bias is not None:
            out = out + _per_channel(bias, x)
        return out

    def _batch_norm(self, name: str, x: torch.Tensor, training: bool) -> torch.Tensor:
        """Per-trial batch norm: trials folded into channels, one fused call per distinct eps
        (one call in all when the trials share it), running statistics updated by the kernel
        when they share the momentum too, else here, per trial, as the kernel does."""
        trials, batch, channels = x.shape[:3]
        spatial = x.shape[3:]
        mean_buf = self.tensors[f"{name}.running_mean"]
        var_buf = self.tensors[f"{name}.running_var"]
        weight = self.tensors.get(f"{name}.weight")
        bias = self.tensors.get(f"{name}.bias")
        groups = self._eps_groups
        # The kernel takes one eps and one momentum, as Python floats: the spec's own.
        momentum = self.active[0].spec.model.normalization.momentum
        fused_update = training and len(groups.eps) == 1 and groups.same_momentum
        if training:
            self.tensors[f"{name}.num_batches_tracked"] += 1

        def fused(eps: float, positions: torch.Tensor | None) -> torch.Tensor:
            def part(t: torch.Tensor | None) -> torch.Tensor | None:
                if t is None or positions is None:
                    return t
                return t.index_select(0, positions)

            xs, count = part(x), len(positions) if positions is not None else trials
            assert xs is not None
            buffers = fused_update or not training
            out = F.batch_norm(
                _trials_in_channels(xs),
                part(mean_buf).reshape(-1) if buffers else None,  # type: ignore[union-attr]
                part(var_buf).reshape(-1) if buffers else None,  # type: ignore[union-attr]
                w.reshape(-1) if (w := part(weight)) is not None else None,
                b.reshape(-1) if (b := part(bias)) is not None else None,
                training,
                momentum,
                eps,
            )
            return out.view(batch, count, channels, *spatial).transpose(0, 1)

        if len(groups.eps) == 1:
            out = fused(groups.eps[0], None)
        else:
            parts = [fused(e, p) for e, p in zip(groups.eps, groups.positions, strict=True)]
            out = torch.cat(parts).index_select(0, groups.inverse)
        if training and not fused_update:
            self._update_running_stats(x, mean_buf, var_buf, self._hyper["norm_momentum"])
        return out

    @staticmethod
    def _update_running_stats(
        x: torch.Tensor, mean_buf: torch.Tensor, var_buf: torch.Tensor, momentum: torch.Tensor
    ) -> None:
        # As PyTorch: running = (1 - m) * running + m * batch, with the unbiased variance over
        # the batch and the positions.
        with torch.no_grad():
            m = momentum.view(-1, 1)
            dims = (1, *range(3, x.dim()))
            mean_buf.mul_(1 - m).add_(m * x.mean(dims))
            var_buf.mul_(1 - m).add_(m * x.var(dims, unbiased=True))

    def _precision(self) -> AbstractContextManager[object]:
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -- the loop ---------------------------------------------------------------------------

    def epochs(
        self, leaving: Callable[[], Collection[int]] = lambda: ()
    ) -> Iterator[list[TrialEpoch]]:
        """Train until every trial has finished or left; yield each pack epoch's results.

        `leaving` is asked before every step which trials (by index) must leave the pack now
        (cancelled, timed out, handed back): they leave at once, their state as of their last
        completed epoch, and the others go on.
        """
        self._drop([t for t in self.active if t.finished])
        while self.active:
            gone = set(leaving())
            self._drop([t for t in self.active if t.index in gone])
            if not self.active:
                return
            outcome = self._train_epoch(leaving)
            if outcome is None:
                return
            yield outcome
            self._drop([t for t in self.active if t.finished or t.diverged])

    def _drop(self, trials: list[Trial]) -> None:
        """Take trials out of the stacked tensors (diverged, finished, cancelled...)."""
        if not trials:
            return
        gone = {id(t) for t in trials}
        keep = [i for i, t in enumerate(self.active) if id(t) not in gone]
        self.active = [self.active[i] for i in keep]
        if not self.active:
            return
        index = torch.tensor(keep, device=self.device)
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                kept = tensor.detach().index_select(0, index)
                self.tensors[name] = kept.requires_grad_(name in self.param_names)
            for state in self.optimizer_state.values():
                for key, tensor in state.items():
                    state[key] = tensor.index_select(0, index)
        self._index_active()

    def _train_epoch(self, leaving: Callable[[], Collection[int]]) -> list[TrialEpoch] | None:
        started = time.perf_counter()
        trials = self.active
        count = len(trials)
        orders = torch.stack(
            [torch.randperm(len(self.x_train), generator=t.shuffle) for t in trials]
        ).to(self.device)
        labels = self._labels_active()
        dtype = self.tensors[self.param_names[0]].dtype

        def zeros(rows: int) -> torch.Tensor:  # [rows, T], handed out as [T, rows]
            return torch.zeros(rows, count, device=self.device, dtype=dtype).T

        epoch = {
            "orders": orders,
            "labels": labels,
            "step_losses": zeros(self.steps_per_epoch),
            "grad_norms": zeros(self.steps_per_epoch),
            "layer_grad_sums": zeros(len(self.layer_names)),
            "correct": torch.zeros(count, device=self.device, dtype=torch.long),
            "lrs": torch.tensor([t.lr for t in trials], dtype=torch.float64),
            "dropout_keys": self._dropout_key_table(trials),
            **{k: v.T for k, v in self._schedule_table(trials).items()},
        }
        # Every per-epoch tensor above has the trial on dimension 0 (hence the transposes), so
        # a trial leaving mid-epoch is one index_select for each.
        for step, (start, stop) in enumerate(self.bounds):
            gone = set(leaving()) if step else set()
            leavers = [t for t in self.active if t.index in gone]
            if leavers:
                # Their half-trained epoch is lost, as a stopped single run's is; their state
                # stays that of their last completed epoch. The others go on.
                keep = torch.tensor([i for i, t in enumerate(self.active) if t.index not in gone])
                self._drop(leavers)
                if not self.active:
                    return None
                epoch = {k: v.index_select(0, keep.to(v.device)) for k, v in epoch.items()}
            index = epoch["orders"][:, start:stop]
            losses, total, layer_norms, correct = self._train_step(
                index,
                epoch["labels"],
                epoch["dropout_keys"][:, step],
                {k: epoch[k][:, step] for k in _SCHEDULE_KEYS},
            )
            epoch["grad_norms"][:, step] = total
            epoch["layer_grad_sums"] += layer_norms
            epoch["step_losses"][:, step] = losses
            epoch["correct"] += correct
        return self._finish_epoch(started, epoch)

    def _train_step(
        self,
        index: torch.Tensor,
        labels: torch.Tensor,
        dropout_keys: torch.Tensor,
        schedule: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of every active trial on its batch (index: [T, B] into the training
        data), updating the weights and optimizer state in place; returns each trial's loss
        [T], gradient norm before clipping [T], per-layer gradient norms [T, layers] and
        correct predictions [T]. Device tensors in, device tensors out, nothing read on the
        host: benchmarks/cuda_graphs.py captures exactly this."""
        x = self.x_train[index]
        y = labels.gather(1, index)
        self._dropout_keys = dropout_keys
        with self._precision():
            logits = self._forward(x, training=True)
        count, batch = y.shape
        losses = (
            F.cross_entropy(
                full_precision(logits).reshape(count * batch, -1),
                y.reshape(-1),
                reduction="none",
            )
            .view(count, batch)
            .mean(1)
        )
        params = [self.tensors[name] for name in self.param_names]
        grads = torch.autograd.grad(losses.sum(), params)
        norms, total = self._clip(grads)
        self._step(params, grads, schedule)
        correct = (logits.detach().argmax(-1) == y).sum(1)
        return losses.detach(), total, norms.index_select(0, self.layer_positions).T, correct

    def _dropout_key_table(self, trials: list[Trial]) -> torch.Tensor:
        """[T, steps, layers]: each trial's stream key for each dropout layer at each step of
        its next epoch, (seed, epoch, step) as TrainingRun's set_position has them; moved to
        the device once an epoch, so that no step waits on a copy from the host."""
        names = list(self._dropout_layers)
        table = [
            [
                [stream_key((t.spec.seed, t.progress.epoch + 1, step), name) for name in names]
                for step in range(self.steps_per_epoch)
            ]
            for t in trials
        ]
        return torch.tensor(table, dtype=torch.int64).to(self.device)

    def _clip(self, grads: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each parameter's gradient norm per trial [P, T], and each trial's total norm [T]
        before clipping; gradients over a trial's own limit are scaled as clip_grad_norm_."""
        norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])
        total = torch.linalg.vector_norm(norms, dim=0)
        if self.active[0].spec.grad_clip_norm is not None:
            scale = (self._hyper["clip"] / (total + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(_per_trial(scale, g))
        return norms, total

    def _schedule_table(self, trials: list[Trial]) -> dict[str, torch.Tensor]:
        """Per step of this epoch and per trial, the numbers the optimizer step needs, in
        Python floats exactly as torch.optim computes them; advances the trials' counters."""
        lrs: list[list[float]] = []
        step_sizes: list[list[float]] = []
        corrections: list[list[float]] = []
        decays: list[list[float]] = []
        for _ in range(self.steps_per_epoch):
            row_lr, row_size, row_corr, row_decay = [], [], [], []
            for t in trials:
                lr = t.lr
                t.optimizer_steps += 1
                beta1, beta2 = t.spec.optimizer.betas
                row_lr.append(lr)
                row_size.append(lr / (1 - beta1**t.optimizer_steps))
                row_corr.append((1 - beta2**t.optimizer_steps) ** 0.5)
                row_decay.append(1 - lr * t.spec.optimizer.weight_decay)
                if t.scheduled:
                    t.schedule_steps += 1
            lrs.append(row_lr)
            step_sizes.append(row_size)
            corrections.append(row_corr)
            decays.append(row_decay)
        dtype = self.tensors[self.param_names[0]].dtype

        def table(rows: list[list[float]]) -> torch.Tensor:
            return torch.tensor(rows, dtype=dtype, device=self.device)

        return {
            "lr": table(lrs),
            "step_size": table(step_sizes),
            "correction": table(corrections),
            "decay": table(decays),
        }

    @torch.no_grad()
    def _step(
        self,
        params: list[torch.Tensor],
        grads: tuple[torch.Tensor, ...],
        schedule: dict[str, torch.Tensor],
    ) -> None:
        """One optimizer step for every trial, by torch.optim's single-tensor formulas."""
        spec = self.active[0].spec.optimizer
        hyper = self._hyper
        lr = schedule["lr"]
        for name, param, grad in zip(self.param_names, params, grads, strict=True):
            state = self.optimizer_state[name]

            def trial(values: torch.Tensor, like: torch.Tensor = param) -> torch.Tensor:
                return _per_trial(values, like)

            if self._decaying and spec.type != "adamw":
                grad = grad + trial(hyper["weight_decay"]) * param
            if spec.type == "sgd":
                if spec.momentum > 0:
                    buf = state["momentum_buffer"]
                    buf.mul_(trial(hyper["momentum"])).add_(grad)
                    grad = grad + trial(hyper["momentum"]) * buf if spec.nesterov else buf
                param.sub_(trial(lr) * grad)
            elif spec.type in ("adam", "adamw"):
                if spec.type == "adamw" and self._decaying:
                    param.mul_(trial(schedule["decay"]))
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, trial(1 - hyper["beta1"]))
                beta2 = trial(hyper["beta2"])
                exp_avg_sq.mul_(beta2).add_((1 - beta2) * grad * grad)
                denom = (exp_avg_sq.sqrt() / trial(schedule["correction"])).add_(OPTIMIZER_EPS)
                param.sub_(trial(schedule["step_size"]) * exp_avg / denom)
            else:
                square_avg = state["square_avg"]
                square_avg.mul_(RMSPROP_ALPHA).addcmul_(grad, grad, value=1 - RMSPROP_ALPHA)
                avg = square_avg.sqrt().add_(OPTIMIZER_EPS)
                if spec.momentum > 0:
                    buf = state["momentum_buffer"]
                    buf.mul_(trial(hyper["momentum"])).add_(grad / avg)
                    param.sub_(trial(lr) * buf)
                else:
                    param.sub_(trial(lr) * grad / avg)

    def _finish_epoch(self, started: float, epoch: dict[str, torch.Tensor]) -> list[TrialEpoch]:
        outcomes: list[TrialEpoch] = []
        # One host sync per epoch: a NaN is found here, not by a .item() on every step.
        finite = torch.isfinite(epoch["step_losses"])
        first_bad = (~finite).int().argmax(1).tolist()
        nan_steps = {
            position: first_bad[position] + 1
            for position, ok in enumerate(finite.all(1).tolist())
            if not ok
        }
        epoch = self._end_diverged(nan_steps, outcomes, epoch)
        if not self.active:
            return outcomes
        val_loss, val_accuracy = self._evaluate(self.x_val, self.y_val)
        # Weights that overflowed without a NaN step loss: as diverged as a NaN step, as
        # TrainingRun has it (no database stores the epoch's infinite loss).
        overflowed = {
            position: self.steps_per_epoch
            for position, loss in enumerate(val_loss)
            if not math.isfinite(loss)
        }
        if overflowed:
            epoch = self._end_diverged(overflowed, outcomes, epoch)
            val_loss = [v for p, v in enumerate(val_loss) if p not in overflowed]
            val_accuracy = [v for p, v in enumerate(val_accuracy) if p not in overflowed]
            if not self.active:
                return outcomes
        captured: dict[str, torch.Tensor] = {}
        probe_labels = self._labels_active()[:, :TRAIN_EVAL_SAMPLES]
        train_eval_loss, train_eval_accuracy = self._evaluate(
            self.x_train[:TRAIN_EVAL_SAMPLES], probe_labels, captured
        )
        step_losses, grad_norms = epoch["step_losses"], epoch["grad_norms"]
        train_loss = step_losses.mean(1).tolist()
        grad_mean = grad_norms.mean(1).tolist()
        grad_max = grad_norms.max(1).values.tolist()
        if self.steps_per_epoch > 1:
            loss_std = step_losses.std(1).tolist()
        else:
            loss_std = [0.0] * len(self.active)
        layers = self._layer_reports(epoch["layer_grad_sums"], captured)
        correct = epoch["correct"].tolist()
        lrs = epoch["lrs"].tolist()
        seconds = time.perf_counter() - started
        for position, trial in enumerate(self.active):
            number = trial.progress.epoch + 1
            metrics = {
                "train_loss": train_loss[position],
                "train_accuracy": correct[position] / len(self.x_train),
                "val_loss": val_loss[position],
                "val_accuracy": val_accuracy[position],
                "lr": lrs[position],
                "epoch_seconds": seconds,
            }
            gap = val_loss[position] - train_eval_loss[position]
            diagnostics: dict[str, Any] = {
                "train_eval_loss": train_eval_loss[position],
                "train_eval_accuracy": train_eval_accuracy[position],
                "generalization_gap": gap,
                "accuracy_gap": train_eval_accuracy[position] - val_accuracy[position],
                "grad_norm_mean": grad_mean[position],
                "grad_norm_max": grad_max[position],
                "step_loss_std": loss_std[position],
                "layers": layers[position],
            }
            improved = trial.progress.advance(trial.spec, number, metrics, gap)
            result = EpochResult(number, metrics, diagnostics, improved)
            outcomes.append(TrialEpoch(trial.index, result))
        self._take_snapshots(range(len(self.active)))
        for outcome in outcomes:
            if outcome.result is not None and outcome.result.improved:
                trial = self.trials[outcome.trial]
                trial.best = trial.snapshot
        outcomes.sort(key=lambda o: o.trial)
        return outcomes

    def _end_diverged(
        self, steps: dict[int, int], outcomes: list[TrialEpoch], epoch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The trials at these positions diverged (at these steps of this epoch): each ends
        with its Diverged and leaves the pack; returns the epoch's tensors of the others."""
        if not steps:
            return epoch
        for position, step in steps.items():
            trial = self.active[position]
            trial.diverged = True
            failed = Diverged(trial.progress.epoch + 1, step)
            outcomes.append(TrialEpoch(trial.index, None, failed))
        keep = torch.tensor([i for i in range(len(self.active)) if i not in steps])
        self._drop([self.active[position] for position in steps])
        return {k: v.index_select(0, keep.to(v.device)) for k, v in epoch.items()}

    @torch.inference_mode()
    def _evaluate(
        self, x: torch.Tensor, y: torch.Tensor, captured: dict[str, torch.Tensor] | None = None
    ) -> tuple[list[float], list[float]]:
        """Per-trial loss and accuracy in eval mode; y is shared [N] or per trial [T, N]."""
        count = len(self.active)
        total = torch.zeros(count, device=self.device, dtype=torch.float64)
        correct = torch.zeros(count, device=self.device, dtype=torch.long)
        chunk = evaluation_chunk(self.batch_size)
        for start in range(0, len(x), chunk):
            xb = x[start : start + chunk]
            yb = y[..., start : start + chunk]
            yb = yb.expand(count, -1) if yb.dim() == 1 else yb
            with self._precision():
                logits = full_precision(self._forward(xb, training=False, captured=captured))
            batch = yb.shape[1]
            losses = F.cross_entropy(
                logits.reshape(count * batch, -1), yb.reshape(-1), reduction="none"
            ).view(count, batch)
            total += losses.sum(1)
            correct += (logits.argmax(-1) == yb).sum(1)
        return (total / len(x)).tolist(), (correct.double() / len(x)).tolist()

    def _layer_reports(
        self, grad_sums: torch.Tensor, captured: dict[str, torch.Tensor]
    ) -> list[list[dict[str, Any]]]:
        """Each trial's per-layer statistics, as LayerDiagnostics reports them."""
        weight_norms = torch.stack(
            [
                torch.linalg.vector_norm(self.tensors[f"{name}.weight"].detach().flatten(1), dim=1)
                for name, _ in self.layer_names
            ]
        ).tolist()
        grad_means = (grad_sums / max(self.steps_per_epoch, 1)).T.tolist()
        # Per trial, on its own slice, as the single model's hook computes them (in float32).
        stats = {
            name: [
                [float(v.contiguous().float().mean()), float(v.contiguous().float().std())]
                for v in value
            ]
            for name, value in captured.items()
        }
        reports = []
        for position in range(len(self.active)):
            report: list[dict[str, Any]] = [
                {
                    "name": name,
                    "kind": kind,
                    "weight_norm": weight_norms[layer][position],
                    "grad_norm": grad_means[layer][position],
                }
                for layer, (name, kind) in enumerate(self.layer_names)
            ]
            report += [
                {
                    "name": name,
                    "kind": "activation",
                    "pre_activation_mean": values[position][0],
                    "pre_activation_std": values[position][1],
                }
                for name, values in stats.items()
            ]
            reports.append(report)
        return reports

    # -- state ------------------------------------------------------------------------------

    def release(self) -> None:
        """Free the pack's working tensors (weights, gradients, optimizer state), keeping its
        trials' snapshots: all that a pack which ran out of memory still needs, to hand each
        trial's last completed epoch on (Trial.weights, Trial.trainer_state)."""
        self.active = []
        self.tensors = {}
        self.optimizer_state = {}

    def _take_snapshots(self, positions: Collection[int]) -> None:
        frozen = _Frozen(
            {name: t.detach().clone() for name, t in self.tensors.items()},
            {
                name: {key: t.clone() for key, t in state.items()}
                for name, state in self.optimizer_state.items()
            },
        )
        for position in positions:
            trial = self.active[position]
            state: dict[str, Any] = {
                "rng_shuffle": trial.shuffle.get_state(),
                "schedule_steps": trial.schedule_steps,
                "optimizer_steps": trial.optimizer_steps,
                "progress": Progress(**trial.progress.as_state()),
            }
            trial.snapshot = _Snapshot(trial.progress.epoch, frozen, position, state)

    def single_state(self, trial: Trial, snapshot: _Snapshot) -> dict[str, Any]:
        """The trial's trainer state exactly in TrainingRun's format."""
        spec = trial.spec
        steps = snapshot.state["optimizer_steps"]
        dummy = [nn.Parameter(torch.zeros(1)) for _ in self.param_names]
        optimizer = build_optimizer(spec.optimizer, dummy)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, trial.factor)
        schedule_steps = snapshot.state["schedule_steps"]
        lr = spec.optimizer.lr * trial.factor(schedule_steps)
        scheduler.last_epoch = schedule_steps
        scheduler._step_count = schedule_steps + 1
        scheduler._last_lr = [lr]
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer_dict = optimizer.state_dict()
        per_param: dict[int, dict[str, Any]] = {}
        step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for i, name in enumerate(self.param_names):
            stacked = snapshot.frozen.optimizer[name]
            entry: dict[str, Any] = {}
            if spec.optimizer.type in ("adam", "adamw", "rmsprop"):
                entry["step"] = torch.tensor(float(steps), dtype=step_dtype)
            for key, tensor in stacked.items():
                entry[key] = tensor[snapshot.position]
            if entry:
                per_param[i] = entry
        optimizer_dict["state"] = per_param
        state: dict[str, Any] = {
            "format": 1,
            "optimizer": optimizer_dict,
            "scheduler": scheduler.state_dict(),
            "rng_shuffle": snapshot.state["rng_shuffle"],
            "progress": snapshot.state["progress"].as_state(),
        }
        return state

    def _load_state(self, trial: Trial, state: dict[str, Any]) -> None:
        """Resume a trial from a trainer state (TrainingRun's format: either trainer's)."""
        optimizer = optimizer_state_from_json(state["optimizer"])
        position = self.active.index(trial)
        steps = 0
        for i, name in enumerate(self.param_names):
            entry = optimizer["state"].get(i, {})
            for key, tensor in self.optimizer_state[name].items():
                if key in entry:
                    tensor[position] = entry[key].to(tensor)
            if "step" in entry:
                steps = int(entry["step"])
        trial.optimizer_steps = steps
        trial.schedule_steps = int(state["scheduler"]["last_epoch"])
        trial.shuffle.set_state(state["rng_shuffle"])
        trial.progress = Progress(**state["progress"])


_SCHEDULE_KEYS = ("lr", "step_size", "correction", "decay")


def _batch_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """As TrainingRun._batches: a lone last sample joins the batch before it."""
    bounds = [(start, min(start + size, n)) for start in range(0, n, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds
