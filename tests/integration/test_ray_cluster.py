"""Node loss on a multi-node Ray: the node running a job's actor dies mid-job; the job finishes on another node.

There is one machine here, so the cluster is `ray.cluster_utils.Cluster`: a head node without GPUs and two worker
nodes with one logical GPU each, every node its own raylet process tree, as on separate hosts. Removing a node
without grace kills its raylet and its workers, as a power loss would; the head notices through missed health
checks (shortened here from Ray's defaults of about 30 s to a few seconds) and Ray restarts the actor on the other
node. The job goes through the real `Worker` and store, so the retry is the worker's own policy.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from raysupport import FakeFactory, Harness, ray_auth_env, share_with_ray

from daemon.config import RayConfig
from daemon.rayconnect import connect, disconnect
from daemon.raygen import RayGenerator

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 4,
}


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    for key, value in ray_auth_env().items():
        monkeypatch.setenv(key, value)
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "_system_config": FAST_HEALTH_CHECKS},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        connect(RayConfig(address=cluster.address, namespace="i2vd-cluster-test"))
        share_with_ray()
        yield cluster
    finally:
        disconnect()
        cluster.shutdown()


def test_a_job_whose_node_dies_finishes_on_another_node(
    cluster: object, tmp_path: Path, make_image: Callable[..., Path]
) -> None:
    factory = FakeFactory(tmp_path / "loads.txt", step_seconds=0.25)
    generator = RayGenerator("node-loss", factory, max_restarts=2, poll_seconds=0.05)
    first = generator.state()
    harness = Harness(tmp_path, generator, steps=24)
    job = harness.claim(make_image, "node", "prompt: outlive a node\nvariants: []\n")

    outcomes: list[str] = []
    runner = threading.Thread(target=lambda: outcomes.extend(harness.run_until_settled(job)))
    runner.start()
    while harness.worker.progress is None or harness.worker.progress[0] < 3:
        assert runner.is_alive(), outcomes
        time.sleep(0.05)
    [victim] = [node for node in cluster.list_all_nodes() if node.node_id == first.node_id]  # type: ignore[attr-defined]
    killed = time.monotonic()
    cluster.remove_node(victim, allow_graceful=False)  # type: ignore[attr-defined]
    runner.join(timeout=240)
    recovered = time.monotonic() - killed

    assert outcomes == ["retried", "succeeded"], outcomes
    [manifest] = [json.loads(path.read_text()) for path in harness.config.outbox.glob("video_*.json")]
    assert manifest["attempts"] == 2
    second = generator.state()
    assert second.node_id != first.node_id and second.gpu_ids == ("0",)
    assert factory.loads() == [first.pid, second.pid]
    print(f"node killed at step 3; job published {recovered:.1f} s later")
