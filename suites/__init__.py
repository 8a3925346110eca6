"""Robustness suites: (model, question set) pairs of our own besides the embedded demo.

Run from the repository root (``python -m suites.build NAME --out DIR``); the folder is
not installed with tokenopt. See suites/README.md.
"""
