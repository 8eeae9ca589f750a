"""The training loop: one TrainingRun per job attempt, yielding an EpochResult per epoch.

In-memory datasets live on the device as tensors and are batched by index (no DataLoader
processes). Everything the next epoch depends on (weights, optimizer, schedule position, the
data order's generator, the best-so-far bookkeeping) is in trainer_state(), so a run resumed
from it continues bit for bit as if it had never stopped (dropout's masks need no state: they
are a function of the seed, epoch and step, worker/training/dropout.py).

A run stopped in the middle of an epoch has half-trained weights that no resume could
continue from, so every epoch ends with a snapshot: a copy, on the device, of everything the
state holds. weights() and trainer_state() serialize the snapshot, i.e. the run as of its last
completed epoch, whenever the caller chooses to store it (not necessarily every epoch).
"""

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812  (the PyTorch convention)

from app.core.spec import JobSpec, evaluation_chunk
from worker.training.checkpoint import (
    optimizer_state_from_json,
    pack_state,
    pack_weights,
    unpack_state,
    unpack_weights,
)
from worker.training.data import PreparedData
from worker.training.diagnostics import LayerDiagnostics
from worker.training.dropout import dropouts
from worker.training.models import build_model
from worker.training.optim import build_optimizer, lr_factor
from worker.training.probes import Probes

# The fixed training slice evaluated in eval mode every epoch: the training side of the
# generalization gap, and the probe batch for per-layer statistics. Evaluated in one chunk
# (it is at most app.core.spec.EVALUATION_CHUNK_SAMPLES).
TRAIN_EVAL_SAMPLES = 512


class Interrupted(Exception):
    """should_stop() asked the run to stop; the last completed epoch is its state."""


class Diverged(Exception):
    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"loss became NaN or infinite at epoch {epoch}, step {step}")
        self.epoch = epoch
        self.step = step


@dataclass
class EpochResult:
    epoch: int
    metrics: dict[
        str, float
    ]  # train_loss, train_accuracy, val_loss, val_accuracy, lr, epoch_seconds
    diagnostics: dict[str, Any]
    improved: bool  # a new best validation result: this epoch's weights are the best checkpoint


@dataclass(frozen=True)
class _Snapshot:
    """The run as of the end of one epoch: copies on the device, serialized only when stored."""

    epoch: int
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]


def _copied(value: Any) -> Any:
    """A deep copy of a (nested) state dict whose tensors no later step can change."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copied(v) for v in value]
    return value


@dataclass
class Progress:
    """A run's bookkeeping across epochs: best so far and early stopping (the packed trainer
    keeps one per trial)."""

    epoch: int = 0
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    monitor_best: float | None = None  # early stopping's best value of its metric
    stale_epochs: int = 0  # epochs since early stopping last saw an improvement
    stopped_early: bool = False
    last_metrics: dict[str, float] = field(default_factory=dict)

    def advance(self, spec: JobSpec, epoch: int, metrics: dict[str, float], gap: float) -> bool:
        """Book a completed epoch; whether it is a new best (by validation accuracy)."""
        self.epoch = epoch
        self.last_metrics = {**metrics, "generalization_gap": gap}
        improved = metrics["val_accuracy"] > self.best_val_accuracy
        if improved:
            self.best_val_accuracy, self.best_epoch = metrics["val_accuracy"], epoch
        stopping = spec.early_stopping
        if stopping is not None:
            value = metrics[stopping.metric]
            sign = -1.0 if stopping.metric == "val_loss" else 1.0  # so that higher is better
            best = self.monitor_best
            if best is None or sign * value > sign * best + stopping.min_delta:
                self.monitor_best, self.stale_epochs = value, 0
            else:
                self.stale_epochs += 1
            self.stopped_early = self.stale_epochs >= stopping.patience and epoch < spec.epochs
        return improved

    def as_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "best_val_accuracy": self.best_val_accuracy,
            "monitor_best": self.monitor_best,
            "best_epoch": self.best_epoch,
            "stale_epochs": self.stale_epochs,
            "stopped_early": self.stopped_early,
            "last_metrics": self.last_metrics,
        }

    def summary(self) -> dict[str, Any]:
        last = self.last_metrics
        return {
            "best_val_accuracy": self.best_val_accuracy if self.best_epoch else None,
            "best_epoch": self.best_epoch or None,
            "final_train_loss": last.get("train_loss"),
            "final_val_loss": last.get("val_loss"),
            "final_val_accuracy": last.get("val_accuracy"),
            "final_generalization_gap": last.get("generalization_gap"),
            "epochs_completed": self.epoch,
            "stopped_early": self.stopped_early,
        }


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: bf16 (autocast) goes up to float32; float32 and float64 stay."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is visible to this worker")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class TrainingRun:
    def __init__(
        self,
        spec: JobSpec,
        data: PreparedData,
        *,
        resume_weights: bytes | None = None,
        resume_state: bytes | None = None,
    ) -> None:
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.autocast = spec.mixed_precision == "bf16" and self.device.type == "cuda"
        torch.manual_seed(spec.seed)
        self.model = build_model(spec.model, data.info).to(self.device)
        # Told each step where their masks come from (set_position, without its walk).
        self._dropouts = [layer for _, layer in dropouts(self.model)]
        self.x_train = data.x_train.to(self.device)
        self.y_train = data.y_train.to(self.device)
        self.x_val = data.x_val.to(self.device)
        self.y_val = data.y_val.to(self.device)
        self.batch_size = min(spec.dataset.batch_size, len(self.x_train))
        self.steps_per_epoch = len(self._batches())
        for layer in self._dropouts:  # each then draws its masks a block of steps at a time
            layer.steps_per_epoch = self.steps_per_epoch
        # A fixed slice of the training set, for the eval-mode training loss (bounded cost on
        # large sets) and the probe batch for per-layer statistics, in one forward pass.
        self.x_train_probe = self.x_train[:TRAIN_EVAL_SAMPLES]
        self.y_train_probe = self.y_train[:TRAIN_EVAL_SAMPLES]
        self.layer_diagnostics = LayerDiagnostics(self.model)
        # Built only when asked for: a job without probes draws and runs nothing extra.
        self.probes = (
            Probes(spec.diagnostics, self.model, self.x_train, self.y_train, self.batch_size)
            if spec.diagnostics is not None and spec.diagnostics.asked
            else None
        )
        self.optimizer = build_optimizer(spec.optimizer, self.model.parameters())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_factor(spec.schedule, spec.optimizer.lr, spec.epochs, self.steps_per_epoch),
        )
        # A constant schedule never changes the rate: no need to step it every batch.
        self.scheduled = spec.schedule.type != "constant" or spec.schedule.warmup_epochs > 0
        # The data order has its own generator, saved in the trainer state; dropout's masks
        # need none (worker/training/dropout.py: they are a function of seed, epoch and step).
        self.shuffle = torch.Generator().manual_seed(spec.seed + 1)
        self.progress = Progress()
        self._snapshot: _Snapshot | None = None  # none before the first completed epoch
        self._best_weights: dict[str, torch.Tensor] | None = None  # the best epoch's weights
        if resume_weights is not None and resume_state is not None:
            unpack_weights(self.model, resume_weights)
            self._load_state(unpack_state(resume_state))
            self._take_snapshot()

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # -- the loop ---------------------------------------------------------------------------

    def epochs(self, should_stop: Callable[[], bool] = lambda: False) -> Iterator[EpochResult]:
        """Train the remaining epochs, yielding after each; stops early if the spec says so."""
        while self.progress.epoch < self.spec.epochs and not self.progress.stopped_early:
            yield self._train_epoch(self.progress.epoch + 1, should_stop)

    def _batches(self) -> list[tuple[int, int]]:
        """Batch boundaries over a shuffled epoch. A lone last sample joins the batch before it:
        batch normalization cannot train on a batch of one."""
        n, size = len(self.x_train), self.batch_size
        bounds = [(start, min(start + size, n)) for start in range(0, n, size)]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
            bounds[-2:] = [(bounds[-2][0], n)]
        return bounds

    def _train_epoch(self, epoch: int, should_stop: Callable[[], bool]) -> EpochResult:
        started = time.perf_counter()
        self.model.train()
        order = torch.randperm(len(self.x_train), generator=self.shuffle).to(self.device)
        step_losses = torch.zeros(self.steps_per_epoch, device=self.device)
        grad_norms = torch.zeros(self.steps_per_epoch, device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        lr = self.optimizer.param_groups[0]["lr"]
        for step, (start, stop) in enumerate(self._batches()):
            if should_stop():
                raise Interrupted
            index = order[start:stop]
            x, y = self.x_train[index], self.y_train[index]
            for layer in self._dropouts:
                layer.position = (self.spec.seed, epoch, step)
            with self._precision():
                logits = self.model(x)
            loss = F.cross_entropy(full_precision(logits), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norms[step] = self.layer_diagnostics.clip_and_measure(self.spec.grad_clip_norm)
            if self.probes is not None:
                self.probes.before_step(step, x, y, self.optimizer.param_groups[0]["lr"])
            self.optimizer.step()
            if self.probes is not None:
                self.probes.after_step(x, y)
            if self.scheduled:
                self.scheduler.step()
            step_losses[step] = loss.detach()
            correct += (logits.argmax(1) == y).sum()
        # One host sync per epoch: a NaN is found here, not by a .item() on every step.
        finite = torch.isfinite(step_losses)
        if not bool(finite.all()):
            raise Diverged(epoch, int((~finite).nonzero()[0]) + 1)
        val_loss, val_accuracy = self._evaluate(self.x_val, self.y_val)
        if not math.isfinite(val_loss):
            # Weights that overflowed without a NaN step loss: as diverged as a NaN step.
            raise Diverged(epoch, self.steps_per_epoch)
        # The gap is measured against the training data in eval mode (no dropout, BN running
        # statistics), exactly as validation is: the running training loss is inflated by
        # dropout and would hide the very overfitting dropout is meant to cure.
        with self.layer_diagnostics.capturing_pre_activations():
            train_eval_loss, train_eval_accuracy = self._evaluate(
                self.x_train_probe, self.y_train_probe
            )
        train_loss = float(step_losses.mean())
        metrics = {
            "train_loss": train_loss,
            "train_accuracy": float(correct) / len(self.x_train),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": lr,
            "epoch_seconds": 0.0,  # set below, once everything this epoch does is done
        }
        gap = val_loss - train_eval_loss
        diagnostics: dict[str, Any] = {
            "train_eval_loss": train_eval_loss,
            "train_eval_accuracy": train_eval_accuracy,
            "generalization_gap": gap,
            "accuracy_gap": train_eval_accuracy - val_accuracy,
            "grad_norm_mean": float(grad_norms.mean()),
            "grad_norm_max": float(grad_norms.max()),
            "step_loss_std": float(step_losses.std()) if self.steps_per_epoch > 1 else 0.0,
            "layers": self.layer_diagnostics.epoch_report(self.steps_per_epoch),
        }
        if self.probes is not None:
            diagnostics.update(self.probes.epoch_report(grad_norms))
        improved = self.progress.advance(self.spec, epoch, metrics, gap)
        self._take_snapshot()
        if improved:
            self._best_weights = self._snapshot.weights if self._snapshot else None
        metrics["epoch_seconds"] = time.perf_counter() - started
        return EpochResult(epoch, metrics, diagnostics, improved)

    def _precision(self) -> AbstractContextManager[object]:
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()  # entering a disabled autocast costs a little on every step

    @torch.inference_mode()
    def _evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        self.model.eval()
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        chunk = evaluation_chunk(self.batch_size)
        for start in range(0, len(x), chunk):
            xb, yb = x[start : start + chunk], y[start : start + chunk]
            with self._precision():
                logits = full_precision(self.model(xb))
            total_loss += F.cross_entropy(logits, yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
        self.model.train()
        return float(total_loss) / len(x), float(correct) / len(x)

    # -- results and state ------------------------------------------------------------------

    @property
    def completed_epoch(self) -> int:
        """The last completed epoch: what weights() and trainer_state() hold (0: none yet)."""
        return self._snapshot.epoch if self._snapshot else 0

    @property
    def best_epoch(self) -> int:
        """The epoch of the best validation accuracy so far (0: none yet)."""
        return self.progress.best_epoch

    @property
    def finished(self) -> bool:
        """No epoch is left: the last one is done, or early stopping ended the run."""
        return self.progress.epoch >= self.spec.epochs or self.progress.stopped_early

    def weights(self, metadata: dict[str, str] | None = None, *, best: bool = False) -> bytes:
        """The model as of the last completed epoch (or of the best one) as safetensors.

        The file's metadata holds the epoch, plus whatever the caller adds (the trainer knows
        nothing of jobs). A resumed run holds no best weights until it improves on its own.
        """
        if best:
            if self._best_weights is None:
                raise ValueError("this run has completed no best epoch of its own")
            tensors, epoch = self._best_weights, self.best_epoch
        elif self._snapshot is not None:
            tensors, epoch = self._snapshot.weights, self._snapshot.epoch
        else:
            raise ValueError("no epoch has completed yet: there are no weights to store")
        return pack_weights(tensors, {**(metadata or {}), "epoch": str(epoch)})

    def trainer_state(self) -> bytes:
        """Everything but the weights that a resume after the last completed epoch needs."""
        if self._snapshot is None:
            raise ValueError("no epoch has completed yet: there is no state to resume from")
        return pack_state(self._snapshot.state)

    def _take_snapshot(self) -> None:
        p = self.progress
        state: dict[str, Any] = {
            "format": 1,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_shuffle": self.shuffle.get_state(),
            "progress": p.as_state(),
        }
        # Copies on the device: cheap next to an epoch, and the training goes on meanwhile.
        self._snapshot = _Snapshot(p.epoch, _copied(self.model.state_dict()), _copied(state))

    def _load_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(optimizer_state_from_json(state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.shuffle.set_state(state["rng_shuffle"])
        self.progress = Progress(**state["progress"])

    def summary(self) -> dict[str, Any]:
        return {
            **self.progress.summary(),
            "parameters": self.parameters,
            "device": str(self.device),
            "precision": "bf16" if self.autocast else "fp32",
        }
