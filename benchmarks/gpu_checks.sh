#!/usr/bin/env bash
# Run ON THE LENT GPU MACHINE, all of a session's GPU checks in one call (a machine costs a
# minute or two to start, and a session has 15 minutes of one). Here first, once:
#     benchmarks/gpu_wheels.sh          # .whl/: what the machine's image lacks, ~16 MiB
# then the device tool's run:
#     command: bash benchmarks/gpu_checks.sh     carry: [".whl"]     timeout_s: 590
# Each step has its own time limit so that one hang cannot cost the others; the log comes back
# as $OUT/gpu_checks.log. Steps, most needed first: the CUDA tests; the packed sweep in process
# (issue 11's goal: 10x one job at a time at 32 trials, still rising at 128); a 32-job study
# through the service, packed against unpacked; a packed step eager against a CUDA graph
# (item 5: capture where it pays); the dropout masks; the trainer's throughput.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/gpu_checks.log"

step() {  # step SECONDS COMMAND...: run it under a limit, timing it, whatever it returns
    local limit=$1
    shift
    echo "=== $* (limit ${limit}s)"
    local started=$SECONDS
    timeout "$limit" "$@"
    echo "=== exit $? after $((SECONDS - started))s"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
    step 130 python3 -m pytest -m gpu -q -p no:cacheprovider tests/training tests/e2e/test_gpu.py
    step 160 python3 benchmarks/packed_sweep.py --device cuda --model mlp cnn \
        --trials 8 32 128 256 --epochs 2 --rounds 1
    step 110 python3 benchmarks/packed_sweep.py --service --device cuda --model mlp \
        --epochs 8 --max-pack 32 --rounds 1
    step 60 python3 benchmarks/cuda_graphs.py --trials 1 8 32 128 --steps 100 --rounds 3
    step 30 python3 benchmarks/dropout_masks.py --device cuda --rounds 3
    step 50 python3 benchmarks/train_throughput.py --device cuda --rounds 3
} 2>&1 | tee "$log"
