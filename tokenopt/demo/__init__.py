"""The embedded demo: a seeded task suite and a tiny LM trained on it."""

from tokenopt.demo.suite import ANSWER_CUE, FAMILIES, SuiteConfig, generate_suite, make_example

__all__ = ["ANSWER_CUE", "FAMILIES", "SuiteConfig", "generate_suite", "make_example"]
