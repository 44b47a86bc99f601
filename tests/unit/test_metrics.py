"""The exporter: names, zero-initialised labels, device memory at scrape time, /healthz codes, loopback binding."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import OUTCOMES, STAGES, DaemonMetrics, MetricsServer


def scrape(metrics: DaemonMetrics) -> dict[str, float]:
    from prometheus_client import generate_latest

    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_every_label_set_starts_at_zero() -> None:
    samples = scrape(DaemonMetrics())
    for outcome in OUTCOMES:
        assert samples[f"i2vd_jobs_total{{outcome={outcome}}}"] == 0
    for stage in STAGES:
        assert samples[f"i2vd_stage_duration_seconds_count{{stage={stage}}}"] == 0
    assert samples["i2vd_queue_depth{}"] == 0
    assert samples["i2vd_frames_generated_total{}"] == 0
    assert samples["i2vd_model_load_seconds{}"] == 0
    assert samples["i2vd_gpu_memory_bytes{device=cpu,kind=allocated}"] == 0
    assert samples["i2vd_job_duration_seconds_bucket{le=3600.0}"] == 0


def test_device_memory_is_read_at_scrape_time() -> None:
    metrics = DaemonMetrics()
    reading = {"allocated": 5, "reserved": 8, "total": 80, "free": 70}
    metrics.watch_device_memory("cuda:0", lambda: reading)
    samples = scrape(metrics)
    assert samples["i2vd_gpu_memory_bytes{device=cuda:0,kind=reserved}"] == 8
    reading["allocated"] = 6
    assert scrape(metrics)["i2vd_gpu_memory_bytes{device=cuda:0,kind=allocated}"] == 6


def test_watcher_mode_is_one_hot() -> None:
    metrics = DaemonMetrics()
    metrics.set_watcher_mode("polling")
    samples = scrape(metrics)
    assert samples["i2vd_watcher_mode{mode=polling}"] == 1
    assert samples["i2vd_watcher_mode{mode=inotify}"] == 0


def test_server_on_loopback_serves_metrics_and_health() -> None:
    metrics = DaemonMetrics()
    health = {"watcher": True, "worker": True, "model": True}
    server = MetricsServer(metrics, lambda: health, "127.0.0.1", 0)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            assert b"i2vd_jobs_total" in response.read()
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
            assert response.status == 200
            assert json.loads(response.read())["healthy"] is True
        health["model"] = False
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
            raise AssertionError("unhealthy must not answer 200")
        except urllib.error.HTTPError as error:
            assert error.code == 503
            assert json.loads(error.read())["parts"]["model"] is False
    finally:
        server.stop()
    assert not server.is_alive()


def test_component_up_follows_the_health_source_and_new_outcomes_start_at_zero() -> None:
    metrics = DaemonMetrics()
    samples = scrape(metrics)
    assert samples["i2vd_component_up{component=worker}"] == 0  # no health source yet: nothing is up
    assert samples["i2vd_jobs_total{outcome=cancelled}"] == 0
    assert samples["i2vd_jobs_total{outcome=degraded}"] == 0
    assert samples["i2vd_queue_paused{}"] == 0
    parts = {"watcher": True, "intake": True, "worker": False, "model": True}
    metrics.watch_health(lambda: parts)
    samples = scrape(metrics)
    assert samples["i2vd_component_up{component=worker}"] == 0
    assert samples["i2vd_component_up{component=model}"] == 1
