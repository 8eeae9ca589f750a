"""Counter-based dropout: masks that are SplitMix64 streams keyed by (seed, epoch, step, layer),
with torch's dropout semantics (scaling, alpha dropout, feature dropout)."""

import math

import pytest
import torch

from tests.training.helpers import data_for, make_spec, train
from worker.training.dropout import (
    ALPHA,
    Dropout,
    apply_noise,
    keep_mask,
    keep_thresholds,
    mask_shape,
    set_position,
    stream_key,
)
from worker.training.loop import TrainingRun
from worker.training.models import build_model

MASK64 = 2**64 - 1


def splitmix64(state: int, count: int) -> list[int]:
    """The reference generator (Steele, Lea and Flood 2014) on Python integers: the high 32
    bits of its first `count` outputs from `state`."""
    outputs = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        outputs.append((z ^ (z >> 31)) >> 32)
    return outputs


def thresholds(rates: list[float]) -> torch.Tensor:
    return keep_thresholds(torch.tensor(rates, dtype=torch.float64))


def mask(
    keys: list[int], rates: list[float], shape: list[int], *, numpy_on_cpu: bool = True
) -> torch.Tensor:
    like = torch.empty(len(keys), *shape)
    states = torch.tensor(keys, dtype=torch.int64)
    return keep_mask(states, thresholds(rates), shape, like, numpy_on_cpu=numpy_on_cpu)


@pytest.mark.parametrize("numpy_on_cpu", [True, False], ids=["numpy", "torch-int64"])
def test_a_mask_is_splitmix64_against_the_keep_threshold(numpy_on_cpu: bool) -> None:
    key = stream_key((7, 2, 5), "hidden.0.dropout")
    rate = 0.3
    threshold = round((1 - rate) * 2**32)
    expected = [u < threshold for u in splitmix64(key & MASK64, 500)]
    assert mask([key], [rate], [500], numpy_on_cpu=numpy_on_cpu)[0].tolist() == expected
    # Keys with the sign bit set (half of them) take the same path through int64.
    negative = next(k for k in (stream_key((s, 1, 0), "x") for s in range(50)) if k < 0)
    expected = [u < threshold for u in splitmix64(negative & MASK64, 200)]
    assert mask([negative], [rate], [200], numpy_on_cpu=numpy_on_cpu)[0].tolist() == expected


def test_the_cpu_and_cuda_arithmetic_draw_the_same_masks() -> None:
    """numpy's uint64 (the CPU path, a cache-sized chunk at a time) and torch's int64 (the
    CUDA path, run here on CPU) agree bit for bit: over several chunks, for several trials,
    with rates from 0 to near 1 (thresholds 2^32 and small) and in a pack's layout."""
    keys = [stream_key((seed, 3, 1), "blocks.1.dropout") for seed in range(5)]
    rates = [0.0, 0.1, 0.5, 0.9, 1 - 2**-30]
    shape = [64, 16, 100]  # 102,400 an element a trial: four chunks and a part
    assert torch.equal(mask(keys, rates, shape), mask(keys, rates, shape, numpy_on_cpu=False))
    assert mask(keys, rates, shape)[0].all()
    trials, batch, channels, length = 5, 8, 16, 30
    like = torch.empty(batch, trials * channels, length).unflatten(1, (trials, channels))
    like = like.transpose(0, 1)
    states = torch.tensor(keys)
    both = [
        keep_mask(states, thresholds(rates), [batch, channels, length], like, numpy_on_cpu=flag)
        for flag in (True, False)
    ]
    assert torch.equal(both[0], both[1])


def test_each_stream_is_its_own_seed_epoch_step_and_layer() -> None:
    positions = [(0, 1, 0), (1, 1, 0), (0, 2, 0), (0, 1, 1)]
    keys = {stream_key(p, layer) for p in positions for layer in ("input_dropout", "h.0.d")}
    assert len(keys) == 8
    assert stream_key((0, 1, 0, "gradient-noise", 0), "h") != stream_key((0, 1, 0), "h")
    masks = mask(sorted(keys), [0.5] * 8, [4096]).float()
    # Independent fair coins: every pair agrees on about half the elements.
    agreement = (masks.unsqueeze(0) == masks.unsqueeze(1)).float().mean(-1)
    off_diagonal = agreement[~torch.eye(8, dtype=torch.bool)]
    assert ((off_diagonal - 0.5).abs() < 4 * 0.5 / math.sqrt(4096)).all()


@pytest.mark.parametrize("rate", [0.05, 0.25, 0.5, 0.9])
def test_a_mask_keeps_a_fraction_one_minus_the_rate(rate: float) -> None:
    n = 200_000
    kept = mask([stream_key((3, 1, 0), "d")], [rate], [n]).float().mean().item()
    assert abs(kept - (1 - rate)) < 5 * math.sqrt(rate * (1 - rate) / n)


def test_a_trials_mask_does_not_depend_on_the_pack() -> None:
    keys = [stream_key((seed, 1, 3), "d") for seed in range(3)]
    rates = [0.1, 0.5, 0.3]
    packed = mask(keys, rates, [8, 5])
    shuffled = mask(keys[::-1], rates[::-1], [8, 5])
    assert torch.equal(packed, shuffled.flip(0))
    for t in range(3):
        assert torch.equal(packed[t], mask(keys[t : t + 1], rates[t : t + 1], [8, 5])[0])


def test_a_mask_takes_the_activations_layout_and_keeps_the_logical_order() -> None:
    # A CNN pack's activations lie trials-in-channels: [B, T*C, L] seen as [T, B, C, L].
    trials, batch, channels, length = 3, 4, 5, 6
    like = torch.empty(batch, trials * channels, length).unflatten(1, (trials, channels))
    like = like.transpose(0, 1)
    keys = torch.tensor([stream_key((s, 1, 0), "d") for s in range(trials)])
    cut = thresholds([0.5] * trials)
    strided = keep_mask(keys, cut, [batch, channels, length], like)
    contiguous = keep_mask(keys, cut, [batch, channels, length], like.contiguous())
    assert strided.stride() == like.stride()
    assert torch.equal(strided, contiguous)


def test_feature_dropout_draws_one_value_per_sample_and_channel() -> None:
    assert mask_shape([4, 3, 5, 5], feature=True) == [4, 3, 1, 1]
    assert mask_shape([4, 3, 5], feature=False) == [4, 3, 5]
    layer = Dropout(0.5, feature=True)
    layer.position, layer.layer = (1, 1, 0), "d"
    out = layer(torch.ones(16, 8, 10))
    per_channel = out[..., :1]
    assert torch.equal(out, per_channel.expand_as(out))  # a channel is kept or dropped whole
    assert set(per_channel.unique().tolist()) == {0.0, 2.0}


def test_kept_values_scale_as_torch_dropout_and_the_mean_is_kept() -> None:
    x = torch.randn(100_000) + 1.0
    layer = Dropout(0.2)
    layer.position, layer.layer = (5, 1, 0), "d"
    out = layer(x)
    kept = out != 0
    reference = torch.nn.functional.dropout(x, 0.2)  # torch's own, on its own mask
    both = kept & (reference != 0)
    assert both.sum() > 50_000
    assert torch.equal(out[both], reference[both])
    assert abs(out.mean().item() - x.mean().item()) < 0.02


def test_alpha_dropout_keeps_a_standard_normal_standard() -> None:
    """SELU's fixed point: alpha dropout leaves mean 0 and variance 1 (Klambauer et al.)."""
    x = torch.randn(400_000, dtype=torch.float64)
    rates = torch.tensor([0.2], dtype=torch.float64)
    keep = keep_mask(stream_key((1, 1, 0), "d"), keep_thresholds(rates), [len(x)], x[None])[0]
    out = apply_noise(x, keep, rates, alpha=True)
    a = 1 / math.sqrt((ALPHA**2 * 0.2 + 1) * 0.8)
    dropped = out[~keep].unique()
    assert torch.allclose(dropped, torch.tensor([-ALPHA * a + ALPHA * a * 0.2], dtype=x.dtype))
    reference = torch.nn.functional.alpha_dropout(x, 0.2, training=True)  # torch's own mask
    both = keep & (reference != dropped)
    assert torch.equal(out[both], reference[both])
    assert abs(out.mean().item()) < 0.01
    assert abs(out.var().item() - 1) < 0.01


def test_dropout_trains_only_at_a_position_and_evaluates_as_identity() -> None:
    spec = make_spec(model={"hidden_sizes": [8], "dropout": {"rate": 0.5, "input_rate": 0.2}})
    model = build_model(spec.model, data_for(spec).info)
    x = torch.randn(6, 64)
    with pytest.raises(RuntimeError, match="set_position"):
        model(x)
    set_position(model, (spec.seed, 1, 0))
    first = model(x)
    assert torch.equal(first, model(x))  # the same position, the same masks
    set_position(model, (spec.seed, 1, 1))
    assert not torch.equal(first, model(x))
    model.eval()
    set_position(model, None)
    assert torch.equal(model(x), model(x))


def test_a_runs_masks_do_not_depend_on_the_global_generator() -> None:
    """Other code drawing from torch's generator mid-run (a library, a probe, a test) leaves
    the masks, and so the run, as they were."""
    spec = make_spec(model={"hidden_sizes": [16], "dropout": {"rate": 0.3}}, epochs=3)
    plain, _ = train(spec)
    run = TrainingRun(spec, data_for(spec))
    for _ in run.epochs():
        torch.rand(1000)
    assert run.weights() == plain.weights()


@pytest.mark.parametrize("feature", [False, True], ids=["element-wise", "feature"])
def test_masks_drawn_a_block_of_steps_ahead_are_the_masks_drawn_step_by_step(
    monkeypatch: pytest.MonkeyPatch, feature: bool
) -> None:
    """A layer told the steps in an epoch draws blocks of steps' masks at once; the masks are
    those drawn one step at a time: across blocks (a block here holds 3 steps), for a short
    last batch, for a probe's tagged position between steps, and into the next epoch."""
    mask_elements = 8 * 5 * (1 if feature else 4)  # a full batch's, [8, 5, 4] activations
    monkeypatch.setattr("worker.training.dropout._BLOCK_ELEMENTS", 3 * mask_elements)
    ahead, stepwise = Dropout(0.4, feature=feature), Dropout(0.4, feature=feature)
    ahead.layer = stepwise.layer = "blocks.0.dropout"
    ahead.steps_per_epoch = 8  # blocks of steps 0-2, 3-5 and 6-7
    positions: list[tuple[object, ...]] = [(3, 1, step) for step in range(8)]
    positions[4:4] = [(3, 1, 3, "gradient-noise", 0)]
    positions += [(3, 2, 0), (3, 2, 1)]
    for position in positions:
        rows = 2 if position[2] == 7 else 8  # the epoch's last batch is short
        x = torch.randn(rows, 5, 4)
        ahead.position = stepwise.position = position
        assert torch.equal(ahead(x), stepwise(x)), position
    assert ahead._block is not None
    assert len(ahead._block[2]) == 3  # epoch 2's first block
