"""Evaluation against the alternatives: baselines, the scoreboard, reports, the gate, cv and A/B reports."""

__all__: list[str] = []
