"""The OpenAI-compatible server and proxy that apply a policy (``pip install tokenopt[serve]``)."""

from tokenopt.decisions import DecisionLog, DecisionRecord, read_decisions
from tokenopt.serve.app import create_app
from tokenopt.serve.config import ServeConfig

__all__ = ["DecisionLog", "DecisionRecord", "ServeConfig", "create_app", "read_decisions"]
