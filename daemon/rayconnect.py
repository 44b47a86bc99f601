"""Joining (or starting) the Ray cluster that runs the `ray` executor's generator actors.

Ray is an optional dependency (`pip install "i2vd[cluster]"`): this module imports it inside `connect`, so the core
install never needs it. The daemon process is the Ray driver and the only claimer of jobs; the cluster only runs
generator actors (see `daemon.raygen`).

Defaults keep Ray quiet. A local Ray (no `address`) starts no dashboard (its port would be the one HTTP door), and
actor output goes to Ray's own log files (`/tmp/ray/session_latest/logs/worker-*.out`), not to the daemon's stderr,
whose lines must stay JSON. Ray's internal gRPC ports (GCS, raylet, workers) listen on every interface whatever
`ray.init` is told (Ray resolves 127.0.0.1 to the node's address, measured with Ray 2.60); they are guarded by
Ray's token authentication, which Ray 2.60 turns on for a local Ray (token in `~/.ray/auth_token`, or
`RAY_AUTH_TOKEN`), and by the host firewall. On a real cluster the nodes were started by `ray start` (README,
"Running on a Ray cluster"), which decides their ports, authentication, dashboard and metrics export.
"""

from __future__ import annotations

import logging
from typing import Any

from daemon.config import RayConfig

LOOPBACK = "127.0.0.1"


def connect(config: RayConfig, **overrides: Any) -> bool:
    """Connect this process to Ray as a driver in `config.namespace`; return False if it already was.

    Contract: call once, before the first `make_ray_generator_factories(...)` factory is called, from the thread that
    starts the service. `config.address` None starts a private local Ray on this host (logical resources as
    detected; `overrides` such as `num_gpus=2` or `object_store_memory=...` go to `ray.init` as they are, for tests
    and single-host trials); `"auto"` joins the cluster a `ray start` on this host belongs to; `"host:6379"` joins
    that head node. A process already connected is left as it is (Ray allows one connection per process). Raises
    whatever `ray.init` raises (e.g. `ConnectionError` when no head answers): the service treats that as fatal.
    """
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {
        "address": config.address,
        "namespace": config.namespace,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
    }
    if config.address is None:
        options.update(include_dashboard=False, dashboard_host=LOOPBACK)
    options.update(overrides)
    ray.init(**options)
    return True


def disconnect() -> None:
    """Leave the cluster (a local Ray started by `connect` stops). Detached actors of a real cluster live on."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
