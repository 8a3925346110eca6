"""Shared-prefix collection against the naive per-budget loop, on the demo LM.

Prints, measured side by side in one run:
- LM forward tokens and wall time of shared-prefix decoding (one reasoning pass per
  query and mode, answers branched off the cache at every budget) against running
  each budget separately, for 6 budgets and the modes greedy, sc5 and beam3;
- queries per second of the full collection step at batch sizes 1, 8 and 32;
- peak memory.

Usage: python benchmarks/collect.py [--queries 256] [--device auto] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from tokenopt.actions import parse_modes
from tokenopt.data import assign_split
from tokenopt.demo.suite import SuiteConfig, generate_suite
from tokenopt.lm.decoding import DecodeStats, decode_with_budgets
from tokenopt.lm.local import TransformersLM

BUDGETS = [0, 2, 4, 8, 16, 32]
MODES = "greedy,sc5,beam3"


def _run(lm, prompts, modes, budgets_list, batch_size):
    stats = DecodeStats()
    started = time.perf_counter()
    for mode in modes:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            seeds = list(range(start, start + len(batch)))
            for budgets in budgets_list:
                _, _, call = decode_with_budgets(lm.model, batch, mode, budgets, lm.settings, seeds)
                stats.add(call)
    return stats, time.perf_counter() - started


class _ForwardCounter:
    """Counts the positions every forward pass of the LM runs (padding included)."""

    def __init__(self, model):
        self.tokens = 0
        self.calls = 0
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            self.tokens += input_ids.numel()
            self.calls += 1


def _left_pad(sequences, pad_id):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # moved to the LM's device by the caller
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        ids[i, width - len(sequence) :] = torch.tensor(sequence)
        mask[i, width - len(sequence) :] = 1
    return ids, mask


def _naive_generate(lm, prompts, modes, batch_size):
    """Each budget run on its own with transformers' generate: reason, force the cue, answer."""
    settings = lm.settings
    started = time.perf_counter()
    for mode in modes:
        kwargs = {"do_sample": False}
        if mode.kind == "sc":
            kwargs = {"do_sample": True, "num_return_sequences": mode.width, "top_k": 0}
        elif mode.kind == "beam":
            kwargs = {"do_sample": False, "num_beams": mode.width, "num_return_sequences": 1}
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            for budget in BUDGETS:
                contexts = [list(p) for p in batch for _ in range(mode.width if mode.kind == "sc" else 1)]
                if budget > 0:
                    ids, mask = (t.to(lm.device) for t in _left_pad(batch, settings.pad_id))
                    out = lm.model.generate(
                        ids, attention_mask=mask, max_new_tokens=budget, pad_token_id=settings.pad_id,
                        eos_token_id=[*settings.cue_ids, *settings.eos_ids], **kwargs,
                    )  # fmt: skip
                    contexts = []
                    for row in out[:, ids.shape[1] :].tolist():
                        trace = [t for t in row if t != settings.pad_id]
                        if trace and trace[-1] in (*settings.cue_ids, *settings.eos_ids):
                            trace = trace[:-1]
                        contexts.append(trace)
                    repeat = mode.width if mode.kind == "sc" else 1
                    contexts = [list(batch[i // repeat]) + trace for i, trace in enumerate(contexts)]
                contexts = [c + list(settings.cue_ids) for c in contexts]
                ids, mask = (t.to(lm.device) for t in _left_pad(contexts, settings.pad_id))
                answer_kwargs = dict(kwargs)
                answer_kwargs.pop("num_return_sequences", None)
                lm.model.generate(
                    ids, attention_mask=mask, max_new_tokens=settings.max_answer_tokens, pad_token_id=settings.pad_id,
                    eos_token_id=[*settings.eos_ids, *settings.newline_ids], **answer_kwargs,
                )  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=256, help="demo test-split queries to decode")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = TransformersLM(device=args.device)
    suite = [r for r in generate_suite(SuiteConfig(n_queries=3000)) if assign_split(str(r["id"])) == "test"]
    questions = [str(r["question"]) for r in suite[: args.queries]]
    prompts = [lm.encode_prompt(q) for q in questions]
    modes = parse_modes(MODES)
    print(f"device {lm.device}, {len(prompts)} demo test queries, budgets {BUDGETS}, modes {MODES}")

    counter = _ForwardCounter(lm.model)
    _run(lm, prompts[:32], modes, [BUDGETS], 32)  # warm-up
    counter.tokens = counter.calls = 0
    _, shared_s = _run(lm, prompts, modes, [BUDGETS], 32)
    shared = (counter.tokens, counter.calls)
    counter.tokens = counter.calls = 0
    _, engine_s = _run(lm, prompts, modes, [[b] for b in BUDGETS], 32)
    engine = (counter.tokens, counter.calls)
    counter.tokens = counter.calls = 0
    generate_s = _naive_generate(lm, prompts, modes, 32)
    generate = (counter.tokens, counter.calls)
    print("\n| method (batch 32) | forward tokens | forward calls | wall s |")
    print("|---|---|---|---|")
    print(f"| shared prefix (tokenopt collect) | {shared[0]:,} | {shared[1]:,} | {shared_s:.2f} |")
    print(f"| naive: one budget per run, same decoder | {engine[0]:,} | {engine[1]:,} | {engine_s:.2f} |")
    print(
        f"| naive: one budget per run, transformers generate | {generate[0]:,} | {generate[1]:,} | {generate_s:.2f} |"
    )
    for name, (tokens, _), seconds in (("same decoder", engine, engine_s), ("generate", generate, generate_s)):
        print(
            f"\nagainst naive ({name}): {tokens / shared[0]:.2f}x fewer forward tokens, "
            f"{seconds / shared_s:.2f}x faster in wall time"
        )

    print("\n| batch size | queries/s (all modes, all budgets) |")
    print("|---|---|")
    subset = prompts[:64]
    for batch_size in (1, 8, 32):
        _, seconds = _run(lm, subset, modes, [BUDGETS], batch_size)
        print(f"| {batch_size} | {len(subset) / seconds:.1f} |")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory {peak_mb:.0f} MB")
    if lm.device.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
