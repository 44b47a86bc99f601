"""Acceptance: the daemon's /metrics against the real Prometheus tools.

`promtool check metrics` lints the exposition of a running `i2vd run`; a real Prometheus (loopback, random port,
tmp storage, 1 s scrape) scrapes it while it processes jobs; its HTTP API must then return the counters and
histograms, the accounting identity, every PromQL expression of the shipped Grafana dashboard (non-empty), and the
alert rules loaded and healthy. The alert rules also pass `promtool check rules` and their unit tests.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from opshelpers import JOB_SECONDS, OpsDaemon, drop_pair, find_tool, free_port

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "config" / "grafana" / "i2vd-dashboard.json"
ALERTS = REPO / "config" / "prometheus" / "i2vd-alerts.yml"
VARIABLES = {"$__rate_interval": "30s", "$instance": ".*", "$job": ".*"}


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def wait_value(self, expr: str, expected: float, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            result = self.query(expr)
            last = result
            if len(result) == 1 and float(result[0]["value"][1]) == expected:
                return
            time.sleep(0.5)
        raise AssertionError(f"{expr} never became {expected}: {last}")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    binary = find_tool("prometheus")
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []

    def start(target_port: int) -> Prometheus:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "i2vd", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        logs.append(log)
        command = [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return Prometheus(base)
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"prometheus did not become ready: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)
    for log in logs:
        log.close()


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    resolved = []
    for expr in expressions:
        for name, value in VARIABLES.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"unknown dashboard variable in {expr}"
        resolved.append(expr)
    return resolved


def test_real_prometheus_scrapes_jobs_histograms_dashboard_and_rules(
    ops_daemon: Callable[..., OpsDaemon], prometheus: Callable[[int], Prometheus]
) -> None:
    promtool = find_tool("promtool")
    port = free_port()
    daemon = ops_daemon(port=port)
    prom = prometheus(port)
    daemon.wait_for_event("service_ready")
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=daemon.metrics_text(), capture_output=True, text=True, timeout=30
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    drop_pair(daemon.inbox, "one", "prompt: first\nvariants: []\n")
    drop_pair(daemon.inbox, "two", "prompt: second\nvariants: [first_frame]\n")
    drop_pair(daemon.inbox, "bad", "prompt: x\nstrength: 2\n")
    daemon.wait_for(
        lambda: sum(e.get("outcome") == "succeeded" for e in daemon.events() if e.get("event") == "job_finished") == 2,
        JOB_SECONDS,
        "two finished jobs",
    )

    prom.wait_value('i2vd_jobs_total{outcome="succeeded"}', 2)
    prom.wait_value('i2vd_jobs_total{outcome="rejected"}', 1)
    assert prom.value("i2vd_jobs_received_total") == 3
    identity = (
        'i2vd_jobs_received_total - on() (sum(i2vd_jobs_total{outcome=~"succeeded|failed|rejected|cancelled"})'
        " + on() i2vd_jobs_in_progress + on() i2vd_jobs_pending)"
    )
    assert prom.value(identity) == 0
    assert prom.value("i2vd_job_duration_seconds_count") == 2
    assert prom.value('i2vd_stage_duration_seconds_count{stage="generate"}') == 2
    assert prom.value('i2vd_job_duration_seconds_bucket{le="3600.0"}') == 2
    assert prom.value("i2vd_denoise_step_seconds_count") == 4
    assert prom.value("i2vd_frames_generated_total") == 16
    assert prom.value("i2vd_watcher_up") == 1
    assert prom.value('up{job="i2vd"}') == 1
    assert prom.value('i2vd_build_info{model="embedded-tiny"}') == 1
    time.sleep(2.5)  # a few more scrapes, so every rate() window holds two samples after the jobs

    empty = []
    for expr in dashboard_expressions():
        if not prom.query(expr):
            empty.append(expr)
    assert not empty, f"dashboard expressions without data: {empty}"

    groups = prom.api("rules")["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert len(rules) == 6 and all(rule["health"] == "ok" for rule in rules.values()), rules
    assert daemon.stop() == 0


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = find_tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = ALERTS.with_name("i2vd-alerts.test.yml")
    run = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    alerts = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    tested = set(re.findall(r"alertname: (\w+)", tests.read_text()))
    assert alerts == tested, f"alerts without a promtool unit test: {alerts - tested}"


def test_dashboard_is_importable_json_with_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("throughput", "queue", "outcome", "latency", "step", "memory", "oom", "model", "watcher"):
        assert topic in titles, topic
