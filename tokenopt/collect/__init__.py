"""``tokenopt collect``: the outcome table of every (budget, mode) action on every query.

:mod:`~tokenopt.collect.config` holds the settings, :mod:`~tokenopt.collect.local`
collects in this process (a local transformers model or an OpenAI-compatible
upstream), :mod:`~tokenopt.collect.ray` shards the same work over a Ray cluster.
"""

from tokenopt.collect.config import CollectConfig, CollectSummary
from tokenopt.collect.local import add_features, collect, collect_shard

__all__ = ["CollectConfig", "CollectSummary", "add_features", "collect", "collect_shard"]
