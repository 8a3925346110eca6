"""The OpenAI-compatible server and proxy that apply a policy (``pip install tokenopt[serve]``)."""

from tokenopt.serve.app import ServeConfig, create_app
from tokenopt.serve.log import DecisionLog, DecisionRecord, read_decisions

__all__ = ["DecisionLog", "DecisionRecord", "ServeConfig", "create_app", "read_decisions"]
