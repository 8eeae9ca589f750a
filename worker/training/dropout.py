"""Dropout whose masks are a pure function of (job seed, epoch, step, layer, element).

torch's dropout draws its masks from a stateful generator: a job's masks then depend on
everything that drew before (so a resume must carry the generator's state), a pack of jobs
must keep one generator per trial and call it once per trial, serially (MT19937 fills one
element at a time: 9 ns an element on the 2-core CPU, 40% of a small CNN pack's epoch),
and a CUDA run draws other masks than a CPU run. Here a mask is counter-based instead: layer
L of a job with seed s, at step k of epoch e, keeps element i (its flat index in the mask)
where output i of a SplitMix64 stream started at the state blake2b(s, e, k, L) falls below
(1 - p) * 2^32. So
- a job draws the same masks alone, in any pack and at any position in it, on CPU and CUDA;
- a pack draws every trial's mask of a layer in one vectorized call;
- a resumed job goes on with the masks it would have drawn, with no generator state.
SplitMix64 (Steele, Lea and Flood, OOPSLA 2014) passes BigCrush; a stream's state is 64 bits
drawn by a cryptographic hash, so two masks overlap with probability ~ n / 2^64.

Masks are applied as ATen's _dropout_impl applies its noise: noise = keep / (1 - p), or for
alpha dropout noise = keep * a and the shift (keep - 1) * alpha * a + alpha * a * p.
"""

import hashlib
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import nn

ALPHA = 1.7580993408473766  # SELU's alpha * lambda, as ATen's alpha dropout
# SplitMix64's constants, as signed 64-bit integers: torch has no unsigned 64-bit arithmetic,
# and its int64 multiplication wraps, which is the mod-2^64 product SplitMix64 needs.
_GAMMA = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def stream_key(position: Sequence[object], layer: str) -> int:
    """The 64-bit state (as a signed int) of the stream for one mask: the layer's at
    `position`, (seed, epoch, step) in training, with a tag after it for masks drawn outside
    training (a probe's), which must not repeat the training step's."""
    text = ":".join(str(part) for part in (*position, layer))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), signed=True)


@lru_cache(maxsize=32)
def _counters(count: int, device: torch.device) -> torch.Tensor:
    """(i + 1) * gamma for i < count: a stream's states before mixing, less its start."""
    return torch.arange(1, count + 1, dtype=torch.int64, device=device).mul_(_GAMMA)


def _logical_shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    """z >>> bits on 64-bit patterns held as int64 (whose >> copies the sign bit)."""
    return z.bitwise_right_shift(bits).bitwise_and_((1 << (64 - bits)) - 1)


def _keep_torch(z: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output from the states z (int64, mixed in place), its high 32 bits against
    the thresholds: the CUDA path, in torch's int64 arithmetic."""
    z.bitwise_xor_(_logical_shift(z, 30)).mul_(_MIX1)
    z.bitwise_xor_(_logical_shift(z, 27)).mul_(_MIX2)
    z.bitwise_xor_(_logical_shift(z, 31))
    return _logical_shift(z, 32) < thresholds


_CHUNK = 1 << 15  # uint64s a pass of the CPU path: 256 KiB, so that its passes run in cache


@lru_cache(maxsize=32)
def _counters_numpy(count: int) -> np.ndarray:
    """_counters in numpy's uint64."""
    return np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GAMMA % 2**64)


def _keep_numpy(
    keys: torch.Tensor | int, thresholds: torch.Tensor, shape: Sequence[int], out: np.ndarray
) -> None:
    """keep_mask into `out` in numpy's uint64 arithmetic: the CPU path. torch has no
    unsigned 64-bit shifts, so each of its logical shifts is two passes, and each of its
    calls costs more than numpy's; numpy's uint64 needs neither, and taken a cache-sized
    chunk at a time the passes stay in cache. A mask takes a half to four fifths of torch's
    time (benchmarks/dropout_masks.py: less for a pack's large masks, more for a job's
    small ones, whose cost is mostly calls)."""
    view = (len(thresholds), *([1] * len(shape)))
    if isinstance(keys, int):
        states: np.ndarray | np.uint64 = np.uint64(keys % 2**64)
    else:
        states = keys.numpy().view(np.uint64).reshape(view)
    # The states in logical order (a pack's mask may lie otherwise: the comparison at the
    # end writes it so; mixing in its order took half as long again).
    z = np.empty(out.shape, dtype=np.uint64)
    np.add(_counters_numpy(math.prod(shape)).reshape(1, *shape), states, out=z)
    flat = z.reshape(-1)  # a view
    scratch = np.empty(min(_CHUNK, flat.size), dtype=np.uint64)
    for start in range(0, flat.size, _CHUNK):
        u = flat[start : start + _CHUNK]
        part = scratch[: u.size]
        for shift, multiplier in ((30, _MIX1), (27, _MIX2)):
            np.right_shift(u, np.uint64(shift), out=part)
            u ^= part
            u *= np.uint64(multiplier % 2**64)
        np.right_shift(u, np.uint64(31), out=part)
        u ^= part
        u >>= np.uint64(32)
    np.less(z, thresholds.numpy().view(np.uint64).reshape(view), out=out)


def mask_shape(x_shape: Sequence[int], feature: bool) -> list[int]:
    """A batch's mask: as the input [B, C, *spatial], or for feature (spatial) dropout one
    value per sample and channel, [B, C, 1, ...], as ATen's make_feature_noise."""
    shape = list(x_shape)
    if feature:
        shape[2:] = [1] * (len(shape) - 2)
    return shape


def keep_thresholds(rates: torch.Tensor) -> torch.Tensor:
    """(1 - p) 2^32 for each rate p (float64): an output's high 32 bits below it keep the
    element. In [0, 2^32], held as int64 (and read as uint64 by the CPU path)."""
    return torch.round((1 - rates) * 2**32).to(torch.int64)


def keep_mask(
    keys: torch.Tensor | int,
    thresholds: torch.Tensor,
    shape: Sequence[int],
    like: torch.Tensor,
    *,
    numpy_on_cpu: bool = True,
) -> torch.Tensor:
    """[T, *shape] booleans: mask t from the stream keys[t], keeping an element where its
    output falls below thresholds[t] (keep_thresholds). keys: [T] int64 (or one int, T = 1)
    and thresholds: [T] int64, on the activations' device, so that no mask waits on a copy
    from the host. `like` is the activations, [T, B, C, *spatial]; an element-wise mask is
    laid out as they are (a pack's may lie trials-in-channels), so that applying it keeps
    their layout, an element's index in its stream being its logical index all the same. On
    CPU the arithmetic is numpy's unless numpy_on_cpu is False, which runs the CUDA path's
    (tests compare the two, the benchmark times them)."""
    full = [len(thresholds), *shape]
    if like.shape[1:] == tuple(shape):
        out = torch.empty_like(like, dtype=torch.bool)
    else:
        out = torch.empty(full, dtype=torch.bool, device=like.device)
    if out.device.type == "cpu" and numpy_on_cpu:
        _keep_numpy(keys, thresholds, shape, out.numpy())
        return out
    view = [len(thresholds), *([1] * len(shape))]
    states = keys if isinstance(keys, int) else keys.view(view)
    counters = _counters(math.prod(shape), like.device).view([1, *shape])
    z = torch.add(counters, states, out=torch.empty_like(out, dtype=torch.int64))
    return _keep_torch(z, thresholds.view(view))


def apply_noise(
    x: torch.Tensor, keep: torch.Tensor, rates: torch.Tensor, alpha: bool
) -> torch.Tensor:
    """x with the mask applied as ATen's dropout applies its noise; `rates` (float64)
    broadcast against the mask, the scale factors computed from them in double precision and
    then in x's dtype, as ATen computes them."""

    def cast(values: torch.Tensor) -> torch.Tensor:
        return values.to(x.dtype)

    if not alpha:  # keep / (1 - p) in x's dtype, as noise.div_(1 - p): one op, not two
        return x * torch.div(keep, cast(1 - rates))
    noise = keep.to(x.dtype)
    a = 1.0 / torch.sqrt((ALPHA**2 * rates + 1) * (1 - rates))
    offset = noise.add(-1).mul_(cast(ALPHA * a)).add_(cast(ALPHA * a * rates))
    return x * noise.mul_(cast(a)) + offset


_BLOCK_ELEMENTS = 1 << 20  # mask elements a layer draws ahead in one call: 1 MiB of booleans


class Dropout(nn.Module):
    """Dropout (element-wise, alpha, or feature/spatial) with counter-based masks.

    Training needs a stream position: set_position names the job's (seed, epoch, step)
    before each training forward. Eval mode, or a rate of 0, passes x through.

    Told the steps in an epoch (`steps_per_epoch`, as the trainer does), a layer draws the
    masks of a block of that epoch's steps in one call and serves the next steps from it: a
    small model's mask is a few thousand elements, whose cost is the dozen calls that make
    it, not its arithmetic (on CUDA, a dozen kernel launches). The masks are the same
    either way: mask k of a block is keep_mask at step k, and a short last batch takes the
    first rows of a full one, which are the first elements of the same stream.
    """

    rate: torch.Tensor
    threshold: torch.Tensor

    def __init__(self, p: float, *, alpha: bool = False, feature: bool = False) -> None:
        super().__init__()
        self.p = p
        # The rate and its keep threshold as the pack holds them, on the model's device (so
        # moved with it, and kept out of the state dict): no copy from the host on each step.
        rate = torch.tensor([p], dtype=torch.float64)
        self.register_buffer("rate", rate, persistent=False)
        self.register_buffer("threshold", keep_thresholds(rate), persistent=False)
        self.alpha = alpha
        self.feature = feature
        self.layer = ""  # its name in the model, set by name_dropouts
        self.position: tuple[object, ...] | None = None
        self.steps_per_epoch: int | None = None
        # ((seed, epoch), first step, masks [steps, *shape]) drawn ahead, or None.
        self._block: tuple[tuple[object, ...], int, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        kind = "alpha" if self.alpha else "feature" if self.feature else "element-wise"
        return f"p={self.p}, {kind}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.position is None:
            raise RuntimeError("dropout trains at a stream position: call set_position first")
        shape = mask_shape(x.shape, self.feature)
        keep = self._drawn_ahead(self.position, shape, x)
        if keep is None:  # a pack's computation for a pack of one: the same numbers
            key = stream_key(self.position, self.layer)
            keep = keep_mask(key, self.threshold, shape, x.unsqueeze(0))[0]
        return apply_noise(x, keep, self.rate.view([1] * x.dim()), self.alpha)

    def _drawn_ahead(
        self, position: tuple[object, ...], shape: list[int], x: torch.Tensor
    ) -> torch.Tensor | None:
        """The mask at a training step (seed, epoch, step) from the block that holds it,
        drawing a new block from this step on where none does; None for other positions
        (a probe's tagged ones) or where the steps in an epoch are not known."""
        if self.steps_per_epoch is None or len(position) != 3:
            return None
        seed, epoch, step = position
        if not isinstance(step, int):
            return None
        if self._block is not None:
            epoch_of, first, masks = self._block
            at = step - first
            holds = epoch_of == (seed, epoch) and 0 <= at < len(masks)
            fits = list(masks.shape[2:]) == shape[1:] and masks.shape[1] >= shape[0]
            if holds and fits and masks.device == x.device:
                return masks[at, : shape[0]]
        count = min(self.steps_per_epoch - step, max(1, _BLOCK_ELEMENTS // math.prod(shape)))
        if count < 2:
            return None
        keys = [stream_key((seed, epoch, k), self.layer) for k in range(step, step + count)]
        like = x.unsqueeze(0).expand(count, *x.shape)
        masks = keep_mask(
            torch.tensor(keys, device=x.device), self.threshold.expand(count), shape, like
        )
        self._block = ((seed, epoch), step, masks)
        return masks[0]


def dropouts(model: nn.Module) -> list[tuple[str, Dropout]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Dropout)]


def name_dropouts(model: nn.Module) -> None:
    """Each dropout layer keys its masks by its name in the model: the same alone and packed."""
    for name, module in dropouts(model):
        module.layer = name


def set_position(model: nn.Module, position: tuple[object, ...] | None) -> None:
    """Where the model's dropout layers draw from: (seed, epoch, step, *tag), or nowhere."""
    for _, module in dropouts(model):
        module.position = position


def position_of(model: nn.Module) -> tuple[object, ...] | None:
    found = dropouts(model)
    return found[0][1].position if found else None
