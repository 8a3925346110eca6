#!/usr/bin/env bash
# The demo collection on CUDA against the same collection on CPU, row by row, and the
# collection benchmark on CUDA.
#
# Collects one small split of the demo suite (default: the test split of a 500-query suite,
# float32) once with --device cpu and once with --device cuda, then compares the two
# outcome tables row by row: ids, splits, actions, budgets, modes, answers, EM, every
# token count and the per-sequence answers and tokens must be identical; log-probabilities
# and confidences equal within a tolerance (ATOL, default 1e-4); latency is not compared.
# Exits 1 on any difference (the first differing rows are printed), 0 when identical.
# Without a CUDA device it collects nothing and exits 0 with a SKIP message.
#
# Run from the repo root on a machine with torch and transformers; writes into
# ${OUT:-runs/cuda}. Settings: QUERIES (suite size, default 500), SPLIT (default test),
# ATOL, DEVICE (the device compared with the CPU, default cuda; DEVICE=cpu runs the whole
# comparison on CPU, to check this script on a machine without a GPU).
set -euo pipefail
OUT=${OUT:-runs/cuda}
QUERIES=${QUERIES:-500}
SPLIT=${SPLIT:-test}
ATOL=${ATOL:-1e-4}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1

python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [[ $DEVICE == cuda* ]] && ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "SKIP: no CUDA device (torch.cuda.is_available() is False); nothing collected or compared."
    echo "      DEVICE=cpu bash $0 runs the same comparison on CPU."
    exit 0
fi
if [[ $DEVICE == cuda* ]]; then
    python3 -c "import torch; print('device', torch.cuda.get_device_name(0))"
fi

REFERENCE="$OUT/table_cpu"
COMPARED="$OUT/table_${DEVICE//:/_}"
[[ $COMPARED == "$REFERENCE" ]] && COMPARED="$OUT/table_cpu_again"
mkdir -p "$OUT"
rm -rf "$REFERENCE" "$COMPARED"
python3 - "$OUT/questions.jsonl" "$QUERIES" <<'EOF'
import sys

from tokenopt.demo.suite import SuiteConfig, generate_suite, write_jsonl

write_jsonl(generate_suite(SuiteConfig(n_queries=int(sys.argv[2]), seed=5)), sys.argv[1])
EOF

collect() {  # DEVICE FOLDER
    SECONDS=0
    python3 -m tokenopt.cli collect --data "$OUT/questions.jsonl" --device "$1" --dtype float32 \
        --split "$SPLIT" --shard-size 1000 --out "$2" 2>&1 | tail -2
    echo "collect on $1: wall s $SECONDS"
}
collect cpu "$REFERENCE"
collect "$DEVICE" "$COMPARED"

python3 - "$REFERENCE" "$COMPARED" "$ATOL" <<'EOF'
"""Compare two outcome tables row by row; exit 1 on any difference."""

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

first, second, atol = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
EXACT = [
    "split", "budget", "mode", "answer", "em", "reasoning_tokens", "cue_tokens", "answer_tokens", "prompt_tokens",
    "billed_tokens", "natural_stop", "n_sequences", "sample_answers", "sample_em", "sample_tokens",
]  # fmt: skip
APPROX = ["confidence", "answer_logprob", "sample_logprobs"]


def outcomes(table: Path) -> pa.Table:
    parts = sorted((table / "outcomes").glob("part-*.parquet"))
    if not parts:
        sys.exit(f"{table} has no outcome shards")
    return pa.concat_tables([pq.read_table(p) for p in parts]).sort_by([("id", "ascending"), ("action", "ascending")])


a, b = outcomes(first), outcomes(second)
problems: list[str] = []
keys_a = list(zip(a.column("id").to_pylist(), a.column("action").to_pylist(), strict=True))
keys_b = list(zip(b.column("id").to_pylist(), b.column("action").to_pylist(), strict=True))
if keys_a != keys_b:
    only_a, only_b = sorted(set(keys_a) - set(keys_b)), sorted(set(keys_b) - set(keys_a))
    problems.append(f"rows differ: {len(a)} vs {len(b)} rows; only in {first.name}: {only_a[:5]}, "
                    f"only in {second.name}: {only_b[:5]}")  # fmt: skip
else:
    for name in EXACT:
        left, right = a.column(name).to_pylist(), b.column(name).to_pylist()
        bad = [k for k, (x, y) in enumerate(zip(left, right, strict=True)) if x != y]
        problems += [f"{keys_a[k]} {name}: {left[k]!r} vs {right[k]!r}" for k in bad[:5]]
        if len(bad) > 5:
            problems.append(f"... {name} differs on {len(bad)} rows in all")
    for name in APPROX:
        left, right = a.column(name).to_pylist(), b.column(name).to_pylist()
        bad = []
        for k, (x, y) in enumerate(zip(left, right, strict=True)):
            x, y = np.atleast_1d(np.asarray(x, dtype=np.float64)), np.atleast_1d(np.asarray(y, dtype=np.float64))
            if x.shape != y.shape or not np.allclose(x, y, rtol=0.0, atol=atol, equal_nan=True):
                bad.append(k)
        problems += [f"{keys_a[k]} {name}: {left[k]!r} vs {right[k]!r} (atol {atol:g})" for k in bad[:5]]
        if len(bad) > 5:
            problems.append(f"... {name} differs on {len(bad)} rows in all")
for name in ("queries.parquet", "features.parquet"):
    if not pq.read_table(first / name).equals(pq.read_table(second / name)):
        problems.append(f"{name} differs")
if problems:
    print(f"DIFFERENT: {first} and {second}:", *problems, sep="\n  ")
    sys.exit(1)
print(f"IDENTICAL: {len(a)} rows ({len(set(a.column('id').to_pylist()))} queries x "
      f"{len(set(a.column('action').to_pylist()))} actions), exact on ids, actions, answers and tokens, "
      f"log-probabilities within {atol:g}")  # fmt: skip
EOF

if [[ $DEVICE == cuda* ]]; then
    python3 benchmarks/collect.py --device "$DEVICE" --queries 256 2>&1 | grep -v "Loading weights" \
        | tee "$OUT/bench_cuda.txt"
fi
