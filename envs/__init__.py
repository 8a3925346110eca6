"""Gymnasium environments of tokenopt, installed as ``tokenopt.envs``.

The environments that wrap an outcome table or a live LM (``tokenopt/TokenBudget-v0``
and ``tokenopt/TokenBudgetStream-v0``) are registered here.
"""

__all__: list[str] = []
