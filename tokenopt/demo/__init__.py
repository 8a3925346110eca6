"""The embedded demo: a seeded task suite and a tiny LM trained on it."""

from pathlib import Path

from tokenopt.demo.suite import ANSWER_CUE, FAMILIES, SuiteConfig, generate_suite, make_example

__all__ = ["ANSWER_CUE", "DEMO_MODEL_DIR", "FAMILIES", "SuiteConfig", "generate_suite", "make_example"]

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"
"""The embedded demo LM, committed inside the package (a ``save_pretrained`` folder)."""
