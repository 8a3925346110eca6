"""What layer-wise learning-rate decay and weight decay do for the demo LM.

Trains the demo LM with a short schedule three times (the defaults; without
layer-wise decay; without weight decay) and prints, side by side, the training loss
and the loss on 2,048 held-out examples drawn with another seed.

Usage: python benchmarks/demo_lm_ablation.py [--steps 600]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenopt.demo.train import DEMO_TASK, DemoTrainConfig, _collate, _draw_rows, _Encoder, train_demo_lm


def held_out_loss(model_dir: str, config: DemoTrainConfig) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    rng = np.random.default_rng(999)
    rows = _draw_rows(rng, 2048, config, DEMO_TASK, _Encoder(tokenizer, DEMO_TASK.answer_cue))
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    losses = []
    with torch.inference_mode():
        for start in range(0, len(rows), 256):
            input_ids, labels, attention = _collate(rows[start : start + 256], tokenizer.pad_token_id)
            losses.append(float(model(input_ids=input_ids, attention_mask=attention, labels=labels).loss))
    return float(np.mean(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    base = DemoTrainConfig(steps=args.steps)
    variants = {
        "defaults (layer decay 0.8, weight decay 0.01)": base,
        "no layer-wise lr decay (1.0)": replace(base, layer_decay=1.0),
        "no weight decay": replace(base, weight_decay=0.0),
    }
    print(f"| variant ({args.steps} steps) | train loss (last 50 steps) | held-out loss |")
    print("|---|---|---|")
    for name, config in variants.items():
        with tempfile.TemporaryDirectory() as folder:
            summary = train_demo_lm(folder, config)
            print(f"| {name} | {summary['final_loss']:.4f} | {held_out_loss(folder, config):.4f} |", flush=True)


if __name__ == "__main__":
    main()
