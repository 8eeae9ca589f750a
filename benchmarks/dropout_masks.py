"""Dropout masks for a pack of T trials: torch's generator trial by trial against counter-based.

The baseline is how the pack drew masks before worker/training/dropout.py: one torch.Generator
per trial (MT19937, as ATen's CPU dropout draws), one bernoulli_ call per trial, each into its
slice of the pack's noise tensor. The counter-based arms are keep_mask: every trial's mask of a
layer in one vectorized call, in torch's int64 arithmetic (the CUDA path) and, on CPU, in
numpy's uint64 a cache-sized chunk at a time (the CPU path). All arms make the same masks'
worth of work: for each of a small CNN's two dropout layers (mnist1d, batch 64: [64, 32, 40]
and [64, 64, 20] per trial), draw the mask of every trial, then scale it into noise as dropout
does. Arms alternate round by round; printed are the medians of the rounds' nanoseconds per
mask element and of their ratios to the baseline.

    PYTHONPATH=. .venv/bin/python benchmarks/dropout_masks.py [--trials 1 8 32] [--rounds 5]
        [--device cpu|cuda]
"""

import argparse
import statistics
import time

import torch

from worker.training.dropout import keep_mask, keep_thresholds, stream_key

SHAPES = ([64, 32, 40], [64, 64, 20])  # the sweep CNN's activations where dropout applies
STEPS = 20  # masks per layer per timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generators(trials: int, device: torch.device) -> float:
    """Seconds for STEPS steps: each trial's mask from its own generator, one call a trial."""
    streams = [torch.Generator(device).manual_seed(seed) for seed in range(trials)]
    rates = [0.1 + 0.4 * t / max(1, trials) for t in range(trials)]
    sync(device)
    started = time.perf_counter()
    for _ in range(STEPS):
        for shape in SHAPES:
            noise = torch.empty(trials, *shape, device=device)
            for position, generator in enumerate(streams):
                noise[position].bernoulli_(1 - rates[position], generator=generator)
            keep = torch.tensor([1 - p for p in rates], device=device)
            noise.div_(keep.view(-1, 1, 1, 1))
    sync(device)
    return time.perf_counter() - started


def counters(trials: int, device: torch.device, numpy_on_cpu: bool = True) -> float:
    """Seconds for STEPS steps: every trial's mask of a layer in one keep_mask call."""
    rates = torch.tensor(
        [0.1 + 0.4 * t / max(1, trials) for t in range(trials)], dtype=torch.float64, device=device
    )
    thresholds = keep_thresholds(rates)
    keys = torch.tensor(
        [[stream_key((seed, 1, step), "layer") for seed in range(trials)] for step in range(STEPS)],
        device=device,
    )
    sync(device)
    started = time.perf_counter()
    for step in range(STEPS):
        for shape in SHAPES:
            like = torch.empty(trials, *shape, device=device)
            keep = keep_mask(keys[step], thresholds, shape, like, numpy_on_cpu=numpy_on_cpu)
            noise = keep.to(like.dtype)
            noise.div_((1 - rates).to(like.dtype).view(-1, 1, 1, 1))
    sync(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    arms = {
        "generators": lambda trials: generators(trials, device),
        "torch int64": lambda trials: counters(trials, device, numpy_on_cpu=False),
    }
    if device.type == "cpu":
        arms["numpy uint64"] = lambda trials: counters(trials, device)
    names = list(arms)
    print("ns an element (speed-up against generators)")
    print("trials  " + "  ".join(f"{name:>22}" for name in names))
    for trials in args.trials:
        elements = trials * STEPS * sum(a * b * c for a, b, c in SHAPES)
        for arm in arms.values():  # warm up
            arm(trials)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        ratios: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name, arm in arms.items():
                seconds[name].append(arm(trials))
            for name in names:
                ratios[name].append(seconds["generators"][-1] / seconds[name][-1])
        cells = []
        for name in names:
            per_element = statistics.median(seconds[name]) / elements * 1e9
            cells.append(f"{per_element:14.2f} ({statistics.median(ratios[name]):4.2f}x)")
        print(f"{trials:6d}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
