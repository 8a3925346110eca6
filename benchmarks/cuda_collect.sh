#!/usr/bin/env bash
# The demo collection on a CUDA device: the test split's outcome table (float32, for
# comparison with a CPU collection) and the collection benchmark. Run from the repo root
# on a machine with torch and transformers; writes into ${OUT:-runs/cuda}.
set -o pipefail
OUT=${OUT:-runs/cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
SECONDS=0
python3 -m tokenopt.cli collect --device cuda --dtype float32 --split test --shard-size 1000 --out "$OUT/table_cuda" 2>&1 | tail -2
echo "collect wall s: $SECONDS"
python3 benchmarks/collect.py --device cuda --queries 256 2>&1 | grep -v "Loading weights" | tee "$OUT/bench_cuda.txt"
