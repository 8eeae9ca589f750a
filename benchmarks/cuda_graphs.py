"""A packed training step, launched op by op against captured once in a CUDA graph and replayed.

Issue 11 asks to capture the training step in a CUDA graph where that pays, measured on and
off. Small models are launch-bound on a GPU: a step is a few hundred kernels of microseconds
each, and a graph replays them with one launch. Whether that pays for a pack, whose step
already serves every trial with one set of kernels, is what this measures, before the worker
does it: `PackedRun._train_step` (forward, loss, gradients, each trial's clipping and
optimizer step; device tensors in and out, nothing read on the host) for the sweep's trials
of benchmarks/packed_sweep.py, on one fixed batch, timed --steps times eagerly and as graph
replays, alternating for --rounds rounds; printed are milliseconds a step (medians) and the
eager/graph ratio (the median of the rounds' own), over pack size. A pack of one stands for a
job alone.

    python benchmarks/cuda_graphs.py [--model mlp cnn] [--trials 1 8 32 128] [--steps 100]

Without CUDA it times the eager step alone, which checks the script (graphs need a GPU).
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.packed_sweep import MODELS, load, sweep
from worker.training.packed import PackedRun

Step = Callable[[], object]


def steps_of(pack: PackedRun) -> tuple[Step, Callable[[], Step] | None]:
    """The pack's step on fixed inputs, eagerly; and a function that captures it (CUDA)."""
    trials = pack.active
    batch = pack.bounds[0][1] - pack.bounds[0][0]
    # The inputs live in tensors that stay put, as a captured graph reads them by address.
    index = torch.stack(
        [torch.randperm(len(pack.x_train), generator=t.shuffle)[:batch] for t in trials]
    ).to(pack.device)
    labels = pack._labels_active()
    keys = pack._dropout_key_table(trials)[:, 0].contiguous()
    schedule = {k: v[0].contiguous() for k, v in pack._schedule_table(trials).items()}

    def eager() -> object:
        return pack._train_step(index, labels, keys, schedule)

    if pack.device.type != "cuda":
        return eager, None

    def capture() -> Step:
        # As torch.cuda.graphs' documentation has it: warm up on a side stream (these steps
        # train, as every timed one does), then capture one step; replay runs it again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                eager()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()
        return graph.replay

    return eager, capture


def seconds_per_step(step: Step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["mlp", "cnn"], choices=MODELS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    for model in args.model:
        data = load(sweep(model, 1, 1, args.device)[0])
        print(f"model={model} device={device} steps={args.steps}; medians of {args.rounds} rounds")
        print(f"{'trials':>6} {'eager ms':>9} {'graph ms':>9} {'eager/graph':>11}")
        for count in args.trials:
            pack = PackedRun(sweep(model, count, 1, args.device), data)
            eager, capture = steps_of(pack)
            seconds_per_step(eager, 5, device)  # kernels chosen, allocator warm
            replay = capture() if capture else None
            eager_s, graph_s = [], []
            for _ in range(args.rounds):
                eager_s.append(seconds_per_step(eager, args.steps, device))
                if replay:
                    graph_s.append(seconds_per_step(replay, args.steps, device))
            line = f"{count:>6} {1e3 * statistics.median(eager_s):>9.3f}"
            if graph_s:
                ratio = statistics.median(e / g for e, g in zip(eager_s, graph_s, strict=True))
                line += f" {1e3 * statistics.median(graph_s):>9.3f} {ratio:>11.2f}"
            else:
                line += f" {'(no CUDA)':>9} {'':>11}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
