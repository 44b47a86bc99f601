"""The Prometheus files for a Ray cluster: the scrape config is valid, the Ray alert rules pass their unit tests,
and they name the actor class the executor really creates.

Ray's metrics agent needs `ray[default]`, which the test install leaves out (`cluster` brings plain `ray`), so the
series names and labels the rules use were read from a real Ray 2.60 export by hand (README, "Running on a Ray
cluster"); here promtool checks the files against synthetic series.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from opshelpers import find_tool

from daemon.rayactor import GeneratorActor

PROMETHEUS = Path(__file__).resolve().parents[2] / "config" / "prometheus"


def test_ray_scrape_config_is_valid() -> None:
    promtool = find_tool("promtool")
    check = subprocess.run(
        [promtool, "check", "config", "ray-scrape.yml"], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    jobs = {job["job_name"] for job in yaml.safe_load((PROMETHEUS / "ray-scrape.yml").read_text())["scrape_configs"]}
    assert jobs == {"i2vd", "ray"}


def test_ray_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = find_tool("promtool")
    rules, tests = PROMETHEUS / "ray-alerts.yml", PROMETHEUS / "ray-alerts.test.yml"
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    groups = yaml.safe_load(rules.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    assert alerts == set(re.findall(r"alertname: (\w+)", tests.read_text()))
    assert f'Name="{GeneratorActor.__name__}"' in rules.read_text(), "Ray labels actors with their class name"
