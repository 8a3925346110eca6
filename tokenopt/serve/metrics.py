"""Prometheus metrics of the server, each labelled by policy arm (low cardinality).

Labels take few values: arm (A, B), endpoint (2), status (the handful the server
answers), budget and mode (the policy's action table), token kind (reasoning,
answer). Every server has its own registry, so two servers in one process (tests)
do not share counters. With several uvicorn workers, set ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from tokenopt.serve.budget import SpendController

__all__ = ["ServeMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_POLICY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class ServeMetrics:
    """The counters, gauges and histograms ``GET /metrics`` exposes."""

    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series double the output and say nothing here
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tokenopt_requests",
            "Requests answered, by arm, endpoint and HTTP status.",
            ["arm", "endpoint", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "tokenopt_billed_tokens", "Tokens generated and billed, by arm and kind.", ["arm", "kind"], registry=r
        )
        self.decisions = Counter(
            "tokenopt_decisions", "Decisions served, by arm, budget and mode.", ["arm", "budget", "mode"], registry=r
        )
        self.latency = Histogram(
            "tokenopt_request_latency_seconds",
            "Request latency from arrival to response, by arm and endpoint.",
            ["arm", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.policy_latency = Histogram(
            "tokenopt_policy_latency_seconds",
            "Time the policy took to decide (features included), by arm.",
            ["arm"],
            buckets=_POLICY_BUCKETS,
            registry=r,
        )
        self.errors = Counter("tokenopt_errors", "Requests answered with an error, by kind.", ["kind"], registry=r)
        self.feedback = Counter(
            "tokenopt_feedback", "Feedback received, by arm and correctness.", ["arm", "correct"], registry=r
        )
        self.em = Gauge(
            "tokenopt_feedback_em", "Exact match over the feedback received so far, by arm.", ["arm"], registry=r
        )
        self.in_flight = Gauge("tokenopt_requests_in_flight", "Requests admitted and not yet answered.", registry=r)
        self.reloads = Counter("tokenopt_policy_reloads", "Policy reloads, by result.", ["result"], registry=r)
        # Budget control (--token-budget / --target-mean-tokens): read from each arm's controller at scrape time.
        self.cost_weight = Gauge(
            "tokenopt_cost_weight",
            "The price lambda the arm's policy decides at, set by its controller.",
            ["arm"],
            registry=r,
        )
        self.cost_weight_min = Gauge(
            "tokenopt_cost_weight_min", "Lower bound of the arm's lambda (its policy's range).", ["arm"], registry=r
        )
        self.cost_weight_max = Gauge(
            "tokenopt_cost_weight_max", "Upper bound of the arm's lambda (its policy's range).", ["arm"], registry=r
        )
        self.spend_rate = Gauge(
            "tokenopt_spend_tokens_per_second",
            "Billed tokens per second over the controller's window, by arm (--token-budget).",
            ["arm"],
            registry=r,
        )
        self.spend_rate_target = Gauge(
            "tokenopt_spend_target_tokens_per_second",
            "This replica's share of the token budget, by arm (--token-budget / --replicas).",
            ["arm"],
            registry=r,
        )
        self.spend_mean = Gauge(
            "tokenopt_spend_tokens_per_request",
            "Mean billed tokens per request over the controller's window, by arm (--target-mean-tokens).",
            ["arm"],
            registry=r,
        )
        self.spend_mean_target = Gauge(
            "tokenopt_spend_target_tokens_per_request",
            "The target mean billed tokens per request, by arm (--target-mean-tokens).",
            ["arm"],
            registry=r,
        )
        self._feedback_counts: dict[str, list[int]] = {}

    def watch_budget(self, arm: str, controller: SpendController) -> None:
        """Expose an arm's controller: its lambda, bounds, measured spend and target (read at each scrape)."""
        self.cost_weight.labels(arm=arm).set_function(lambda: controller.cost_weight)
        self.cost_weight_min.labels(arm=arm).set_function(lambda: controller.bounds[0])
        self.cost_weight_max.labels(arm=arm).set_function(lambda: controller.bounds[1])
        rate = controller.target.kind == "rate"
        spend, target = (self.spend_rate, self.spend_rate_target) if rate else (self.spend_mean, self.spend_mean_target)

        def measured() -> float:
            value = controller.measured()
            # No window yet: a rate of nothing is 0; a mean of no requests is undefined.
            return (0.0 if rate else math.nan) if value is None else value

        spend.labels(arm=arm).set_function(measured)
        target.labels(arm=arm).set_function(lambda: controller.target.value)

    def record_feedback(self, arm: str, correct: bool) -> None:
        """Count a feedback and update the arm's EM gauge."""
        self.feedback.labels(arm=arm, correct=str(bool(correct)).lower()).inc()
        right, total = self._feedback_counts.setdefault(arm, [0, 0])
        self._feedback_counts[arm] = [right + int(correct), total + 1]
        self.em.labels(arm=arm).set((right + int(correct)) / (total + 1))
