"""The shipped Prometheus rules: promtool checks and unit-tests them, and a real Prometheus that
scrapes a real ``tokenopt serve`` on loopback records them."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving import free_port, stop

from tokenopt.demo.suite import SuiteConfig, generate_suite

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "docs" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "docs" / "prometheus" / "rules_test.yml"
QUESTIONS = [item["question"] for item in generate_suite(SuiteConfig(n_queries=20, seed=29))]


def _binary(name: str) -> str:
    """The path of ``name``; a skip where it is missing, a failure in CI (which installs it)."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (Debian: apt-get install prometheus; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set: CI must run these tests")
        pytest.skip(reason)
    return path


def test_the_rules_pass_promtool_check_and_their_unit_tests():
    promtool = _binary("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS" in check.stdout + check.stderr, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", str(RULES_TEST)], capture_output=True, text=True, timeout=120)
    assert test.returncode == 0 and "SUCCESS" in test.stdout + test.stderr, test.stdout + test.stderr


def test_promtool_catches_a_rule_that_does_not_hold(tmp_path):
    # The unit tests can fail: with the over-spend threshold raised to 1.5, the 1.2 over-spend no longer fires.
    promtool = _binary("promtool")
    (tmp_path / "rules.yml").write_text(RULES.read_text().replace("ratio_rate5m > 1.1", "ratio_rate5m > 1.5"))
    (tmp_path / "rules_test.yml").write_text(RULES_TEST.read_text())
    test = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "rules_test.yml")], capture_output=True, text=True, timeout=120
    )
    assert test.returncode != 0 and "TokenoptSpendOverTarget" in test.stdout + test.stderr


@contextlib.contextmanager
def _process(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            stop(process)


def _wait_until(check, what: str, process: subprocess.Popen[bytes], log: Path, seconds: float = 90.0):
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(httpx.TransportError):
            value = check()
            if value:
                return value
        assert process.poll() is None, f"{what}: the process exited:\n{log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.5)


def test_prometheus_scrapes_a_budgeted_server_and_records_the_rules(tmp_path, conditioned_policy):
    prometheus = _binary("prometheus")
    server_port, prometheus_port = free_port(), free_port()
    serve = [
        sys.executable, "-m", "tokenopt.cli", "serve", "--policy", str(conditioned_policy), "--port", str(server_port),
        "--log", str(tmp_path / "decisions.sqlite"), "--device", "cpu", "--token-budget", "36k/min", "--replicas", "3",
    ]  # fmt: skip
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: tokenopt\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server_port}']\n"
    )
    server_log, prometheus_log = tmp_path / "serve.log", tmp_path / "prometheus.log"
    url, api = f"http://127.0.0.1:{server_port}", f"http://127.0.0.1:{prometheus_port}/api/v1/query"

    def query(expression: str) -> dict[str, float]:
        body = httpx.get(api, params={"query": expression}, timeout=5).json()
        assert body["status"] == "success", body
        return {sample["metric"].get("arm", ""): float(sample["value"][1]) for sample in body["data"]["result"]}

    with _process(serve, server_log) as server:
        _wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, "the server", server, server_log)
        command = [
            prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ]  # fmt: skip
        with _process(command, prometheus_log) as scraper:
            # The recorded fleet budget: this replica's share of 36k/min over 3 replicas, 200 tokens/s.
            target = _wait_until(
                lambda: query("arm:tokenopt_spend_target_tokens_per_second:sum"), "a recorded series", scraper,
                prometheus_log,
            )  # fmt: skip
            assert target == {"A": pytest.approx(200.0)}

            def spend_recorded() -> dict[str, float]:
                for question in QUESTIONS[:3]:  # traffic, so that the billed-token counter moves between scrapes
                    httpx.post(f"{url}/v1/completions", json={"prompt": question}, timeout=60).raise_for_status()
                ratio = query("arm:tokenopt_spend_over_target:ratio_rate5m")
                return ratio if ratio.get("A", 0.0) > 0 else {}

            _wait_until(spend_recorded, "the recorded spend", scraper, prometheus_log)
            # The ratio is the recorded spend over the recorded budget (both evaluated by Prometheus).
            agreement = query("arm:tokenopt_spend_over_target:ratio_rate5m / (arm:tokenopt_billed_tokens:rate5m / 200)")
            assert agreement == {"A": pytest.approx(1.0, rel=0.05)}
